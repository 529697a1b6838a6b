#ifndef FDBROKER_BROKER_WORKER_REGISTRY_H_
#define FDBROKER_BROKER_WORKER_REGISTRY_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/handoff_channel.h"
#include "broker/worker_lifecycle.h"
#include "wire/socket_address.h"

namespace fdbroker {

// The Hello label by which a worker names the listeners it serves.
inline constexpr char kListenersLabel[] = "listeners";

// One worker process as the broker sees it. Loop thread only. Who writes
// what: the lifecycle fields only WorkerLifecycle (worker_lifecycle.h); what
// the Hello declared, WorkerRegistration; the load figures (unacked, owned,
// handed_total), the ConnectionDispatcher.
struct Worker {
  uint64_t id = 0;
  pid_t pid = 0;
  // Lifecycle.
  WorkerState state = WorkerState::kStarting;
  DrainCause drain_cause = DrainCause::kNone;  // Kept once exited.
  int64_t drain_deadline_mono_nanos = 0;       // 0: none (or passed).
  int64_t registered_mono_nanos = 0;           // 0: never registered.
  // The process (SO_PEERCRED pid) whose Hello was accepted: after a lost
  // channel only it may take this registration back (Readmitted).
  pid_t registered_pid = 0;

  bool supervised = false;
  // Supervised, but started by a previous broker (not our child).
  bool adopted = false;
  // Most connections (owned + unacked) the worker wants; 0 means no limit.
  uint32_t capacity = 0;
  // Most connections per hand-off packet (Hello.max_connections_per_message,
  // capped by the broker); 1: single Connection messages only.
  uint32_t max_connections_per_message = 1;
  // Hello.supports_release: it gives idle connections back when asked
  // (ReleaseRequest, Drain.release_idle); only then may it send Release.
  bool supports_release = false;
  // Hello.supports_listener_grant (minor 4).
  bool supports_listener_grant = false;
  // --placement=kernel: the KernelPlacement slot granted to it (-1: none;
  // it takes hand-offs), and the figures of the connections it accepted
  // itself, from its ListenerLoad reports (the broker never sees those
  // connections, so they have no ids here).
  int kernel_slot = -1;
  int64_t kernel_active = 0;
  uint64_t kernel_accepted_total = 0;
  // Hello.version.minor: which optional messages it understands (Reconnect
  // from 3 on).
  uint32_t protocol_minor = 0;
  // Hello.reports_liveness: its Heartbeats say how long its application
  // thread has been silent, so --worker_timeout applies to it.
  bool reports_liveness = false;
  // When its application thread last proved it runs (loop clock): the
  // registration, then each Heartbeat's receipt minus its app_silent_ms.
  int64_t app_alive_mono_nanos = 0;
  // Told Reconnect at an upgrade's commit: it closes its channel once it
  // has answered what it was sent, so nothing more may be sent to it here.
  bool moving = false;
  std::map<std::string, std::string> labels;
  absl::Time started_at;
  int64_t started_mono_nanos = 0;
  // Null before Hello and after the channel closed.
  std::unique_ptr<HandoffChannel> channel;
  // Connections sent and neither Acked nor Rejected yet. The broker still
  // holds their fds (see ConnectionDispatcher).
  int64_t unacked = 0;
  // Acked and not yet Closed: the worker owns these sockets. Each id maps to
  // its socket's identity (SocketIdentity, taken at the Ack; 0 for one
  // claimed at re-registration, whose socket this broker never held), which
  // a Release must match.
  absl::flat_hash_map<uint64_t, uint64_t> owned;
  // Owned connections whose addresses came from a PROXY header (peer, local):
  // their sockets name the balancer, so a Release takes these back with them.
  absl::flat_hash_map<uint64_t,
                      std::pair<wire::SocketAddress, wire::SocketAddress>>
      proxied;
  uint64_t handed_total = 0;
  // Of those, the new ones (not moved from another worker): what
  // --max_connections_per_worker counts. Counting moved ones would make a
  // recycle push the workers that take its idle clients past the limit in
  // turn, without end, once there are more clients than the limit.
  uint64_t new_total = 0;

  // Draining because the broker asked (or the worker said Goodbye): its exit
  // is expected, not a crash.
  bool retiring() const { return IsRequested(drain_cause); }

  int64_t active() const {
    return static_cast<int64_t>(owned.size()) + kernel_active;
  }
  // What balancing compares: every connection the worker has or will have.
  int64_t load() const { return active() + unacked; }
  bool HasRoom() const { return capacity == 0 || load() < capacity; }
  // Whether it takes connections that came through `listener` (a
  // Connection.listener name; null: none known). Its Hello label
  // kListenersLabel, comma-separated names, restricts it to those listeners
  // (one broker can front two pools); without the label, every listener.
  bool Serves(const std::string* listener) const;
  // Ready, with a channel that is open: what a rebalance weighs and what
  // accepts from its kernel-placement slot.
  bool Reachable() const {
    return state == WorkerState::kReady && channel != nullptr &&
           !channel->closed();
  }
  // Can take a new connection right now.
  bool Available() const {
    return Reachable() && !channel->congested() && !moving && HasRoom();
  }
};

// The table of workers, by id (ids increase, so iteration follows start
// order). Loop thread only; the control plane reads it through posted tasks.
class WorkerRegistry {
 public:
  using Map = std::map<uint64_t, std::unique_ptr<Worker>>;

  // Adds a worker with a fresh id.
  Worker& Add(pid_t pid, bool supervised, WorkerState state, absl::Time now,
              int64_t now_mono_nanos);
  Worker* Find(uint64_t id);
  Worker* FindByPid(pid_t pid);
  void Remove(uint64_t id);

  const Map& workers() const { return workers_; }
  size_t size() const { return workers_.size(); }
  size_t CountInState(WorkerState state) const;
  int64_t TotalActive() const;
  int64_t TotalUnacked() const;

 private:
  Map workers_;
  uint64_t next_id_ = 1;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_REGISTRY_H_
