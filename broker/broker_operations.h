#ifndef FDBROKER_BROKER_BROKER_OPERATIONS_H_
#define FDBROKER_BROKER_BROKER_OPERATIONS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "broker/connection_dispatcher.h"
#include "broker/event_loop.h"
#include "broker/listener.h"
#include "broker/rate_window.h"
#include "broker/supervisor.h"
#include "broker/worker_events.h"
#include "broker/worker_manager.h"
#include "broker/worker_registry.h"
#include "fdbroker/v1/broker.pb.h"

namespace fdbroker {

// What the control plane may ask of the data plane. Every method runs on the
// loop thread (the ControlService posts to it) and validates its input: an
// error status carries the code and the message the operator sees.
class BrokerOperations {
 public:
  using DrainWorkerDone =
      absl::AnyInvocable<void(absl::StatusOr<v1::DrainWorkerResponse>)>;
  virtual ~BrokerOperations() = default;

  virtual v1::ListWorkersResponse ListWorkers() = 0;
  virtual v1::GetLoadResponse GetLoad() = 0;
  virtual absl::StatusOr<v1::ScaleWorkersResponse> ScaleWorkers(
      const v1::ScaleWorkersRequest& request) = 0;
  // Answers through `done`, possibly later (a rolling restart waits for the
  // replacement to register).
  virtual void DrainWorker(const v1::DrainWorkerRequest& request,
                           DrainWorkerDone done) = 0;
  virtual absl::StatusOr<v1::DrainResponse> Drain(
      const v1::DrainRequest& request) = 0;
  virtual absl::StatusOr<v1::ResumeResponse> Resume(
      const v1::ResumeRequest& request) = 0;
  virtual absl::StatusOr<v1::RebalanceResponse> Rebalance(
      const v1::RebalanceRequest& request) = 0;
  // Starts a rolling restart and answers at once (progress: WatchEvents).
  virtual absl::StatusOr<v1::RestartWorkersResponse> RestartWorkers(
      const v1::RestartWorkersRequest& request) = 0;
};

// Converts a google.protobuf.Duration field: unset or zero gives `fallback`;
// negative, malformed or longer than a day is InvalidArgument naming `field`.
absl::StatusOr<absl::Duration> DurationField(
    const google::protobuf::Duration& value, bool has_value,
    absl::Duration fallback, absl::string_view field);

// RestartWorkers' worker_cmd and env over the `current` command: nullopt
// when both are empty (the command stays), else the new command;
// InvalidArgument for an unparsable command line, a program not found or not
// executable, a bad variable name, FDBROKER_SOCKET, or a NUL in a value.
absl::StatusOr<std::optional<Supervisor::Command>> WorkerCommandFields(
    const std::string& worker_cmd,
    const google::protobuf::Map<std::string, std::string>& env,
    const Supervisor::Command& current);

// The real implementation over the broker's parts. Also samples the rates
// GetLoad reports and keeps the health status current.
class DataPlaneOperations final : public BrokerOperations {
 public:
  // Called on the loop thread when "serving" changes: accepting, not
  // shutting down, not in a restart loop, and at least one ready worker.
  using HealthCallback = std::function<void(bool serving)>;

  DataPlaneOperations(EventLoop& loop, Listener& listener,
                      WorkerRegistry& registry,
                      ConnectionDispatcher& dispatcher, WorkerManager& manager,
                      std::function<void(const WorkerEvent&)> emit);
  ~DataPlaneOperations() override;

  // Starts the once-a-second sampling and health checks.
  void Start(HealthCallback on_health);
  // Recomputes health now (e.g. after a worker became ready).
  void RefreshHealth();

  v1::ListWorkersResponse ListWorkers() override;
  v1::GetLoadResponse GetLoad() override;
  absl::StatusOr<v1::ScaleWorkersResponse> ScaleWorkers(
      const v1::ScaleWorkersRequest& request) override;
  void DrainWorker(const v1::DrainWorkerRequest& request,
                   DrainWorkerDone done) override;
  absl::StatusOr<v1::DrainResponse> Drain(
      const v1::DrainRequest& request) override;
  absl::StatusOr<v1::ResumeResponse> Resume(
      const v1::ResumeRequest& request) override;
  absl::StatusOr<v1::RebalanceResponse> Rebalance(
      const v1::RebalanceRequest& request) override;
  absl::StatusOr<v1::RestartWorkersResponse> RestartWorkers(
      const v1::RestartWorkersRequest& request) override;

 private:
  v1::Worker ToProto(const Worker& worker) const;
  v1::Worker ToProtoById(uint64_t id) const;
  // Connections accepted by the broker and, under --placement=kernel, by
  // workers from their own listeners (as they report them).
  uint64_t AcceptedTotal() const;
  void Tick();

  EventLoop& loop_;
  Listener& listener_;
  WorkerRegistry& registry_;
  ConnectionDispatcher& dispatcher_;
  WorkerManager& manager_;
  std::function<void(const WorkerEvent&)> emit_;
  HealthCallback on_health_;
  int health_ = -1;  // Unknown until the first check.
  Timer tick_timer_{loop_};
  RateWindow accepted_rate_;
  RateWindow handed_rate_;
  absl::flat_hash_map<uint64_t, RateWindow> worker_rates_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_BROKER_OPERATIONS_H_
