#include "broker/upgrade.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/message_channel.h"

namespace fdbroker {

absl::StatusOr<UpgradeSockets> RequestUpgrade(const std::string& socket_path,
                                              absl::Duration timeout) {
  wire::UniqueFd socket(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!socket) return absl::ErrnoToStatus(errno, "socket");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError("--socket path too long");
  }
  std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());
  if (::connect(socket.get(), reinterpret_cast<sockaddr*>(&addr),
                sizeof(addr)) != 0) {
    return absl::ErrnoToStatus(
        errno, absl::StrCat("--upgrade: no running broker on ", socket_path));
  }
  wire::MessageChannel channel(std::move(socket));
  v1::HandoffMessage request;
  request.mutable_upgrade_request()->mutable_version()->set_major(
      wire::kProtocolMajor);
  request.mutable_upgrade_request()->mutable_version()->set_minor(
      wire::kProtocolMinor);
  request.mutable_upgrade_request()->set_pid(::getpid());
  absl::StatusOr<wire::SendResult> sent = channel.Send(request);
  if (!sent.ok()) return sent.status();

  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    v1::HandoffMessage reply;
    std::vector<wire::UniqueFd> fds;
    absl::StatusOr<wire::ReceiveResult> received = channel.Receive(reply, fds);
    if (!received.ok()) return received.status();
    if (*received == wire::ReceiveResult::kPeerClosed) {
      return absl::UnavailableError(
          "--upgrade: the running broker closed the channel");
    }
    if (*received == wire::ReceiveResult::kReceived) {
      if (reply.has_refusal()) {
        return absl::FailedPreconditionError(
            absl::StrCat("--upgrade refused: ", reply.refusal().message()));
      }
      if (reply.has_upgrade_handover()) {
        // [0] the first listener, [1] the hand-off socket, then the
        // further listeners (the channel checked the count).
        UpgradeSockets sockets;
        sockets.handoff = std::move(fds[1]);
        sockets.listeners.push_back(std::move(fds[0]));
        for (size_t i = 2; i < fds.size(); ++i) {
          sockets.listeners.push_back(std::move(fds[i]));
        }
        return sockets;
      }
      continue;  // Heartbeats and the like: keep waiting.
    }
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left <= 0) {
      return absl::DeadlineExceededError(
          "--upgrade: the running broker did not hand over in time");
    }
    pollfd p{channel.fd(), POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(left));
  }
}

absl::StatusOr<std::vector<wire::UniqueFd>> TakeActivatedListeners() {
  std::vector<wire::UniqueFd> fds;
  const char* pid_text = std::getenv("LISTEN_PID");
  const char* fds_text = std::getenv("LISTEN_FDS");
  if (pid_text == nullptr || fds_text == nullptr) return fds;
  int pid = 0, count = 0;
  const bool for_us = absl::SimpleAtoi(pid_text, &pid) && pid == ::getpid();
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  if (!for_us) return fds;
  // 253: the most fds an upgrade can hand over in one packet.
  if (!absl::SimpleAtoi(fds_text, &count) || count < 1 || count > 252) {
    return absl::InvalidArgumentError(
        absl::StrCat("LISTEN_FDS=", fds_text, ": expected 1 to 252"));
  }
  constexpr int kFirstActivatedFd = 3;  // SD_LISTEN_FDS_START.
  for (int i = 0; i < count; ++i) fds.emplace_back(kFirstActivatedFd + i);
  return fds;
}

}  // namespace fdbroker
