#ifndef FDBROKER_BROKER_EVENT_HUB_H_
#define FDBROKER_BROKER_EVENT_HUB_H_

#include <cstdint>
#include <functional>
#include <map>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/worker_events.h"
#include "fdbroker/v1/broker.pb.h"

namespace fdbroker {

// Fans events out to WatchEvents streams. Publish() runs on the loop thread;
// Subscribe()/Unsubscribe() on gRPC threads. Subscribers and close callbacks
// are called with the hub's lock held, so they must only queue work (never
// block or call back into the hub).
class EventHub {
 public:
  using Subscriber = std::function<void(const v1::WatchEventsResponse&)>;
  // Called once when the hub closes (broker shutdown).
  using OnClose = std::function<void()>;
  // Most WatchEvents streams at once: each may queue thousands of events, so
  // a client cannot make the broker hold an unbounded number.
  static constexpr size_t kMaxSubscribers = 64;

  static v1::WatchEventsResponse ToProto(const WorkerEvent& event);

  // The subscription's id (never 0). Unavailable once the hub is closed,
  // ResourceExhausted with kMaxSubscribers subscribed.
  absl::StatusOr<uint64_t> Subscribe(Subscriber subscriber, OnClose on_close)
      ABSL_LOCKS_EXCLUDED(mu_);
  void Unsubscribe(uint64_t id) ABSL_LOCKS_EXCLUDED(mu_);
  void Publish(const WorkerEvent& event) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends every stream; later Subscribe() calls fail.
  void Close() ABSL_LOCKS_EXCLUDED(mu_);
  size_t subscribers() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    Subscriber subscriber;
    OnClose on_close;
  };
  mutable absl::Mutex mu_;
  std::map<uint64_t, Entry> subscribers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_EVENT_HUB_H_
