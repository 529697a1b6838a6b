#include "broker/worker_drainer.h"

#include <signal.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "spdlog/spdlog.h"

namespace fdbroker {

WorkerDrainer::WorkerDrainer(EventLoop& loop, WorkerRegistry& registry,
                             ConnectionDispatcher& dispatcher,
                             Supervisor& supervisor, WorkerLifecycle& lifecycle,
                             const WorkerPool& pool, WorkerStats& stats)
    : loop_(loop),
      registry_(registry),
      dispatcher_(dispatcher),
      supervisor_(supervisor),
      lifecycle_(lifecycle),
      pool_(pool),
      stats_(stats) {
  dispatcher_.set_migration_observer(
      [this](uint64_t from, uint64_t to, v1::ReleaseReason reason) {
        NoteMigration(from, to, reason);
      });
}

WorkerDrainer::~WorkerDrainer() { dispatcher_.set_migration_observer(nullptr); }

// ---- Draining -------------------------------------------------------------

void WorkerDrainer::Drain(Worker& worker, DrainCause cause,
                          absl::Duration timeout) {
  Drain(std::vector<Worker*>{&worker}, cause, timeout);
}

void WorkerDrainer::Drain(const std::vector<Worker*>& workers, DrainCause cause,
                          absl::Duration timeout) {
  // One worker leaves and others stay: its idle connections move to them
  // (released) instead of being closed. A broker-wide drain has nowhere to
  // move them.
  absl::flat_hash_set<uint64_t> leaving;
  for (const Worker* worker : workers) leaving.insert(worker->id);
  const bool can_move =
      !pool_.shutting_down() && !pool_.suspended() && OthersCanTake(leaving);
  for (Worker* worker : workers) {
    const bool release_idle = worker->supports_release && can_move;
    if (!lifecycle_.Drain(*worker, cause, timeout, release_idle)) continue;
    if (worker->channel == nullptr) {
      // Not registered (or its channel is gone): nothing to tell it.
      if (worker->supervised) supervisor_.Signal(worker->pid, SIGTERM);
      continue;
    }
    v1::HandoffMessage drain;
    drain.mutable_drain()->set_deadline_unix_nanos(
        absl::ToUnixNanos(loop_.clock().Now() + timeout));
    drain.mutable_drain()->set_release_idle(release_idle);
    worker->channel->SendControl(std::move(drain));
    spdlog::info(
        "worker {} (pid {}) draining ({}), deadline in {}{}", worker->id,
        worker->pid, std::string(DrainCauseName(cause)),
        absl::FormatDuration(timeout),
        release_idle ? ", idle connections move to other workers" : "");
  }
}

std::vector<uint64_t> WorkerDrainer::DrainSurplus(int count,
                                                  absl::Duration timeout) {
  std::vector<Worker*> serving;
  for (const auto& [id, worker] : registry_.workers()) {
    if (WorkerPool::Serving(*worker)) serving.push_back(worker.get());
  }
  std::sort(serving.begin(), serving.end(), [](Worker* a, Worker* b) {
    const bool a_starting = a->state == WorkerState::kStarting;
    const bool b_starting = b->state == WorkerState::kStarting;
    if (a_starting != b_starting) return a_starting;
    if (a->load() != b->load()) return a->load() < b->load();
    return a->id > b->id;
  });
  serving.resize(std::min<size_t>(serving.size(), std::max(count, 0)));
  Drain(serving, DrainCause::kScaleDown, timeout);
  std::vector<uint64_t> ids;
  for (const Worker* worker : serving) ids.push_back(worker->id);
  return ids;
}

void WorkerDrainer::Check(int64_t now_nanos) {
  for (const auto& [id, worker] : registry_.workers()) {
    if (!WorkerLifecycle::TakeExpiredDeadline(*worker, now_nanos)) continue;
    if (worker->supervised) {
      spdlog::warn(
          "worker {} (pid {}) still running at its drain deadline; "
          "killing it",
          id, worker->pid);
      supervisor_.Signal(worker->pid, SIGKILL);
    } else if (worker->channel != nullptr) {
      worker->channel->Close(
          absl::DeadlineExceededError("drain deadline passed"));
    }
  }
}

bool WorkerDrainer::OthersCanTake(
    const absl::flat_hash_set<uint64_t>& leaving) const {
  for (const auto& [id, other] : registry_.workers()) {
    if (!leaving.contains(id) && other->Reachable() && other->HasRoom()) {
      return true;
    }
  }
  return false;
}

// ---- Replace-then-drain, scale-up --------------------------------------

void WorkerDrainer::AwaitReplacement(uint64_t replacement_id, uint64_t old_id,
                                     absl::Duration timeout, DrainCallback done,
                                     DrainCause cause) {
  pending_replaces_.emplace(
      replacement_id, PendingReplace{old_id, timeout, std::move(done), cause});
}

void WorkerDrainer::AwaitScaleUp(const std::vector<uint64_t>& started) {
  awaiting_scale_ready_.insert(started.begin(), started.end());
}

void WorkerDrainer::OnRegistered(const Worker& worker) {
  if (pending_replaces_.contains(worker.id)) {
    OnReplacementDone(worker.id, absl::OkStatus());
  }
  if (awaiting_scale_ready_.erase(worker.id) > 0 &&
      awaiting_scale_ready_.empty()) {
    RebalanceAfterScale();
  }
}

void WorkerDrainer::OnRemoved(uint64_t id) {
  // The scale-up's other workers are ready: rebalance onto them anyway
  // (from a fresh turn: this may run inside a channel callback).
  if (awaiting_scale_ready_.erase(id) > 0 && awaiting_scale_ready_.empty()) {
    loop_.RunSoon([this] { RebalanceAfterScale(); });
  }
}

void WorkerDrainer::OnExited(uint64_t id, pid_t pid, int wait_status) {
  if (!pending_replaces_.contains(id)) return;
  OnReplacementDone(
      id,
      absl::UnavailableError(absl::StrCat(
          "the replacement worker ", id, " (pid ", pid,
          ") exited before registering: ", DescribeWaitStatus(wait_status))));
}

void WorkerDrainer::OnReplacementDone(uint64_t replacement_id,
                                      const absl::Status& status) {
  auto it = pending_replaces_.find(replacement_id);
  PendingReplace pending = std::move(it->second);
  pending_replaces_.erase(it);
  if (!status.ok()) {
    pending.done(status);
    return;
  }
  Worker* old = registry_.Find(pending.old_id);
  if (old == nullptr || old->state == WorkerState::kExited) {
    // It went away while its replacement started; the pool is whole.
    pending.done(DrainResult{pending.old_id, replacement_id});
    return;
  }
  if (!old->retiring()) Drain(*old, pending.cause, pending.timeout);
  pending.done(DrainResult{pending.old_id, replacement_id});
}

// ---- Rebalance and migrations --------------------------------------------

void WorkerDrainer::RebalanceAfterScale() {
  absl::StatusOr<RebalanceResult> result = Rebalance("after scale-up");
  if (!result.ok()) {
    spdlog::info("no rebalance after scale-up: {}",
                 std::string(result.status().message()));
  }
}
absl::StatusOr<WorkerDrainer::RebalanceResult> WorkerDrainer::Rebalance(
    absl::string_view trigger, int64_t slack) {
  if (pool_.shutting_down()) {
    return absl::FailedPreconditionError("the broker is shutting down");
  }
  if (pool_.suspended()) {
    return absl::FailedPreconditionError(
        "the broker is drained (Drain with a timeout); Resume first");
  }
  std::vector<Worker*> ready;
  int64_t total = 0;
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->Reachable()) {
      ready.push_back(worker.get());
      total += worker->load();
    }
  }
  if (ready.size() < 2) {
    return absl::FailedPreconditionError(
        absl::StrCat("rebalancing needs at least 2 ready workers; ",
                     ready.size(), " ready now"));
  }
  const int64_t n = static_cast<int64_t>(ready.size());
  RebalanceResult result;
  result.mean = static_cast<double>(total) / static_cast<double>(n);
  const int64_t ceil_mean = (total + n - 1) / n;
  std::string asked;
  for (Worker* worker : ready) {
    // Within `slack` connections of the mean is balanced; above it by more
    // and above ceil(mean), the excess over ceil(mean) moves (at least 1).
    if (static_cast<double>(worker->load()) <=
            result.mean + static_cast<double>(slack) ||
        worker->load() <= ceil_mean) {
      continue;
    }
    if (!worker->supports_release) {
      result.skipped.push_back(worker->id);
      continue;
    }
    const uint32_t excess = static_cast<uint32_t>(std::min<int64_t>(
        worker->load() - ceil_mean, std::numeric_limits<uint32_t>::max()));
    v1::HandoffMessage request;
    request.mutable_release_request()->set_max_connections(excess);
    request.mutable_release_request()->set_reason(v1::RELEASE_REASON_REBALANCE);
    worker->channel->SendControl(std::move(request));
    ++stats_.release_requests;
    result.asked.emplace_back(worker->id, excess);
    absl::StrAppend(&asked, asked.empty() ? "" : ", ", "worker ", worker->id,
                    " for ", excess);
  }
  ++stats_.rebalances;
  std::string detail = absl::StrCat(
      trigger, ": mean ", absl::StrFormat("%.1f", result.mean), " over ",
      ready.size(), " workers; ",
      asked.empty() ? "nobody asked" : absl::StrCat("asked ", asked),
      result.skipped.empty()
          ? ""
          : absl::StrCat("; ", result.skipped.size(),
                         " worker(s) above it cannot release"));
  spdlog::info("rebalance {}", detail);
  lifecycle_.Emit(v1::EVENT_TYPE_REBALANCE_REQUESTED, nullptr,
                  std::move(detail));
  return result;
}

void WorkerDrainer::NoteMigration(uint64_t from, uint64_t to,
                                  v1::ReleaseReason reason) {
  MigrationTally& tally = migrations_[{from, static_cast<int>(reason)}];
  if (tally.total == 0) {
    const Worker* releaser = registry_.Find(from);
    tally.pid = releaser != nullptr ? releaser->pid : 0;
  }
  ++tally.total;
  ++tally.by_target[to];
  if (!migration_timer_.armed()) {
    migration_timer_.Arm(absl::Milliseconds(250), [this] { EmitMigrations(); });
  }
}

void WorkerDrainer::EmitMigrations() {
  for (const auto& [key, tally] : migrations_) {
    std::string targets;
    for (const auto& [to, count] : tally.by_target) {
      absl::StrAppend(&targets, targets.empty() ? "" : ", ", "worker ", to,
                      " (", count, ")");
    }
    WorkerEvent event;
    event.type = v1::EVENT_TYPE_CONNECTIONS_MIGRATED;
    event.worker_id = key.first;
    event.pid = tally.pid;
    event.detail = absl::StrCat(
        tally.total, " connection(s) moved (",
        key.second == v1::RELEASE_REASON_DRAIN ? "drain" : "rebalance", ") to ",
        targets);
    lifecycle_.Emit(std::move(event));
  }
  migrations_.clear();
}

}  // namespace fdbroker
