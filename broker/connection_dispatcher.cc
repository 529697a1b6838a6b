#include "broker/connection_dispatcher.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace fdbroker {

ConnectionDispatcher::ConnectionDispatcher(EventLoop& loop,
                                           WorkerRegistry& registry,
                                           BalancingPolicy& policy,
                                           const Options& options)
    : loop_(loop),
      registry_(registry),
      policy_(policy),
      options_(options),
      // Start above anything an earlier broker on this host handed out
      // (seconds since the epoch in the high bits), so ids stay unique
      // across restarts even before ReserveIdsAbove() learns of them.
      next_connection_id_(
          (static_cast<uint64_t>(absl::ToUnixSeconds(absl::Now())) << 24) + 1) {
}

ConnectionDispatcher::~ConnectionDispatcher() {
  if (pending_timer_ != 0) loop_.Cancel(pending_timer_);
}

void ConnectionDispatcher::Dispatch(AcceptedConnection connection) {
  ++stats_.dispatched;
  Entry entry;
  entry.id = next_connection_id_++;
  entry.connection = std::move(connection);
  // Earlier arrivals go first: only place directly when nobody is waiting.
  if (pending_.empty() && TryPlace(entry)) return;
  Enqueue(std::move(entry), /*front=*/false);
  PlacePending();
}

void ConnectionDispatcher::Enqueue(Entry entry, bool front) {
  if (!front && pending_.size() >= options_.max_pending) {
    ++stats_.rejected_overload;
    // The fd closes with `entry`.
    return;
  }
  if (front) {
    pending_.push_front(std::move(entry));
  } else {
    pending_.push_back(std::move(entry));
  }
  ArmPendingTimer();
}

bool ConnectionDispatcher::TryPlace(Entry& entry) {
  candidates_.clear();
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->Available() && id != entry.excluded_id) {
      candidates_.push_back(worker.get());
    }
  }
  while (!candidates_.empty()) {
    const size_t pick = policy_.Pick(candidates_, entry.connection.peer);
    Worker& worker = *candidates_[pick];
    v1::Connection* body = message_.mutable_connection();
    body->set_connection_id(entry.id);
    entry.connection.peer.Format(*body->mutable_peer_address());
    entry.connection.local.Format(*body->mutable_local_address());
    body->set_accept_time_unix_nanos(entry.connection.accept_unix_nanos);
    absl::StatusOr<wire::SendResult> sent =
        worker.channel->SendConnection(message_, entry.connection.fd.get());
    if (sent.ok() && *sent == wire::SendResult::kSent) {
      ++worker.unacked;
      ++entry.attempts;
      entry.worker_id = worker.id;
      const uint64_t id = entry.id;
      in_flight_.emplace(id, std::move(entry));
      return true;
    }
    if (sent.ok()) {
      // The worker is not reading its channel: bypass it, never wait.
      ++stats_.send_would_block;
    } else {
      ++stats_.send_errors;
      worker.channel->Close(absl::UnavailableError(
          absl::StrCat("hand-off failed: ", sent.status().message())));
    }
    candidates_.erase(candidates_.begin() + pick);
  }
  return false;
}

absl::Status ConnectionDispatcher::OnAck(Worker& worker, const v1::Ack& ack) {
  for (uint64_t id : ack.connection_ids()) {
    auto it = in_flight_.find(id);
    if (it == in_flight_.end() || it->second.worker_id != worker.id) {
      return absl::InvalidArgumentError(
          absl::StrCat("ack for connection ", id, " not sent to this worker"));
    }
    latency_.Observe(loop_.NowNanos() -
                     it->second.connection.accept_mono_nanos);
    // The worker owns the socket now; the broker's copy closes here.
    in_flight_.erase(it);
    --worker.unacked;
    worker.owned.insert(id);
    ++worker.handed_total;
    ++stats_.handed_off;
  }
  return absl::OkStatus();
}

absl::Status ConnectionDispatcher::OnReject(Worker& worker,
                                            const v1::Reject& reject) {
  for (uint64_t id : reject.connection_ids()) {
    auto it = in_flight_.find(id);
    if (it == in_flight_.end() || it->second.worker_id != worker.id) {
      return absl::InvalidArgumentError(absl::StrCat(
          "reject for connection ", id, " not sent to this worker"));
    }
    Entry entry = std::move(it->second);
    in_flight_.erase(it);
    --worker.unacked;
    ++stats_.rejected_by_worker;
    if (entry.attempts >= options_.max_attempts) {
      ++stats_.failed_attempts;
      spdlog::warn("connection {} rejected {} times; closing it", id,
                   entry.attempts);
      continue;
    }
    ++stats_.replaced;
    entry.worker_id = 0;
    entry.excluded_id = worker.id;
    Enqueue(std::move(entry), /*front=*/true);
  }
  PlacePending();
  return absl::OkStatus();
}

absl::Status ConnectionDispatcher::OnClosed(Worker& worker,
                                            const v1::Closed& closed) {
  for (uint64_t id : closed.connection_ids()) {
    if (worker.owned.erase(id) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "closed for connection ", id, " this worker does not own"));
    }
  }
  PlacePending();
  return absl::OkStatus();
}

void ConnectionDispatcher::ReclaimUnacked(Worker& worker) {
  if (worker.unacked == 0) return;
  std::vector<uint64_t> ids;
  for (const auto& [id, entry] : in_flight_) {
    if (entry.worker_id == worker.id) ids.push_back(id);
  }
  // Highest id first onto the front, so they leave in accept order.
  std::sort(ids.begin(), ids.end(), std::greater<uint64_t>());
  for (uint64_t id : ids) {
    auto it = in_flight_.find(id);
    Entry entry = std::move(it->second);
    in_flight_.erase(it);
    entry.worker_id = 0;
    ++stats_.worker_lost;
    ++stats_.replaced;
    Enqueue(std::move(entry), /*front=*/true);
  }
  spdlog::info("worker {}: {} un-acked connection(s) re-queued", worker.id,
               ids.size());
  worker.unacked = 0;
  PlacePending();
}

void ConnectionDispatcher::PlacePending() {
  while (!pending_.empty() && TryPlace(pending_.front())) pending_.pop_front();
}

void ConnectionDispatcher::CloseAllPending() {
  stats_.rejected_shutdown += pending_.size();
  pending_.clear();
}

void ConnectionDispatcher::ArmPendingTimer() {
  if (pending_timer_ != 0 || pending_.empty()) return;
  const int64_t wait = pending_.front().connection.accept_mono_nanos +
                       absl::ToInt64Nanoseconds(options_.pending_timeout) -
                       EventLoop::MonotonicNanos();
  pending_timer_ =
      loop_.RunAfter(absl::Nanoseconds(std::max<int64_t>(wait, 0)), [this] {
        pending_timer_ = 0;
        ExpirePending();
      });
}

void ConnectionDispatcher::ExpirePending() {
  const int64_t limit = EventLoop::MonotonicNanos() -
                        absl::ToInt64Nanoseconds(options_.pending_timeout);
  size_t expired = 0;
  // Re-queued entries may sit before newer ones; check the whole queue.
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->connection.accept_mono_nanos <= limit) {
      it = pending_.erase(it);
      ++expired;
    } else {
      ++it;
    }
  }
  if (expired > 0) {
    stats_.rejected_overload += expired;
    spdlog::warn(
        "closed {} connection(s) that waited longer than {} for a "
        "worker",
        expired, absl::FormatDuration(options_.pending_timeout));
  }
  // The next deadline is the oldest remaining entry's.
  if (!pending_.empty()) {
    int64_t oldest = pending_.front().connection.accept_mono_nanos;
    for (const Entry& e : pending_) {
      oldest = std::min(oldest, e.connection.accept_mono_nanos);
    }
    const int64_t wait = oldest +
                         absl::ToInt64Nanoseconds(options_.pending_timeout) -
                         EventLoop::MonotonicNanos();
    pending_timer_ = loop_.RunAfter(
        absl::Nanoseconds(std::max<int64_t>(wait, 1000000)), [this] {
          pending_timer_ = 0;
          ExpirePending();
        });
  }
}

}  // namespace fdbroker
