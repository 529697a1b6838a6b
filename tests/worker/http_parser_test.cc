#include "http_parser.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace fdbroker::http {
namespace {

ParseResult ParseAll(absl::string_view data, HttpRequest& request) {
  RequestParser parser;
  return parser.Parse(data, request);
}

int ErrorStatus(absl::string_view data) {
  HttpRequest request;
  const ParseResult result = ParseAll(data, request);
  return result.status == ParseStatus::kError ? result.error_status : 0;
}

TEST(HttpParserTest, ParsesAGet) {
  const std::string data =
      "GET /sleep?ms=5 HTTP/1.1\r\nHost: example\r\nUser-Agent: t\r\n\r\n";
  HttpRequest request;
  const ParseResult result = ParseAll(data, request);
  ASSERT_EQ(result.status, ParseStatus::kComplete);
  EXPECT_EQ(result.consumed, data.size());
  EXPECT_EQ(request.method, Method::kGet);
  EXPECT_EQ(request.method_token, "GET");
  EXPECT_EQ(request.target, "/sleep?ms=5");
  EXPECT_EQ(request.version_minor, 1);
  EXPECT_TRUE(request.keep_alive);
  EXPECT_EQ(request.content_length, 0u);
}

TEST(HttpParserTest, RecognisesHeadAndOtherMethods) {
  HttpRequest request;
  ASSERT_EQ(ParseAll("HEAD / HTTP/1.1\r\n\r\n", request).status,
            ParseStatus::kComplete);
  EXPECT_EQ(request.method, Method::kHead);
  ASSERT_EQ(ParseAll("DELETE / HTTP/1.1\r\n\r\n", request).status,
            ParseStatus::kComplete);
  EXPECT_EQ(request.method, Method::kOther);
  EXPECT_EQ(request.method_token, "DELETE");
  // Methods are case-sensitive.
  ASSERT_EQ(ParseAll("get / HTTP/1.1\r\n\r\n", request).status,
            ParseStatus::kComplete);
  EXPECT_EQ(request.method, Method::kOther);
}

TEST(HttpParserTest, PipelinedRequestsInOneBuffer) {
  const std::string data =
      "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
      "GET /b HTTP/1.1\r\n\r\n"
      "POST /c HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz"
      "GET /d HTTP/1.1\r\nConnection: close\r\n\r\n"
      "GET /e HTTP/1.1\r\n";  // Incomplete.
  RequestParser parser;
  absl::string_view rest = data;
  std::vector<std::string> targets;
  for (;;) {
    HttpRequest request;
    const ParseResult result = parser.Parse(rest, request);
    if (result.status != ParseStatus::kComplete) {
      EXPECT_EQ(result.status, ParseStatus::kIncomplete);
      break;
    }
    targets.emplace_back(request.target);
    rest.remove_prefix(result.consumed + request.content_length);
  }
  EXPECT_EQ(targets, (std::vector<std::string>{"/a", "/b", "/c", "/d"}));
  EXPECT_EQ(rest, "GET /e HTTP/1.1\r\n");
}

TEST(HttpParserTest, RequestSplitAtEveryByteOffset) {
  const std::string data =
      "GET /path?q=1 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n"
      "Content-Length: 0\r\n\r\n";
  // One parser fed a growing prefix, as bytes trickle in.
  RequestParser growing;
  for (size_t n = 0; n <= data.size(); ++n) {
    HttpRequest request;
    const ParseResult result =
        growing.Parse(absl::string_view(data).substr(0, n), request);
    if (n < data.size()) {
      ASSERT_EQ(result.status, ParseStatus::kIncomplete) << "at " << n;
    } else {
      ASSERT_EQ(result.status, ParseStatus::kComplete);
      EXPECT_EQ(result.consumed, data.size());
      EXPECT_EQ(request.target, "/path?q=1");
      EXPECT_FALSE(request.keep_alive);
    }
  }
  // A fresh parser per split point: first part, then everything.
  for (size_t split = 0; split < data.size(); ++split) {
    RequestParser parser;
    HttpRequest request;
    ASSERT_EQ(
        parser.Parse(absl::string_view(data).substr(0, split), request).status,
        ParseStatus::kIncomplete)
        << "split " << split;
    const ParseResult result = parser.Parse(data, request);
    ASSERT_EQ(result.status, ParseStatus::kComplete) << "split " << split;
    EXPECT_EQ(result.consumed, data.size());
    EXPECT_EQ(request.target, "/path?q=1");
  }
}

TEST(HttpParserTest, SkipsEmptyLinesBeforeTheRequest) {
  const std::string data = "\r\n\r\nGET / HTTP/1.1\r\n\r\n";
  HttpRequest request;
  const ParseResult result = ParseAll(data, request);
  ASSERT_EQ(result.status, ParseStatus::kComplete);
  EXPECT_EQ(result.consumed, data.size());
  EXPECT_EQ(request.target, "/");
}

TEST(HttpParserTest, AcceptsBareLineFeeds) {
  const std::string data = "GET / HTTP/1.1\nHost: x\n\n";
  HttpRequest request;
  const ParseResult result = ParseAll(data, request);
  ASSERT_EQ(result.status, ParseStatus::kComplete);
  EXPECT_EQ(result.consumed, data.size());
}

TEST(HttpParserTest, MalformedRequestsAre400) {
  using std::string_literals::operator""s;
  const std::vector<std::string> malformed = {
      "GET\r\n\r\n",
      "GET /\r\n\r\n",
      " GET / HTTP/1.1\r\n\r\n",
      "GET  / HTTP/1.1\r\n\r\n",
      "GET / HTTP/1.1 \r\n\r\n",
      "GET /a b HTTP/1.1\r\n\r\n",
      "G@T / HTTP/1.1\r\n\r\n",
      "GET / HTTP/1.x\r\n\r\n",
      "GET / HTTP/11\r\n\r\n",
      "GET / FTP/1.1\r\n\r\n",
      "GET /\x01 HTTP/1.1\r\n\r\n",
      "GET /\r HTTP/1.1\r\n\r\n",
      "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
      "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
      "GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
      "GET / HTTP/1.1\r\nX: a\x01"
      "b\r\n\r\n",
      "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n"s,
      "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
      "GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
      "GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
      "GET / HTTP/1.1\r\nContent-Length: \r\n\r\n",
      "GET / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
      "GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
      "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
      "\x16\x03\x01\x02\x05\x01\r\n\r\n",  // A TLS ClientHello.
  };
  for (const std::string& data : malformed) {
    EXPECT_EQ(ErrorStatus(data), 400) << "request: " << data;
  }
}

TEST(HttpParserTest, RepeatedEqualContentLengthIsAccepted) {
  HttpRequest request;
  ASSERT_EQ(ParseAll("PUT / HTTP/1.1\r\nContent-Length: 4\r\n"
                     "Content-Length: 4\r\n\r\n",
                     request)
                .status,
            ParseStatus::kComplete);
  EXPECT_EQ(request.content_length, 4u);
}

TEST(HttpParserTest, OtherMajorVersionIs505) {
  EXPECT_EQ(ErrorStatus("GET / HTTP/2.0\r\n\r\n"), 505);
  EXPECT_EQ(ErrorStatus("GET / HTTP/0.9\r\n\r\n"), 505);
}

TEST(HttpParserTest, TransferEncodingIs501) {
  EXPECT_EQ(ErrorStatus("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                        "\r\n"),
            501);
}

TEST(HttpParserTest, OversizedHeadIs431) {
  const std::string big_header =
      "GET / HTTP/1.1\r\nX-Big: " + std::string(kMaxHeadBytes, 'a') + "\r\n";
  // Incomplete but already too large.
  EXPECT_EQ(ErrorStatus(big_header), 431);
  // Complete and too large.
  EXPECT_EQ(ErrorStatus(big_header + "\r\n"), 431);
  // Many small headers adding up.
  std::string many = "GET / HTTP/1.1\r\n";
  while (many.size() <= kMaxHeadBytes) many += "X-Header: value-value\r\n";
  EXPECT_EQ(ErrorStatus(many + "\r\n"), 431);
}

TEST(HttpParserTest, HeadAtTheLimitIsAccepted) {
  std::string data = "GET / HTTP/1.1\r\nX-Pad: ";
  data += std::string(kMaxHeadBytes - data.size() - 4, 'p');
  data += "\r\n\r\n";
  ASSERT_EQ(data.size(), kMaxHeadBytes);
  HttpRequest request;
  EXPECT_EQ(ParseAll(data, request).status, ParseStatus::kComplete);
}

TEST(HttpParserTest, ConnectionHeaderAndVersionDecideKeepAlive) {
  struct Case {
    std::string request;
    bool keep_alive;
  };
  const std::vector<Case> cases = {
      {"GET / HTTP/1.1\r\n\r\n", true},
      {"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false},
      {"GET / HTTP/1.1\r\nconnection: CLOSE\r\n\r\n", false},
      {"GET / HTTP/1.1\r\nConnection: Upgrade, close\r\n\r\n", false},
      {"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", true},
      {"GET / HTTP/1.0\r\n\r\n", false},
      {"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true},
      {"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true},
      {"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", false},
  };
  for (const Case& c : cases) {
    HttpRequest request;
    ASSERT_EQ(ParseAll(c.request, request).status, ParseStatus::kComplete)
        << c.request;
    EXPECT_EQ(request.keep_alive, c.keep_alive) << c.request;
  }
}

TEST(HttpParserTest, ContentLengthAndExpect) {
  HttpRequest request;
  const std::string data =
      "POST /x HTTP/1.1\r\nContent-Length:  42 \r\nExpect: 100-continue\r\n"
      "\r\n";
  const ParseResult result = ParseAll(data + "body...", request);
  ASSERT_EQ(result.status, ParseStatus::kComplete);
  EXPECT_EQ(result.consumed, data.size());  // The body is not consumed.
  EXPECT_EQ(request.content_length, 42u);
  EXPECT_TRUE(request.expect_continue);
}

TEST(HttpParserTest, ParseSleepMillis) {
  uint32_t ms = 0;
  EXPECT_TRUE(ParseSleepMillis("ms=250", 60000, ms));
  EXPECT_EQ(ms, 250u);
  EXPECT_TRUE(ParseSleepMillis("a=b&ms=0&c=d", 60000, ms));
  EXPECT_EQ(ms, 0u);
  EXPECT_TRUE(ParseSleepMillis("ms=60000", 60000, ms));
  EXPECT_FALSE(ParseSleepMillis("ms=60001", 60000, ms));
  EXPECT_FALSE(ParseSleepMillis("ms=-1", 60000, ms));
  EXPECT_FALSE(ParseSleepMillis("ms=", 60000, ms));
  EXPECT_FALSE(ParseSleepMillis("ms=1x", 60000, ms));
  EXPECT_FALSE(ParseSleepMillis("ms=99999999999999", 60000, ms));
  EXPECT_FALSE(ParseSleepMillis("xms=1", 60000, ms));
  EXPECT_FALSE(ParseSleepMillis("", 60000, ms));
}

}  // namespace
}  // namespace fdbroker::http
