#include "http_connection.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"

namespace fdbroker::http {
namespace {

Reply ErrorReply(int status) {
  switch (status) {
    case 431:
      return Reply::kHeadersTooLarge;
    case 501:
      return Reply::kNotImplemented;
    case 505:
      return Reply::kVersionNotSupported;
    default:
      return Reply::kBadRequest;
  }
}

}  // namespace

HttpConnection::HttpConnection(const Responses& responses)
    : responses_(responses) {
  SetClientAddress("");
}

void HttpConnection::OnData(absl::string_view data) {
  if (state_ == State::kClosing) return;  // Only read to avoid an RST.
  if (!in_.empty() || state_ != State::kActive || input_blocked_) {
    in_.append(data.data(), data.size());
    ProcessBuffered();
    return;
  }
  // The common case: parse straight from the caller's buffer, keep only an
  // incomplete tail.
  const size_t used = Process(data);
  if (used < data.size()) in_.assign(data.data() + used, data.size() - used);
}

void HttpConnection::ProcessBuffered() {
  if (state_ != State::kActive || input_blocked_ || in_.empty()) return;
  const size_t used = Process(in_);
  // The parser's resume point is relative to the first unconsumed byte,
  // which stays at in_[0].
  in_.erase(0, used);
}

size_t HttpConnection::Process(absl::string_view data) {
  size_t pos = 0;
  while (state_ == State::kActive) {
    if (body_left_ > 0) {
      const size_t skip = static_cast<size_t>(
          std::min<uint64_t>(body_left_, data.size() - pos));
      pos += skip;
      body_left_ -= skip;
      if (body_left_ > 0) break;
      continue;
    }
    if (pos == data.size()) break;
    if (out_.size() - out_sent_ >= kMaxOutputBacklog) {
      input_blocked_ = true;
      break;
    }
    HttpRequest request;
    const ParseResult result = parser_.Parse(data.substr(pos), request);
    if (result.status == ParseStatus::kIncomplete) break;
    if (result.status == ParseStatus::kError) {
      Fail(result.error_status);
      in_.clear();
      return data.size();
    }
    pos += result.consumed;
    body_left_ = request.content_length;
    Handle(request);
  }
  return pos;
}

void HttpConnection::Handle(const HttpRequest& request) {
  ++requests_;
  const bool head = request.method == Method::kHead;
  // Without 100-continue support the client may or may not send the body:
  // the connection cannot be reused safely.
  const bool keep_alive =
      request.keep_alive && !draining_ && !peer_closed_ &&
      !(request.expect_continue && request.content_length > 0);
  const ConnectionHeader connection = !keep_alive ? ConnectionHeader::kClose
                                      : request.version_minor == 0
                                          ? ConnectionHeader::kKeepAlive
                                          : ConnectionHeader::kNone;
  if (!keep_alive) state_ = State::kClosing;

  Reply reply = Reply::kNotFound;
  if (request.method == Method::kOther) {
    reply = Reply::kMethodNotAllowed;
  } else {
    absl::string_view path = request.target;
    absl::string_view query;
    const size_t question = path.find('?');
    if (question != absl::string_view::npos) {
      query = path.substr(question + 1);
      path = path.substr(0, question);
    }
    if (path == "/") {
      reply = Reply::kRoot;
    } else if (path == "/sleep") {
      uint32_t millis;
      if (ParseSleepMillis(query, kMaxSleepMillis, millis)) {
        state_ = State::kSleeping;
        sleep_millis_ = millis;
        sleep_head_ = head;
        sleep_connection_ = connection;
        return;
      }
      reply = Reply::kBadSleep;
    } else if (path == "/block") {
      // A hung application, for the broker's --worker_timeout: the whole
      // loop thread stops, heartbeats included.
      uint32_t millis;
      if (ParseSleepMillis(query, kMaxSleepMillis, millis)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(millis));
        responses_.AppendSlept(out_, millis, connection, head, client_line_);
        return;
      }
      reply = Reply::kBadSleep;
    }
  }
  responses_.Append(out_, reply, connection, head, client_line_);
}

void HttpConnection::Fail(int error_status) {
  responses_.Append(out_, ErrorReply(error_status), ConnectionHeader::kClose,
                    /*head=*/false, client_line_);
  failed_ = true;
  state_ = State::kClosing;
}

void HttpConnection::SetClientAddress(absl::string_view address) {
  client_line_ = absl::StrCat(
      "X-Client-Address: ", address.empty() ? "unknown" : address, "\r\n");
}

void HttpConnection::OnPeerClosed() { peer_closed_ = true; }

void HttpConnection::OnSleepDone() {
  if (state_ != State::kSleeping) return;
  responses_.AppendSlept(out_, sleep_millis_, sleep_connection_, sleep_head_,
                         client_line_);
  state_ = sleep_connection_ == ConnectionHeader::kClose ? State::kClosing
                                                         : State::kActive;
  ProcessBuffered();
}

void HttpConnection::Resume() {
  if (!input_blocked_) return;
  input_blocked_ = false;
  ProcessBuffered();
}

void HttpConnection::StartDrain() {
  draining_ = true;
  if (state_ == State::kSleeping) {
    sleep_connection_ = ConnectionHeader::kClose;
  }
}

void HttpConnection::ConsumeOutput(size_t bytes) {
  out_sent_ += bytes;
  if (out_sent_ >= out_.size()) {
    out_.clear();  // Keeps the capacity for the next responses.
    out_sent_ = 0;
  }
}

bool HttpConnection::ShouldClose() const {
  switch (state_) {
    case State::kClosing:
      return true;
    case State::kSleeping:
      return false;
    case State::kActive:
      break;
  }
  if (input_blocked_) return false;
  // Everything complete has been answered; the rest can never complete.
  if (peer_closed_) return true;
  // A draining connection closes between requests. One that has not sent a
  // request yet is left to the server's grace period.
  return draining_ && idle() && requests_ > 0;
}

bool HttpConnection::idle() const {
  return state_ == State::kActive && in_.empty() && body_left_ == 0 &&
         !has_pending_output() && !input_blocked_;
}

bool HttpConnection::needs_linger() const {
  return !peer_closed_ && (failed_ || !in_.empty() || body_left_ > 0);
}

}  // namespace fdbroker::http
