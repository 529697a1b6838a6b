#include "tests/util/test_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace fdbroker::testing {
namespace {

using wire::UniqueFd;

// Milliseconds left until `deadline` for poll(), at least 0.
int PollTimeoutMs(absl::Time deadline) {
  absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  // Round up so a poll never returns just before the deadline and spins.
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 1 << 30));
}

// Waits until `fd` is ready for `events` or the deadline passes.
absl::Status PollUntil(int fd, short events, absl::Time deadline,
                       absl::string_view what) {
  for (;;) {
    pollfd pfd{fd, events, 0};
    int n = ::poll(&pfd, 1, PollTimeoutMs(deadline));
    if (n > 0) return absl::OkStatus();
    if (n == 0) {
      return absl::DeadlineExceededError(absl::StrCat("timed out ", what));
    }
    if (errno != EINTR) return absl::ErrnoToStatus(errno, "poll");
  }
}

absl::Status WriteAll(int fd, absl::string_view data, absl::Time deadline) {
  while (!data.empty()) {
    ssize_t n =
        ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      absl::Status ready =
          PollUntil(fd, POLLOUT, deadline, "sending the request");
      if (!ready.ok()) return ready;
      continue;
    }
    return absl::ErrnoToStatus(errno, "send");
  }
  return absl::OkStatus();
}

// Reads up to `max` bytes, waiting for at least one. Returns 0 at EOF.
absl::StatusOr<size_t> ReadSome(int fd, char* buf, size_t max,
                                absl::Time deadline) {
  for (;;) {
    ssize_t n = ::recv(fd, buf, max, MSG_DONTWAIT);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      absl::Status ready =
          PollUntil(fd, POLLIN, deadline, "waiting for the response");
      if (!ready.ok()) return ready;
      continue;
    }
    return absl::ErrnoToStatus(errno, "recv");
  }
}

absl::Status ClosedEarly(absl::string_view while_reading) {
  return absl::UnavailableError(
      absl::StrCat("connection closed while reading ", while_reading));
}

// Reads exactly one CRLF-terminated line (without the CRLF), byte by byte so
// that nothing beyond it is consumed.
absl::StatusOr<std::string> ReadLine(int fd, absl::Time deadline,
                                     absl::string_view what) {
  std::string line;
  for (;;) {
    char c;
    absl::StatusOr<size_t> n = ReadSome(fd, &c, 1, deadline);
    if (!n.ok()) return n.status();
    if (*n == 0) return ClosedEarly(what);
    if (c == '\n') {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      return line;
    }
    line.push_back(c);
    if (line.size() > 64 * 1024) {
      return absl::InvalidArgumentError(absl::StrCat(what, " too long"));
    }
  }
}

absl::Status ReadExactly(int fd, size_t count, absl::Time deadline,
                         std::string& out) {
  const size_t start = out.size();
  out.resize(start + count);
  size_t done = 0;
  while (done < count) {
    absl::StatusOr<size_t> n =
        ReadSome(fd, out.data() + start + done, count - done, deadline);
    if (!n.ok()) return n.status();
    if (*n == 0) {
      out.resize(start + done);
      return ClosedEarly(
          absl::StrCat("the body (", done, " of ", count, " bytes arrived)"));
    }
    done += *n;
  }
  return absl::OkStatus();
}

absl::Status ReadChunkedBody(int fd, absl::Time deadline, std::string& out) {
  for (;;) {
    absl::StatusOr<std::string> size_line =
        ReadLine(fd, deadline, "a chunk size");
    if (!size_line.ok()) return size_line.status();
    // Chunk extensions (";name=value") are allowed and ignored.
    absl::string_view hex = absl::StripAsciiWhitespace(
        absl::string_view(*size_line).substr(0, size_line->find(';')));
    uint64_t size = 0;
    if (!absl::SimpleHexAtoi(hex, &size)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad chunk size line '", *size_line, "'"));
    }
    if (size == 0) {
      // Trailer fields, then the empty line.
      for (;;) {
        absl::StatusOr<std::string> trailer =
            ReadLine(fd, deadline, "the trailer");
        if (!trailer.ok()) return trailer.status();
        if (trailer->empty()) return absl::OkStatus();
      }
    }
    absl::Status data = ReadExactly(fd, size, deadline, out);
    if (!data.ok()) return data;
    absl::StatusOr<std::string> end = ReadLine(fd, deadline, "a chunk end");
    if (!end.ok()) return end.status();
    if (!end->empty()) return absl::InvalidArgumentError("chunk overrun");
  }
}

}  // namespace

bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout,
             absl::Duration poll) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    if (pred()) return true;
    absl::Time now = absl::Now();
    if (now >= deadline) return false;
    absl::SleepFor(std::min(poll, deadline - now));
  }
}

FdTableFull::FdTableFull() {
  int lowest = 0;
  while (::fcntl(lowest, F_GETFD) != -1) ++lowest;
  if (::getrlimit(RLIMIT_NOFILE, &before_) != 0) return;
  rlimit full = before_;
  full.rlim_cur = static_cast<rlim_t>(lowest);
  ok_ = ::setrlimit(RLIMIT_NOFILE, &full) == 0;
}

FdTableFull::~FdTableFull() {
  if (ok_) ::setrlimit(RLIMIT_NOFILE, &before_);
}

absl::StatusOr<int> CountOpenFds(pid_t pid) {
  const std::string path = absl::StrCat("/proc/", pid, "/fd");
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return absl::ErrnoToStatus(errno, path);
  // Our own listing fd shows up in /proc/self/fd; it is not the caller's.
  const int own_fd = pid == ::getpid() ? ::dirfd(dir) : -1;
  int count = 0;
  while (dirent* entry = ::readdir(dir)) {
    int fd;
    if (!absl::SimpleAtoi(entry->d_name, &fd)) continue;  // "." and ".."
    if (fd != own_fd) ++count;
  }
  ::closedir(dir);
  return count;
}

std::vector<pid_t> ChildPids(pid_t pid) {
  std::vector<pid_t> children;
  const std::string tasks = absl::StrCat("/proc/", pid, "/task");
  DIR* dir = ::opendir(tasks.c_str());
  if (dir == nullptr) return children;
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    absl::StatusOr<std::string> list =
        ReadFile(absl::StrCat(tasks, "/", entry->d_name, "/children"));
    if (!list.ok()) continue;  // The thread exited meanwhile.
    for (absl::string_view word :
         absl::StrSplit(*list, ' ', absl::SkipWhitespace())) {
      pid_t child;
      if (absl::SimpleAtoi(word, &child)) children.push_back(child);
    }
  }
  ::closedir(dir);
  std::sort(children.begin(), children.end());
  children.erase(std::unique(children.begin(), children.end()), children.end());
  return children;
}

bool ProcessGone(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  // A zombie still answers kill(); its state in /proc/PID/stat is 'Z'. The
  // command name in parentheses may contain anything, so look after ')'.
  absl::StatusOr<std::string> stat =
      ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  if (!stat.ok()) return true;
  size_t paren = stat->rfind(')');
  return paren != std::string::npos && paren + 2 < stat->size() &&
         (*stat)[paren + 2] == 'Z';
}

absl::StatusOr<UniqueFd> ConnectTcp(const std::string& host, int port,
                                    absl::Duration timeout,
                                    const std::string& source) {
  const absl::Time deadline = absl::Now() + timeout;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* addrs = nullptr;
  const std::string service = std::to_string(port);
  int gai = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &addrs);
  if (gai != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve ", host, ": ", ::gai_strerror(gai)));
  }
  absl::Status last = absl::UnavailableError("no address");
  for (addrinfo* ai = addrs; ai != nullptr; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family,
                         ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                         ai->ai_protocol));
    if (!fd.valid()) {
      last = absl::ErrnoToStatus(errno, "socket");
      continue;
    }
    if (!source.empty()) {
      addrinfo* local = nullptr;
      addrinfo local_hints{};
      local_hints.ai_family = ai->ai_family;
      local_hints.ai_socktype = SOCK_STREAM;
      local_hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
      if (::getaddrinfo(source.c_str(), "0", &local_hints, &local) != 0) {
        last = absl::InvalidArgumentError(
            absl::StrCat("bad source address ", source));
        continue;
      }
      const int bound = ::bind(fd.get(), local->ai_addr, local->ai_addrlen);
      ::freeaddrinfo(local);
      if (bound != 0) {
        last = absl::ErrnoToStatus(errno, absl::StrCat("bind ", source));
        continue;
      }
    }
    int rc = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      last = PollUntil(fd.get(), POLLOUT, deadline,
                       absl::StrCat("connecting to ", host, ":", port));
      if (!last.ok()) continue;
      int error = 0;
      socklen_t len = sizeof(error);
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &len);
      rc = error == 0 ? 0 : -1;
      errno = error;
    }
    if (rc != 0) {
      last = absl::ErrnoToStatus(errno,
                                 absl::StrCat("connect to ", host, ":", port));
      continue;
    }
    int flags = ::fcntl(fd.get(), F_GETFL);
    ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ::freeaddrinfo(addrs);
    return fd;
  }
  ::freeaddrinfo(addrs);
  return last;
}

absl::StatusOr<HttpResponse> HttpGet(int fd, absl::string_view path,
                                     bool keep_alive, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  const std::string request = absl::StrCat(
      "GET ", path, " HTTP/1.1\r\nHost: fdbroker-test\r\n",
      "Connection: ", keep_alive ? "keep-alive" : "close", "\r\n\r\n");
  absl::Status sent = WriteAll(fd, request, deadline);
  if (!sent.ok()) return sent;

  HttpResponse response;
  absl::StatusOr<std::string> status_line =
      ReadLine(fd, deadline, "the status line");
  if (!status_line.ok()) return status_line.status();
  // "HTTP/1.1 200 OK"
  std::vector<absl::string_view> parts =
      absl::StrSplit(*status_line, absl::MaxSplits(' ', 2));
  if (parts.size() < 2 || !absl::StartsWith(parts[0], "HTTP/1.") ||
      parts[1].size() != 3 || !absl::SimpleAtoi(parts[1], &response.status)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad status line '", *status_line, "'"));
  }
  for (;;) {
    absl::StatusOr<std::string> line = ReadLine(fd, deadline, "the header");
    if (!line.ok()) return line.status();
    if (line->empty()) break;
    size_t colon = line->find(':');
    if (colon == std::string::npos || colon == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad header line '", *line, "'"));
    }
    std::string name = absl::AsciiStrToLower(line->substr(0, colon));
    std::string value(
        absl::StripAsciiWhitespace(absl::string_view(*line).substr(colon + 1)));
    auto [it, inserted] = response.headers.emplace(name, value);
    if (!inserted) absl::StrAppend(&it->second, ", ", value);
  }

  const bool no_body = (response.status >= 100 && response.status < 200) ||
                       response.status == 204 || response.status == 304;
  auto te = response.headers.find("transfer-encoding");
  auto cl = response.headers.find("content-length");
  if (no_body) return response;
  if (te != response.headers.end() &&
      absl::StrContains(absl::AsciiStrToLower(te->second), "chunked")) {
    absl::Status body = ReadChunkedBody(fd, deadline, response.body);
    if (!body.ok()) return body;
    return response;
  }
  if (cl != response.headers.end()) {
    uint64_t length = 0;
    if (!absl::SimpleAtoi(cl->second, &length)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad content-length '", cl->second, "'"));
    }
    absl::Status body = ReadExactly(fd, length, deadline, response.body);
    if (!body.ok()) return body;
    return response;
  }
  // Neither: the body ends when the server closes the connection.
  char buf[4096];
  for (;;) {
    absl::StatusOr<size_t> n = ReadSome(fd, buf, sizeof(buf), deadline);
    if (!n.ok()) return n.status();
    if (*n == 0) return response;
    response.body.append(buf, *n);
  }
}

int WorkerPidOf(const HttpResponse& response) {
  auto it = response.headers.find("x-worker-pid");
  int pid = 0;
  if (it != response.headers.end()) (void)absl::SimpleAtoi(it->second, &pid);
  return pid;
}

absl::StatusOr<HttpResponse> HttpGetOnce(const std::string& host, int port,
                                         absl::string_view path,
                                         absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<UniqueFd> fd = ConnectTcp(host, port, timeout);
  if (!fd.ok()) return fd.status();
  return HttpGet(fd->get(), path, /*keep_alive=*/false,
                 std::max(deadline - absl::Now(), absl::ZeroDuration()));
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return absl::ErrnoToStatus(errno, path);
  std::string contents;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n > 0) {
      contents.append(buf, static_cast<size_t>(n));
    } else if (n == 0) {
      return contents;
    } else if (errno != EINTR) {
      return absl::ErrnoToStatus(errno, path);
    }
  }
}

std::string MakeTempDir() {
  char templ[] = "/tmp/fdbroker-test-XXXXXX";
  if (::mkdtemp(templ) == nullptr) {
    std::perror("mkdtemp");
    std::abort();
  }
  return templ;
}

absl::StatusOr<std::map<std::string, std::string>> ReadKeyValueFile(
    const std::string& path) {
  absl::StatusOr<std::string> contents = ReadFile(path);
  if (!contents.ok()) return contents.status();
  std::map<std::string, std::string> values;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*contents, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    size_t eq = line.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_number, ": expected key=value, got '", line, "'"));
    }
    values[std::string(line.substr(0, eq))] = std::string(line.substr(eq + 1));
  }
  return values;
}

absl::StatusOr<wire::UniqueFd> ConnectUnix(const std::string& path) {
  wire::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError("Unix socket path too long");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) !=
      0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("connect ", path));
  }
  return fd;
}

}  // namespace fdbroker::testing
