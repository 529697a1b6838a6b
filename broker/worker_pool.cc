#include "broker/worker_pool.h"

#include <signal.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace fdbroker {

absl::string_view PoolModeName(PoolMode mode) {
  switch (mode) {
    case PoolMode::kAdopting:
      return "adopting";
    case PoolMode::kRunning:
      return "running";
    case PoolMode::kSuspended:
      return "suspended";
    case PoolMode::kHandingOver:
      return "handing over";
    case PoolMode::kShuttingDown:
      return "shutting down";
  }
  return "unknown";
}

WorkerPool::WorkerPool(EventLoop& loop, WorkerRegistry& registry,
                       Supervisor& supervisor, WorkerLifecycle& lifecycle,
                       WorkerStats& stats, const Options& options)
    : loop_(loop),
      registry_(registry),
      supervisor_(supervisor),
      lifecycle_(lifecycle),
      stats_(stats),
      options_(options) {}

void WorkerPool::Start(absl::Duration adopt_grace) {
  if (adopt_grace <= absl::ZeroDuration()) {
    Reconcile();
    return;
  }
  // Workers of a previous broker may be about to re-register: give them the
  // chance to count toward --workers before starting new ones.
  mode_ = PoolMode::kAdopting;
  spdlog::info(
      "waiting up to {} for workers of the previous broker to "
      "re-register",
      absl::FormatDuration(adopt_grace));
  adopt_timer_.Arm(adopt_grace, [this] {
    if (mode_ != PoolMode::kAdopting) return;
    mode_ = PoolMode::kRunning;
    Reconcile();
  });
}

void WorkerPool::Suspend() {
  if (mode_ == PoolMode::kRunning || mode_ == PoolMode::kAdopting) {
    mode_ = PoolMode::kSuspended;
  }
  restart_timer_.Cancel();
}

std::vector<uint64_t> WorkerPool::Resume() {
  std::vector<uint64_t> started;
  if (mode_ != PoolMode::kSuspended) return started;
  mode_ = PoolMode::kRunning;
  for (int i = CountServing(); i < options_.target_workers; ++i) {
    const uint64_t id = SpawnOne();
    if (id != 0) started.push_back(id);
  }
  return started;
}

void WorkerPool::HandOver() {
  if (mode_ != PoolMode::kShuttingDown) mode_ = PoolMode::kHandingOver;
  restart_timer_.Cancel();
}

void WorkerPool::ShutDown() {
  mode_ = PoolMode::kShuttingDown;
  restart_timer_.Cancel();
}

bool WorkerPool::Serving(const Worker& worker) {
  return worker.supervised && (worker.state == WorkerState::kStarting ||
                               worker.state == WorkerState::kReady);
}

int WorkerPool::CountServing() const {
  int serving = 0;
  for (const auto& [id, worker] : registry_.workers()) {
    serving += Serving(*worker);
  }
  return serving;
}

uint64_t WorkerPool::SpawnOne(bool restart) {
  absl::StatusOr<pid_t> pid = supervisor_.Spawn();
  if (!pid.ok()) {
    spdlog::error("cannot start worker: {}", pid.status().ToString());
    ++crash_streak_;
    Reconcile();
    return 0;
  }
  if (restart) --pending_restarts_;
  Worker& worker = lifecycle_.Spawned(*pid, restart);
  spdlog::info("worker {} {}: pid {}", worker.id,
               restart ? "started (restart)" : "started", *pid);
  return worker.id;
}

absl::StatusOr<std::vector<uint64_t>> WorkerPool::StartNow(int count) {
  // An operator asked: start now, without the crash back-off.
  restart_timer_.Cancel();
  std::vector<uint64_t> started;
  for (int i = 0; i < count; ++i) {
    const uint64_t id = SpawnOne();
    if (id == 0) {
      return absl::InternalError(absl::StrCat("could not start a worker (",
                                              supervisor_.argv()[0],
                                              "); see the broker's log"));
    }
    started.push_back(id);
  }
  return started;
}

void WorkerPool::NoteFailure(const Worker& worker) {
  // One that never registered failed to start, however long that took (an
  // app that needs seconds to import and fail is a restart loop too); one
  // that registered counts only if it died within stable_after of starting.
  const bool registered = worker.registered_mono_nanos != 0;
  const int64_t lived = loop_.NowNanos() - worker.started_mono_nanos;
  if (registered && lived >= absl::ToInt64Nanoseconds(options_.stable_after)) {
    crash_streak_ = 0;
  }
  ++crash_streak_;
  ++pending_restarts_;
  last_failure_nanos_ = loop_.NowNanos();
  if (crash_streak_ == kRestartLoopStreak) {
    ++stats_.restart_loops;
    spdlog::error(
        "restart loop: {} workers in a row failed to register or died "
        "within {} of starting; restarts back off (up to {})",
        crash_streak_, absl::FormatDuration(options_.stable_after),
        absl::FormatDuration(options_.restart_backoff_max));
    lifecycle_.Emit(
        v1::EVENT_TYPE_RESTART_LOOP, &worker,
        absl::StrCat(crash_streak_,
                     " workers in a row failed to register or died within ",
                     absl::FormatDuration(options_.stable_after),
                     " of starting"));
  }
}

void WorkerPool::Reconcile() {
  if (mode_ != PoolMode::kRunning) return;
  const int serving = CountServing();
  if (serving >= options_.target_workers) {
    pending_restarts_ = 0;  // Scaling made up for the failures.
    return;
  }
  if (restart_timer_.armed()) return;
  absl::Duration delay = absl::ZeroDuration();
  if (crash_streak_ > 0) {
    delay = std::min(options_.restart_backoff_max,
                     options_.restart_backoff_initial *
                         std::pow(2.0, std::min(crash_streak_ - 1, 30)));
  }
  if (delay == absl::ZeroDuration()) {
    for (int i = serving; i < options_.target_workers; ++i) {
      SpawnOne(/*restart=*/pending_restarts_ > 0);
    }
    return;
  }
  spdlog::info("restarting worker(s) in {}", absl::FormatDuration(delay));
  restart_timer_.Arm(delay, [this] {
    if (mode_ != PoolMode::kRunning ||
        CountServing() >= options_.target_workers) {
      return;
    }
    SpawnOne(/*restart=*/pending_restarts_ > 0);
    // One at a time while crashing; Reconcile schedules the rest.
    Reconcile();
  });
}

void WorkerPool::Check(int64_t now_nanos) {
  if (crash_streak_ > 0) {
    // A worker started after the last failure has stayed up long enough.
    for (const auto& [id, worker] : registry_.workers()) {
      if (worker->state == WorkerState::kReady &&
          worker->started_mono_nanos >= last_failure_nanos_ &&
          now_nanos - worker->started_mono_nanos >=
              absl::ToInt64Nanoseconds(options_.stable_after)) {
        if (crash_streak_ >= kRestartLoopStreak) {
          spdlog::info("restart loop over: worker {} has stayed up", id);
        }
        crash_streak_ = 0;
        break;
      }
    }
  }
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->state == WorkerState::kStarting && worker->supervised &&
        now_nanos - worker->started_mono_nanos >
            absl::ToInt64Nanoseconds(options_.start_timeout)) {
      spdlog::warn("worker {} (pid {}) did not register within {}; killing it",
                   id, worker->pid,
                   absl::FormatDuration(options_.start_timeout));
      supervisor_.Signal(worker->pid, SIGKILL);
    }
  }
}

}  // namespace fdbroker
