// The real fdbroker-http-worker binary in standalone mode
// (--listen=127.0.0.1:0), driven over TCP. It reports the port it bound in
// its --ready_file ("listen=127.0.0.1:PORT"), which the tests poll for.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "tests/worker/raw_http.h"
#include "wire/socket_address.h"

namespace fdbroker::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kWorker[] = FDBROKER_BIN_DIR "/fdbroker-http-worker";

// One standalone worker; killed by the Subprocess destructor if a test
// fails half-way.
class StandaloneWorker {
 public:
  explicit StandaloneWorker(const std::string& listen = "127.0.0.1:0")
      : dir_(MakeTempDir()) {
    const std::string ready = dir_ + "/ready";
    absl::StatusOr<std::unique_ptr<Subprocess>> process = Subprocess::Start(
        {kWorker, "--listen=" + listen, "--ready_file=" + ready});
    EXPECT_TRUE(process.ok()) << process.status();
    if (!process.ok()) return;
    process_ = *std::move(process);
    absl::StatusOr<std::map<std::string, std::string>> values;
    const bool ready_seen = WaitFor(
        [&] {
          values = ReadKeyValueFile(ready);
          return values.ok() && values->count("listen") == 1;
        },
        absl::Seconds(20));
    EXPECT_TRUE(ready_seen) << process_->Output();
    if (!ready_seen) return;
    absl::StatusOr<wire::HostPort> address =
        wire::HostPort::Parse(values->at("listen"));
    EXPECT_TRUE(address.ok()) << address.status();
    port_ = address.ok() ? address->port : 0;
    EXPECT_EQ(values->at("pid"), absl::StrCat(process_->pid()));
  }
  ~StandaloneWorker() {
    process_.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  int port() const { return port_; }
  Subprocess& process() { return *process_; }
  std::string pid() const { return absl::StrCat(process_->pid()); }

  wire::UniqueFd Connect() {
    absl::StatusOr<wire::UniqueFd> fd = ConnectTcp("127.0.0.1", port_);
    EXPECT_TRUE(fd.ok()) << fd.status();
    return fd.ok() ? *std::move(fd) : wire::UniqueFd();
  }

 private:
  std::string dir_;
  std::unique_ptr<Subprocess> process_;
  int port_ = 0;
};

class HttpWorkerStandaloneTest : public ::testing::Test {
 protected:
  StandaloneWorker worker_;
};

TEST_F(HttpWorkerStandaloneTest, KeepAliveServesManyRequestsWithPidHeader) {
  wire::UniqueFd fd = worker_.Connect();
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<HttpResponse> response = HttpGet(fd.get(), "/", true);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->status, 200);
    EXPECT_EQ(response->headers["x-worker-pid"], worker_.pid());
    EXPECT_FALSE(response->body.empty());
    EXPECT_EQ(response->headers.count("connection"), 0u);
    // Standalone, the client is the socket's peer.
    EXPECT_EQ(response->headers["x-client-address"],
              wire::SocketAddress::Of(fd.get())->ToString());
  }
}

TEST_F(HttpWorkerStandaloneTest, PipelinedResponsesComeInRequestOrder) {
  wire::UniqueFd fd = worker_.Connect();
  const absl::Time start = absl::Now();
  ASSERT_TRUE(SendAll(fd.get(),
                      "GET /sleep?ms=200 HTTP/1.1\r\nHost: t\r\n\r\n"
                      "GET / HTTP/1.1\r\nHost: t\r\n\r\n"
                      "GET /missing HTTP/1.1\r\nHost: t\r\n\r\n"
                      "HEAD / HTTP/1.1\r\nHost: t\r\n\r\n"
                      "DELETE / HTTP/1.1\r\nHost: t\r\n\r\n"
                      "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                  .ok());
  absl::StatusOr<std::string> stream = ReadUntilClose(fd.get());
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_THAT(ResponseStatuses(*stream),
              ElementsAre(200, 200, 404, 200, 405, 200));
  // The sleep came first and everything waited for it.
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(200));
  EXPECT_EQ(stream->find("slept 200 ms"), stream->find("\r\n\r\n") + 4);
}

TEST_F(HttpWorkerStandaloneTest, ConnectionCloseIsHonoured) {
  wire::UniqueFd fd = worker_.Connect();
  absl::StatusOr<HttpResponse> response = HttpGet(fd.get(), "/", false);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->headers["connection"], "close");
  absl::StatusOr<std::string> rest = ReadUntilClose(fd.get());
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(*rest, "");
}

TEST_F(HttpWorkerStandaloneTest, Http10ClosesUnlessKeepAlive) {
  wire::UniqueFd fd = worker_.Connect();
  ASSERT_TRUE(SendAll(fd.get(), "GET / HTTP/1.0\r\n\r\n").ok());
  absl::StatusOr<std::string> stream = ReadUntilClose(fd.get());
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_THAT(ResponseStatuses(*stream), ElementsAre(200));

  wire::UniqueFd keep = worker_.Connect();
  ASSERT_TRUE(SendAll(keep.get(),
                      "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                      "GET / HTTP/1.0\r\n\r\n")
                  .ok());
  stream = ReadUntilClose(keep.get());
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_THAT(ResponseStatuses(*stream), ElementsAre(200, 200));
  EXPECT_THAT(*stream, HasSubstr("Connection: keep-alive"));
}

TEST_F(HttpWorkerStandaloneTest, SleepWaitsAndValidatesItsArgument) {
  wire::UniqueFd fd = worker_.Connect();
  const absl::Time start = absl::Now();
  absl::StatusOr<HttpResponse> slept = HttpGet(fd.get(), "/sleep?ms=150", true);
  ASSERT_TRUE(slept.ok()) << slept.status();
  EXPECT_EQ(slept->status, 200);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(150));
  EXPECT_EQ(slept->body, "slept 150 ms\n");
  for (const char* bad :
       {"/sleep?ms=60001", "/sleep?ms=-1", "/sleep?ms=abc", "/sleep"}) {
    absl::StatusOr<HttpResponse> response = HttpGet(fd.get(), bad, true);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->status, 400) << bad;
  }
  // Still usable: a bad query is not a malformed request.
  absl::StatusOr<HttpResponse> after = HttpGet(fd.get(), "/", true);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->status, 200);
}

TEST_F(HttpWorkerStandaloneTest,
       MalformedRequestGets400AndTheConnectionCloses) {
  for (const char* bad :
       {"NONSENSE\r\n\r\n", "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"}) {
    wire::UniqueFd fd = worker_.Connect();
    ASSERT_TRUE(SendAll(fd.get(), bad).ok());
    absl::StatusOr<std::string> stream = ReadUntilClose(fd.get());
    ASSERT_TRUE(stream.ok()) << stream.status();
    EXPECT_THAT(ResponseStatuses(*stream), ElementsAre(400)) << bad;
    EXPECT_THAT(*stream, HasSubstr("Connection: close"));
    EXPECT_THAT(*stream, HasSubstr("X-Worker-Pid: " + worker_.pid()));
  }
}

TEST_F(HttpWorkerStandaloneTest, OversizedHeadersGet431) {
  wire::UniqueFd fd = worker_.Connect();
  ASSERT_TRUE(SendAll(fd.get(), "GET / HTTP/1.1\r\nX-Big: " +
                                    std::string(20000, 'b') + "\r\n\r\n")
                  .ok());
  absl::StatusOr<std::string> stream = ReadUntilClose(fd.get());
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_THAT(ResponseStatuses(*stream), ElementsAre(431));
}

TEST_F(HttpWorkerStandaloneTest, TransferEncodingGets501) {
  wire::UniqueFd fd = worker_.Connect();
  ASSERT_TRUE(SendAll(fd.get(),
                      "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "5\r\nhello\r\n0\r\n\r\n")
                  .ok());
  absl::StatusOr<std::string> stream = ReadUntilClose(fd.get());
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_THAT(ResponseStatuses(*stream), ElementsAre(501));
}

TEST_F(HttpWorkerStandaloneTest, RequestBodiesAreConsumed) {
  wire::UniqueFd fd = worker_.Connect();
  ASSERT_TRUE(SendAll(fd.get(),
                      "POST /form HTTP/1.1\r\nContent-Length: 14\r\n\r\n"
                      "GET / HTTP/1.1"  // Body bytes that look like a request.
                      "GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                  .ok());
  absl::StatusOr<std::string> stream = ReadUntilClose(fd.get());
  ASSERT_TRUE(stream.ok()) << stream.status();
  EXPECT_THAT(ResponseStatuses(*stream), ElementsAre(405, 200));
}

// Sends "GET /" and a /sleep in one write and waits for the first response:
// once it is back the worker has read the sleep too, and is sleeping.
void StartSleep(int fd, int millis) {
  ASSERT_TRUE(SendAll(fd, absl::StrCat("GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                                       "GET /sleep?ms=", millis,
                                       " HTTP/1.1\r\nHost: t\r\n\r\n"))
                  .ok());
  absl::StatusOr<std::string> first = ReadUntilContains(fd, "pid ");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_THAT(ResponseStatuses(*first), ElementsAre(200));
}

TEST_F(HttpWorkerStandaloneTest, SigtermFinishesInFlightRequestsAndExitsZero) {
  wire::UniqueFd idle = worker_.Connect();
  absl::StatusOr<HttpResponse> first = HttpGet(idle.get(), "/", true);
  ASSERT_TRUE(first.ok()) << first.status();
  wire::UniqueFd busy = worker_.Connect();
  StartSleep(busy.get(), 700);

  const absl::Time signalled = absl::Now();
  ASSERT_TRUE(worker_.process().Signal(SIGTERM).ok());
  // The idle keep-alive connection is closed at once...
  absl::StatusOr<std::string> idle_rest = ReadUntilClose(idle.get());
  ASSERT_TRUE(idle_rest.ok()) << idle_rest.status();
  EXPECT_EQ(*idle_rest, "");
  EXPECT_LT(absl::Now() - signalled, absl::Milliseconds(500));
  // ... new connections are refused (the listener is closed) ...
  EXPECT_FALSE(ConnectTcp("127.0.0.1", worker_.port(), absl::Seconds(2)).ok());
  // ... and the sleeping request is answered, then its connection closed.
  absl::StatusOr<std::string> busy_rest = ReadUntilClose(busy.get());
  ASSERT_TRUE(busy_rest.ok()) << busy_rest.status();
  EXPECT_THAT(ResponseStatuses(*busy_rest), ElementsAre(200));
  EXPECT_THAT(*busy_rest, HasSubstr("Connection: close"));
  EXPECT_THAT(*busy_rest, HasSubstr("slept 700 ms"));

  absl::StatusOr<int> exit_code = worker_.process().Wait(absl::Seconds(10));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0) << worker_.process().Output();
}

TEST_F(HttpWorkerStandaloneTest, SecondSigtermClosesEverythingAtOnce) {
  wire::UniqueFd busy = worker_.Connect();
  StartSleep(busy.get(), 30000);
  ASSERT_TRUE(worker_.process().Signal(SIGTERM).ok());
  // The first signal was handled once the listener is gone (two pending
  // SIGTERMs would merge into one).
  ASSERT_TRUE(
      WaitFor([&] { return !ConnectTcp("127.0.0.1", worker_.port()).ok(); },
              absl::Seconds(10)));
  const absl::Time signalled = absl::Now();
  ASSERT_TRUE(worker_.process().Signal(SIGTERM).ok());
  absl::StatusOr<int> exit_code = worker_.process().Wait(absl::Seconds(10));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0);
  EXPECT_LT(absl::Now() - signalled, absl::Seconds(5));
  absl::StatusOr<std::string> rest = ReadUntilClose(busy.get());
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(*rest, "");  // Cut short: no response.
}

TEST(HttpWorkerReusePortTest, TwoWorkersShareAPort) {
  StandaloneWorker first;
  ASSERT_NE(first.port(), 0);
  StandaloneWorker second(absl::StrCat("127.0.0.1:", first.port()));
  ASSERT_EQ(second.port(), first.port());
  std::set<std::string> pids;
  for (int i = 0; i < 500 && pids.size() < 2; ++i) {
    absl::StatusOr<HttpResponse> response =
        HttpGetOnce("127.0.0.1", first.port(), "/");
    ASSERT_TRUE(response.ok()) << response.status();
    pids.insert(response->headers["x-worker-pid"]);
  }
  EXPECT_EQ(pids, (std::set<std::string>{first.pid(), second.pid()}));
}

// Bad command lines: one line on stderr, exit code 2, nothing bound.
TEST(HttpWorkerFlagsTest, BadFlagsExitWithCode2) {
  const std::vector<std::vector<std::string>> bad = {
      {"--capacity=-1", "--listen=127.0.0.1:0"},
      {"--capacity=lots", "--listen=127.0.0.1:0"},
      {"--listen=127.0.0.1"},
      {"--listen=127.0.0.1:99999"},
      {"--listen=::1:80"},
      {"--no_such_flag=1", "--listen=127.0.0.1:0"},
      {"--listen=127.0.0.1:0", "--socket=/tmp/x.sock"},
      {"stray-argument", "--listen=127.0.0.1:0"},
      {},  // Neither --listen nor a broker socket.
  };
  for (const std::vector<std::string>& args : bad) {
    std::vector<std::string> argv = {kWorker};
    argv.insert(argv.end(), args.begin(), args.end());
    Subprocess::Options options;
    options.env["FDBROKER_SOCKET"] = "";
    absl::StatusOr<std::unique_ptr<Subprocess>> process =
        Subprocess::Start(argv, options);
    ASSERT_TRUE(process.ok()) << process.status();
    absl::StatusOr<int> exit_code = (*process)->Wait(absl::Seconds(10));
    ASSERT_TRUE(exit_code.ok()) << exit_code.status();
    const std::string stderr_text = (*process)->Stderr();
    EXPECT_EQ(*exit_code, 2) << absl::StrJoin(args, " ") << ": " << stderr_text;
    EXPECT_EQ(std::count(stderr_text.begin(), stderr_text.end(), '\n'), 1)
        << stderr_text;
    EXPECT_THAT(stderr_text, HasSubstr("fdbroker-http-worker: "));
  }
}

TEST(HttpWorkerFlagsTest, MissingBrokerSocketNamesTheWaysOut) {
  Subprocess::Options options;
  options.env["FDBROKER_SOCKET"] = "";
  absl::StatusOr<std::unique_ptr<Subprocess>> process =
      Subprocess::Start({kWorker}, options);
  ASSERT_TRUE(process.ok()) << process.status();
  absl::StatusOr<int> exit_code = (*process)->Wait(absl::Seconds(10));
  ASSERT_TRUE(exit_code.ok());
  EXPECT_EQ(*exit_code, 2);
  EXPECT_THAT((*process)->Stderr(), HasSubstr("FDBROKER_SOCKET"));
  EXPECT_THAT((*process)->Stderr(), HasSubstr("--listen"));
}

}  // namespace
}  // namespace fdbroker::testing
