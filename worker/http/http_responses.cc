#include "http_responses.h"

#include <cstdio>

#include "absl/strings/str_cat.h"

namespace fdbroker::http {
namespace {

struct ReplyInfo {
  int status;
  const char* status_line;
  const char* extra_headers;
  const char* body;
};

ReplyInfo Info(Reply reply) {
  switch (reply) {
    case Reply::kRoot:
      return {200, "HTTP/1.1 200 OK\r\n", "", nullptr};
    case Reply::kBadSleep:
      return {400, "HTTP/1.1 400 Bad Request\r\n", "",
              "bad request: use /sleep?ms=N (or /block?ms=N) with 0 <= N <= "
              "60000\n"};
    case Reply::kBadRequest:
      return {400, "HTTP/1.1 400 Bad Request\r\n", "", "bad request\n"};
    case Reply::kNotFound:
      return {404, "HTTP/1.1 404 Not Found\r\n", "", "not found\n"};
    case Reply::kMethodNotAllowed:
      return {405, "HTTP/1.1 405 Method Not Allowed\r\n",
              "Allow: GET, HEAD\r\n", "method not allowed\n"};
    case Reply::kHeadersTooLarge:
      return {431, "HTTP/1.1 431 Request Header Fields Too Large\r\n", "",
              "request header fields too large\n"};
    case Reply::kNotImplemented:
      return {501, "HTTP/1.1 501 Not Implemented\r\n", "",
              "transfer codings are not implemented\n"};
    case Reply::kVersionNotSupported:
      return {505, "HTTP/1.1 505 HTTP Version Not Supported\r\n", "",
              "HTTP version not supported\n"};
  }
  return {500, "HTTP/1.1 500 Internal Server Error\r\n", "", "\n"};
}

const char* ConnectionLine(ConnectionHeader connection) {
  switch (connection) {
    case ConnectionHeader::kNone:
      return "";
    case ConnectionHeader::kKeepAlive:
      return "Connection: keep-alive\r\n";
    case ConnectionHeader::kClose:
      return "Connection: close\r\n";
  }
  return "";
}

constexpr ConnectionHeader kConnectionHeaders[] = {ConnectionHeader::kNone,
                                                   ConnectionHeader::kKeepAlive,
                                                   ConnectionHeader::kClose};

}  // namespace

Responses::Responses(pid_t pid)
    : pid_header_(absl::StrCat("X-Worker-Pid: ", pid, "\r\n")) {
  const std::string root_body =
      absl::StrCat("hello from fdbroker-http-worker pid ", pid, "\n");
  for (int r = 0; r < kReplyCount; ++r) {
    const Reply reply = static_cast<Reply>(r);
    const ReplyInfo info = Info(reply);
    const std::string body = info.body != nullptr ? info.body : root_body;
    for (ConnectionHeader connection : kConnectionHeaders) {
      for (bool head : {false, true}) {
        Canned& canned = canned_[Index(reply, connection, head)];
        canned.before_date = info.status_line;
        canned.after_date = absl::StrCat(
            "Server: fdbroker-http-worker\r\n", pid_header_, info.extra_headers,
            "Content-Type: text/plain\r\nContent-Length: ", body.size(), "\r\n",
            ConnectionLine(connection), "\r\n", head ? "" : body);
      }
    }
  }
  SetDate(std::time(nullptr));
}

int Responses::Index(Reply reply, ConnectionHeader connection, bool head) {
  return (static_cast<int>(reply) * 3 + static_cast<int>(connection)) * 2 +
         (head ? 1 : 0);
}

int Responses::Status(Reply reply) { return Info(reply).status; }

void Responses::SetDate(std::time_t now) {
  static constexpr char kDays[7][4] = {"Sun", "Mon", "Tue", "Wed",
                                       "Thu", "Fri", "Sat"};
  static constexpr char kMonths[12][4] = {"Jan", "Feb", "Mar", "Apr",
                                          "May", "Jun", "Jul", "Aug",
                                          "Sep", "Oct", "Nov", "Dec"};
  std::tm utc;
  gmtime_r(&now, &utc);
  // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT" (RFC 9110 5.6.7).
  char buffer[64];
  const int n = std::snprintf(
      buffer, sizeof(buffer), "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
      kDays[utc.tm_wday], utc.tm_mday, kMonths[utc.tm_mon], utc.tm_year + 1900,
      utc.tm_hour, utc.tm_min, utc.tm_sec);
  date_line_.assign(buffer, n > 0 ? static_cast<size_t>(n) : 0);
}

void Responses::Append(std::string& out, Reply reply,
                       ConnectionHeader connection, bool head,
                       absl::string_view connection_line) const {
  const Canned& canned = canned_[Index(reply, connection, head)];
  out.append(canned.before_date);
  out.append(date_line_);
  out.append(connection_line.data(), connection_line.size());
  out.append(canned.after_date);
}

void Responses::AppendSlept(std::string& out, uint32_t millis,
                            ConnectionHeader connection, bool head,
                            absl::string_view connection_line) const {
  char body[32];
  const int body_size = std::snprintf(body, sizeof(body), "slept %u ms\n",
                                      static_cast<unsigned>(millis));
  absl::StrAppend(&out, "HTTP/1.1 200 OK\r\n", date_line_, connection_line,
                  "Server: fdbroker-http-worker\r\n", pid_header_,
                  "Content-Type: text/plain\r\nContent-Length: ", body_size,
                  "\r\n", ConnectionLine(connection), "\r\n");
  if (!head) out.append(body, static_cast<size_t>(body_size));
}

}  // namespace fdbroker::http
