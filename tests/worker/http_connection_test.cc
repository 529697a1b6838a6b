// HttpConnection is the HTTP/1.1 state machine without I/O: bytes in,
// responses out. These tests drive it directly.

#include "http_connection.h"

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fdbroker::http {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

class HttpConnectionTest : public ::testing::Test {
 protected:
  // Takes all pending output, as a server's write would.
  std::string TakeOutput() {
    std::string out(connection_.pending_output());
    connection_.ConsumeOutput(out.size());
    return out;
  }

  // The status codes of the responses in `out`, in order.
  static std::vector<int> Statuses(absl::string_view out) {
    std::vector<int> statuses;
    for (absl::string_view part : absl::StrSplit(out, "HTTP/1.1 ")) {
      if (part.size() >= 3)
        statuses.push_back(std::stoi(std::string(part.substr(0, 3))));
    }
    return statuses;
  }

  Responses responses_{1234};
  HttpConnection connection_{responses_};
};

TEST_F(HttpConnectionTest, AnswersGetWithPidHeader) {
  connection_.OnData("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  const std::string out = TakeOutput();
  EXPECT_TRUE(absl::StartsWith(out, "HTTP/1.1 200 OK\r\n")) << out;
  EXPECT_THAT(out, HasSubstr("\r\nX-Worker-Pid: 1234\r\n"));
  EXPECT_THAT(out, HasSubstr("\r\nDate: "));
  EXPECT_THAT(out, HasSubstr("\r\nContent-Length: "));
  EXPECT_THAT(out, Not(HasSubstr("Connection:")));
  EXPECT_TRUE(absl::EndsWith(out, "pid 1234\n")) << out;
  EXPECT_TRUE(connection_.idle());
  EXPECT_FALSE(connection_.ShouldClose());
  EXPECT_EQ(connection_.requests(), 1u);
}

TEST_F(HttpConnectionTest, HeadHasHeadersButNoBody) {
  connection_.OnData("HEAD / HTTP/1.1\r\n\r\n");
  const std::string out = TakeOutput();
  EXPECT_THAT(out, HasSubstr("Content-Length: "));
  EXPECT_TRUE(absl::EndsWith(out, "\r\n\r\n")) << out;
}

TEST_F(HttpConnectionTest, RoutesAndMethods) {
  connection_.OnData(
      "GET /nothing-here HTTP/1.1\r\n\r\n"
      "POST / HTTP/1.1\r\n\r\n"
      "GET /sleep HTTP/1.1\r\n\r\n"
      "GET /sleep?ms=60001 HTTP/1.1\r\n\r\n"
      "GET /?x=1 HTTP/1.1\r\n\r\n");
  const std::string out = TakeOutput();
  EXPECT_THAT(Statuses(out), ElementsAre(404, 405, 400, 400, 200));
  EXPECT_THAT(out, HasSubstr("Allow: GET, HEAD\r\n"));
  EXPECT_FALSE(connection_.ShouldClose());  // Well-formed: keep-alive.
}

TEST_F(HttpConnectionTest, PipelinedResponsesKeepRequestOrder) {
  connection_.OnData(
      "GET / HTTP/1.1\r\n\r\nGET /missing HTTP/1.1\r\n\r\n"
      "GET / HTTP/1.1\r\n\r\n");
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(200, 404, 200));
  EXPECT_EQ(connection_.requests(), 3u);
}

TEST_F(HttpConnectionTest, RequestSplitAcrossReadsAtEveryOffset) {
  const std::string data =
      "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /missing HTTP/1.1\r\n\r\n";
  for (size_t split = 0; split <= data.size(); ++split) {
    HttpConnection connection(responses_);
    connection.OnData(absl::string_view(data).substr(0, split));
    connection.OnData(absl::string_view(data).substr(split));
    EXPECT_THAT(Statuses(connection.pending_output()), ElementsAre(200, 404))
        << "split at " << split;
  }
  // And one byte at a time.
  for (char c : data) connection_.OnData(absl::string_view(&c, 1));
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(200, 404));
}

TEST_F(HttpConnectionTest, BodiesAreConsumed) {
  const std::string request =
      "POST /upload HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world"
      "GET / HTTP/1.1\r\n\r\n";
  connection_.OnData(request);
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(405, 200));
  // The same with the body split over reads.
  connection_.OnData("PUT / HTTP/1.1\r\nContent-Length: 6\r\n\r\nab");
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(405));
  EXPECT_FALSE(connection_.idle());  // The body is still coming.
  connection_.OnData("cd");
  connection_.OnData("efGET / HTTP/1.1\r\n\r\n");
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(200));
  EXPECT_TRUE(connection_.idle());
}

TEST_F(HttpConnectionTest, SleepHoldsLaterPipelinedRequests) {
  connection_.OnData(
      "GET / HTTP/1.1\r\n\r\nGET /sleep?ms=25 HTTP/1.1\r\n\r\n"
      "GET /missing HTTP/1.1\r\n\r\n");
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(200));
  ASSERT_TRUE(connection_.sleeping());
  EXPECT_EQ(connection_.sleep_millis(), 25u);
  EXPECT_FALSE(connection_.wants_input());
  EXPECT_FALSE(connection_.ShouldClose());
  EXPECT_FALSE(connection_.idle());
  connection_.OnSleepDone();
  const std::string out = TakeOutput();
  EXPECT_THAT(Statuses(out), ElementsAre(200, 404));
  EXPECT_THAT(out, HasSubstr("slept 25 ms\n"));
  EXPECT_FALSE(connection_.sleeping());
}

TEST_F(HttpConnectionTest, ConnectionCloseIsHonoured) {
  connection_.OnData(
      "GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n");
  const std::string out = TakeOutput();
  EXPECT_THAT(Statuses(out), ElementsAre(200));  // Nothing after close.
  EXPECT_THAT(out, HasSubstr("\r\nConnection: close\r\n"));
  EXPECT_TRUE(connection_.ShouldClose());
  // The client sent more: close gracefully, not with an RST.
  EXPECT_TRUE(connection_.needs_linger());
}

TEST_F(HttpConnectionTest, Http10ClosesUnlessKeepAlive) {
  connection_.OnData("GET / HTTP/1.0\r\n\r\n");
  EXPECT_THAT(TakeOutput(), HasSubstr("\r\nConnection: close\r\n"));
  EXPECT_TRUE(connection_.ShouldClose());
  EXPECT_FALSE(connection_.needs_linger());

  HttpConnection keep(responses_);
  keep.OnData("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  EXPECT_THAT(std::string(keep.pending_output()),
              HasSubstr("\r\nConnection: keep-alive\r\n"));
  EXPECT_FALSE(keep.ShouldClose());
}

TEST_F(HttpConnectionTest, MalformedRequestIs400AndCloses) {
  connection_.OnData(
      "GET / HTTP/1.1\r\n\r\nNONSENSE\r\n\r\nGET / HTTP/1.1\r\n\r\n");
  const std::string out = TakeOutput();
  EXPECT_THAT(Statuses(out), ElementsAre(200, 400));
  EXPECT_THAT(out, HasSubstr("\r\nConnection: close\r\n"));
  EXPECT_TRUE(connection_.ShouldClose());
  EXPECT_TRUE(connection_.needs_linger());
  // Later input is ignored.
  connection_.OnData("GET / HTTP/1.1\r\n\r\n");
  EXPECT_FALSE(connection_.has_pending_output());
}

TEST_F(HttpConnectionTest, ErrorStatuses) {
  const std::vector<std::pair<std::string, int>> cases = {
      {"GET / HTTP/1.1\r\nX: " + std::string(kMaxHeadBytes, 'x') + "\r\n\r\n",
       431},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
      {"GET / HTTP/2.0\r\n\r\n", 505},
      {"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400},
  };
  for (const auto& [request, status] : cases) {
    HttpConnection connection(responses_);
    connection.OnData(request);
    const std::string out(connection.pending_output());
    EXPECT_THAT(Statuses(out), ElementsAre(status)) << request.substr(0, 40);
    EXPECT_THAT(out, HasSubstr("Connection: close"));
    EXPECT_TRUE(connection.ShouldClose());
  }
}

TEST_F(HttpConnectionTest, OversizedHeadIs431BeforeItEnds) {
  connection_.OnData("GET / HTTP/1.1\r\nX-Long: ");
  for (int i = 0; i < 20 && !connection_.has_pending_output(); ++i) {
    connection_.OnData(std::string(1024, 'a'));
  }
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(431));
  EXPECT_TRUE(connection_.ShouldClose());
}

TEST_F(HttpConnectionTest, ExpectContinueWithBodyClosesAfterTheResponse) {
  connection_.OnData(
      "POST / HTTP/1.1\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n");
  const std::string out = TakeOutput();
  EXPECT_THAT(Statuses(out), ElementsAre(405));
  EXPECT_THAT(out, HasSubstr("Connection: close"));
  EXPECT_TRUE(connection_.ShouldClose());
  EXPECT_TRUE(connection_.needs_linger());
}

TEST_F(HttpConnectionTest, DrainClosesIdleConnectionAtOnce) {
  connection_.OnData("GET / HTTP/1.1\r\n\r\n");
  TakeOutput();
  EXPECT_FALSE(connection_.ShouldClose());
  connection_.StartDrain();
  EXPECT_TRUE(connection_.ShouldClose());
  EXPECT_FALSE(connection_.needs_linger());
}

TEST_F(HttpConnectionTest, DrainLetsTheRequestInProgressFinish) {
  connection_.OnData("GET /sleep?ms=10 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n");
  connection_.StartDrain();
  EXPECT_FALSE(connection_.ShouldClose());
  connection_.OnSleepDone();
  const std::string out = TakeOutput();
  // The sleep is answered with Connection: close; the next request is not.
  EXPECT_THAT(Statuses(out), ElementsAre(200));
  EXPECT_THAT(out, HasSubstr("Connection: close"));
  EXPECT_TRUE(connection_.ShouldClose());
}

TEST_F(HttpConnectionTest, DrainWithPartialRequestWaitsForIt) {
  connection_.OnData("GET / HTTP/1.1\r\nHo");
  connection_.StartDrain();
  EXPECT_FALSE(connection_.ShouldClose());
  connection_.OnData("st: x\r\n\r\n");
  const std::string out = TakeOutput();
  EXPECT_THAT(Statuses(out), ElementsAre(200));
  EXPECT_THAT(out, HasSubstr("Connection: close"));
  EXPECT_TRUE(connection_.ShouldClose());
}

TEST_F(HttpConnectionTest, DrainBeforeTheFirstRequestIsLeftToTheServer) {
  connection_.StartDrain();
  EXPECT_TRUE(connection_.idle());
  // The server gives it a grace period to send its first request.
  EXPECT_FALSE(connection_.ShouldClose());
}

TEST_F(HttpConnectionTest, HalfClosedClientStillGetsItsResponses) {
  connection_.OnData("GET / HTTP/1.1\r\n\r\nGET /sleep?ms=1 HTTP/1.1\r\n\r\n");
  connection_.OnPeerClosed();
  EXPECT_FALSE(connection_.ShouldClose());  // The sleep is pending.
  connection_.OnSleepDone();
  EXPECT_THAT(Statuses(TakeOutput()), ElementsAre(200, 200));
  EXPECT_TRUE(connection_.ShouldClose());
  EXPECT_FALSE(connection_.needs_linger());
}

TEST_F(HttpConnectionTest, BackPressureHoldsRequestsUntilOutputDrains) {
  std::string flood;
  const std::string request = "GET / HTTP/1.1\r\n\r\n";
  while (flood.size() < 64 * 1024) flood += request;
  const size_t total = flood.size() / request.size();
  size_t answered = 0;
  for (int round = 0; round < 20; ++round) {
    connection_.OnData(flood);
  }
  // Output stops growing past the backlog limit.
  EXPECT_TRUE(connection_.input_blocked());
  EXPECT_FALSE(connection_.wants_input());
  EXPECT_LT(connection_.pending_output().size(), kMaxOutputBacklog + 1024);
  while (connection_.has_pending_output() || connection_.input_blocked()) {
    answered += Statuses(TakeOutput()).size();
    connection_.Resume();
  }
  EXPECT_EQ(answered, total * 20);
  EXPECT_TRUE(connection_.idle());
}

// Releasable: only between requests, with nothing buffered either way.
TEST_F(HttpConnectionTest, ReleasableOnlyWhenNothingIsInFlight) {
  EXPECT_TRUE(connection_.releasable());  // No request yet.
  connection_.OnData("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_FALSE(connection_.releasable()) << "response not written yet";
  TakeOutput();
  EXPECT_TRUE(connection_.releasable());
  connection_.OnData("GET / HTT");  // Half a request read.
  EXPECT_FALSE(connection_.releasable());
  connection_.OnData("P/1.1\r\nHost: x\r\n\r\n");
  TakeOutput();
  EXPECT_TRUE(connection_.releasable());
  connection_.OnData("GET /sleep?ms=5 HTTP/1.1\r\n\r\n");
  EXPECT_FALSE(connection_.releasable()) << "sleeping";
  connection_.OnSleepDone();
  TakeOutput();
  EXPECT_TRUE(connection_.releasable());
  connection_.StartDrain();  // Promised to close: not handed on.
  EXPECT_FALSE(connection_.releasable());
}

TEST_F(HttpConnectionTest, NotReleasableAfterThePeerHalfClosed) {
  connection_.OnData("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  TakeOutput();
  connection_.OnPeerClosed();
  EXPECT_FALSE(connection_.releasable());
}

}  // namespace
}  // namespace fdbroker::http
