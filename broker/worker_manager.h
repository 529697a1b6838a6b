#ifndef FDBROKER_BROKER_WORKER_MANAGER_H_
#define FDBROKER_BROKER_WORKER_MANAGER_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/connection_dispatcher.h"
#include "broker/event_loop.h"
#include "broker/handoff_channel.h"
#include "broker/metrics_list.h"
#include "broker/supervisor.h"
#include "broker/worker_events.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_registry.h"
#include "wire/sys_calls.h"

namespace fdbroker {

// The life of every worker: registration (Hello → Welcome/Refusal), the
// messages of registered workers, heartbeats, draining, and keeping the
// supervised pool at its target size with capped exponential back-off
// restarts. Loop thread only; the control plane drives it via posted tasks.
class WorkerManager : public HandoffChannel::Delegate {
 public:
  struct Options {
    int target_workers = 0;
    int max_workers = 64;
    absl::Duration drain_timeout = absl::Seconds(30);
    absl::Duration heartbeat_interval = absl::Seconds(1);
    absl::Duration heartbeat_timeout = absl::Seconds(10);
    // A supervised worker that has not registered by then is killed.
    absl::Duration start_timeout = absl::Seconds(30);
    absl::Duration restart_backoff_initial = absl::Milliseconds(100);
    absl::Duration restart_backoff_max = absl::Seconds(10);
    // A worker that lived at least this long resets the back-off: only
    // workers that die right after start form a restart loop.
    absl::Duration stable_after = absl::Seconds(1);
    // Rebalance once the workers a ScaleWorkers scale-up started are all
    // ready (--rebalance_after_scale).
    bool rebalance_after_scale = false;
  };
  // broker/metrics_list.h declares the fields (and their metrics).
  using Stats = WorkerStats;

  using EventCallback = std::function<void(const WorkerEvent&)>;
  struct ScaleResult {
    int previous_count = 0;
    int count = 0;
    std::vector<uint64_t> started;
    std::vector<uint64_t> draining;
  };
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

  WorkerManager(EventLoop& loop, WorkerRegistry& registry,
                ConnectionDispatcher& dispatcher, Supervisor& supervisor,
                wire::SysCalls& sys, const Options& options,
                EventCallback on_event = nullptr);
  ~WorkerManager() override;

  // Starts the heartbeat ticker and the initial pool; with `adopt_grace`,
  // the pool waits that long for re-registering workers of a previous
  // broker, which count toward the target.
  void Start(absl::Duration adopt_grace = absl::ZeroDuration());

  // Called when a peer asks for an upgrade hand-over (UpgradeRequest instead
  // of Hello); the callback owns the channel from then on.
  using UpgradeCallback = std::function<void(
      std::unique_ptr<HandoffChannel> channel, const v1::UpgradeRequest&)>;
  static constexpr uint64_t kUpgradePeerId = ~uint64_t{0};
  void set_upgrade_handler(UpgradeCallback callback) {
    on_upgrade_ = std::move(callback);
  }

  // A peer connected to the hand-off socket; `allowed` says whether its
  // uid may register (if not, its Hello is answered with a Refusal).
  void OnNewPeer(wire::UniqueFd socket, const ucred& peer, bool allowed);
  // A supervised child exited (from the Supervisor).
  void OnChildExited(pid_t pid, int wait_status);

  // Broker shutdown: no more restarts or registrations; every worker drains
  // within `timeout`. `done` runs once no worker is left or the deadline
  // (plus a short grace for reaping) has passed.
  void DrainAll(absl::Duration timeout, absl::AnyInvocable<void()> done);

  // Sets the supervised pool size. Scale-up starts workers now (no
  // back-off: an operator asked); scale-down drains the workers with the
  // fewest connections first (unregistered ones before any). Idempotent.
  absl::StatusOr<ScaleResult> Scale(int count, absl::Duration drain_timeout);
  // Drains worker `id`. With `replace` (supervised only) a replacement is
  // started first and `id` drains once it has registered; `done` runs then
  // (or with the error if the replacement failed). Without `replace` a
  // supervised pool shrinks by one. NotFound, FailedPrecondition on misuse.
  void DrainWorkerById(uint64_t id, absl::Duration timeout, bool replace,
                       DrainCallback done);
  // Every ready worker more than one connection above the mean load that
  // supports_release is asked to release its excess over ceil(mean); the
  // dispatcher places released connections elsewhere. FailedPrecondition
  // while shutting down or drained, or with fewer than 2 ready workers.
  // `trigger` is for the log and the event ("RPC", "after scale-up").
  absl::StatusOr<RebalanceResult> Rebalance(absl::string_view trigger);
  // Broker-wide Drain with a timeout: every worker drains and none is
  // restarted until ResumePool(), which restores the pool (returns the ids
  // of the workers it started).
  std::vector<uint64_t> SuspendPool(absl::Duration timeout);
  // The broker hands its workers to a new broker (upgrade): no restarts from
  // now on; the workers keep running and re-register there.
  void PrepareForUpgrade();
  std::vector<uint64_t> ResumePool();
  bool pool_suspended() const { return pool_suspended_; }
  // Consecutive quick failures; restarts back off while it is above zero.
  int crash_streak() const { return crash_streak_; }
  // Workers keep dying right after start (the streak reached 3): counted,
  // streamed as an event, and the broker reports NOT_SERVING.
  static constexpr int kRestartLoopStreak = 3;
  bool in_restart_loop() const { return crash_streak_ >= kRestartLoopStreak; }
  bool shutting_down() const { return shutting_down_; }
  int target_workers() const { return options_.target_workers; }
  int max_workers() const { return options_.max_workers; }
  absl::Duration drain_timeout() const { return options_.drain_timeout; }

  const Stats& stats() const { return stats_; }

  // HandoffChannel::Delegate.
  void OnMessage(HandoffChannel& channel, v1::HandoffMessage& message,
                 wire::UniqueFd fd) override;
  void OnChannelClosed(HandoffChannel& channel,
                       const absl::Status& reason) override;
  void OnWritable(HandoffChannel& channel) override;

 private:
  void OnHello(HandoffChannel& channel, const v1::Hello& hello);
  // The Hello's owned_connections: none held by the broker or owned by a
  // worker other than `self`, none twice.
  absl::Status CheckClaims(const v1::Hello& hello, const Worker* self) const;
  void Refuse(HandoffChannel& channel, v1::RefusalReason reason,
              absl::string_view message);
  absl::Status OnWorkerMessage(Worker& worker, v1::HandoffMessage& message,
                               wire::UniqueFd fd);
  // Another ready worker with room could take `worker`'s connections.
  bool OthersCanTake(const absl::flat_hash_set<uint64_t>& leaving) const;
  // Tells `worker` to drain for `cause`, with a deadline `timeout` from now.
  void DrainWorker(Worker& worker, DrainCause cause, absl::Duration timeout);
  // Drains `workers` together: none of them is a place to move the others'
  // idle connections to.
  void DrainWorkers(const std::vector<Worker*>& workers, DrainCause cause,
                    absl::Duration timeout);
  // Tallies a finished migration; one event per releasing worker and reason
  // is emitted a moment later (a drain moves hundreds at once).
  void NoteMigration(uint64_t from, uint64_t to, v1::ReleaseReason reason);
  void EmitMigrations();
  // --rebalance_after_scale: the last awaited worker is ready (or gone).
  void RebalanceAfterScale();
  // The supervised worker that is `pid` or one of its near ancestors.
  Worker* FindSupervisedAncestor(pid_t pid);
  void RemoveWorker(Worker& worker);
  // Counts an unexpected loss (crash or lost channel) once per worker, for
  // the restart back-off.
  void NoteFailure(Worker& worker);
  void MaybeEndRestartLoop(int64_t now);
  void Reconcile();
  // Starts one supervised worker; returns its id (0 on failure).
  uint64_t SpawnOne(bool restart = false);
  // A supervised worker that counts toward the pool target: not retiring,
  // draining or gone.
  static bool Serving(const Worker& worker);
  int CountServing() const;
  void OnReplacementDone(uint64_t replacement_id, const absl::Status& status);
  void Tick();
  void MaybeFinishShutdown();

  EventLoop& loop_;
  WorkerRegistry& registry_;
  ConnectionDispatcher& dispatcher_;
  Supervisor& supervisor_;
  wire::SysCalls& sys_;
  Options options_;
  Stats stats_;
  WorkerLifecycle lifecycle_;
  // Channels that have not said Hello yet, with their arrival time.
  absl::flat_hash_map<HandoffChannel*, std::unique_ptr<HandoffChannel>>
      unregistered_;
  // Unregistered channels whose peer's uid is not allowed.
  absl::flat_hash_set<HandoffChannel*> disallowed_;
  int crash_streak_ = 0;
  int64_t last_failure_nanos_ = 0;
  // Failed workers not yet replaced (their replacements are "restarts").
  int pending_restarts_ = 0;
  Timer restart_timer_{loop_};
  Timer tick_timer_{loop_};
  Timer adopt_timer_{loop_};
  bool shutting_down_ = false;
  bool pool_suspended_ = false;
  bool adopting_ = false;
  bool handing_over_ = false;
  UpgradeCallback on_upgrade_;
  // Rolling restarts waiting for their replacement: replacement id -> the
  // worker to drain and the caller to answer.
  struct PendingReplace {
    uint64_t old_id;
    absl::Duration timeout;
    DrainCallback done;
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
  int64_t shutdown_deadline_nanos_ = 0;
  absl::AnyInvocable<void()> shutdown_done_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_MANAGER_H_
