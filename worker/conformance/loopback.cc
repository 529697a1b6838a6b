#include "loopback.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace fdbroker::conformance {
namespace {

std::string Format(const sockaddr_in& address) {
  char ip[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &address.sin_addr, ip, sizeof(ip));
  return absl::StrCat(ip, ":", ntohs(address.sin_port));
}

bool WaitReadable(int fd, absl::Time deadline) {
  for (;;) {
    const absl::Duration left = deadline - absl::Now();
    const int ms = left <= absl::ZeroDuration()
                       ? 0
                       : static_cast<int>(absl::ToInt64Milliseconds(
                             absl::Ceil(left, absl::Milliseconds(1))));
    pollfd p{fd, POLLIN, 0};
    const int n = ::poll(&p, 1, ms);
    if (n > 0) return true;
    if (n == 0 || errno != EINTR) return false;
  }
}

absl::StatusOr<std::string> Read(int fd, absl::Time deadline, int flags) {
  if (!WaitReadable(fd, deadline)) {
    return absl::DeadlineExceededError("nothing to read");
  }
  char buffer[65536];
  const ssize_t n = ::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT | flags);
  if (n < 0) {
    if (errno == ECONNRESET) return std::string();
    return absl::ErrnoToStatus(errno, "recv");
  }
  return std::string(buffer, static_cast<size_t>(n));
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoopbackListener>> LoopbackListener::Create() {
  wire::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return absl::ErrnoToStatus(errno, "socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&address),
             sizeof(address)) != 0 ||
      ::listen(fd.get(), 64) != 0) {
    return absl::ErrnoToStatus(errno, "bind/listen 127.0.0.1:0");
  }
  return std::unique_ptr<LoopbackListener>(new LoopbackListener(std::move(fd)));
}

absl::StatusOr<wire::UniqueFd> LoopbackListener::ConnectClient() {
  sockaddr_in address{};
  socklen_t length = sizeof(address);
  if (::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&address),
                    &length) != 0) {
    return absl::ErrnoToStatus(errno, "getsockname");
  }
  wire::UniqueFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!client) return absl::ErrnoToStatus(errno, "socket");
  if (::connect(client.get(), reinterpret_cast<sockaddr*>(&address),
                sizeof(address)) != 0) {
    return absl::ErrnoToStatus(errno, "connect");
  }
  return client;
}

absl::StatusOr<TcpPair> LoopbackListener::Connect() {
  TcpPair pair;
  absl::StatusOr<wire::UniqueFd> client = ConnectClient();
  if (!client.ok()) return client.status();
  pair.client = *std::move(client);
  // Blocking, like the broker's hand-off: the worker picks its own mode.
  pair.server.Reset(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!pair.server) return absl::ErrnoToStatus(errno, "accept4");
  pair.peer_address = PeerAddress(pair.server.get());
  pair.local_address = LocalAddress(pair.server.get());
  return pair;
}

std::string LocalAddress(int fd) {
  sockaddr_in address{};
  socklen_t length = sizeof(address);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return "?";
  }
  return Format(address);
}

std::string PeerAddress(int fd) {
  sockaddr_in address{};
  socklen_t length = sizeof(address);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return "?";
  }
  return Format(address);
}

absl::StatusOr<std::string> ReadSome(int fd, absl::Time deadline) {
  return Read(fd, deadline, 0);
}

absl::StatusOr<std::string> PeekSome(int fd, absl::Time deadline) {
  return Read(fd, deadline, MSG_PEEK);
}

bool ReadsEof(int fd, absl::Time deadline) {
  for (;;) {
    absl::StatusOr<std::string> data = ReadSome(fd, deadline);
    if (!data.ok()) return false;
    if (data->empty()) return true;
  }
}

bool NothingReadable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 0;
}

absl::Status WriteAll(int fd, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n =
        ::send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, "send");
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace fdbroker::conformance
