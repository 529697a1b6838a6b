#include "tests/worker/raw_http.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <functional>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace fdbroker::testing {

absl::Status SendAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::ErrnoToStatus(errno, "send");
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

namespace {

// Reads until `done(out)` holds (then returns out) or the peer closes (then
// returns out if `close_ok`, else Unavailable).
absl::StatusOr<std::string> ReadUntil(
    int fd, absl::Duration timeout,
    const std::function<bool(const std::string&)>& done, bool close_ok) {
  const absl::Time deadline = absl::Now() + timeout;
  std::string out;
  char buffer[16 * 1024];
  for (;;) {
    if (done(out)) return out;
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(
          absl::StrCat("connection still open; received so far: ", out));
    }
    pollfd p{fd, POLLIN, 0};
    const int ready = ::poll(&p, 1,
                             static_cast<int>(absl::ToInt64Milliseconds(
                                 absl::Ceil(left, absl::Milliseconds(1)))));
    if (ready < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "poll");
    if (ready <= 0) continue;
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n > 0) {
      out.append(buffer, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) {
      if (close_ok || done(out)) return out;
      return absl::UnavailableError(
          absl::StrCat("connection closed; received before: ", out));
    }
    if (errno == EAGAIN || errno == EINTR) continue;
    if (errno == ECONNRESET) {
      return absl::UnavailableError(
          absl::StrCat("connection reset; received before: ", out));
    }
    return absl::ErrnoToStatus(errno, "recv");
  }
}

}  // namespace

absl::StatusOr<std::string> ReadUntilClose(int fd, absl::Duration timeout) {
  return ReadUntil(
      fd, timeout, [](const std::string&) { return false; },
      /*close_ok=*/true);
}

absl::StatusOr<std::string> ReadUntilContains(int fd, absl::string_view needle,
                                              absl::Duration timeout) {
  return ReadUntil(
      fd, timeout,
      [needle](const std::string& out) {
        return absl::StrContains(out, needle);
      },
      /*close_ok=*/false);
}

std::vector<int> ResponseStatuses(absl::string_view stream) {
  std::vector<int> statuses;
  size_t pos = 0;
  while ((pos = stream.find("HTTP/1.1 ", pos)) != absl::string_view::npos) {
    int status;
    if (absl::SimpleAtoi(stream.substr(pos + 9, 3), &status)) {
      statuses.push_back(status);
    }
    pos += 9;
  }
  return statuses;
}

absl::StatusOr<TcpPair> MakeTcpPair() {
  wire::UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listener) return absl::ErrnoToStatus(errno, "socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t size = sizeof(address);
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&address), size) !=
          0 ||
      ::listen(listener.get(), 1) != 0 ||
      ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&address),
                    &size) != 0) {
    return absl::ErrnoToStatus(errno, "loopback listener");
  }
  TcpPair pair;
  pair.client.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(pair.client.get(), reinterpret_cast<sockaddr*>(&address),
                size) != 0) {
    return absl::ErrnoToStatus(errno, "connect");
  }
  pair.server.Reset(::accept4(listener.get(), nullptr, nullptr,
                              SOCK_CLOEXEC | SOCK_NONBLOCK));
  if (!pair.server) return absl::ErrnoToStatus(errno, "accept4");
  return pair;
}

}  // namespace fdbroker::testing
