#include "broker/worker_recycler.h"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"
#include "wire/unique_fd.h"

namespace fdbroker {
namespace {

// A bound on the tree walked, against a fork bomb under a worker.
constexpr int kMaxTreeProcesses = 256;

// The first 4 KiB of a /proc file (all of statm or a children list that
// matters); nullopt if it cannot be read (the process is gone).
std::optional<std::string> ReadProcFile(const std::string& path) {
  wire::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return std::nullopt;
  char buf[4096];
  const ssize_t n = ::read(fd.get(), buf, sizeof(buf));
  if (n < 0) return std::nullopt;
  return std::string(buf, static_cast<size_t>(n));
}

std::string Mib(uint64_t bytes) {
  return absl::StrFormat("%.1f MiB", static_cast<double>(bytes) / (1 << 20));
}

uint64_t ResidentBytes(pid_t pid) {
  std::optional<std::string> statm =
      ReadProcFile(absl::StrCat("/proc/", pid, "/statm"));
  if (!statm.has_value()) return 0;
  std::vector<absl::string_view> fields =
      absl::StrSplit(*statm, ' ', absl::SkipEmpty());
  uint64_t pages = 0;
  if (fields.size() < 2 || !absl::SimpleAtoi(fields[1], &pages)) return 0;
  static const uint64_t page_size =
      static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return pages * page_size;
}

// The children of every thread of `pid`.
void AppendChildren(pid_t pid, std::vector<pid_t>& out) {
  const std::string tasks = absl::StrCat("/proc/", pid, "/task");
  DIR* dir = ::opendir(tasks.c_str());
  if (dir == nullptr) return;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    std::optional<std::string> children =
        ReadProcFile(absl::StrCat(tasks, "/", entry->d_name, "/children"));
    if (!children.has_value()) continue;
    for (absl::string_view child :
         absl::StrSplit(*children, ' ', absl::SkipWhitespace())) {
      pid_t child_pid = 0;
      if (absl::SimpleAtoi(child, &child_pid)) out.push_back(child_pid);
    }
  }
  ::closedir(dir);
}

}  // namespace

uint64_t ProcessTreeResidentBytes(pid_t pid) {
  uint64_t total = 0;
  std::vector<pid_t> pending = {pid};
  for (int seen = 0; !pending.empty() && seen < kMaxTreeProcesses; ++seen) {
    const pid_t next = pending.back();
    pending.pop_back();
    total += ResidentBytes(next);
    AppendChildren(next, pending);
  }
  return total;
}

absl::string_view WorkerRecycler::ReasonName(Reason reason) {
  switch (reason) {
    case Reason::kRestart:
      return "restart";
    case Reason::kMaxConnections:
      return "max_connections";
    case Reason::kMaxRss:
      return "max_rss";
    case Reason::kMaxAge:
      return "max_age";
  }
  return "unknown";
}

WorkerRecycler::WorkerRecycler(EventLoop& loop, WorkerRegistry& registry,
                               Supervisor& supervisor,
                               WorkerLifecycle& lifecycle, WorkerPool& pool,
                               WorkerDrainer& drainer, WorkerStats& stats,
                               const Options& options)
    : loop_(loop),
      registry_(registry),
      supervisor_(supervisor),
      lifecycle_(lifecycle),
      pool_(pool),
      drainer_(drainer),
      stats_(stats),
      options_(options) {}

// ---- Rolling restart ----------------------------------------------------

absl::StatusOr<WorkerRecycler::RestartPlan> WorkerRecycler::Restart(
    RestartRequest request) {
  if (restart_.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "a rolling restart is running (", restart_->replaced, " of ",
        restart_->total,
        " workers replaced); wait for its RESTART_DONE or RESTART_FAILED "
        "event"));
  }
  if (pool_.mode() != PoolMode::kRunning) {
    return absl::FailedPreconditionError(
        absl::StrCat("the worker pool is ", PoolModeName(pool_.mode()),
                     pool_.suspended() ? "; Resume first" : ""));
  }
  RestartRun run;
  run.generation = ++restart_generation_;
  run.max_surge = std::max(1, request.max_surge);
  run.drain_timeout = request.drain_timeout;
  run.started_nanos = loop_.NowNanos();
  RestartPlan plan;
  plan.max_surge = run.max_surge;
  // Oldest first (ids grow with start order); a worker a recycle is
  // replacing already is not replaced twice.
  for (const auto& [id, worker] : registry_.workers()) {
    if (WorkerPool::Serving(*worker) && !in_flight_.contains(id)) {
      plan.replacing.push_back(id);
    }
  }
  std::sort(plan.replacing.begin(), plan.replacing.end());
  run.queue.assign(plan.replacing.begin(), plan.replacing.end());
  run.total = plan.replacing.size();
  if (request.command.has_value()) {
    run.previous_command = supervisor_.command();
    supervisor_.set_command(*std::move(request.command));
  }
  const std::string detail =
      absl::StrCat(run.total, " worker(s), max_surge ", run.max_surge,
                   ", drain timeout ", absl::FormatDuration(run.drain_timeout),
                   ", command: ", absl::StrJoin(supervisor_.argv(), " "));
  spdlog::info("rolling restart: {}", detail);
  lifecycle_.Emit(v1::EVENT_TYPE_RESTART_REQUESTED, nullptr, detail);
  restart_ = std::move(run);
  StepRestart();
  return plan;
}

void WorkerRecycler::StepRestart() {
  if (!restart_.has_value()) return;
  while (restart_->in_flight < restart_->max_surge &&
         !restart_->queue.empty()) {
    const uint64_t id = restart_->queue.front();
    restart_->queue.pop_front();
    Worker* worker = registry_.Find(id);
    // Gone or already leaving (scaled down, crashed): nothing to replace.
    if (worker == nullptr || !WorkerPool::Serving(*worker)) {
      ++restart_->replaced;
      continue;
    }
    if (!Replace(*worker, Reason::kRestart, restart_->drain_timeout,
                 "rolling restart")) {
      FailRestart(absl::StrCat("could not start a replacement for worker ", id,
                               " (", supervisor_.argv()[0],
                               "); see the broker's log"));
      return;
    }
    ++restart_->in_flight;
  }
  MaybeFinishRestart();
}

void WorkerRecycler::FailRestart(const std::string& why) {
  const std::string detail = absl::StrCat(
      why, "; stopped after ", restart_->replaced, " of ", restart_->total,
      " worker(s) replaced, the others keep serving",
      restart_->previous_command.has_value()
          ? "; the previous worker command is restored"
          : "");
  if (restart_->previous_command.has_value()) {
    supervisor_.set_command(*std::move(restart_->previous_command));
  }
  ++stats_.rolling_restarts_failed;
  spdlog::error("rolling restart failed: {}", detail);
  lifecycle_.Emit(v1::EVENT_TYPE_RESTART_FAILED, nullptr, detail);
  restart_.reset();
}

void WorkerRecycler::MaybeFinishRestart() {
  if (!restart_.has_value() || restart_->in_flight > 0 ||
      !restart_->queue.empty() || !restart_->predecessors.empty()) {
    return;
  }
  const std::string detail = absl::StrCat(
      restart_->replaced, " worker(s) replaced in ",
      absl::FormatDuration(
          absl::Nanoseconds(loop_.NowNanos() - restart_->started_nanos)));
  ++stats_.rolling_restarts_done;
  spdlog::info("rolling restart done: {}", detail);
  lifecycle_.Emit(v1::EVENT_TYPE_RESTART_DONE, nullptr, detail);
  restart_.reset();
}

// ---- Replacing one worker -----------------------------------------------

bool WorkerRecycler::Replace(Worker& old, Reason reason, absl::Duration timeout,
                             std::string why) {
  const uint64_t replacement = pool_.SpawnOne();
  if (replacement == 0) return false;
  const uint64_t old_id = old.id;
  in_flight_[old_id] = reason;
  spdlog::info("replacing worker {} (pid {}) with worker {}: {}", old_id,
               old.pid, replacement, why);
  const uint64_t generation =
      reason == Reason::kRestart ? restart_->generation : 0;
  drainer_.AwaitReplacement(
      replacement, old_id, timeout,
      [this, old_id, reason, generation, why = std::move(why)](
          absl::StatusOr<WorkerDrainer::DrainResult> result) {
        OnReplaced(old_id, reason, generation, why, std::move(result));
      },
      reason == Reason::kRestart ? DrainCause::kRestarted
                                 : DrainCause::kRecycled);
  return true;
}

void WorkerRecycler::OnReplaced(
    uint64_t old_id, Reason reason, uint64_t generation, const std::string& why,
    absl::StatusOr<WorkerDrainer::DrainResult> result) {
  in_flight_.erase(old_id);
  const bool this_restart = reason == Reason::kRestart &&
                            restart_.has_value() &&
                            restart_->generation == generation;
  if (this_restart) --restart_->in_flight;
  if (!result.ok()) {
    spdlog::error("replacing worker {} ({}) failed: {}", old_id, why,
                  result.status().ToString());
    recycle_paused_until_nanos_ =
        loop_.NowNanos() + absl::ToInt64Nanoseconds(options_.failure_backoff);
    if (this_restart) FailRestart(std::string(result.status().message()));
    return;
  }
  switch (reason) {
    case Reason::kRestart:
      ++stats_.recycled_restart;
      break;
    case Reason::kMaxConnections:
      ++stats_.recycled_max_connections;
      break;
    case Reason::kMaxRss:
      ++stats_.recycled_max_rss;
      break;
    case Reason::kMaxAge:
      ++stats_.recycled_max_age;
      break;
  }
  const Worker* old = registry_.Find(old_id);
  const Worker* replacement = registry_.Find(result->replacement_id);
  WorkerEvent event;
  event.type = v1::EVENT_TYPE_WORKER_RECYCLED;
  event.worker_id = old_id;
  event.pid = old != nullptr ? old->pid : 0;
  event.reason = std::string(ReasonName(reason));
  event.detail = absl::StrCat(
      why, "; replaced by worker ", result->replacement_id,
      replacement != nullptr ? absl::StrCat(" (pid ", replacement->pid, ")")
                             : "");
  lifecycle_.Emit(std::move(event));
  if (!this_restart) return;
  ++restart_->replaced;
  if (old != nullptr && old->state != WorkerState::kExited) {
    restart_->predecessors.insert(old_id);
  }
  // From a fresh turn: this runs inside the replacement's registration.
  loop_.RunSoon([this, generation] {
    if (restart_.has_value() && restart_->generation == generation) {
      StepRestart();
    }
  });
}

void WorkerRecycler::OnRemoved(uint64_t id) {
  connection_limit_.erase(id);
  rss_.erase(id);
  if (restart_.has_value() && restart_->predecessors.erase(id) > 0) {
    MaybeFinishRestart();
  }
}

// ---- Recycling ------------------------------------------------------------

uint64_t WorkerRecycler::ConnectionLimit(uint64_t id) {
  auto [it, added] = connection_limit_.try_emplace(id, 0);
  if (added) {
    it->second = options_.max_connections +
                 std::uniform_int_distribution<uint64_t>(
                     0, options_.max_connections_jitter)(rng_);
  }
  return it->second;
}

void WorkerRecycler::OnHanded(const Worker& worker) {
  if (options_.max_connections == 0 || check_soon_ ||
      worker.new_total < ConnectionLimit(worker.id)) {
    return;
  }
  // At once rather than at the next tick (a busy worker takes hundreds of
  // connections in half a second), from a fresh turn (this runs inside the
  // worker's Ack).
  check_soon_ = true;
  loop_.RunSoon([this] {
    check_soon_ = false;
    Check(loop_.NowNanos());
  });
}

std::optional<std::pair<WorkerRecycler::Reason, std::string>>
WorkerRecycler::PastLimit(const Worker& worker, int64_t now_nanos) {
  if (options_.max_connections > 0) {
    const uint64_t limit = ConnectionLimit(worker.id);
    if (worker.new_total >= limit) {
      return std::make_pair(
          Reason::kMaxConnections,
          absl::StrCat(worker.new_total, " new connections, limit ", limit));
    }
  }
  if (options_.max_age > absl::ZeroDuration() &&
      now_nanos - worker.started_mono_nanos >=
          absl::ToInt64Nanoseconds(options_.max_age)) {
    return std::make_pair(
        Reason::kMaxAge,
        absl::StrCat("running for ",
                     absl::FormatDuration(absl::Seconds(
                         (now_nanos - worker.started_mono_nanos) / 1000000000)),
                     ", limit ", absl::FormatDuration(options_.max_age)));
  }
  if (options_.max_rss_bytes > 0) {
    auto it = rss_.find(worker.id);
    if (it != rss_.end() && it->second >= options_.max_rss_bytes) {
      return std::make_pair(
          Reason::kMaxRss,
          absl::StrCat("resident memory ", Mib(it->second), ", limit ",
                       Mib(options_.max_rss_bytes)));
    }
  }
  return std::nullopt;
}

void WorkerRecycler::Check(int64_t now_nanos) {
  if (restart_.has_value() && pool_.mode() != PoolMode::kRunning) {
    FailRestart(
        absl::StrCat("the worker pool is ", PoolModeName(pool_.mode())));
  }
  if (options_.max_connections == 0 && options_.max_rss_bytes == 0 &&
      options_.max_age <= absl::ZeroDuration()) {
    return;
  }
  std::vector<Worker*> candidates;
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->supervised && worker->state == WorkerState::kReady &&
        !in_flight_.contains(id)) {
      candidates.push_back(worker.get());
    }
  }
  if (options_.max_rss_bytes > 0 && now_nanos >= next_rss_sample_nanos_) {
    next_rss_sample_nanos_ =
        now_nanos + absl::ToInt64Nanoseconds(options_.rss_interval);
    for (const Worker* worker : candidates) {
      rss_[worker->id] = ProcessTreeResidentBytes(worker->pid);
    }
  }
  // One recycle at a time, none during a restart (it replaces them all) or
  // while the pool does not run or a replacement failed recently.
  if (restart_.has_value() || !in_flight_.empty() ||
      pool_.mode() != PoolMode::kRunning ||
      now_nanos < recycle_paused_until_nanos_) {
    return;
  }
  std::sort(candidates.begin(), candidates.end(),
            [](const Worker* a, const Worker* b) { return a->id < b->id; });
  for (Worker* worker : candidates) {
    auto past = PastLimit(*worker, now_nanos);
    if (!past.has_value()) continue;
    if (!Replace(*worker, past->first, options_.drain_timeout, past->second)) {
      recycle_paused_until_nanos_ =
          now_nanos + absl::ToInt64Nanoseconds(options_.failure_backoff);
    }
    return;
  }
}

}  // namespace fdbroker
