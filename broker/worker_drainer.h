#ifndef FDBROKER_BROKER_WORKER_DRAINER_H_
#define FDBROKER_BROKER_WORKER_DRAINER_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/connection_dispatcher.h"
#include "broker/event_loop.h"
#include "broker/supervisor.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_pool.h"
#include "broker/worker_registry.h"

namespace fdbroker {

// Workers leaving, and the connections that move: tells workers to drain
// (with release_idle when others can take their idle connections), ends
// the ones past their drain deadline, drains a worker once its replacement
// registered, asks the workers above the mean load to release their excess
// (Rebalance, also once after a scale-up), and reports the migrations that
// follow, aggregated. Loop thread only.
class WorkerDrainer {
 public:
  struct DrainResult {
    uint64_t worker_id = 0;
    uint64_t replacement_id = 0;  // 0 unless replaced.
  };
  using DrainCallback =
      absl::AnyInvocable<void(absl::StatusOr<DrainResult> result)>;
  struct RebalanceResult {
    // Mean load (owned + unacked) of the ready workers.
    double mean = 0;
    // Workers sent a ReleaseRequest, and for how many connections.
    std::vector<std::pair<uint64_t, uint32_t>> asked;
    // Workers above the mean that cannot release (no supports_release).
    std::vector<uint64_t> skipped;
  };

  // `pool`'s mode says whether connections can move at all (not while
  // suspended or shutting down).
  WorkerDrainer(EventLoop& loop, WorkerRegistry& registry,
                ConnectionDispatcher& dispatcher, Supervisor& supervisor,
                WorkerLifecycle& lifecycle, const WorkerPool& pool,
                WorkerStats& stats);
  ~WorkerDrainer();

  // Tells `workers` to drain for `cause` within `timeout` (an unregistered
  // one is sent SIGTERM). Drained together: none of them is a place to move
  // the others' idle connections to.
  void Drain(const std::vector<Worker*>& workers, DrainCause cause,
             absl::Duration timeout);
  void Drain(Worker& worker, DrainCause cause, absl::Duration timeout);
  // Scale-down: drains `count` of the serving workers, unregistered ones
  // first (they serve nobody), then the least loaded; among equals the
  // youngest, so long-lived workers keep their caches. Returns their ids.
  std::vector<uint64_t> DrainSurplus(int count, absl::Duration timeout);
  // Every tick: a worker past its drain deadline is killed (supervised) or
  // its channel closed (external).
  void Check(int64_t now_nanos);

  // Replace-then-drain: `old_id` drains for `cause` once `replacement_id`
  // registered (`done` is answered then), or `done` gets the error if it
  // exits first.
  void AwaitReplacement(uint64_t replacement_id, uint64_t old_id,
                        absl::Duration timeout, DrainCallback done,
                        DrainCause cause = DrainCause::kReplaced);
  // --rebalance_after_scale: rebalance once these are all ready (or gone).
  void AwaitScaleUp(const std::vector<uint64_t>& started);
  // `worker` registered (a replacement, a scale-up's worker?).
  void OnRegistered(const Worker& worker);
  // Worker `id` is gone from the registry (pid and wait status if it
  // exited as a process).
  void OnRemoved(uint64_t id);
  void OnExited(uint64_t id, pid_t pid, int wait_status);

  // Every ready worker more than `slack` connections above the mean load
  // (and above ceil(mean)) that supports_release is asked to release its
  // excess over ceil(mean). The RPC allows one connection of slack; kernel
  // placement's automatic rebalance none, so that it ends exactly even.
  // FailedPrecondition while shutting down or suspended, or with fewer
  // than 2 ready workers. `trigger` is for the log and the event.
  absl::StatusOr<RebalanceResult> Rebalance(absl::string_view trigger,
                                            int64_t slack = 1);

 private:
  // Another ready worker, not one of `leaving`, has room.
  bool OthersCanTake(const absl::flat_hash_set<uint64_t>& leaving) const;
  void OnReplacementDone(uint64_t replacement_id, const absl::Status& status);
  void RebalanceAfterScale();
  // Tallies a finished migration; one event per releasing worker and reason
  // is emitted a moment later (a drain moves hundreds at once).
  void NoteMigration(uint64_t from, uint64_t to, v1::ReleaseReason reason);
  void EmitMigrations();

  EventLoop& loop_;
  WorkerRegistry& registry_;
  ConnectionDispatcher& dispatcher_;
  Supervisor& supervisor_;
  WorkerLifecycle& lifecycle_;
  const WorkerPool& pool_;
  WorkerStats& stats_;
  // Rolling restarts waiting for their replacement: replacement id -> the
  // worker to drain and the caller to answer.
  struct PendingReplace {
    uint64_t old_id;
    absl::Duration timeout;
    DrainCallback done;
    DrainCause cause;
  };
  absl::flat_hash_map<uint64_t, PendingReplace> pending_replaces_;
  // Workers of the last scale-up not ready yet (--rebalance_after_scale).
  absl::flat_hash_set<uint64_t> awaiting_scale_ready_;
  // Finished migrations not yet reported, by (releaser, reason).
  struct MigrationTally {
    pid_t pid = 0;
    uint64_t total = 0;
    std::map<uint64_t, uint64_t> by_target;  // Worker id -> connections.
  };
  std::map<std::pair<uint64_t, int>, MigrationTally> migrations_;
  Timer migration_timer_{loop_};
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_DRAINER_H_
