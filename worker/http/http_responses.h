#ifndef FDBROKER_WORKER_HTTP_HTTP_RESPONSES_H_
#define FDBROKER_WORKER_HTTP_HTTP_RESPONSES_H_

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <ctime>
#include <string>

#include "absl/strings/string_view.h"

namespace fdbroker::http {

// The responses the example worker sends.
enum class Reply {
  kRoot,                 // 200, GET /
  kBadSleep,             // 400, /sleep without a valid ms=0..60000
  kBadRequest,           // 400, malformed request
  kNotFound,             // 404
  kMethodNotAllowed,     // 405, not GET or HEAD
  kHeadersTooLarge,      // 431
  kNotImplemented,       // 501, Transfer-Encoding
  kVersionNotSupported,  // 505
};
inline constexpr int kReplyCount = 8;

// What the Connection header says.
enum class ConnectionHeader {
  kNone,       // HTTP/1.1 keep-alive: the default, no header.
  kKeepAlive,  // HTTP/1.0 keep-alive.
  kClose,
};

// Builds responses by appending to a connection's output buffer. Every
// response carries X-Worker-Pid, Date and the connection's own header line
// (X-Client-Address). The fixed parts are formatted once
// at start-up, so a response costs a few appends and no allocation once the
// buffer has grown.
//
// Loop thread only: SetDate() changes what later responses say.
class Responses {
 public:
  explicit Responses(pid_t pid);

  // Sets the Date header to `now` (call when the second changes).
  void SetDate(std::time_t now);

  // Appends `reply`; a HEAD response has the headers and no body.
  // `connection_line` is a header line of the connection's own ("Name:
  // value\r\n"), sent after Date.
  void Append(std::string& out, Reply reply, ConnectionHeader connection,
              bool head, absl::string_view connection_line) const;
  // Appends the 200 answer to /sleep?ms=`millis`.
  void AppendSlept(std::string& out, uint32_t millis,
                   ConnectionHeader connection, bool head,
                   absl::string_view connection_line) const;

  // The response status of `reply` (200, 400, ...).
  static int Status(Reply reply);

 private:
  // The canned response split around the Date header.
  struct Canned {
    std::string before_date;
    std::string after_date;
  };
  static int Index(Reply reply, ConnectionHeader connection, bool head);

  std::string pid_header_;
  // "Date: <IMF-fixdate>\r\n".
  std::string date_line_;
  std::array<Canned, kReplyCount * 3 * 2> canned_;
};

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_HTTP_RESPONSES_H_
