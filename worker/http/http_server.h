#ifndef FDBROKER_WORKER_HTTP_HTTP_SERVER_H_
#define FDBROKER_WORKER_HTTP_HTTP_SERVER_H_

#include <chrono>
#include <cstdint>
#include <ctime>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "connection_source.h"
#include "http_connection.h"
#include "http_responses.h"
#include "wire/unique_fd.h"

namespace fdbroker::http {

// The example worker's event loop: one thread, one epoll set holding the
// connection source, a signalfd (SIGTERM, SIGINT) and every client socket
// (edge-triggered). It owns every client fd from OnNewConnection() until it
// closes it and tells the source (ConnectionClosed).
//
// Drain (SIGTERM, or the broker's Drain through the source, or the source
// giving up on a lost broker; a broker that is lost and re-registered with
// is not a drain and is invisible here): stop
// taking connections, close idle keep-alive connections at once, let busy
// ones finish the request in progress (its response says Connection:
// close), give a connection that has not sent its first request a short
// grace, and return from Run() once no connection is left and the source is
// finished. A second signal or the broker's drain deadline closes whatever
// is left at once.
//
// Migration (broker mode): a connection is released to the broker only when
// it is idle: no request being processed or sleeping, no response pending or
// unflushed, not lingering, and an empty input buffer. A partly received
// request is therefore never released; whole requests are answered as they
// arrive, so a released connection never has unread bytes to pass along
// (unread_data is always empty; bytes still in the kernel's socket buffer
// travel with the socket). The fd leaves epoll before the Release; once the
// SDK took it the server forgets the connection (no ConnectionClosed). A
// ReleaseRequest releases up to N such connections. A drain with
// ReleaseOnDrain() releases idle connections at once and busy ones as soon
// as their response is out (one whose client asked for Connection: close
// closes as usual); if a Release fails (the broker is gone) the drain
// continues the ordinary way, closing.
class HttpServer final : public ConnectionSink {
 public:
  // Blocks SIGTERM and SIGINT in the calling thread (they are read from a
  // signalfd): call before starting any other thread.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Create(
      std::unique_ptr<ConnectionSource> source);
  ~HttpServer() override;

  // Serves until drained. OK is a clean exit.
  absl::Status Run();

  void OnNewConnection(wire::UniqueFd fd, uint64_t source_id,
                       std::string initial_data,
                       std::string peer_address) override;
  void OnDrain(absl::Time deadline) override;
  void OnReleaseRequest(uint32_t max_connections,
                        worker::ReleaseReason reason) override;

 private:
  using MonoTime = std::chrono::steady_clock::time_point;
  enum class TimerKind { kNone, kSleep, kLinger, kFirstRequestGrace };

  struct Slot {
    explicit Slot(const Responses& responses) : http(responses) {}
    uint64_t key = 0;
    wire::UniqueFd fd;
    uint64_t source_id = 0;
    HttpConnection http;
    // Waiting for EPOLLOUT with output pending.
    bool write_blocked = false;
    // An input edge was consumed without reading to EAGAIN: read again when
    // the connection wants input.
    bool read_deferred = false;
    // In deferred_reads_.
    bool read_queued = false;
    // Write side shut down; reading and discarding until EOF or timeout.
    bool lingering = false;
    TimerKind timer = TimerKind::kNone;
    uint64_t timer_generation = 0;
    // When the connection was handed to this server: a drain leaves one
    // that has sent nothing open until kFirstRequestGrace after it.
    MonoTime delivered_at;
  };
  struct TimerEntry {
    MonoTime at;
    uint64_t key;
    uint64_t generation;
    bool operator>(const TimerEntry& other) const { return at > other.at; }
  };

  HttpServer(std::unique_ptr<ConnectionSource> source, wire::UniqueFd epoll_fd,
             wire::UniqueFd signal_fd);

  // Adds the slot's socket to epoll (edge-triggered, in and out); false if
  // it cannot be watched.
  bool Watch(const Slot& slot);
  void Dispatch(uint64_t key, uint32_t events);
  void OnSignal();
  void OnSourceReadable();
  void OnReadable(Slot& slot);
  void OnWritable(Slot& slot);
  // Reads and discards the input of a lingering connection.
  void DiscardInput(Slot& slot);
  // After anything happened to `slot`: write, resume held-back requests,
  // schedule its timer or close it. `slot` may be gone afterwards.
  void Service(Slot& slot);
  // Writes pending output; false if the connection was closed on an error.
  bool Flush(Slot& slot);
  // Whether `slot` may be handed to another worker now (see the class
  // comment).
  bool Releasable(const Slot& slot) const;
  enum class ReleaseResult { kReleased, kKept, kClosed };
  // Releases `slot` to the source. kReleased and kClosed: `slot` is gone
  // (closed if it could not be put back into epoll); kKept: the source
  // refused, the connection is served as before.
  ReleaseResult TryRelease(Slot& slot, worker::ReleaseReason reason);
  // A release drain that cannot release any more turns into an ordinary
  // one: every connection drains and is serviced at the end of the turn.
  void StopReleasing();
  void RunPendingServices();
  void CloseGracefully(Slot& slot);
  // Closes `slot`'s connection; a kCut one is reported as cut unfinished.
  enum class Closure { kFinished, kCut };
  void Close(Slot& slot, Closure closure = Closure::kFinished);
  void ScheduleTimer(Slot& slot, TimerKind kind, MonoTime at);
  void RunTimers();
  void RunDeferredReads();
  int NextTimeoutMillis() const;
  void RefreshClock();
  enum class StopSource { kNo, kYes };
  void BeginDrain(absl::Time deadline, StopSource stop_source);
  void CloseAll();
  Slot* Find(uint64_t key);

  Responses responses_;
  std::unique_ptr<ConnectionSource> source_;
  const wire::UniqueFd epoll_fd_;
  const wire::UniqueFd signal_fd_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Slot>> slots_;
  uint64_t next_key_;
  uint64_t next_timer_generation_ = 1;
  std::priority_queue<TimerEntry, std::vector<TimerEntry>,
                      std::greater<TimerEntry>>
      timers_;
  // Connections to read from at the end of the loop turn (read_deferred
  // and able to take input again).
  std::vector<uint64_t> deferred_reads_;
  // Connections to Service() at the end of the loop turn.
  std::vector<uint64_t> to_service_;
  std::unique_ptr<char[]> read_buffer_;
  MonoTime now_;
  std::time_t date_second_ = 0;
  bool draining_ = false;
  // Draining by releasing idle connections (ReleaseOnDrain()).
  bool release_drain_ = false;
  std::optional<MonoTime> drain_deadline_;
  // Set by a second signal or the drain deadline: everything was closed,
  // the source gets this long to say Goodbye.
  std::optional<MonoTime> forced_exit_at_;
  std::optional<MonoTime> source_paused_until_;
};

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_HTTP_SERVER_H_
