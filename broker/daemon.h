#ifndef FDBROKER_BROKER_DAEMON_H_
#define FDBROKER_BROKER_DAEMON_H_

#include <signal.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "broker/balancing_policy.h"
#include "broker/broker_operations.h"
#include "broker/config.h"
#include "broker/connection_dispatcher.h"
#include "broker/control_server.h"
#include "broker/control_service.h"
#include "broker/event_hub.h"
#include "broker/event_loop.h"
#include "broker/handoff_server.h"
#include "broker/listener.h"
#include "broker/metrics.h"
#include "broker/process_metrics.h"
#include "broker/supervisor.h"
#include "broker/upgrade.h"
#include "broker/worker_manager.h"
#include "broker/worker_registry.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// The signals the broker takes (through a signalfd on its loop; main()
// blocks them in every thread before any exists): SIGTERM, SIGINT and
// SIGQUIT drain, a second one stops at once; SIGHUP starts a rolling
// restart of the workers (RestartWorkers with the defaults); SIGUSR1 and
// SIGUSR2 are logged and ignored, so that no signal sent by habit kills the
// broker without a drain (each one's default action would).
sigset_t BrokerSignals();

// The composition root: builds the parts, wires their callbacks, runs the
// event loop and sequences shutdown. It holds no data-plane logic itself.
class Daemon {
 public:
  // Binds every socket; an error here is a start-up failure.
  static absl::StatusOr<std::unique_ptr<Daemon>> Create(
      const BrokerConfig& config);
  ~Daemon();

  // Runs until shut down; returns the process exit code.
  int Run();

 private:
  explicit Daemon(const BrokerConfig& config);
  absl::Status Init();
  absl::Status WriteReadyFile() const;
  // --loop_slice for the calling (loop) thread; logs the outcome.
  void ApplyLoopSlice();
  void OnSignal();
  void OnEvent(const WorkerEvent& event);
  // Planned upgrade, running side: hand the sockets over, finish the
  // hand-offs in flight, exit.
  void OnUpgradeRequest(std::unique_ptr<HandoffChannel> channel,
                        const v1::UpgradeRequest& request);
  // Closes a refused upgrade peer's channel and frees it.
  void Discard(std::unique_ptr<HandoffChannel> channel);
  // The new broker is up (UpgradeReady): move the first half of the workers
  // and keep accepting with the rest until the new broker has a worker.
  void CommitUpgrade();
  // Then (once): stop accepting, move the other workers, finish, exit.
  void StopAcceptingForUpgrade();
  // Tells `group` to Reconnect to the new broker, after what is staged for
  // them; nothing more is placed with them.
  void MoveWorkers(const std::vector<Worker*>& group);
  // New side: from now on this broker accepts clients (Listener::Hold).
  void AcceptAfterUpgrade();
  // It failed or went away first: take the ports back and carry on.
  void AbortUpgrade(const absl::Status& reason);
  void FinishUpgrade(int64_t deadline_nanos);
  // New side: a connection the previous broker could not place
  // (UpgradeInbox), placed here like one accepted here.
  void TakePassedConnection(const v1::Connection& passed, wire::UniqueFd fd);
  absl::Status StartMetricsServer();
  absl::Status StartControlServer();
  // Frees the control and metrics ports (the gRPC shutdown on a thread).
  void StopControlPlane();
  // Binds them again, retrying until `deadline_nanos`.
  void RestoreControlPlane(int64_t deadline_nanos);
  template <typename Start>
  auto RetryWhileUpgrading(Start start) -> decltype(start());
  void SyncMetrics();
  void BeginShutdown();
  // Who may call mutating RPCs (see ControlService::Authorization).
  ControlService::Authorization ControlAuthorization();

  const BrokerConfig config_;
  // Declared first, destroyed last: everything below registers with it.
  std::unique_ptr<EventLoop> loop_;
  wire::UniqueFd signal_fd_;
  std::unique_ptr<IoWatch> signal_watch_;
  WorkerRegistry registry_;
  std::unique_ptr<BalancingPolicy> policy_;
  std::unique_ptr<ConnectionDispatcher> dispatcher_;
  std::unique_ptr<Supervisor> supervisor_;
  std::unique_ptr<WorkerManager> manager_;
  std::unique_ptr<HandoffServer> handoff_server_;
  std::unique_ptr<Listener> listener_;
  EventHub hub_;
  std::shared_ptr<prometheus::Registry> metrics_registry_;
  std::unique_ptr<BrokerMetrics> metrics_;
  std::shared_ptr<ProcessMetrics> process_metrics_;
  std::unique_ptr<MetricsServer> metrics_server_;
  std::unique_ptr<Timer> metrics_timer_;  // Set once the loop exists.
  std::unique_ptr<DataPlaneOperations> operations_;
  std::unique_ptr<ControlService> control_service_;
  std::unique_ptr<ControlServer> control_server_;
  // The control plane's bound port, read by gRPC threads (0 until bound).
  std::atomic<uint16_t> control_port_{0};
  // The metrics endpoint's bound address, for binding it again.
  std::string metrics_address_;
  bool shutting_down_ = false;
  // Running side of a planned upgrade, from the hand-over on.
  std::unique_ptr<PendingUpgrade> upgrade_;
  size_t passed_to_new_broker_ = 0;
  bool upgrade_stopped_accepting_ = false;
  // New side: the channel to the running broker, until UpgradeReady.
  std::unique_ptr<wire::MessageChannel> upgrade_reporter_;
  // Then the same channel, until the previous broker exits.
  std::unique_ptr<UpgradeInbox> upgrade_inbox_;
  std::thread control_shutdown_;
  std::atomic<bool> control_stopped_{false};
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_DAEMON_H_
