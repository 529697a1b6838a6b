#include "broker/broker_operations.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/time_util.h"
#include "spdlog/spdlog.h"
#include "wire/command_line.h"
#include "wire/message_channel.h"

namespace fdbroker {
namespace {

constexpr int64_t kRateWindowNanos = 10'000'000'000;

v1::WorkerState StateToProto(WorkerState state) {
  switch (state) {
    case WorkerState::kStarting:
      return v1::WORKER_STATE_STARTING;
    case WorkerState::kReady:
      return v1::WORKER_STATE_READY;
    case WorkerState::kDraining:
      return v1::WORKER_STATE_DRAINING;
    case WorkerState::kExited:
      return v1::WORKER_STATE_EXITED;
  }
  return v1::WORKER_STATE_UNSPECIFIED;
}

}  // namespace

absl::StatusOr<absl::Duration> DurationField(
    const google::protobuf::Duration& value, bool has_value,
    absl::Duration fallback, absl::string_view field) {
  if (!has_value || (value.seconds() == 0 && value.nanos() == 0)) {
    return fallback;
  }
  if (value.nanos() <= -1000000000 || value.nanos() >= 1000000000 ||
      (value.seconds() > 0 && value.nanos() < 0) ||
      (value.seconds() < 0 && value.nanos() > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " is not a valid duration"));
  }
  const absl::Duration d =
      absl::Seconds(value.seconds()) + absl::Nanoseconds(value.nanos());
  if (d < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " must not be negative, got ", absl::FormatDuration(d)));
  }
  if (d > absl::Hours(24)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " must be at most 24h, got ", absl::FormatDuration(d)));
  }
  return d;
}

DataPlaneOperations::DataPlaneOperations(
    EventLoop& loop, Listener& listener, WorkerRegistry& registry,
    ConnectionDispatcher& dispatcher, WorkerManager& manager,
    std::function<void(const WorkerEvent&)> emit)
    : loop_(loop),
      listener_(listener),
      registry_(registry),
      dispatcher_(dispatcher),
      manager_(manager),
      emit_(std::move(emit)),
      accepted_rate_(kRateWindowNanos),
      handed_rate_(kRateWindowNanos) {}

DataPlaneOperations::~DataPlaneOperations() = default;

void DataPlaneOperations::Start(HealthCallback on_health) {
  on_health_ = std::move(on_health);
  Tick();
}

uint64_t DataPlaneOperations::AcceptedTotal() const {
  // With --placement=kernel workers accept most connections themselves.
  return dispatcher_.stats().dispatched + manager_.stats().kernel_accepted;
}

void DataPlaneOperations::Tick() {
  tick_timer_.Arm(absl::Seconds(1), [this] { Tick(); });
  const int64_t now = loop_.clock().MonotonicNanos();
  accepted_rate_.Sample(now, AcceptedTotal());
  handed_rate_.Sample(now, dispatcher_.stats().handed_off);
  absl::flat_hash_map<uint64_t, RateWindow> rates;
  for (const auto& [id, worker] : registry_.workers()) {
    auto it = worker_rates_.find(id);
    RateWindow rate =
        it == worker_rates_.end() ? RateWindow(kRateWindowNanos) : it->second;
    rate.Sample(now, worker->handed_total);
    rates.emplace(id, std::move(rate));
  }
  worker_rates_ = std::move(rates);  // Forgets workers that are gone.
  RefreshHealth();
}

void DataPlaneOperations::RefreshHealth() {
  bool serving = listener_.accepting() && !manager_.shutting_down() &&
                 !manager_.in_restart_loop() &&
                 registry_.CountInState(WorkerState::kReady) > 0;
  if (static_cast<int>(serving) == health_) return;
  health_ = serving;
  spdlog::info("health: {}", serving ? "SERVING" : "NOT_SERVING");
  if (on_health_) on_health_(serving);
}

v1::Worker DataPlaneOperations::ToProto(const Worker& worker) const {
  v1::Worker out;
  out.set_id(worker.id);
  out.set_pid(worker.pid);
  out.set_state(StateToProto(worker.state));
  out.set_active_connections(worker.active());
  out.set_unacked_connections(worker.unacked);
  out.set_handed_total(worker.handed_total);
  out.set_supervised(worker.supervised);
  out.set_capacity(worker.capacity);
  out.set_supports_release(worker.supports_release);
  out.set_reports_liveness(worker.reports_liveness);
  if (worker.reports_liveness && worker.state != WorkerState::kStarting) {
    *out.mutable_app_silent() =
        google::protobuf::util::TimeUtil::NanosecondsToDuration(
            std::max<int64_t>(0,
                              loop_.NowNanos() - worker.app_alive_mono_nanos));
  }
  *out.mutable_started_at() =
      google::protobuf::util::TimeUtil::NanosecondsToTimestamp(
          absl::ToUnixNanos(worker.started_at));
  for (const auto& [key, value] : worker.labels) {
    (*out.mutable_labels())[key] = value;
  }
  return out;
}

v1::Worker DataPlaneOperations::ToProtoById(uint64_t id) const {
  for (const auto& [worker_id, worker] : registry_.workers()) {
    if (worker_id == id) return ToProto(*worker);
  }
  v1::Worker gone;
  gone.set_id(id);
  gone.set_state(v1::WORKER_STATE_EXITED);
  return gone;
}

v1::ListWorkersResponse DataPlaneOperations::ListWorkers() {
  v1::ListWorkersResponse response;
  for (const auto& [id, worker] : registry_.workers()) {
    *response.add_workers() = ToProto(*worker);
  }
  return response;
}

v1::GetLoadResponse DataPlaneOperations::GetLoad() {
  const int64_t now = loop_.clock().MonotonicNanos();
  const ConnectionDispatcher::Stats& stats = dispatcher_.stats();
  v1::GetLoadResponse response;
  int64_t unacked = 0;
  for (const auto& [id, worker] : registry_.workers()) {
    v1::WorkerLoad* load = response.add_workers();
    load->set_worker_id(id);
    load->set_pid(worker->pid);
    load->set_state(StateToProto(worker->state));
    load->set_active_connections(worker->active());
    load->set_unacked_connections(worker->unacked);
    load->set_capacity(worker->capacity);
    auto it = worker_rates_.find(id);
    if (it != worker_rates_.end()) {
      load->set_handed_per_second(
          it->second.PerSecond(now, worker->handed_total));
    }
    unacked += worker->unacked;
  }
  response.set_active_connections(registry_.TotalActive());
  response.set_unacked_connections(unacked);
  response.set_accepted_total(AcceptedTotal());
  response.set_handed_off_total(stats.handed_off);
  response.set_rejected_total(stats.rejected_overload +
                              stats.rejected_shutdown + stats.failed_attempts);
  response.set_pending_connections(static_cast<int64_t>(dispatcher_.pending()));
  response.set_accepting(listener_.accepting() && !manager_.shutting_down());
  response.set_accepted_per_second(
      accepted_rate_.PerSecond(now, AcceptedTotal()));
  response.set_handed_off_per_second(
      handed_rate_.PerSecond(now, stats.handed_off));
  return response;
}

absl::StatusOr<v1::ScaleWorkersResponse> DataPlaneOperations::ScaleWorkers(
    const v1::ScaleWorkersRequest& request) {
  if (request.count() < 0 || request.count() > manager_.max_workers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("count must be in 0..", manager_.max_workers(),
                     " (--max_workers), got ", request.count()));
  }
  absl::StatusOr<absl::Duration> timeout =
      DurationField(request.drain_timeout(), request.has_drain_timeout(),
                    manager_.drain_timeout(), "drain_timeout");
  if (!timeout.ok()) return timeout.status();
  absl::StatusOr<WorkerManager::ScaleResult> result =
      manager_.Scale(request.count(), *timeout);
  if (!result.ok()) return result.status();
  v1::ScaleWorkersResponse response;
  response.set_previous_count(result->previous_count);
  response.set_count(result->count);
  for (uint64_t id : result->started) *response.add_started() = ToProtoById(id);
  for (uint64_t id : result->draining) {
    *response.add_draining() = ToProtoById(id);
  }
  RefreshHealth();
  return response;
}

void DataPlaneOperations::DrainWorker(const v1::DrainWorkerRequest& request,
                                      DrainWorkerDone done) {
  if (request.worker_id() == 0) {
    done(absl::InvalidArgumentError(
        "worker_id is required (ListWorkers shows the ids)"));
    return;
  }
  absl::StatusOr<absl::Duration> timeout =
      DurationField(request.timeout(), request.has_timeout(),
                    manager_.drain_timeout(), "timeout");
  if (!timeout.ok()) {
    done(timeout.status());
    return;
  }
  manager_.DrainWorkerById(
      request.worker_id(), *timeout, request.replace(),
      [this, done = std::move(done)](
          absl::StatusOr<WorkerManager::DrainResult> result) mutable {
        if (!result.ok()) {
          done(result.status());
          return;
        }
        v1::DrainWorkerResponse response;
        *response.mutable_worker() = ToProtoById(result->worker_id);
        if (result->replacement_id != 0) {
          *response.mutable_replacement() = ToProtoById(result->replacement_id);
        }
        RefreshHealth();
        done(std::move(response));
      });
}

absl::StatusOr<v1::DrainResponse> DataPlaneOperations::Drain(
    const v1::DrainRequest& request) {
  if (manager_.shutting_down()) {
    return absl::FailedPreconditionError("the broker is shutting down");
  }
  absl::StatusOr<absl::Duration> timeout =
      DurationField(request.timeout(), request.has_timeout(),
                    absl::ZeroDuration(), "timeout");
  if (!timeout.ok()) return timeout.status();
  // The socket stays bound: clients wait in the backlog until Resume.
  listener_.Pause();
  v1::DrainResponse response;
  response.set_accepting(false);
  response.set_pending_connections(static_cast<int64_t>(dispatcher_.pending()));
  if (*timeout > absl::ZeroDuration()) {
    for (uint64_t id : manager_.SuspendPool(*timeout)) {
      *response.add_draining() = ToProtoById(id);
    }
  }
  WorkerEvent event;
  event.time = loop_.clock().Now();
  event.type = v1::EVENT_TYPE_DRAIN_REQUESTED;
  event.detail = *timeout > absl::ZeroDuration()
                     ? absl::StrCat("workers drain within ",
                                    absl::FormatDuration(*timeout))
                     : "stopped accepting";
  emit_(event);
  RefreshHealth();
  return response;
}

absl::StatusOr<v1::ResumeResponse> DataPlaneOperations::Resume(
    const v1::ResumeRequest&) {
  if (manager_.shutting_down()) {
    return absl::FailedPreconditionError("the broker is shutting down");
  }
  v1::ResumeResponse response;
  if (manager_.pool_suspended()) {
    for (uint64_t id : manager_.ResumePool()) {
      *response.add_started() = ToProtoById(id);
    }
  }
  listener_.Resume();
  response.set_accepting(true);
  WorkerEvent event;
  event.time = loop_.clock().Now();
  event.type = v1::EVENT_TYPE_RESUME_REQUESTED;
  emit_(event);
  RefreshHealth();
  return response;
}

absl::StatusOr<v1::RebalanceResponse> DataPlaneOperations::Rebalance(
    const v1::RebalanceRequest&) {
  // The request has no fields; the manager checks the broker's state.
  absl::StatusOr<WorkerManager::RebalanceResult> result =
      manager_.Rebalance("RPC");
  if (!result.ok()) return result.status();
  v1::RebalanceResponse response;
  response.set_mean_connections(result->mean);
  for (const auto& [id, count] : result->asked) {
    v1::WorkerRelease* asked = response.add_asked();
    *asked->mutable_worker() = ToProtoById(id);
    asked->set_requested_connections(count);
  }
  for (uint64_t id : result->skipped) {
    *response.add_skipped() = ToProtoById(id);
  }
  return response;
}

absl::StatusOr<v1::RestartWorkersResponse> DataPlaneOperations::RestartWorkers(
    const v1::RestartWorkersRequest& request) {
  if (request.max_surge() < 0 || request.max_surge() > manager_.max_workers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_surge must be in 1..", manager_.max_workers(),
                     " (--max_workers; 0 means 1), got ", request.max_surge()));
  }
  WorkerRecycler::RestartRequest restart;
  restart.max_surge = std::max(1, request.max_surge());
  absl::StatusOr<absl::Duration> timeout =
      DurationField(request.drain_timeout(), request.has_drain_timeout(),
                    manager_.drain_timeout(), "drain_timeout");
  if (!timeout.ok()) return timeout.status();
  restart.drain_timeout = *timeout;
  absl::StatusOr<std::optional<Supervisor::Command>> command =
      WorkerCommandFields(request.worker_cmd(), request.env(),
                          manager_.worker_command());
  if (!command.ok()) return command.status();
  restart.command = *std::move(command);
  absl::StatusOr<WorkerRecycler::RestartPlan> plan =
      manager_.RestartWorkers(std::move(restart));
  if (!plan.ok()) return plan.status();
  v1::RestartWorkersResponse response;
  for (uint64_t id : plan->replacing) {
    *response.add_replacing() = ToProtoById(id);
  }
  response.set_max_surge(plan->max_surge);
  response.set_worker_cmd(absl::StrJoin(manager_.worker_command().argv, " "));
  return response;
}

absl::StatusOr<std::optional<Supervisor::Command>> WorkerCommandFields(
    const std::string& worker_cmd,
    const google::protobuf::Map<std::string, std::string>& env,
    const Supervisor::Command& current) {
  if (worker_cmd.empty() && env.empty()) return std::nullopt;
  Supervisor::Command command = current;
  if (!worker_cmd.empty()) {
    absl::StatusOr<std::vector<std::string>> argv =
        wire::SplitCommandLine(worker_cmd);
    if (!argv.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker_cmd: ", argv.status().message()));
    }
    if (argv->empty()) {
      return absl::InvalidArgumentError("worker_cmd: no program");
    }
    if (absl::StatusOr<std::string> program = wire::ResolveProgram((*argv)[0]);
        !program.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker_cmd: ", program.status().message()));
    }
    command.argv = *std::move(argv);
  }
  if (!env.empty()) {
    command.env.clear();
    for (const auto& [name, value] : env) {
      const bool valid_name = !name.empty() && !absl::ascii_isdigit(name[0]) &&
                              std::all_of(name.begin(), name.end(), [](char c) {
                                return absl::ascii_isalnum(c) || c == '_';
                              });
      if (!valid_name) {
        return absl::InvalidArgumentError(
            absl::StrCat("env: \"", absl::CEscape(name),
                         "\" is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"));
      }
      if (name == wire::kSocketEnvVar) {
        return absl::InvalidArgumentError(
            absl::StrCat("env: ", name, " is set by the broker"));
      }
      if (value.find('\0') != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("env: the value of ", name, " contains a NUL byte"));
      }
      command.env[name] = value;
    }
  }
  return command;
}

}  // namespace fdbroker
