#include "broker/event_hub.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"

namespace fdbroker {

v1::WatchEventsResponse EventHub::ToProto(const WorkerEvent& event) {
  v1::WatchEventsResponse out;
  *out.mutable_time() =
      google::protobuf::util::TimeUtil::NanosecondsToTimestamp(
          absl::ToUnixNanos(event.time));
  out.set_type(event.type);
  out.set_worker_id(event.worker_id);
  out.set_pid(event.pid);
  out.set_exit_status(event.exit_status);
  out.set_detail(event.detail);
  out.set_reason(event.reason);
  return out;
}

absl::StatusOr<uint64_t> EventHub::Subscribe(Subscriber subscriber,
                                             OnClose on_close) {
  absl::MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("the broker is shutting down");
  if (subscribers_.size() >= kMaxSubscribers) {
    return absl::ResourceExhaustedError(
        absl::StrCat("too many WatchEvents streams (", kMaxSubscribers,
                     " at once); close one and retry"));
  }
  const uint64_t id = next_id_++;
  subscribers_.emplace(id, Entry{std::move(subscriber), std::move(on_close)});
  return id;
}

void EventHub::Unsubscribe(uint64_t id) {
  absl::MutexLock lock(&mu_);
  subscribers_.erase(id);
}

void EventHub::Publish(const WorkerEvent& event) {
  const v1::WatchEventsResponse proto = ToProto(event);
  absl::MutexLock lock(&mu_);
  for (auto& [id, entry] : subscribers_) entry.subscriber(proto);
}

void EventHub::Close() {
  // Under the lock, like Publish: a stream unsubscribes (under this lock)
  // before it is destroyed, so no callback can reach a destroyed stream.
  absl::MutexLock lock(&mu_);
  closed_ = true;
  for (auto& [id, entry] : subscribers_) entry.on_close();
  subscribers_.clear();
}

size_t EventHub::subscribers() const {
  absl::MutexLock lock(&mu_);
  return subscribers_.size();
}

}  // namespace fdbroker
