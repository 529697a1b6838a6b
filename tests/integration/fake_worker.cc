// A deliberately misbehaving worker for fault tests, speaking the hand-off
// protocol directly through the wire library (no SDK, so nothing is handled
// for it). Registers with the broker at $FDBROKER_SOCKET, then:
//   --mode=die_before_ack  exits (code 1) on the first Connection, without
//                          acking or touching the socket;
//   --mode=stall           never reads its channel again after Welcome.
// Prints "registered" on stdout once welcomed.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "fdbroker/v1/handoff.pb.h"
#include "wire/message_channel.h"

namespace {

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "fake_worker: %s\n", why.c_str());
  std::exit(3);
}

fdbroker::v1::HandoffMessage Next(fdbroker::wire::MessageChannel& channel,
                                  fdbroker::wire::UniqueFd& fd) {
  for (;;) {
    fdbroker::v1::HandoffMessage message;
    absl::StatusOr<fdbroker::wire::ReceiveResult> r =
        channel.Receive(message, fd);
    if (!r.ok()) Fail(std::string(r.status().message()));
    if (*r == fdbroker::wire::ReceiveResult::kPeerClosed) Fail("broker gone");
    if (*r == fdbroker::wire::ReceiveResult::kReceived) return message;
    pollfd p{channel.fd(), POLLIN, 0};
    ::poll(&p, 1, -1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--mode=", 7) == 0) mode = argv[i] + 7;
  }
  if (mode != "die_before_ack" && mode != "stall") Fail("unknown --mode");
  const char* path = std::getenv("FDBROKER_SOCKET");
  if (path == nullptr) Fail("FDBROKER_SOCKET not set");
  fdbroker::wire::UniqueFd socket(
      ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
  if (::connect(socket.get(), reinterpret_cast<sockaddr*>(&addr),
                sizeof(addr)) != 0) {
    Fail("connect");
  }
  fdbroker::wire::MessageChannel channel(std::move(socket));
  fdbroker::v1::HandoffMessage hello;
  hello.mutable_hello()->mutable_version()->set_major(1);
  hello.mutable_hello()->set_pid(::getpid());
  (*hello.mutable_hello()->mutable_labels())["kind"] = "fake-" + mode;
  if (!channel.Send(hello).ok()) Fail("send hello");
  fdbroker::wire::UniqueFd fd;
  fdbroker::v1::HandoffMessage welcome = Next(channel, fd);
  if (welcome.body_case() != fdbroker::v1::HandoffMessage::kWelcome) {
    Fail("not welcomed");
  }
  std::printf("registered\n");
  std::fflush(stdout);
  if (mode == "stall") {
    for (;;) ::pause();
  }
  for (;;) {
    fdbroker::v1::HandoffMessage message = Next(channel, fd);
    if (message.body_case() == fdbroker::v1::HandoffMessage::kConnection) {
      // Die holding the fd, never acking: the broker must re-place it.
      std::_Exit(1);
    }
  }
}
