#ifndef FDBROKER_TESTS_INTEGRATION_LINE_CLIENT_H_
#define FDBROKER_TESTS_INTEGRATION_LINE_CLIENT_H_

#include <poll.h>
#include <sys/socket.h>

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/util/test_util.h"
#include "wire/unique_fd.h"

namespace fdbroker::testing {

// One keep-alive client of the line server.
class LineClient {
 public:
  static absl::StatusOr<LineClient> Connect(int port) {
    absl::StatusOr<wire::UniqueFd> fd = ConnectTcp("127.0.0.1", port);
    if (!fd.ok()) return fd.status();
    return LineClient(*std::move(fd));
  }

  absl::Status Send(const std::string& bytes) {
    if (::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) !=
        static_cast<ssize_t>(bytes.size())) {
      return absl::UnavailableError("send failed");
    }
    return absl::OkStatus();
  }

  // The next answered line: "<pid> <line>".
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    size_t end;
    while ((end = buffer_.find('\n')) == std::string::npos) {
      const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left <= 0) return absl::DeadlineExceededError("no answer in time");
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
      char buf[512];
      const ssize_t n = ::recv(fd_.get(), buf, sizeof(buf), 0);
      if (n <= 0) return absl::UnavailableError("connection closed");
      buffer_.append(buf, static_cast<size_t>(n));
    }
    std::string line = buffer_.substr(0, end);
    buffer_.erase(0, end + 1);
    return line;
  }

  // Sends `line` and returns the pid of the worker that answered it.
  absl::StatusOr<int> Ask(const std::string& line,
                          absl::Duration timeout = absl::Seconds(10)) {
    if (absl::Status s = Send(line + "\n"); !s.ok()) return s;
    return PidOf(ReadLine(timeout), line);
  }

  static absl::StatusOr<int> PidOf(absl::StatusOr<std::string> answer,
                                   const std::string& line) {
    if (!answer.ok()) return answer.status();
    const size_t space = answer->find(' ');
    int pid = 0;
    if (space == std::string::npos ||
        !absl::SimpleAtoi(answer->substr(0, space), &pid) ||
        answer->substr(space + 1) != line) {
      return absl::InternalError(absl::StrCat("unexpected answer: ", *answer));
    }
    return pid;
  }

 private:
  explicit LineClient(wire::UniqueFd fd) : fd_(std::move(fd)) {}
  wire::UniqueFd fd_;
  std::string buffer_;
};

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_INTEGRATION_LINE_CLIENT_H_
