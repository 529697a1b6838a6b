#ifndef FDBROKER_BROKER_WORKER_MANAGER_H_
#define FDBROKER_BROKER_WORKER_MANAGER_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/connection_dispatcher.h"
#include "broker/event_loop.h"
#include "broker/handoff_channel.h"
#include "broker/kernel_placement.h"
#include "broker/supervisor.h"
#include "broker/worker_drainer.h"
#include "broker/worker_events.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_pool.h"
#include "broker/worker_recycler.h"
#include "broker/worker_registration.h"
#include "broker/worker_registry.h"
#include "wire/sys_calls.h"

namespace fdbroker {

// The coordinator of the life of workers, over its pieces: the lifecycle
// (WorkerLifecycle: states and transitions), the way in (WorkerRegistration:
// Hello → Welcome/Refusal), supervision (WorkerPool: target, back-off,
// restart loops) and the way out (WorkerDrainer: drains, deadlines,
// replace-then-drain, rebalance, migrations). Itself it receives every
// channel's messages and closes and every child's exit and routes them,
// heartbeats the registered workers, and sequences the control plane's
// operations and the shutdown. Loop thread only; the control plane drives it
// via posted tasks.
class WorkerManager : public HandoffChannel::Delegate {
 public:
  // Between the stack-dump signal and the SIGKILL of a hung worker: long
  // enough to write a few thousand frames to a pipe.
  static constexpr absl::Duration kStackDumpGrace = absl::Seconds(1);

  struct Options {
    int target_workers = 0;
    int max_workers = 64;
    absl::Duration drain_timeout = absl::Seconds(30);
    absl::Duration heartbeat_interval = absl::Seconds(1);
    absl::Duration heartbeat_timeout = absl::Seconds(10);
    // A connection sent and not acked (or rejected) this long: the worker
    // is cut off (supervised: killed) and the connection placed elsewhere.
    absl::Duration ack_timeout = absl::Seconds(5);
    // A worker that reports liveness and whose application thread is silent
    // this long is hung (0 = never): see Hung().
    absl::Duration worker_timeout = absl::Seconds(30);
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
    // --max_connections_per_worker, --max_connections_jitter,
    // --max_worker_rss, --max_worker_age (its drain_timeout is the one
    // above).
    WorkerRecycler::Options recycle;
  };
  // broker/metrics_list.h declares the fields (and their metrics).
  using Stats = WorkerStats;

  using EventCallback = WorkerLifecycle::EventCallback;

  // --placement=kernel: from now on every worker that supports it is
  // granted a listener of `group_fd`'s SO_REUSEPORT group (the broker's
  // --listen socket, which must outlive this manager); what the broker
  // accepts from those goes to `accepted`; `inherited`: the slots an
  // upgrade brought (KernelPlacement::Create). Call before Start().
  absl::Status EnableKernelPlacement(
      int group_fd, const KernelPlacement::Options& options,
      wire::SysCalls& sys, Listener::AcceptCallback accepted,
      KernelPlacement::Inherited* inherited = nullptr);
  // Null unless EnableKernelPlacement() succeeded.
  KernelPlacement* kernel_placement() { return placement_.get(); }
  struct ScaleResult {
    int previous_count = 0;
    int count = 0;
    std::vector<uint64_t> started;
    std::vector<uint64_t> draining;
  };
  using DrainResult = WorkerDrainer::DrainResult;
  using DrainCallback = WorkerDrainer::DrainCallback;
  using RebalanceResult = WorkerDrainer::RebalanceResult;

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
  using UpgradeCallback = WorkerRegistration::UpgradeCallback;
  static constexpr uint64_t kUpgradePeerId = WorkerRegistration::kUpgradePeerId;
  void set_upgrade_handler(UpgradeCallback callback) {
    registration_.set_upgrade_handler(std::move(callback));
  }

  // A peer connected to the hand-off socket; `allowed` says whether its
  // uid may register (if not, its Hello is answered with a Refusal).
  void OnNewPeer(wire::UniqueFd socket, const ucred& peer, bool allowed) {
    registration_.OnNewPeer(std::move(socket), peer, allowed);
  }
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
  // See WorkerDrainer::Rebalance.
  absl::StatusOr<RebalanceResult> Rebalance(absl::string_view trigger) {
    return drainer_.Rebalance(trigger);
  }
  // Broker-wide Drain with a timeout: every worker drains and none is
  // restarted until ResumePool(), which restores the pool (returns the ids
  // of the workers it started).
  std::vector<uint64_t> SuspendPool(absl::Duration timeout);
  std::vector<uint64_t> ResumePool() { return pool_.Resume(); }
  // Rolling restart (RestartWorkers, SIGHUP): see WorkerRecycler::Restart.
  absl::StatusOr<WorkerRecycler::RestartPlan> RestartWorkers(
      WorkerRecycler::RestartRequest request) {
    return recycler_.Restart(std::move(request));
  }
  bool restarting() const { return recycler_.restarting(); }
  // What a supervised worker is started with now.
  const Supervisor::Command& worker_command() const {
    return supervisor_.command();
  }
  // The broker hands its workers to a new broker (upgrade): no restarts from
  // now on; the workers keep running and re-register there.
  void PrepareForUpgrade() { pool_.HandOver(); }

  bool pool_suspended() const { return pool_.suspended(); }
  bool shutting_down() const { return pool_.shutting_down(); }
  // Consecutive quick failures; restarts back off while it is above zero.
  int crash_streak() const { return pool_.crash_streak(); }
  static constexpr int kRestartLoopStreak = WorkerPool::kRestartLoopStreak;
  bool in_restart_loop() const { return pool_.in_restart_loop(); }
  int target_workers() const { return pool_.target(); }
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
  absl::Status OnWorkerMessage(Worker& worker, v1::HandoffMessage& message,
                               wire::UniqueFd fd);
  void RemoveWorker(Worker& worker);
  // Every half heartbeat interval (at most 500 ms): heartbeats, silent
  // channels, and the pieces' deadlines.
  void Tick();
  // The broker gives up on `worker` (silent, holding a connection unacked,
  // not reading): its channel closes, a supervised one is killed with its
  // process group before its un-acked connections are placed elsewhere,
  // so no connection ever has two owners.
  void DeclareDead(Worker& worker, DrainCause cause, const std::string& why);
  // `worker` reports liveness and its application thread was silent past
  // --worker_timeout (kWorkerTimeout), or it was silent altogether past
  // --heartbeat_timeout (kHeartbeatTimeout): it drains for `cause` with a
  // deadline of kStackDumpGrace, a supervised one gets SIGABRT (stack dump)
  // now; the drainer kills it (or cuts an external one off) at the
  // deadline, and its replacement starts now.
  void Hung(Worker& worker, DrainCause cause, int64_t now_nanos);
  void MaybeFinishShutdown();

  EventLoop& loop_;
  WorkerRegistry& registry_;
  ConnectionDispatcher& dispatcher_;
  Supervisor& supervisor_;
  const Options options_;
  Stats stats_;
  WorkerLifecycle lifecycle_;
  WorkerPool pool_;
  WorkerRegistration registration_;
  WorkerDrainer drainer_;
  std::unique_ptr<KernelPlacement> placement_;
  WorkerRecycler recycler_;
  Timer tick_timer_{loop_};
  // Why the broker closed a worker's channel (DeclareDead), for
  // OnChannelClosed; a close not listed is a lost channel.
  absl::flat_hash_map<uint64_t, DrainCause> declared_dead_;
  // Workers whose channel was full at a tick, and since when.
  absl::flat_hash_map<uint64_t, int64_t> congested_since_;
  int64_t shutdown_deadline_nanos_ = 0;
  absl::AnyInvocable<void()> shutdown_done_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_MANAGER_H_
