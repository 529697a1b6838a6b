#ifndef FDBROKER_BROKER_WORKER_MANAGER_H_
#define FDBROKER_BROKER_WORKER_MANAGER_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "broker/connection_dispatcher.h"
#include "broker/event_loop.h"
#include "broker/handoff_channel.h"
#include "broker/supervisor.h"
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
    // A worker that lived at least this long resets the back-off.
    absl::Duration stable_after = absl::Seconds(10);
  };
  struct Stats {
    uint64_t registered = 0;
    uint64_t refused = 0;
    uint64_t crashes = 0;
    uint64_t restarts = 0;
    uint64_t protocol_errors = 0;
    uint64_t heartbeat_timeouts = 0;
    uint64_t lost_with_worker = 0;  // Owned connections of crashed workers.
  };

  WorkerManager(EventLoop& loop, WorkerRegistry& registry,
                ConnectionDispatcher& dispatcher, Supervisor& supervisor,
                wire::SysCalls& sys, const Options& options);
  ~WorkerManager() override;

  // Spawns the initial pool and starts the heartbeat ticker.
  void Start();

  // A peer connected to the hand-off socket (credentials already checked).
  void OnNewPeer(wire::UniqueFd socket, const ucred& peer);
  // A supervised child exited (from the Supervisor).
  void OnChildExited(pid_t pid, int wait_status);

  // Tells `worker` to drain, with a deadline `timeout` from now.
  void DrainWorker(Worker& worker, absl::Duration timeout);
  // Broker shutdown: no more restarts or registrations; every worker drains
  // within `timeout`. `done` runs once no worker is left or the deadline
  // (plus a short grace for reaping) has passed.
  void DrainAll(absl::Duration timeout, absl::AnyInvocable<void()> done);

  const Stats& stats() const { return stats_; }

  // HandoffChannel::Delegate.
  void OnMessage(HandoffChannel& channel, v1::HandoffMessage& message,
                 wire::UniqueFd fd) override;
  void OnChannelClosed(HandoffChannel& channel,
                       const absl::Status& reason) override;
  void OnWritable(HandoffChannel& channel) override;

 private:
  void OnHello(HandoffChannel& channel, const v1::Hello& hello);
  void Refuse(HandoffChannel& channel, v1::RefusalReason reason,
              absl::string_view message);
  absl::Status OnWorkerMessage(Worker& worker, v1::HandoffMessage& message);
  Worker* FindStartingAncestor(pid_t pid);
  void RemoveWorker(Worker& worker);
  void Reconcile();
  void SpawnOne();
  void Tick();
  void MaybeFinishShutdown();

  EventLoop& loop_;
  WorkerRegistry& registry_;
  ConnectionDispatcher& dispatcher_;
  Supervisor& supervisor_;
  wire::SysCalls& sys_;
  Options options_;
  // Channels that have not said Hello yet, with their arrival time.
  absl::flat_hash_map<HandoffChannel*, std::unique_ptr<HandoffChannel>>
      unregistered_;
  int crash_streak_ = 0;
  EventLoop::TimerId restart_timer_ = 0;
  EventLoop::TimerId tick_timer_ = 0;
  bool shutting_down_ = false;
  int64_t shutdown_deadline_nanos_ = 0;
  absl::AnyInvocable<void()> shutdown_done_;
  Stats stats_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_MANAGER_H_
