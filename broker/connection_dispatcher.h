#ifndef FDBROKER_BROKER_CONNECTION_DISPATCHER_H_
#define FDBROKER_BROKER_CONNECTION_DISPATCHER_H_

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/balancing_policy.h"
#include "broker/event_loop.h"
#include "broker/latency_histogram.h"
#include "broker/listener.h"
#include "broker/metrics_list.h"
#include "broker/worker_registry.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/fd_passing.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// Owns every client connection between accept and the worker's Ack, and
// places each on a worker. Loop thread only.
//
// Ownership rule: a connection's fd lives here (pending queue or in-flight
// table) from accept until the worker that received it Acks it; only then is
// the broker's copy closed. If the worker Rejects it, or its channel dies
// first, the connection goes back to the front of the queue and is placed on
// another worker. So at every moment exactly one process is responsible for
// each accepted connection.
//
// Batching: connections placed on a worker that declared
// max_connections_per_message > 1 are staged (in the in-flight table, fd
// held, counted in the worker's load) and sent together at the end of the
// loop turn, or as soon as the worker's batch is full: one sendmsg and one
// worker wake-up for a burst of accepts. A batch that cannot be sent goes
// back to the front of the queue, like a Reject.
//
// Migration: a worker that Releases an idle connection gives its fd back;
// from then on the broker owns it again (queue or in-flight table) and places
// it like a fresh connection, with the same id and the worker's unread bytes
// as initial_data, on any worker but the releaser (unless only the releaser
// can take it). The migration counts as done when the new owner Acks it.
class ConnectionDispatcher {
 public:
  // The broker's cap on a worker's max_connections_per_message (fds per
  // packet; the kernel allows 253).
  static constexpr uint32_t kMaxConnectionsPerMessage = 64;

  struct Options {
    // Connections waiting for a worker with room; past this they are closed.
    size_t max_pending = 4096;
    // Longest a connection waits for a worker before it is closed.
    absl::Duration pending_timeout = absl::Seconds(10);
    // A connection Rejected this many times is closed.
    int max_attempts = 8;
  };
  // broker/metrics_list.h declares the fields (and their metrics).
  struct Stats {
    FDBROKER_STATS_STRUCT_FIELDS(FDBROKER_DISPATCHER_STATS)
  };
  // A released connection reached its new owner (on its Ack).
  using MigrationObserver = std::function<void(
      uint64_t from_worker, uint64_t to_worker, v1::ReleaseReason reason)>;

  ConnectionDispatcher(EventLoop& loop, WorkerRegistry& registry,
                       BalancingPolicy& policy, const Options& options);
  ~ConnectionDispatcher();

  // Takes a freshly accepted connection: hands it off now if a worker has
  // room, else queues it (or closes it, counted, if the queue is full).
  // `initial_data`: bytes already read from it (one a previous broker
  // passed on at an upgrade).
  void Dispatch(AcceptedConnection connection, std::string initial_data = {});

  // Worker messages. An error means a protocol violation (unknown id, id of
  // another worker); the caller closes that worker's channel.
  absl::Status OnAck(Worker& worker, const v1::Ack& ack);
  absl::Status OnReject(Worker& worker, const v1::Reject& reject);
  absl::Status OnClosed(Worker& worker, const v1::Closed& closed);
  // The worker gives back a connection it owns (`fd`, from the Release's
  // packet): it is placed on another worker. The caller has checked that the
  // worker supports_release.
  absl::Status OnRelease(Worker& worker, const v1::Release& release,
                         wire::UniqueFd fd);

  void set_migration_observer(MigrationObserver observer) {
    on_migrated_ = std::move(observer);
  }
  // Names the listener of a released connection (from its socket), which
  // the broker does not remember for owned connections.
  using ListenerResolver = std::function<const std::string*(int fd)>;
  void set_listener_resolver(ListenerResolver resolver) {
    resolve_listener_ = std::move(resolver);
  }

  // `worker` will Ack nothing more (channel gone, or exited): its un-acked
  // connections go back to the queue and are placed elsewhere.
  void ReclaimUnacked(Worker& worker);

  // Places queued connections while some worker has room. Call whenever a
  // worker becomes available or gains room.
  void PlacePending();

  // Sends every staged batch now rather than at the end of the loop turn:
  // a message sent next on a worker's channel (Reconnect) must follow them.
  void SendStaged() { FlushBatches(); }

  // At an upgrade, once no worker here can take them: sends the queued
  // connections to the new broker (`inbox`, UpgradeInbox) in order, until
  // its socket is full. Returns how many went; this broker's copies close.
  size_t PassPendingTo(HandoffChannel& inbox);

  // Closes every queued connection (counted as `shutdown`), e.g. when the
  // broker drains with nobody left to serve them.
  void CloseAllPending();

  // Ids from now on are above `id` (a re-registering worker owns
  // connections numbered by a previous broker; new ids must not collide).
  void ReserveIdsAbove(uint64_t id) {
    next_connection_id_ = std::max(next_connection_id_, id + 1);
  }

  // The id the next accepted connection gets.
  uint64_t next_connection_id() const { return next_connection_id_; }
  size_t pending() const { return pending_.size(); }
  size_t in_flight() const { return in_flight_.size(); }
  // The broker leaves (an upgrade's deadline) with connections still in
  // flight: counted lost (`upgrade_deadline`); they close with the broker.
  void AbandonInFlight() { stats_.lost_upgrade_deadline += in_flight_.size(); }
  // Workers with a connection in flight since before `cutoff_nanos`
  // (monotonic): neither acked nor rejected in time.
  std::vector<uint64_t> WorkersOverdueSince(int64_t cutoff_nanos) const;
  // Adds the ids of the connections the broker holds itself (queued or in
  // flight) to `ids`: no worker may claim those as its own.
  void CollectHeldIds(absl::flat_hash_set<uint64_t>& ids) const;
  const Stats& stats() const { return stats_; }
  // Accept to Ack, for every handed-off connection.
  const LatencyHistogram& latency() const { return latency_; }

 private:
  struct Entry {
    uint64_t id = 0;
    AcceptedConnection connection;
    uint64_t worker_id = 0;    // While in flight.
    uint64_t excluded_id = 0;  // The worker that last rejected it.
    int attempts = 0;
    bool staged = false;       // In flight but not sent yet (see Batching).
    int64_t placed_nanos = 0;  // When it went in flight (the ack deadline).
    // Released by this worker (0: a fresh connection); never placed back
    // there while another worker can take it.
    uint64_t released_by = 0;
    v1::ReleaseReason release_reason = v1::RELEASE_REASON_UNSPECIFIED;
    // The releasing worker's unread bytes, passed on as initial_data.
    std::string initial_data;
  };

  // Gives `entry` to the best available worker: sent now, or staged in the
  // worker's batch. On success it is moved into the in-flight table; on
  // failure it is left untouched.
  bool TryPlace(Entry& entry);
  // `entry` (moved from) is now placed on `worker`: counted in its load and
  // kept in the in-flight table, sent already or `staged` in its batch.
  void MoveInFlight(Entry& entry, Worker& worker, bool staged);
  // Sends `worker_id`'s staged connections (`ids`, cleared). What cannot be
  // sent goes to failed_ and is re-placed by FlushBatches().
  void SendBatch(uint64_t worker_id, std::vector<uint64_t>& ids);
  // End of the loop turn: sends every staged batch, re-places failures.
  void FlushBatches();
  void ScheduleFlush();
  // Fills message_ with a Connection body for `entry`.
  void FormatConnection(const Entry& entry, v1::Connection& body);
  void Enqueue(Entry entry, bool front);
  void ArmPendingTimer();
  void ExpirePending();

  EventLoop& loop_;
  WorkerRegistry& registry_;
  BalancingPolicy& policy_;
  const Options options_;
  uint64_t next_connection_id_;
  std::deque<Entry> pending_;
  absl::flat_hash_map<uint64_t, Entry> in_flight_;
  Timer pending_timer_{loop_};
  // Staged connection ids per worker id, in placement order.
  absl::flat_hash_map<uint64_t, std::vector<uint64_t>> batches_;
  bool flush_scheduled_ = false;
  // Staged entries whose batch could not be sent, to re-place.
  std::vector<Entry> failed_;
  // Reused per placement so the data path does not allocate.
  std::vector<Worker*> candidates_;
  std::vector<Entry*> batch_entries_;
  std::vector<int> batch_fds_;
  v1::HandoffMessage message_;
  Stats stats_;
  LatencyHistogram latency_;
  MigrationObserver on_migrated_;
  ListenerResolver resolve_listener_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_CONNECTION_DISPATCHER_H_
