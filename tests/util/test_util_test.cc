#include "tests/util/test_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fdbroker::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;
using wire::UniqueFd;

// What the test server answers to one request.
struct Reply {
  std::string bytes;   // Written as is; empty writes nothing.
  bool close = false;  // Close the connection after writing.
};

// A one-thread HTTP server on 127.0.0.1:<ephemeral> that serves connections
// one after another and answers each request (up to the blank line) with
// whatever the handler returns.
class TinyHttpServer {
 public:
  explicit TinyHttpServer(std::function<Reply(const std::string&)> handler)
      : handler_(std::move(handler)) {
    listener_.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(::bind(listener_.get(), reinterpret_cast<sockaddr*>(&addr),
                     sizeof(addr)),
              0);
    EXPECT_EQ(::listen(listener_.get(), 16), 0);
    socklen_t len = sizeof(addr);
    ::getsockname(listener_.get(), reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }

  ~TinyHttpServer() {
    // Wakes the blocked accept() (or recv()) so the thread can finish.
    stopping_ = true;
    ::shutdown(listener_.get(), SHUT_RDWR);
    {
      absl::MutexLock lock(&mu_);
      if (current_ >= 0) ::shutdown(current_, SHUT_RDWR);
    }
    thread_.join();
  }

  int port() const { return port_; }

  std::vector<std::string> requests() {
    absl::MutexLock lock(&mu_);
    return requests_;
  }
  int connections() {
    absl::MutexLock lock(&mu_);
    return connections_;
  }

 private:
  void Serve() {
    while (!stopping_) {
      UniqueFd conn(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn.valid()) return;
      {
        absl::MutexLock lock(&mu_);
        ++connections_;
        current_ = conn.get();
      }
      ServeConnection(conn.get());
      absl::MutexLock lock(&mu_);
      current_ = -1;
    }
  }

  void ServeConnection(int fd) {
    std::string buffer;
    char chunk[4096];
    for (;;) {
      size_t end;
      while ((end = buffer.find("\r\n\r\n")) != std::string::npos) {
        std::string request = buffer.substr(0, end + 4);
        buffer.erase(0, end + 4);
        {
          absl::MutexLock lock(&mu_);
          requests_.push_back(request);
        }
        Reply reply = handler_(request);
        if (!reply.bytes.empty()) {
          ::send(fd, reply.bytes.data(), reply.bytes.size(), MSG_NOSIGNAL);
        }
        if (reply.close) return;
      }
      ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
      if (n <= 0) return;
      buffer.append(chunk, static_cast<size_t>(n));
    }
  }

  std::function<Reply(const std::string&)> handler_;
  UniqueFd listener_;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
  absl::Mutex mu_;
  std::vector<std::string> requests_ ABSL_GUARDED_BY(mu_);
  int connections_ ABSL_GUARDED_BY(mu_) = 0;
  int current_ ABSL_GUARDED_BY(mu_) = -1;
};

constexpr char kHello[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Worker-Pid: 42\r\n"
    "Set-Cookie: a=1\r\nset-cookie: b=2\r\n\r\nhello";

TEST(HttpGetTest, KeepAliveRequestsShareOneConnection) {
  TinyHttpServer server([](const std::string&) { return Reply{kHello}; });
  absl::StatusOr<UniqueFd> fd = ConnectTcp("127.0.0.1", server.port());
  ASSERT_TRUE(fd.ok()) << fd.status();
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<HttpResponse> response =
        HttpGet(fd->get(), "/", /*keep_alive=*/true);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->status, 200);
    EXPECT_EQ(response->body, "hello");
    EXPECT_THAT(response->headers,
                UnorderedElementsAre(Pair("content-length", "5"),
                                     Pair("x-worker-pid", "42"),
                                     Pair("set-cookie", "a=1, b=2")));
  }
  EXPECT_EQ(server.connections(), 1);
  ASSERT_EQ(server.requests().size(), 3u);
  EXPECT_THAT(server.requests()[0], HasSubstr("GET / HTTP/1.1\r\n"));
  EXPECT_THAT(server.requests()[0], HasSubstr("Connection: keep-alive\r\n"));
}

TEST(HttpGetTest, ReadsExactlyOneResponse) {
  // The first request gets two responses at once; the second must still be
  // in the socket for the next HttpGet.
  TinyHttpServer server([](const std::string& request) {
    if (absl::StrContains(request, "/first")) {
      return Reply{
          "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
          "HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\ntwo"};
    }
    return Reply{};
  });
  absl::StatusOr<UniqueFd> fd = ConnectTcp("localhost", server.port());
  ASSERT_TRUE(fd.ok()) << fd.status();
  absl::StatusOr<HttpResponse> first = HttpGet(fd->get(), "/first", true);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->body, "one");
  absl::StatusOr<HttpResponse> second = HttpGet(fd->get(), "/second", true);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->status, 201);
  EXPECT_EQ(second->body, "two");
}

TEST(HttpGetTest, OnceSendsConnectionClose) {
  TinyHttpServer server([](const std::string&) {
    return Reply{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true};
  });
  absl::StatusOr<HttpResponse> response =
      HttpGetOnce("127.0.0.1", server.port(), "/path?x=1");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->body, "ok");
  ASSERT_EQ(server.requests().size(), 1u);
  EXPECT_THAT(server.requests()[0], HasSubstr("GET /path?x=1 HTTP/1.1\r\n"));
  EXPECT_THAT(server.requests()[0], HasSubstr("Connection: close\r\n"));
}

TEST(HttpGetTest, DecodesAChunkedBody) {
  TinyHttpServer server([](const std::string&) {
    return Reply{
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\nA;ext=1\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"};
  });
  absl::StatusOr<HttpResponse> response =
      HttpGetOnce("127.0.0.1", server.port(), "/");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->body, "abc0123456789");
}

TEST(HttpGetTest, ReadsUntilEofWithoutContentLength) {
  TinyHttpServer server([](const std::string&) {
    return Reply{"HTTP/1.0 404 Not Found\r\n\r\nmissing", true};
  });
  absl::StatusOr<HttpResponse> response =
      HttpGetOnce("127.0.0.1", server.port(), "/");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 404);
  EXPECT_EQ(response->body, "missing");
}

TEST(HttpGetTest, NoBodyFor204) {
  TinyHttpServer server([](const std::string&) {
    return Reply{"HTTP/1.1 204 No Content\r\n\r\n"};
  });
  absl::StatusOr<UniqueFd> fd = ConnectTcp("127.0.0.1", server.port());
  ASSERT_TRUE(fd.ok()) << fd.status();
  absl::StatusOr<HttpResponse> response = HttpGet(fd->get(), "/", true);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 204);
  EXPECT_EQ(response->body, "");
}

TEST(HttpGetTest, TimesOutWhenTheServerIsSilent) {
  TinyHttpServer server([](const std::string&) { return Reply{}; });
  absl::StatusOr<UniqueFd> fd = ConnectTcp("127.0.0.1", server.port());
  ASSERT_TRUE(fd.ok()) << fd.status();
  absl::StatusOr<HttpResponse> response =
      HttpGet(fd->get(), "/", true, absl::Milliseconds(200));
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded)
      << response.status();
}

TEST(HttpGetTest, ConnectionClosedMidBodyIsUnavailable) {
  TinyHttpServer server([](const std::string&) {
    return Reply{"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true};
  });
  absl::StatusOr<HttpResponse> response =
      HttpGetOnce("127.0.0.1", server.port(), "/");
  EXPECT_EQ(response.status().code(), absl::StatusCode::kUnavailable)
      << response.status();
}

TEST(HttpGetTest, MalformedStatusLineIsAnError) {
  TinyHttpServer server([](const std::string&) {
    return Reply{"garbage\r\n\r\n", true};
  });
  absl::StatusOr<HttpResponse> response =
      HttpGetOnce("127.0.0.1", server.port(), "/");
  EXPECT_EQ(response.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConnectTcpTest, RefusedIsUnavailable) {
  // A bound socket that does not listen holds the port and refuses connects.
  UniqueFd holder(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(
      ::bind(holder.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
      0);
  socklen_t len = sizeof(addr);
  ::getsockname(holder.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  absl::StatusOr<UniqueFd> fd = ConnectTcp("127.0.0.1", ntohs(addr.sin_port));
  EXPECT_EQ(fd.status().code(), absl::StatusCode::kUnavailable) << fd.status();
}

TEST(ConnectTcpTest, ReturnsABlockingCloexecSocket) {
  TinyHttpServer server([](const std::string&) { return Reply{}; });
  absl::StatusOr<UniqueFd> fd = ConnectTcp("127.0.0.1", server.port());
  ASSERT_TRUE(fd.ok()) << fd.status();
  EXPECT_EQ(::fcntl(fd->get(), F_GETFL) & O_NONBLOCK, 0);
  EXPECT_EQ(::fcntl(fd->get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
}

TEST(WaitForTest, ReturnsTrueOnceThePredicateHolds) {
  int calls = 0;
  EXPECT_TRUE(WaitFor([&] { return ++calls == 3; }, absl::Seconds(10),
                      absl::Milliseconds(1)));
  EXPECT_EQ(calls, 3);
}

TEST(WaitForTest, ReturnsFalseAtTheDeadline) {
  const absl::Time start = absl::Now();
  EXPECT_FALSE(WaitFor([] { return false; }, absl::Milliseconds(50)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
}

TEST(ProcInspectionTest, CountOpenFdsSeesNewFds) {
  absl::StatusOr<int> before = CountOpenFds(::getpid());
  ASSERT_TRUE(before.ok()) << before.status();
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  EXPECT_EQ(CountOpenFds(::getpid()).value_or(-1), *before + 2);
  ::close(fds[0]);
  ::close(fds[1]);
  EXPECT_EQ(CountOpenFds(::getpid()).value_or(-1), *before);
  EXPECT_FALSE(CountOpenFds(0x7ffffff0).ok());
}

TEST(ProcInspectionTest, ChildPidsOfAProcessWithoutChildren) {
  EXPECT_THAT(ChildPids(::getpid()), ElementsAre());
  EXPECT_FALSE(ProcessGone(::getpid()));
  EXPECT_TRUE(ProcessGone(0x7ffffff0));
}

TEST(FileTest, ReadKeyValueFile) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/ready";
  std::ofstream(path) << "# written by fdbroker\nlisten=127.0.0.1:41234\n\n"
                         "control=[::1]:50051\nempty=\nurl=a=b\n";
  absl::StatusOr<std::map<std::string, std::string>> values =
      ReadKeyValueFile(path);
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_THAT(*values,
              UnorderedElementsAre(Pair("listen", "127.0.0.1:41234"),
                                   Pair("control", "[::1]:50051"),
                                   Pair("empty", ""), Pair("url", "a=b")));
  EXPECT_EQ(ReadFile(path).value_or("").substr(0, 2), "# ");

  std::ofstream(path) << "listen\n";
  EXPECT_EQ(ReadKeyValueFile(path).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadFile(dir + "/missing").status().code(),
            absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

TEST(FileTest, MakeTempDirMakesDistinctPrivateDirs) {
  const std::string a = MakeTempDir();
  const std::string b = MakeTempDir();
  EXPECT_NE(a, b);
  EXPECT_EQ(a.rfind("/tmp/", 0), 0u);
  EXPECT_TRUE(std::filesystem::is_directory(a));
  EXPECT_EQ(std::filesystem::status(a).permissions(),
            std::filesystem::perms::owner_all);
  std::filesystem::remove_all(a);
  std::filesystem::remove_all(b);
}

}  // namespace
}  // namespace fdbroker::testing
