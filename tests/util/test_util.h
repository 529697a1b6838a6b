#ifndef FDBROKER_TESTS_UTIL_TEST_UTIL_H_
#define FDBROKER_TESTS_UTIL_TEST_UTIL_H_

#include <sys/resource.h>
#include <sys/types.h>

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "wire/unique_fd.h"

// Helpers for tests that drive the real binaries: waits that poll instead of
// sleeping, /proc inspection, and a small blocking TCP/HTTP/1.1 client.
namespace fdbroker::testing {

// Polls `pred` every `poll` until it returns true (-> true) or `timeout` has
// passed (-> false; `pred` is evaluated one last time at the deadline). Use
// instead of a fixed sleep.
bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout,
             absl::Duration poll = absl::Milliseconds(10));

// Number of open fds of process `pid` (entries in /proc/PID/fd). For this
// process the directory fd used to count is not included.
absl::StatusOr<int> CountOpenFds(pid_t pid);

// While it lives, this process cannot take one more fd: its soft
// RLIMIT_NOFILE is lowered to its lowest unused fd number (so a received
// SCM_RIGHTS fd is dropped and the packet comes with MSG_CTRUNC). The
// destructor puts the limit back. Single-threaded use only.
class FdTableFull {
 public:
  FdTableFull();
  ~FdTableFull();
  FdTableFull(const FdTableFull&) = delete;
  FdTableFull& operator=(const FdTableFull&) = delete;
  bool ok() const { return ok_; }

 private:
  rlimit before_{};
  bool ok_ = false;
};

// The direct children of `pid`, from /proc/PID/task/*/children; empty if the
// process is gone.
std::vector<pid_t> ChildPids(pid_t pid);

// True when `pid` no longer runs: it does not exist or is a zombie.
bool ProcessGone(pid_t pid);

// A blocking, close-on-exec TCP connection to host:port (numeric or a name),
// with TCP_NODELAY. Fails with DeadlineExceeded after `timeout`, Unavailable
// when refused. Does not retry. A non-empty `source` (a numeric IP, e.g.
// "127.0.0.7") is the local address to connect from (any port).
absl::StatusOr<wire::UniqueFd> ConnectTcp(
    const std::string& host, int port,
    absl::Duration timeout = absl::Seconds(5), const std::string& source = "");

// A blocking, close-on-exec connection to the Unix stream socket at `path`.
absl::StatusOr<wire::UniqueFd> ConnectUnix(const std::string& path);

struct HttpResponse {
  int status = 0;
  // Header names in lower case; repeated headers are joined with ", ".
  std::map<std::string, std::string> headers;
  std::string body;
};

// Sends "GET `path` HTTP/1.1" on the connected socket `fd` and reads exactly
// one response: the header byte by byte, then Content-Length bytes (or the
// chunks of a chunked body, or until EOF if the response has neither), so
// nothing of a following response is consumed. With keep_alive false the
// request says "Connection: close". Whole exchange bounded by `timeout`
// (DeadlineExceeded); a connection closed before the end is Unavailable.
absl::StatusOr<HttpResponse> HttpGet(int fd, absl::string_view path,
                                     bool keep_alive,
                                     absl::Duration timeout = absl::Seconds(5));

// One request on a new connection ("Connection: close").
absl::StatusOr<HttpResponse> HttpGetOnce(
    const std::string& host, int port, absl::string_view path,
    absl::Duration timeout = absl::Seconds(5));

// The X-Worker-Pid header of an fdbroker-http-worker response (0 if none).
int WorkerPidOf(const HttpResponse& response);

// The whole contents of the file at `path`.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Creates a fresh private directory /tmp/fdbroker-test-XXXXXX and returns its
// path. The caller removes it (std::filesystem::remove_all). Aborts on failure.
std::string MakeTempDir();

// Parses a file of `key=value` lines (the broker's --ready_file, e.g.
// "listen=127.0.0.1:41234"). Blank lines and lines starting with '#' are
// skipped; the value is everything after the first '='. A line without '='
// is InvalidArgument.
absl::StatusOr<std::map<std::string, std::string>> ReadKeyValueFile(
    const std::string& path);

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_UTIL_TEST_UTIL_H_
