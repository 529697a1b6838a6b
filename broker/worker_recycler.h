#ifndef FDBROKER_BROKER_WORKER_RECYCLER_H_
#define FDBROKER_BROKER_WORKER_RECYCLER_H_

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/event_loop.h"
#include "broker/supervisor.h"
#include "broker/worker_drainer.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_pool.h"
#include "broker/worker_registry.h"

namespace fdbroker {

// Resident memory of `pid` and all its descendants (found through
// /proc/PID/task/TID/children), in bytes; 0 if `pid` is gone. A few small
// /proc reads per process: microseconds, cheap enough for the loop's tick.
uint64_t ProcessTreeResidentBytes(pid_t pid);

// Replaces supervised workers surge-first: the replacement is started and
// registered before its predecessor drains (with release_idle, through
// WorkerDrainer::AwaitReplacement), so the serving pool never drops below its
// target and idle keep-alive clients move instead of being cut. Two users:
//   - RestartWorkers / SIGHUP: every supervised worker, max_surge at a time;
//     the first replacement that fails to start or register ends the
//     restart (RESTART_FAILED) and the remaining workers keep serving.
//   - recycling: a ready worker past --max_connections_per_worker (+ its
//     jitter), --max_worker_rss or --max_worker_age is replaced, one at a
//     time, never during a restart.
// Every replacement done is a WORKER_RECYCLED event with its reason and a
// count in fdbroker_worker_recycles_total{reason}. Loop thread only.
class WorkerRecycler {
 public:
  struct Options {
    // New connections handed to a worker (Worker::new_total: moved ones
    // left out) after which it is recycled; 0: no limit.
    uint64_t max_connections = 0;
    // A random 0..jitter added to max_connections per worker, so that
    // workers started together are not recycled together.
    uint64_t max_connections_jitter = 0;
    // Resident memory of the worker and its descendants; 0: no limit.
    uint64_t max_rss_bytes = 0;
    // Time since the worker started; zero: no limit.
    absl::Duration max_age = absl::ZeroDuration();
    // How often each worker's memory is read from /proc.
    absl::Duration rss_interval = absl::Seconds(1);
    // After a replacement failed, no recycling for this long.
    absl::Duration failure_backoff = absl::Seconds(10);
    // Drain deadline of a recycled worker (--drain_timeout).
    absl::Duration drain_timeout = absl::Seconds(30);
  };
  struct RestartRequest {
    int max_surge = 1;
    absl::Duration drain_timeout;
    // Set: the command for the replacements and every later start.
    std::optional<Supervisor::Command> command;
  };
  struct RestartPlan {
    std::vector<uint64_t> replacing;  // In order.
    int max_surge = 1;
  };
  // Why a worker is replaced (the metric's and the event's reason).
  enum class Reason { kRestart, kMaxConnections, kMaxRss, kMaxAge };
  static absl::string_view ReasonName(Reason reason);

  WorkerRecycler(EventLoop& loop, WorkerRegistry& registry,
                 Supervisor& supervisor, WorkerLifecycle& lifecycle,
                 WorkerPool& pool, WorkerDrainer& drainer, WorkerStats& stats,
                 const Options& options);

  // Starts a rolling restart of every serving supervised worker (oldest
  // first). FailedPrecondition while one runs or the pool is not running.
  absl::StatusOr<RestartPlan> Restart(RestartRequest request);
  bool restarting() const { return restart_.has_value(); }

  // Every tick: a restart stops if the pool stopped running; otherwise at
  // most one worker past a limit starts being recycled.
  void Check(int64_t now_nanos);
  // Worker `id` is gone from the registry.
  void OnRemoved(uint64_t id);
  // `worker` acked connections: past --max_connections_per_worker, its
  // recycling starts now instead of at the next tick.
  void OnHanded(const Worker& worker);

 private:
  struct RestartRun {
    uint64_t generation = 0;
    int max_surge = 1;
    absl::Duration drain_timeout;
    std::deque<uint64_t> queue;  // Still to replace.
    int in_flight = 0;           // Replacements starting.
    size_t total = 0;
    size_t replaced = 0;
    // Replaced workers that have not exited yet: DONE waits for them.
    absl::flat_hash_set<uint64_t> predecessors;
    // The command before the restart changed it (restored on failure).
    std::optional<Supervisor::Command> previous_command;
    int64_t started_nanos = 0;
  };

  // Starts `old`'s replacement; false if it could not be spawned.
  bool Replace(Worker& old, Reason reason, absl::Duration timeout,
               std::string why);
  void OnReplaced(uint64_t old_id, Reason reason, uint64_t generation,
                  const std::string& why,
                  absl::StatusOr<WorkerDrainer::DrainResult> result);
  void StepRestart();
  void FailRestart(const std::string& why);
  void MaybeFinishRestart();
  // Worker `id`'s connection limit: max_connections plus its jitter, drawn
  // once.
  uint64_t ConnectionLimit(uint64_t id);
  // The limit `worker` has passed, with a description, if any.
  std::optional<std::pair<Reason, std::string>> PastLimit(const Worker& worker,
                                                          int64_t now_nanos);

  EventLoop& loop_;
  WorkerRegistry& registry_;
  Supervisor& supervisor_;
  WorkerLifecycle& lifecycle_;
  WorkerPool& pool_;
  WorkerDrainer& drainer_;
  WorkerStats& stats_;
  const Options options_;
  // Workers being replaced (their replacement has not registered yet).
  absl::flat_hash_map<uint64_t, Reason> in_flight_;
  std::optional<RestartRun> restart_;
  uint64_t restart_generation_ = 0;
  // Per worker: its connection limit (max_connections + its jitter) and its
  // last sampled resident memory.
  absl::flat_hash_map<uint64_t, uint64_t> connection_limit_;
  absl::flat_hash_map<uint64_t, uint64_t> rss_;
  int64_t next_rss_sample_nanos_ = 0;
  int64_t recycle_paused_until_nanos_ = 0;
  bool check_soon_ = false;  // A Check is queued (RunSoon) by OnHanded.
  std::mt19937_64 rng_{std::random_device{}()};
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_RECYCLER_H_
