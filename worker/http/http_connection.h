#ifndef FDBROKER_WORKER_HTTP_HTTP_CONNECTION_H_
#define FDBROKER_WORKER_HTTP_HTTP_CONNECTION_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "http_parser.h"
#include "http_responses.h"

namespace fdbroker::http {

// The longest /sleep a request may ask for.
inline constexpr uint32_t kMaxSleepMillis = 60000;
// Unsent response bytes beyond which pipelined requests wait (back-pressure
// on a client that sends faster than it reads).
inline constexpr size_t kMaxOutputBacklog = 256 * 1024;

// The HTTP/1.1 protocol state of one client connection, without any I/O:
// bytes go in through OnData(), responses come out of pending_output(); the
// server does the reads, writes and timers. Requests are answered strictly
// in order, so pipelining works; while a /sleep is pending, later requests
// wait in the input buffer.
//
// Loop thread only.
class HttpConnection {
 public:
  explicit HttpConnection(const Responses& responses);

  // The client's address (the broker's Connection.peer_address: the real
  // client behind a PROXY-protocol balancer), said in every response as
  // X-Client-Address; "unknown" while empty (a Unix-socket client).
  void SetClientAddress(absl::string_view address);

  // Bytes read from the socket (or Connection.initial_data, first).
  void OnData(absl::string_view data);
  // The client half-closed: answer what is complete, then close.
  void OnPeerClosed();
  // The pending sleep is over: answer it and continue with what is buffered.
  void OnSleepDone();
  // Continues with buffered requests held back by back-pressure (call when
  // the output has drained).
  void Resume();
  // From now on every response says "Connection: close" and the connection
  // closes after it; an idle connection should be closed at once.
  void StartDrain();

  absl::string_view pending_output() const {
    return absl::string_view(out_).substr(out_sent_);
  }
  bool has_pending_output() const { return out_sent_ < out_.size(); }
  // `bytes` of pending_output() were written.
  void ConsumeOutput(size_t bytes);

  // A /sleep is pending for sleep_millis().
  bool sleeping() const { return state_ == State::kSleeping; }
  uint32_t sleep_millis() const { return sleep_millis_; }
  // Requests held back by back-pressure wait for Resume().
  bool input_blocked() const { return input_blocked_; }
  // Reading more from the socket is useful now.
  bool wants_input() const {
    return state_ == State::kActive && !input_blocked_ && !peer_closed_;
  }
  // No further response will be produced: close once the output is sent.
  bool ShouldClose() const;
  // Between requests: nothing buffered, no body or sleep pending, no output.
  bool idle() const;
  // Can be handed to another worker as it is: idle (so no request or part
  // of one is buffered, nothing is left to write), not draining (nothing
  // promised "Connection: close"), and the client has not half-closed.
  bool releasable() const { return idle() && !draining_ && !peer_closed_; }
  // The client may still be sending (a body, pipelined requests, an error's
  // rest): close with a lingering half-close instead of an RST.
  bool needs_linger() const;
  // Requests answered so far.
  uint64_t requests() const { return requests_; }

 private:
  enum class State { kActive, kSleeping, kClosing };

  // Handles complete requests at the start of `data`; returns the bytes
  // consumed.
  size_t Process(absl::string_view data);
  // Runs Process() over in_ and drops what it consumed.
  void ProcessBuffered();
  void Handle(const HttpRequest& request);
  void Fail(int error_status);

  const Responses& responses_;
  // "X-Client-Address: ...\r\n".
  std::string client_line_;
  State state_ = State::kActive;
  RequestParser parser_;
  // Input received and not consumed yet (the capacity is kept).
  std::string in_;
  uint64_t body_left_ = 0;
  std::string out_;
  size_t out_sent_ = 0;
  uint64_t requests_ = 0;
  bool draining_ = false;
  bool peer_closed_ = false;
  bool input_blocked_ = false;
  bool failed_ = false;
  // The pending /sleep.
  uint32_t sleep_millis_ = 0;
  bool sleep_head_ = false;
  ConnectionHeader sleep_connection_ = ConnectionHeader::kNone;
};

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_HTTP_CONNECTION_H_
