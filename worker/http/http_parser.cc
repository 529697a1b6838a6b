#include "http_parser.h"

#include <algorithm>
#include <array>
#include <cstring>

#include "absl/strings/match.h"

namespace fdbroker::http {
namespace {

// tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" /
//         "_" / "`" / "|" / "~" / DIGIT / ALPHA        (RFC 9110 5.6.2)
constexpr std::array<bool, 256> MakeTokenTable() {
  std::array<bool, 256> table{};
  for (int c = '0'; c <= '9'; ++c) table[c] = true;
  for (int c = 'a'; c <= 'z'; ++c) table[c] = true;
  for (int c = 'A'; c <= 'Z'; ++c) table[c] = true;
  for (char c : {'!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_',
                 '`', '|', '~'}) {
    table[static_cast<unsigned char>(c)] = true;
  }
  return table;
}
constexpr std::array<bool, 256> kTokenChar = MakeTokenTable();

bool IsToken(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!kTokenChar[static_cast<unsigned char>(c)]) return false;
  }
  return true;
}

// The request target: visible ASCII, no spaces (RFC 9112 3.2).
bool IsTarget(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x21 || u > 0x7e) return false;
  }
  return true;
}

// field-value: VCHAR, obs-text, SP and HTAB; no other control characters.
bool IsFieldValue(absl::string_view s) {
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && u != '\t') || u == 0x7f) return false;
  }
  return true;
}

absl::string_view TrimWhitespace(absl::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

// One line of the head without its line ending (CRLF or a bare LF, which
// RFC 9112 2.2 allows a recipient to accept).
absl::string_view LineAt(absl::string_view head, size_t pos, size_t& next) {
  const size_t newline = head.find('\n', pos);
  next = newline + 1;
  absl::string_view line = head.substr(pos, newline - pos);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  return line;
}

bool ParseDecimal(absl::string_view digits, size_t max_digits,
                  uint64_t& value) {
  if (digits.empty() || digits.size() > max_digits) return false;
  value = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  return true;
}

struct ConnectionOptions {
  bool close = false;
  bool keep_alive = false;
};

// Connection = #connection-option (comma-separated tokens).
void ParseConnectionHeader(absl::string_view value, ConnectionOptions& out) {
  while (!value.empty()) {
    const size_t comma = value.find(',');
    const absl::string_view option = TrimWhitespace(value.substr(0, comma));
    if (absl::EqualsIgnoreCase(option, "close")) out.close = true;
    if (absl::EqualsIgnoreCase(option, "keep-alive")) out.keep_alive = true;
    if (comma == absl::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
}

}  // namespace

ParseResult RequestParser::Parse(absl::string_view data, HttpRequest& request) {
  auto error = [this](int status) {
    Reset();
    return ParseResult{ParseStatus::kError, 0, status};
  };
  auto incomplete = [](void) { return ParseResult{}; };

  // RFC 9112 2.2: ignore empty lines before the request line.
  size_t start = 0;
  while (start < data.size()) {
    if (data[start] == '\n') {
      ++start;
    } else if (data[start] == '\r') {
      if (start + 1 == data.size()) return incomplete();
      if (data[start + 1] != '\n') break;
      start += 2;
    } else {
      break;
    }
    if (start > kMaxHeadBytes) return error(400);
  }

  // Find the empty line that ends the head: "\n\n" or "\n\r\n".
  size_t end = absl::string_view::npos;
  size_t pos = std::max(start, scanned_);
  while (pos < data.size()) {
    const void* found = std::memchr(data.data() + pos, '\n', data.size() - pos);
    if (found == nullptr) {
      pos = data.size();
      break;
    }
    const size_t newline = static_cast<const char*>(found) - data.data();
    if (newline + 1 < data.size() && data[newline + 1] == '\n') {
      end = newline + 2;
      break;
    }
    if (newline + 2 < data.size() && data[newline + 1] == '\r' &&
        data[newline + 2] == '\n') {
      end = newline + 3;
      break;
    }
    if (newline + 2 >= data.size()) {
      // The next line has not arrived completely: rescan from here.
      pos = newline;
      break;
    }
    pos = newline + 1;
  }
  if (end == absl::string_view::npos) {
    if (data.size() - start > kMaxHeadBytes) return error(431);
    scanned_ = pos;
    return incomplete();
  }
  if (end - start > kMaxHeadBytes) return error(431);
  const absl::string_view head = data.substr(start, end - start);

  // request-line = method SP request-target SP HTTP-version
  size_t next;
  const absl::string_view request_line = LineAt(head, 0, next);
  if (request_line.find('\r') != absl::string_view::npos) return error(400);
  const size_t space1 = request_line.find(' ');
  if (space1 == absl::string_view::npos) return error(400);
  const size_t space2 = request_line.find(' ', space1 + 1);
  if (space2 == absl::string_view::npos) return error(400);
  const absl::string_view method = request_line.substr(0, space1);
  const absl::string_view target =
      request_line.substr(space1 + 1, space2 - space1 - 1);
  const absl::string_view version = request_line.substr(space2 + 1);
  if (!IsToken(method) || !IsTarget(target)) return error(400);
  if (version.size() != 8 || !absl::StartsWith(version, "HTTP/") ||
      version[5] < '0' || version[5] > '9' || version[6] != '.' ||
      version[7] < '0' || version[7] > '9') {
    return error(400);
  }
  if (version[5] != '1') return error(505);

  request = HttpRequest();
  request.method_token = method;
  request.target = target;
  request.version_minor = version[7] - '0';
  if (method == "GET") {
    request.method = Method::kGet;
  } else if (method == "HEAD") {
    request.method = Method::kHead;
  }

  ConnectionOptions connection;
  bool have_length = false;
  bool chunked_or_other_coding = false;
  for (size_t line_start = next; line_start < head.size(); line_start = next) {
    const absl::string_view line = LineAt(head, line_start, next);
    if (line.empty()) break;  // The end of the head.
    // Obsolete line folding is rejected (RFC 9112 5.2).
    if (line.front() == ' ' || line.front() == '\t') return error(400);
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) return error(400);
    // No whitespace is allowed between name and colon (RFC 9112 5.1).
    const absl::string_view name = line.substr(0, colon);
    const absl::string_view raw_value = line.substr(colon + 1);
    if (!IsToken(name) || !IsFieldValue(raw_value)) return error(400);
    const absl::string_view value = TrimWhitespace(raw_value);
    if (absl::EqualsIgnoreCase(name, "content-length")) {
      uint64_t length;
      // 18 digits cannot overflow uint64_t.
      if (!ParseDecimal(value, 18, length)) return error(400);
      if (have_length && length != request.content_length) return error(400);
      have_length = true;
      request.content_length = length;
    } else if (absl::EqualsIgnoreCase(name, "connection")) {
      ParseConnectionHeader(value, connection);
    } else if (absl::EqualsIgnoreCase(name, "transfer-encoding")) {
      chunked_or_other_coding = true;
    } else if (absl::EqualsIgnoreCase(name, "expect")) {
      request.expect_continue = absl::EqualsIgnoreCase(value, "100-continue");
    }
  }
  if (chunked_or_other_coding) return error(501);

  request.keep_alive = request.version_minor >= 1
                           ? !connection.close
                           : connection.keep_alive && !connection.close;
  Reset();
  return ParseResult{ParseStatus::kComplete, end, 0};
}

bool ParseSleepMillis(absl::string_view query, uint32_t max_ms,
                      uint32_t& millis) {
  while (!query.empty()) {
    const size_t amp = query.find('&');
    const absl::string_view param = query.substr(0, amp);
    if (absl::StartsWith(param, "ms=")) {
      uint64_t value;
      if (!ParseDecimal(param.substr(3), 9, value) || value > max_ms) {
        return false;
      }
      millis = static_cast<uint32_t>(value);
      return true;
    }
    if (amp == absl::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return false;
}

}  // namespace fdbroker::http
