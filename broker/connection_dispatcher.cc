#include "broker/connection_dispatcher.h"

#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace fdbroker {
namespace {

// The identity of the socket `fd` refers to: its inode in the kernel's
// socket filesystem, the same through every dup and every process; 0 if
// `fd` is no socket.
uint64_t SocketIdentity(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return 0;
  return static_cast<uint64_t>(st.st_ino);
}

// Whether `fd` is the socket with `identity`; for an unknown identity (0),
// at least a connected stream socket, never a pipe, a file or a listener.
absl::Status CheckSameSocket(int fd, uint64_t identity) {
  const uint64_t actual = SocketIdentity(fd);
  if (actual == 0) return absl::InvalidArgumentError("the fd is not a socket");
  if (identity != 0) {
    return actual == identity
               ? absl::OkStatus()
               : absl::InvalidArgumentError(
                     "the fd is not the socket handed out under that id");
  }
  int type = 0, listening = 0;
  socklen_t size = sizeof(type);
  sockaddr_storage peer;
  socklen_t peer_size = sizeof(peer);
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) != 0 ||
      type != SOCK_STREAM ||
      ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) != 0 ||
      listening != 0 ||
      ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_size) != 0) {
    return absl::InvalidArgumentError(
        "the fd is not the socket of a connection (not a connected stream "
        "socket)");
  }
  return absl::OkStatus();
}

// The address of `fd`'s peer or its own; empty unless IP.
wire::SocketAddress IpAddressOf(int fd, bool peer) {
  absl::StatusOr<wire::SocketAddress> address =
      wire::SocketAddress::Of(fd, peer);
  if (!address.ok() ||
      (address->family() != AF_INET && address->family() != AF_INET6)) {
    return wire::SocketAddress();
  }
  return *address;
}

}  // namespace

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
          (static_cast<uint64_t>(absl::ToUnixSeconds(loop.clock().Now()))
           << 24) +
          1) {}

ConnectionDispatcher::~ConnectionDispatcher() = default;

void ConnectionDispatcher::Dispatch(AcceptedConnection connection,
                                    std::string initial_data) {
  ++stats_.dispatched;
  Entry entry;
  entry.id = next_connection_id_++;
  entry.connection = std::move(connection);
  entry.initial_data = std::move(initial_data);
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

void ConnectionDispatcher::FormatConnection(const Entry& entry,
                                            v1::Connection& body) {
  body.set_connection_id(entry.id);
  entry.connection.peer.Format(*body.mutable_peer_address());
  entry.connection.local.Format(*body.mutable_local_address());
  body.set_accept_time_unix_nanos(entry.connection.accept_unix_nanos);
  if (entry.connection.listener != nullptr) {
    body.set_listener(*entry.connection.listener);
  } else {
    body.clear_listener();
  }
  // Always set: message_ and its batch entries are reused.
  body.set_initial_data(entry.initial_data);
}

void ConnectionDispatcher::MoveInFlight(Entry& entry, Worker& worker,
                                        bool staged) {
  ++worker.unacked;
  ++entry.attempts;
  entry.worker_id = worker.id;
  entry.staged = staged;
  entry.placed_nanos = loop_.NowNanos();
  const uint64_t id = entry.id;
  in_flight_.emplace(id, std::move(entry));
}

std::vector<uint64_t> ConnectionDispatcher::WorkersOverdueSince(
    int64_t cutoff_nanos) const {
  std::vector<uint64_t> overdue;
  for (const auto& [id, entry] : in_flight_) {
    if (entry.placed_nanos < cutoff_nanos &&
        std::find(overdue.begin(), overdue.end(), entry.worker_id) ==
            overdue.end()) {
      overdue.push_back(entry.worker_id);
    }
  }
  return overdue;
}

bool ConnectionDispatcher::TryPlace(Entry& entry) {
  candidates_.clear();
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->Available() && id != entry.excluded_id &&
        id != entry.released_by && worker->Serves(entry.connection.listener)) {
      candidates_.push_back(worker.get());
    }
  }
  if (entry.released_by == 0) {
    // --placement=kernel: a fresh connection reached the broker through the
    // share the placement program gives the workers that take hand-offs
    // (the others get theirs from the kernel), so it goes to one of those
    // while any can take it.
    auto accepts_itself = [](const Worker* w) { return w->kernel_slot >= 0; };
    if (!std::all_of(candidates_.begin(), candidates_.end(), accepts_itself)) {
      candidates_.erase(std::remove_if(candidates_.begin(), candidates_.end(),
                                       accepts_itself),
                        candidates_.end());
    }
  }
  if (candidates_.empty() && entry.released_by != 0 &&
      entry.released_by != entry.excluded_id) {
    // Nobody else can take it now: back to the releaser beats waiting.
    Worker* releaser = registry_.Find(entry.released_by);
    if (releaser != nullptr && releaser->Available() &&
        releaser->Serves(entry.connection.listener)) {
      candidates_.push_back(releaser);
    }
  }
  while (!candidates_.empty()) {
    const size_t pick = policy_.Pick(candidates_, entry.connection.peer);
    Worker& worker = *candidates_[pick];
    // Unread bytes of a released connection go alone: a batch of them could
    // outgrow the packet limit.
    if (worker.max_connections_per_message > 1 && entry.initial_data.empty()) {
      const uint64_t id = entry.id;
      MoveInFlight(entry, worker, /*staged=*/true);
      std::vector<uint64_t>& batch = batches_[worker.id];
      batch.push_back(id);
      if (batch.size() >= worker.max_connections_per_message) {
        SendBatch(worker.id, batch);
      }
      ScheduleFlush();
      return true;
    }
    FormatConnection(entry, *message_.mutable_connection());
    const int fd = entry.connection.fd.get();
    absl::StatusOr<wire::SendResult> sent =
        worker.channel->SendConnections(message_, {&fd, 1});
    if (sent.ok() && *sent == wire::SendResult::kSent) {
      MoveInFlight(entry, worker, /*staged=*/false);
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

void ConnectionDispatcher::SendBatch(uint64_t worker_id,
                                     std::vector<uint64_t>& ids) {
  batch_entries_.clear();
  for (uint64_t id : ids) {
    // Entries re-queued meanwhile (channel lost) are no longer ours to send.
    auto it = in_flight_.find(id);
    if (it != in_flight_.end() && it->second.staged &&
        it->second.worker_id == worker_id) {
      batch_entries_.push_back(&it->second);
    }
  }
  ids.clear();
  if (batch_entries_.empty()) return;
  Worker* worker = registry_.Find(worker_id);
  absl::StatusOr<wire::SendResult> sent = absl::UnavailableError("worker gone");
  if (worker != nullptr && worker->channel != nullptr) {
    batch_fds_.clear();
    if (batch_entries_.size() == 1) {
      FormatConnection(*batch_entries_.front(), *message_.mutable_connection());
    } else {
      v1::ConnectionBatch& batch = *message_.mutable_connection_batch();
      // Reuses the Connection objects (and their strings) of earlier batches.
      while (batch.connections_size() >
             static_cast<int>(batch_entries_.size())) {
        batch.mutable_connections()->RemoveLast();
      }
      for (size_t i = 0; i < batch_entries_.size(); ++i) {
        FormatConnection(*batch_entries_[i],
                         i < static_cast<size_t>(batch.connections_size())
                             ? *batch.mutable_connections(static_cast<int>(i))
                             : *batch.add_connections());
      }
    }
    for (const Entry* entry : batch_entries_) {
      batch_fds_.push_back(entry->connection.fd.get());
    }
    sent = worker->channel->SendConnections(message_, batch_fds_);
  }
  if (sent.ok() && *sent == wire::SendResult::kSent) {
    for (Entry* entry : batch_entries_) entry->staged = false;
    if (batch_entries_.size() > 1) ++stats_.batches_sent;
    return;
  }
  if (sent.ok()) {
    // The worker is not reading its channel (it is congested now, so the
    // re-placement passes it by).
    ++stats_.send_would_block;
  } else if (worker != nullptr && worker->channel != nullptr) {
    ++stats_.send_errors;
    worker->channel->Close(absl::UnavailableError(
        absl::StrCat("hand-off failed: ", sent.status().message())));
  }
  for (Entry* entry : batch_entries_) {
    if (worker != nullptr) --worker->unacked;
    const uint64_t id = entry->id;
    auto it = in_flight_.find(id);
    failed_.push_back(std::move(it->second));
    in_flight_.erase(it);
    failed_.back().staged = false;
    failed_.back().worker_id = 0;
    // Not the connection's fault: this attempt does not count.
    --failed_.back().attempts;
  }
  ScheduleFlush();
}

void ConnectionDispatcher::ScheduleFlush() {
  if (flush_scheduled_) return;
  flush_scheduled_ = true;
  loop_.RunSoon([this] {
    flush_scheduled_ = false;
    FlushBatches();
  });
}

void ConnectionDispatcher::FlushBatches() {
  for (auto it = batches_.begin(); it != batches_.end();) {
    if (!it->second.empty()) SendBatch(it->first, it->second);
    // Forget removed workers; keep the others' vectors (and capacity).
    if (registry_.Find(it->first) == nullptr) {
      batches_.erase(it++);
    } else {
      ++it;
    }
  }
  if (failed_.empty()) return;
  // Back to the front in their original order, then placed anew (the
  // worker they failed on is congested or closed, so it is passed by).
  for (auto it = failed_.rbegin(); it != failed_.rend(); ++it) {
    Enqueue(std::move(*it), /*front=*/true);
  }
  failed_.clear();
  PlacePending();
}

void ConnectionDispatcher::CollectHeldIds(
    absl::flat_hash_set<uint64_t>& ids) const {
  for (const Entry& entry : pending_) ids.insert(entry.id);
  for (const auto& [id, entry] : in_flight_) ids.insert(id);
}

absl::Status ConnectionDispatcher::OnAck(Worker& worker, const v1::Ack& ack) {
  for (uint64_t id : ack.connection_ids()) {
    auto it = in_flight_.find(id);
    if (it == in_flight_.end() || it->second.worker_id != worker.id ||
        it->second.staged) {
      return absl::InvalidArgumentError(
          absl::StrCat("ack for connection ", id, " not sent to this worker"));
    }
    const uint64_t released_by = it->second.released_by;
    const v1::ReleaseReason reason = it->second.release_reason;
    if (released_by == 0) {
      latency_.Observe(loop_.NowNanos() -
                       it->second.connection.accept_mono_nanos);
      ++stats_.handed_off;
    } else if (reason == v1::RELEASE_REASON_DRAIN) {
      ++stats_.migrated_drain;
    } else {
      ++stats_.migrated_rebalance;
    }
    // The worker owns the socket now; the broker's copy closes here.
    const uint64_t identity = SocketIdentity(it->second.connection.fd.get());
    const AcceptedConnection& c = it->second.connection;
    if (c.proxied) worker.proxied.try_emplace(id, c.peer, c.local);
    in_flight_.erase(it);
    --worker.unacked;
    worker.owned.emplace(id, identity);
    ++worker.handed_total;
    if (released_by == 0) ++worker.new_total;
    if (released_by != 0 && on_migrated_) {
      on_migrated_(released_by, worker.id, reason);
    }
  }
  return absl::OkStatus();
}

absl::Status ConnectionDispatcher::OnRelease(Worker& worker,
                                             const v1::Release& release,
                                             wire::UniqueFd fd) {
  uint64_t id = release.connection_id();
  if ((id & wire::kWorkerAcceptedIdBit) != 0) {
    // One the worker accepted itself (--placement=kernel): the broker never
    // saw it, so it checks only that the worker reported one, and gives it
    // a broker id of its own.
    if (worker.kernel_active <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "release of worker-accepted connection ", id,
          " while the worker reports none active (listener_load)"));
    }
    if (release.unread_data().size() > wire::kMaxUnreadData) {
      return absl::InvalidArgumentError(
          absl::StrCat("release of connection ", id, " carries ",
                       release.unread_data().size(),
                       " unread bytes; the limit is ", wire::kMaxUnreadData));
    }
    --worker.kernel_active;
    id = next_connection_id_++;
    return Reclaim(worker, id, release, std::move(fd));
  }
  // A connection staged or in flight is not owned yet: only Acked ones can
  // be released, so no id is ever in two places.
  auto owned = worker.owned.find(id);
  if (owned == worker.owned.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "release of connection ", id, " this worker does not own"));
  }
  if (absl::Status same = CheckSameSocket(fd.get(), owned->second);
      !same.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("release of connection ", id, ": ", same.message()));
  }
  if (release.unread_data().size() > wire::kMaxUnreadData) {
    return absl::InvalidArgumentError(absl::StrCat(
        "release of connection ", id, " carries ", release.unread_data().size(),
        " unread bytes; the limit is ", wire::kMaxUnreadData));
  }
  worker.owned.erase(owned);
  return Reclaim(worker, id, release, std::move(fd));
}

absl::Status ConnectionDispatcher::Reclaim(Worker& worker, uint64_t id,
                                           const v1::Release& release,
                                           wire::UniqueFd fd) {
  ++stats_.released;
  Entry entry;
  entry.id = id;
  entry.connection.fd = std::move(fd);
  // The broker does not remember owned connections' addresses: the socket
  // itself tells (a non-IP socket, as in tests, leaves them empty).
  AcceptedConnection& c = entry.connection;
  if (auto p = worker.proxied.find(id); p != worker.proxied.end()) {
    // Behind a PROXY-protocol balancer the socket would name the balancer.
    std::tie(c.peer, c.local) = p->second;
    c.proxied = true;
    worker.proxied.erase(p);
  } else {
    c.peer = IpAddressOf(c.fd.get(), /*peer=*/true);
    c.local = IpAddressOf(c.fd.get(), /*peer=*/false);
  }
  if (resolve_listener_) c.listener = resolve_listener_(c.fd.get());
  // The pending timeout runs from the release; the accept time is not kept.
  c.accept_mono_nanos = loop_.clock().MonotonicNanos();
  c.accept_unix_nanos = loop_.clock().UnixNanos();
  entry.released_by = worker.id;
  entry.release_reason = release.reason() == v1::RELEASE_REASON_DRAIN
                             ? v1::RELEASE_REASON_DRAIN
                             : v1::RELEASE_REASON_REBALANCE;
  entry.initial_data = release.unread_data();
  if (pending_.empty() && TryPlace(entry)) return absl::OkStatus();
  Enqueue(std::move(entry), /*front=*/false);
  PlacePending();
  return absl::OkStatus();
}

absl::Status ConnectionDispatcher::OnReleaseTruncated(
    Worker& worker, const v1::Release& release) {
  const uint64_t id = release.connection_id();
  if (worker.owned.erase(id) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "release of connection ", id, " this worker does not own"));
  }
  worker.proxied.erase(id);
  ++stats_.lost_release_truncated;
  spdlog::warn(
      "connection {} released by worker {} is lost: the broker is out of "
      "file descriptors (ancillary data truncated)",
      id, worker.id);
  return absl::OkStatus();
}

absl::Status ConnectionDispatcher::OnReject(Worker& worker,
                                            const v1::Reject& reject) {
  for (uint64_t id : reject.connection_ids()) {
    auto it = in_flight_.find(id);
    if (it == in_flight_.end() || it->second.worker_id != worker.id ||
        it->second.staged) {
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
  for (const auto* ids :
       {&closed.connection_ids(), &closed.cut_connection_ids()}) {
    for (uint64_t id : *ids) {
      worker.proxied.erase(id);
      if (worker.owned.erase(id) == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "closed for connection ", id, " this worker does not own"));
      }
    }
  }
  // Cut unfinished by the worker itself (its drain deadline): lost.
  stats_.lost_cut_by_worker += closed.cut_connection_ids_size();
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
    entry.staged = false;
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

size_t ConnectionDispatcher::PassPendingTo(HandoffChannel& inbox) {
  size_t passed = 0;
  while (!pending_.empty()) {
    Entry& entry = pending_.front();
    FormatConnection(entry, *message_.mutable_connection());
    const int fd = entry.connection.fd.get();
    absl::StatusOr<wire::SendResult> sent =
        inbox.SendConnections(message_, {&fd, 1});
    if (!sent.ok() || *sent != wire::SendResult::kSent) break;
    pending_.pop_front();
    ++passed;
  }
  return passed;
}

void ConnectionDispatcher::CloseAllPending() {
  stats_.rejected_shutdown += pending_.size();
  pending_.clear();
}

void ConnectionDispatcher::ArmPendingTimer() {
  if (pending_timer_.armed() || pending_.empty()) return;
  const int64_t wait = pending_.front().connection.accept_mono_nanos +
                       absl::ToInt64Nanoseconds(options_.pending_timeout) -
                       loop_.clock().MonotonicNanos();
  pending_timer_.Arm(absl::Nanoseconds(std::max<int64_t>(wait, 0)),
                     [this] { ExpirePending(); });
}

void ConnectionDispatcher::ExpirePending() {
  const int64_t limit = loop_.clock().MonotonicNanos() -
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
                         loop_.clock().MonotonicNanos();
    pending_timer_.Arm(absl::Nanoseconds(std::max<int64_t>(wait, 1000000)),
                       [this] { ExpirePending(); });
  }
}

}  // namespace fdbroker
