#ifndef FDBROKER_BROKER_WORKER_POOL_H_
#define FDBROKER_BROKER_WORKER_POOL_H_

#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/event_loop.h"
#include "broker/supervisor.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_registry.h"

namespace fdbroker {

// What the pool does about its target. One mode at a time; the functions
// that change it are WorkerPool's Start/Suspend/Resume/HandOver/ShutDown.
enum class PoolMode {
  kAdopting,     // Waiting for a previous broker's workers to re-register.
  kRunning,      // Keeps --workers supervised workers, restarting failures.
  kSuspended,    // Drained by the operator: nothing starts until Resume.
  kHandingOver,  // An upgrade took the sockets: nothing starts any more.
  kShuttingDown  // Draining for exit: nothing starts, no one registers.
};

absl::string_view PoolModeName(PoolMode mode);

// Supervision: keeps the supervised pool at its target, starting workers
// and replacing failed ones with capped exponential back-off (100 ms
// doubling to 10 s; a worker that registered and lived stable_after resets
// it), detects restart loops, and kills a worker that does not register in
// time. Restarting with back-off lives here, not in a worker's state: a
// failed worker's record goes at its exit and its replacement is a new
// worker (RESTARTED). Loop thread only.
class WorkerPool {
 public:
  struct Options {
    int target_workers = 0;
    // A supervised worker that has not registered by then is killed.
    absl::Duration start_timeout = absl::Seconds(30);
    absl::Duration restart_backoff_initial = absl::Milliseconds(100);
    absl::Duration restart_backoff_max = absl::Seconds(10);
    // A worker that lived at least this long resets the back-off: only
    // workers that die right after start form a restart loop.
    absl::Duration stable_after = absl::Seconds(1);
  };
  // Workers keep dying right after start (the streak reached 3): counted,
  // streamed as an event, and the broker reports NOT_SERVING.
  static constexpr int kRestartLoopStreak = 3;

  WorkerPool(EventLoop& loop, WorkerRegistry& registry, Supervisor& supervisor,
             WorkerLifecycle& lifecycle, WorkerStats& stats,
             const Options& options);

  // Starts the initial pool; with `adopt_grace`, first waits that long for
  // re-registering workers of a previous broker, which count toward the
  // target.
  void Start(absl::Duration adopt_grace);
  // kSuspended (broker-wide Drain): no restarts until Resume.
  void Suspend();
  // kRunning again; starts the missing workers now. Returns their ids.
  std::vector<uint64_t> Resume();
  // kHandingOver: the workers move to a new broker; none is started.
  void HandOver();
  // kShuttingDown: nothing is started from now on.
  void ShutDown();

  PoolMode mode() const { return mode_; }
  bool suspended() const { return mode_ == PoolMode::kSuspended; }
  bool shutting_down() const { return mode_ == PoolMode::kShuttingDown; }

  int target() const { return options_.target_workers; }
  void set_target(int count) { options_.target_workers = count; }
  // A supervised worker that counts toward the target: starting or ready.
  static bool Serving(const Worker& worker);
  int CountServing() const;

  // Starts one supervised worker now; returns its id (0 on failure, which
  // counts toward the back-off).
  uint64_t SpawnOne(bool restart = false);
  // An operator asked for `count` more workers: started now, without the
  // back-off. Returns their ids, or an error naming the command.
  absl::StatusOr<std::vector<uint64_t>> StartNow(int count);
  // Counts an unexpected loss (crash or lost channel) of `worker`, once per
  // worker (WorkerLifecycle says when), for the back-off.
  void NoteFailure(const Worker& worker);
  // Starts what is missing from the target: at once, or after the back-off
  // while workers keep failing. Only in kRunning.
  void Reconcile();
  // Every tick: ends a restart loop once a worker stays up, and kills
  // supervised workers that did not register within start_timeout.
  void Check(int64_t now_nanos);

  // Consecutive quick failures; restarts back off while it is above zero.
  int crash_streak() const { return crash_streak_; }
  bool in_restart_loop() const { return crash_streak_ >= kRestartLoopStreak; }

 private:
  EventLoop& loop_;
  WorkerRegistry& registry_;
  Supervisor& supervisor_;
  WorkerLifecycle& lifecycle_;
  WorkerStats& stats_;
  Options options_;
  PoolMode mode_ = PoolMode::kRunning;
  int crash_streak_ = 0;
  int64_t last_failure_nanos_ = 0;
  // Failed workers not yet replaced (their replacements are "restarts").
  int pending_restarts_ = 0;
  Timer restart_timer_{loop_};
  Timer adopt_timer_{loop_};
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_POOL_H_
