#ifndef FDBROKER_WORKER_HTTP_HTTP_PARSER_H_
#define FDBROKER_WORKER_HTTP_HTTP_PARSER_H_

#include <cstddef>
#include <cstdint>

#include "absl/strings/string_view.h"

// An incremental, allocation-free HTTP/1.x request-head parser (RFC 9112).
// It keeps only what the example worker needs: method, target, version and
// the headers that frame the message (Connection, Content-Length,
// Transfer-Encoding, Expect). The request's string_views point into the
// caller's buffer.
namespace fdbroker::http {

// The largest request head (request line + headers) accepted; larger is 431.
inline constexpr size_t kMaxHeadBytes = 16 * 1024;

enum class Method { kGet, kHead, kOther };

struct HttpRequest {
  Method method = Method::kOther;
  absl::string_view method_token;
  absl::string_view target;
  // HTTP/1.<minor>.
  int version_minor = 1;
  // After Connection and the version's default: false means close after the
  // response.
  bool keep_alive = true;
  // "Expect: 100-continue" was sent.
  bool expect_continue = false;
  // Body bytes that follow the head (Content-Length; 0 if absent).
  uint64_t content_length = 0;
};

enum class ParseStatus { kComplete, kIncomplete, kError };

struct ParseResult {
  ParseStatus status = ParseStatus::kIncomplete;
  // kComplete: bytes to consume (leading empty lines and the head, not the
  // body).
  size_t consumed = 0;
  // kError: the response status: 400 (malformed), 431 (head too large), 501
  // (Transfer-Encoding), 505 (HTTP major version other than 1). The
  // connection must be closed after that response.
  int error_status = 0;
};

// Parses one request head at a time. Not thread-safe; one per connection.
class RequestParser {
 public:
  // Parses the head at the start of `data`. After kIncomplete, call again
  // with the same bytes plus whatever arrived since (same start): the scan
  // resumes where it stopped, so a head that trickles in byte by byte costs
  // linear time. After kComplete or kError the parser starts afresh.
  ParseResult Parse(absl::string_view data, HttpRequest& request);

  void Reset() { scanned_ = 0; }

 private:
  // Offset in `data` up to which no end of head was found.
  size_t scanned_ = 0;
};

// Parses "ms=N" out of a query string ("a=b&ms=250"): N in [0, max_ms].
// False if absent or invalid.
bool ParseSleepMillis(absl::string_view query, uint32_t max_ms,
                      uint32_t& millis);

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_HTTP_PARSER_H_
