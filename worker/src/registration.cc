#include "registration.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace fdbroker::worker {
namespace {

// A full listen backlog makes a non-blocking AF_UNIX connect fail with
// EAGAIN (it cannot be polled for): retry at this pace until the deadline.
constexpr absl::Duration kBacklogRetry = absl::Milliseconds(10);

// §1: the process serving the hand-off socket must run under our effective
// uid or root. A broker of another uid could be anyone's (a socket planted
// at the path, say under /tmp, by another user): it would get our clients,
// and every released socket with its unread bytes. The broker admits only
// its own uid, so this refuses no working set-up.
absl::Status CheckBrokerUid(int fd, const std::string& path) {
  ucred peer{};
  socklen_t size = sizeof(peer);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("SO_PEERCRED on ", path));
  }
  const uid_t own = ::geteuid();
  if (peer.uid == own || peer.uid == 0) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat("the hand-off socket at ", path, " is served by uid ",
                   peer.uid, " (pid ", peer.pid, "), not by this worker's uid ",
                   own, " or root: refusing to register"));
}

absl::StatusOr<wire::UniqueFd> ConnectSocket(const std::string& path,
                                             absl::Time deadline) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "broker socket path is too long (", path.size(),
        " bytes, the limit is ", sizeof(address.sun_path) - 1, "): ", path));
  }
  std::memcpy(address.sun_path, path.data(), path.size());
  wire::UniqueFd fd(
      ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return absl::ErrnoToStatus(errno, "socket(AF_UNIX, SEQPACKET)");
  for (;;) {
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address),
                  sizeof(address)) == 0) {
      if (absl::Status trusted = CheckBrokerUid(fd.get(), path);
          !trusted.ok()) {
        return trusted;
      }
      return fd;
    }
    const int error = errno;
    if (error == EINTR) continue;
    if (error == EAGAIN && absl::Now() + kBacklogRetry < deadline) {
      absl::SleepFor(kBacklogRetry);
      continue;
    }
    return absl::UnavailableError(absl::StrCat(
        "cannot connect to the broker at ", path, ": ", std::strerror(error)));
  }
}

}  // namespace

absl::StatusOr<std::string> ResolveSocketPath(const std::string& configured) {
  if (!configured.empty()) return configured;
  const char* from_env = std::getenv(wire::kSocketEnvVar);
  if (from_env != nullptr && from_env[0] != '\0') return std::string(from_env);
  return absl::InvalidArgumentError(
      absl::StrCat("no broker socket path: set it explicitly or through the ",
                   wire::kSocketEnvVar, " environment variable"));
}

absl::Status RefusalToStatus(const v1::Refusal& refusal) {
  const std::string text = absl::StrCat(
      "the broker refused to register this worker (",
      v1::RefusalReason_Name(refusal.reason()), "): ", refusal.message());
  switch (refusal.reason()) {
    case v1::REFUSAL_REASON_CREDENTIALS:
      return absl::PermissionDeniedError(text);
    case v1::REFUSAL_REASON_TOO_MANY_WORKERS:
      return absl::ResourceExhaustedError(text);
    case v1::REFUSAL_REASON_SHUTTING_DOWN:
      return absl::UnavailableError(text);
    case v1::REFUSAL_REASON_BAD_HELLO:
      return absl::InvalidArgumentError(text);
    default:
      return absl::FailedPreconditionError(text);
  }
}

absl::StatusOr<std::unique_ptr<wire::MessageChannel>> SendHello(
    const std::string& socket_path, v1::HandoffMessage& hello,
    absl::Time connect_deadline, wire::SysCalls& sys, int attached_fd) {
  absl::StatusOr<wire::UniqueFd> socket =
      ConnectSocket(socket_path, connect_deadline);
  if (!socket.ok()) return socket.status();
  auto channel =
      std::make_unique<wire::MessageChannel>(*std::move(socket), sys);
  // A fresh socket's send buffer is empty, so Hello cannot meet EAGAIN.
  absl::StatusOr<wire::SendResult> sent = channel->Send(hello, attached_fd);
  if (!sent.ok() || *sent != wire::SendResult::kSent) {
    return absl::UnavailableError(absl::StrCat(
        "cannot send Hello to the broker at ", socket_path, ": ",
        sent.ok() ? "socket buffer full" : sent.status().ToString()));
  }
  return channel;
}

absl::StatusOr<v1::Welcome> WelcomeFrom(const std::string& socket_path,
                                        const v1::HandoffMessage& reply) {
  switch (reply.body_case()) {
    case v1::HandoffMessage::kWelcome:
      break;
    case v1::HandoffMessage::kRefusal:
      return RefusalToStatus(reply.refusal());
    default:
      return absl::UnavailableError(
          absl::StrCat("the broker at ", socket_path, " answered Hello with ",
                       wire::BodyName(reply), " instead of Welcome"));
  }
  const v1::Welcome& welcome = reply.welcome();
  if (welcome.has_version() &&
      welcome.version().major() != wire::kProtocolMajor) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the broker at ", socket_path, " speaks protocol ",
        welcome.version().major(), ".", welcome.version().minor(),
        ", this worker ", wire::kProtocolMajor, ".", wire::kProtocolMinor));
  }
  return welcome;
}

absl::StatusOr<Registration> Register(const std::string& socket_path,
                                      v1::HandoffMessage hello,
                                      absl::Duration timeout,
                                      wire::SysCalls& sys) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<std::unique_ptr<wire::MessageChannel>> sent =
      SendHello(socket_path, hello, deadline, sys);
  if (!sent.ok()) return sent.status();
  std::unique_ptr<wire::MessageChannel> channel = *std::move(sent);

  v1::HandoffMessage reply;
  wire::UniqueFd unexpected_fd;
  for (;;) {
    absl::StatusOr<wire::ReceiveResult> received =
        channel->Receive(reply, unexpected_fd);
    if (!received.ok()) {
      return absl::UnavailableError(
          absl::StrCat("bad answer to Hello from the broker at ", socket_path,
                       ": ", received.status().message()));
    }
    if (*received == wire::ReceiveResult::kPeerClosed) {
      return absl::UnavailableError(absl::StrCat(
          "the broker at ", socket_path, " closed the channel before Welcome"));
    }
    if (*received == wire::ReceiveResult::kReceived) break;
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(
          absl::StrCat("no Welcome from the broker at ", socket_path,
                       " within ", absl::FormatDuration(timeout)));
    }
    pollfd waiting{channel->fd(), POLLIN, 0};
    const int wait_ms = static_cast<int>(
        absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))));
    if (::poll(&waiting, 1, wait_ms) < 0 && errno != EINTR) {
      return absl::ErrnoToStatus(errno, "poll");
    }
  }

  absl::StatusOr<v1::Welcome> welcome = WelcomeFrom(socket_path, reply);
  if (!welcome.ok()) return welcome.status();
  Registration registration;
  registration.channel = std::move(channel);
  registration.welcome = *std::move(welcome);
  return registration;
}

}  // namespace fdbroker::worker
