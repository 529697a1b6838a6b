#ifndef FDBROKER_BROKER_WORKER_LIFECYCLE_H_
#define FDBROKER_BROKER_WORKER_LIFECYCLE_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/metrics_list.h"
#include "broker/worker_events.h"

namespace fdbroker {

class EventLoop;
class WorkerRegistry;
struct Worker;

// Where a worker is in its life. Every change of it is one function of
// WorkerLifecycle (below); the diagram, with those functions on the arrows:
// clang-format off
//
//   Spawned, Arrived ──► kStarting ──Registered──► kReady ◄──┐
//                           │                        │       │ Readmitted
//                           │                        │       │ (kChannelLost
//                           │                        │       │  only)
//          Drain(requested) │                        │ Drain(any cause),
//                           ▼                        │ SaidGoodbye,
//                       kDraining ◄──────────────────┘ ChannelLost(cause)
//                           │  Drain again: only a lost worker, whose exit
//                           │  is then expected (e.g. at shutdown)
//                           ▼
//   kStarting, kReady, kDraining ──Exited, Disconnected──► kExited (removed)
//
// clang-format on
//
// Restarting with back-off is the pool's, not a worker's: a failed worker's
// record goes at its exit and its replacement is a new worker (WorkerPool).
enum class WorkerState {
  kStarting,  // Spawned (supervised) and not registered yet.
  kReady,     // Registered; takes connections.
  kDraining,  // Leaving: see its DrainCause; takes no new connections.
  kExited,    // Gone; kept only until its record is removed.
};

absl::string_view WorkerStateName(WorkerState state);

// Why a worker is draining. A drain the broker asked for (or the worker
// announced) ends in an expected exit; a lost channel or a heartbeat timeout
// is a failure, and the worker is replaced at once (with back-off). A new
// reason to retire workers (recycling, a watchdog, a rolling restart) is one
// value here and its name in the .cc.
enum class DrainCause {
  kNone,              // Not draining.
  kOperator,          // DrainWorker without replace.
  kReplaced,          // DrainWorker with replace: its replacement registered.
  kScaleDown,         // ScaleWorkers below the current count.
  kPoolDrain,         // Broker-wide Drain with a timeout (pool suspended).
  kShutdown,          // SIGTERM and friends: the broker drains and exits.
  kGoodbye,           // The worker said Goodbye on its own.
  kChannelLost,       // Its channel closed (EOF, protocol error).
  kHeartbeatTimeout,  // Silent for --heartbeat_timeout: declared dead.
  kAckTimeout,        // A connection not acked within --ack_timeout: cut off.
  kChannelStuck,      // Its channel stayed full for --heartbeat_timeout.
  kRestarted,  // Rolling restart (RestartWorkers, SIGHUP): replacement ready.
  kRecycled,   // Past a recycling limit: its replacement registered.
  kWorkerTimeout,  // Its application thread silent for --worker_timeout:
                   // sent SIGABRT (stack dump), killed after a grace.
};

absl::string_view DrainCauseName(DrainCause cause);
// The broker (or the worker) asked for the drain: the exit that follows is
// expected, not a crash.
bool IsRequested(DrainCause cause);

// broker/metrics_list.h declares the fields (and their metrics). One struct
// for the lifecycle and the pieces around it (WorkerManager::Stats).
struct WorkerStats {
  FDBROKER_STATS_STRUCT_FIELDS(FDBROKER_WORKER_MANAGER_STATS)
};

// Performs the transitions of WorkerState on the registry's records: each
// function sets the state, the drain cause and deadline, counts its metric
// and emits its event, in one place. A transition the diagram does not have
// is refused here (logged, nothing changes, false returned), not by the
// callers. The side effects on processes and channels (Drain message,
// signals) stay with the caller. Loop thread only.
class WorkerLifecycle {
 public:
  using EventCallback = std::function<void(const WorkerEvent&)>;

  WorkerLifecycle(EventLoop& loop, WorkerRegistry& registry,
                  absl::Duration drain_timeout, WorkerStats& stats,
                  EventCallback on_event);

  // Whether `worker` may go from its state to `to` with `cause` (kNone
  // unless `to` is kDraining): the one table of legal transitions.
  static bool Allowed(const Worker& worker, WorkerState to, DrainCause cause);

  // A supervised worker was started (STARTED, or RESTARTED when it replaces
  // a failed one). kStarting.
  Worker& Spawned(pid_t pid, bool restart);
  // A worker the broker did not start says Hello: adopted (supervised by a
  // previous broker) or external. kStarting until Registered.
  Worker& Arrived(pid_t pid, bool adopted);
  // kStarting → kReady: its Hello was accepted (READY).
  bool Registered(Worker& worker);
  // kDraining (kChannelLost) → kReady: the same process registered again on
  // a new channel (READMITTED). Its replacement, if already started, is
  // the pool's surplus.
  bool Readmitted(Worker& worker);
  // kStarting/kReady → kDraining for `cause`, deadline `timeout` from now
  // (DRAINING, telling whether idle connections move). Also turns an
  // unexpected loss into a requested drain (its exit is then expected).
  bool Drain(Worker& worker, DrainCause cause, absl::Duration timeout,
             bool release_idle);
  // The worker said Goodbye: kReady → kDraining (kGoodbye, deadline
  // --drain_timeout), no event; a requested drain keeps its cause.
  bool SaidGoodbye(Worker& worker);
  // Its channel closed. Returns true when that is a failure to count (the
  // exit was not expected): kReady → kDraining for `cause` (kChannelLost or
  // kHeartbeatTimeout; DRAINING "channel lost: ..."); it finishes its
  // connections until its deadline.
  bool ChannelLost(Worker& worker, DrainCause cause,
                   const absl::Status& reason);
  // A supervised worker's process was reaped: → kExited (EXITED, or CRASHED
  // and counted when its exit was not expected). Returns true when this
  // exit is a failure not yet counted by ChannelLost.
  bool Exited(Worker& worker, int wait_status);
  // An external worker's channel closed: for it that is the end → kExited
  // (EXITED "unregistered" after a requested drain, else CRASHED).
  bool Disconnected(Worker& worker, const absl::Status& reason);
  // True once when `worker` is draining and its deadline has passed at
  // `now_nanos` (the deadline is then cleared).
  static bool TakeExpiredDeadline(Worker& worker, int64_t now_nanos);

  // Emits an event not tied to a transition (scale, rebalance, ...).
  void Emit(WorkerEvent::Type type, const Worker* worker,
            std::string detail = "", std::string exit_status = "");
  // Emits `event`, stamped with the loop's clock.
  void Emit(WorkerEvent event);

 private:
  // Checks Allowed() and moves `worker` to `to`; false (logged) if illegal.
  bool Enter(Worker& worker, WorkerState to, DrainCause cause);

  EventLoop& loop_;
  WorkerRegistry& registry_;
  const absl::Duration drain_timeout_;
  WorkerStats& stats_;
  EventCallback on_event_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_LIFECYCLE_H_
