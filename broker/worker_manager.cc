#include "broker/worker_manager.h"

#include <signal.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"
#include "wire/message_channel.h"

namespace fdbroker {
namespace {

// The parent of `pid` from /proc, or 0.
pid_t ParentPid(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(stat, line)) return 0;
  // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::vector<absl::string_view> fields = absl::StrSplit(
      absl::string_view(line).substr(close + 1), ' ', absl::SkipEmpty());
  int ppid = 0;
  if (fields.size() < 2 || !absl::SimpleAtoi(fields[1], &ppid)) return 0;
  return ppid;
}

}  // namespace

WorkerManager::WorkerManager(EventLoop& loop, WorkerRegistry& registry,
                             ConnectionDispatcher& dispatcher,
                             Supervisor& supervisor, wire::SysCalls& sys,
                             const Options& options, EventCallback on_event)
    : loop_(loop),
      registry_(registry),
      dispatcher_(dispatcher),
      supervisor_(supervisor),
      sys_(sys),
      options_(options),
      lifecycle_(loop, registry, options.drain_timeout, stats_,
                 std::move(on_event)) {
  dispatcher_.set_migration_observer(
      [this](uint64_t from, uint64_t to, v1::ReleaseReason reason) {
        NoteMigration(from, to, reason);
      });
}

WorkerManager::~WorkerManager() { dispatcher_.set_migration_observer(nullptr); }

void WorkerManager::Start(absl::Duration adopt_grace) {
  Tick();
  if (adopt_grace <= absl::ZeroDuration()) {
    Reconcile();
    return;
  }
  // Workers of a previous broker may be about to re-register: give them the
  // chance to count toward --workers before starting new ones.
  adopting_ = true;
  spdlog::info(
      "waiting up to {} for workers of the previous broker to "
      "re-register",
      absl::FormatDuration(adopt_grace));
  adopt_timer_.Arm(adopt_grace, [this] {
    adopting_ = false;
    Reconcile();
  });
}

// ---- Registration -------------------------------------------------------

void WorkerManager::OnNewPeer(wire::UniqueFd socket, const ucred& peer,
                              bool allowed) {
  absl::StatusOr<std::unique_ptr<HandoffChannel>> channel =
      HandoffChannel::Create(loop_, std::move(socket), peer, sys_, *this);
  if (!channel.ok()) {
    spdlog::error("cannot watch worker channel: {}",
                  channel.status().ToString());
    return;
  }
  HandoffChannel* key = channel->get();
  if (!allowed) disallowed_.insert(key);
  unregistered_.emplace(key, *std::move(channel));
}

void WorkerManager::Refuse(HandoffChannel& channel, v1::RefusalReason reason,
                           absl::string_view message) {
  ++stats_.refused;
  spdlog::warn("refused worker pid {}: {}", channel.peer().pid,
               std::string(message));
  v1::HandoffMessage refusal;
  refusal.mutable_refusal()->set_reason(reason);
  refusal.mutable_refusal()->set_message(std::string(message));
  channel.SendControl(std::move(refusal));
  channel.Close(absl::PermissionDeniedError(message));
}

Worker* WorkerManager::FindSupervisedAncestor(pid_t pid) {
  // A --worker_cmd may be a wrapper (a shell script, an interpreter launcher)
  // whose child registers: walk a few generations up to the spawned pid.
  for (int depth = 0; depth < 4 && pid > 1; ++depth) {
    Worker* worker = registry_.FindByPid(pid);
    if (worker != nullptr) return worker->supervised ? worker : nullptr;
    pid = ParentPid(pid);
  }
  return nullptr;
}

absl::Status WorkerManager::CheckClaims(const v1::Hello& hello,
                                        const Worker* self) const {
  if (hello.owned_connections().empty()) return absl::OkStatus();
  // A worker re-registering claims what it kept serving; an id this broker
  // holds itself or knows another worker to own is not the claimant's (it
  // would have two owners).
  absl::flat_hash_set<uint64_t> held;
  dispatcher_.CollectHeldIds(held);
  absl::flat_hash_set<uint64_t> claimed;
  for (const v1::OwnedConnection& owned : hello.owned_connections()) {
    const uint64_t id = owned.connection_id();
    if (!claimed.insert(id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("the Hello claims connection ", id, " twice"));
    }
    if (held.contains(id)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the Hello claims connection ", id,
          ", which the broker holds (queued or in flight to a worker)"));
    }
  }
  for (const auto& [worker_id, other] : registry_.workers()) {
    if (other.get() == self || other->state == WorkerState::kExited) continue;
    for (const auto& [id, identity] : other->owned) {
      if (claimed.contains(id)) {
        return absl::InvalidArgumentError(
            absl::StrCat("the Hello claims connection ", id, ", which worker ",
                         worker_id, " owns"));
      }
    }
  }
  return absl::OkStatus();
}

void WorkerManager::OnHello(HandoffChannel& channel, const v1::Hello& hello) {
  const ucred& peer = channel.peer();
  if (hello.version().major() != wire::kProtocolMajor) {
    Refuse(channel, v1::REFUSAL_REASON_VERSION,
           absl::StrCat("protocol major version ", hello.version().major(),
                        " is not supported (broker speaks ",
                        wire::kProtocolMajor, ".", wire::kProtocolMinor, ")"));
    return;
  }
  if (shutting_down_) {
    Refuse(channel, v1::REFUSAL_REASON_SHUTTING_DOWN,
           "the broker is shutting down");
    return;
  }
  if (hello.pid() != 0 && hello.pid() != peer.pid) {
    // In another pid namespace the numbers differ; SO_PEERCRED is the truth.
    spdlog::debug("hello pid {} differs from SO_PEERCRED pid {}", hello.pid(),
                  peer.pid);
  }
  Worker* worker = FindSupervisedAncestor(peer.pid);
  if (worker != nullptr && worker->state != WorkerState::kStarting) {
    Refuse(channel, v1::REFUSAL_REASON_OTHER,
           worker->retiring()
               ? "this worker is being stopped"
               : absl::StrCat("worker ", worker->id, " is already registered"));
    return;
  }
  if (absl::Status claims = CheckClaims(hello, worker); !claims.ok()) {
    ++stats_.protocol_errors;
    Refuse(channel, v1::REFUSAL_REASON_OTHER, std::string(claims.message()));
    return;
  }
  if (worker == nullptr) {
    size_t registered = 0;
    for (const auto& [id, w] : registry_.workers()) {
      registered += w->state != WorkerState::kExited;
    }
    if (registered >= static_cast<size_t>(options_.max_workers)) {
      Refuse(channel, v1::REFUSAL_REASON_TOO_MANY_WORKERS,
             absl::StrCat("the broker already has --max_workers=",
                          options_.max_workers, " workers"));
      return;
    }
    // A worker whose previous broker supervised it joins the supervised
    // pool (adopted: not our child, watched through a pidfd).
    const bool adopt = hello.was_supervised();
    if (adopt) {
      if (absl::Status s = supervisor_.Adopt(peer.pid); !s.ok()) {
        Refuse(channel, v1::REFUSAL_REASON_OTHER,
               absl::StrCat("cannot watch the process: ", s.message()));
        return;
      }
    }
    worker = &lifecycle_.Arrived(peer.pid, adopt);
  }
  worker->pid = worker->supervised ? worker->pid : peer.pid;
  worker->capacity = hello.capacity();
  worker->max_connections_per_message =
      std::clamp<uint32_t>(hello.max_connections_per_message(), 1,
                           ConnectionDispatcher::kMaxConnectionsPerMessage);
  worker->supports_release = hello.supports_release();
  worker->labels.clear();
  for (const auto& [key, value] : hello.labels()) worker->labels[key] = value;
  // Re-registration after a broker restart or upgrade: the worker keeps
  // serving these; our own ids must not collide with them.
  for (const v1::OwnedConnection& owned : hello.owned_connections()) {
    worker->owned.emplace(owned.connection_id(), 0);  // identity unknown
    dispatcher_.ReserveIdsAbove(owned.connection_id());
  }
  auto it = unregistered_.find(&channel);
  worker->channel = std::move(it->second);
  unregistered_.erase(it);
  worker->channel->worker_id = worker->id;

  v1::HandoffMessage welcome;
  v1::Welcome* body = welcome.mutable_welcome();
  body->mutable_version()->set_major(wire::kProtocolMajor);
  body->mutable_version()->set_minor(wire::kProtocolMinor);
  body->set_worker_id(worker->id);
  body->set_supervised(worker->supervised);
  body->set_heartbeat_interval_ms(static_cast<uint32_t>(
      absl::ToInt64Milliseconds(options_.heartbeat_interval)));
  body->set_heartbeat_timeout_ms(static_cast<uint32_t>(
      absl::ToInt64Milliseconds(options_.heartbeat_timeout)));
  worker->channel->SendControl(std::move(welcome));
  spdlog::info(
      "worker {} registered: pid {}, {}, capacity {}{}", worker->id, peer.pid,
      worker->adopted      ? "adopted"
      : worker->supervised ? "supervised"
                           : "external",
      worker->capacity == 0 ? std::string("unlimited")
                            : absl::StrCat(worker->capacity),
      worker->owned.empty() ? std::string()
                            : absl::StrCat(", ", worker->owned.size(),
                                           " connection(s) it still owns"));
  lifecycle_.Registered(*worker);
  dispatcher_.PlacePending();
  if (pending_replaces_.contains(worker->id)) {
    OnReplacementDone(worker->id, absl::OkStatus());
  }
  if (awaiting_scale_ready_.erase(worker->id) > 0 &&
      awaiting_scale_ready_.empty()) {
    RebalanceAfterScale();
  }
}

// ---- Messages -----------------------------------------------------------

void WorkerManager::OnMessage(HandoffChannel& channel,
                              v1::HandoffMessage& message, wire::UniqueFd fd) {
  if (channel.worker_id == 0) {
    if (channel.closed()) return;  // Refused or timed out: too late.
    if (disallowed_.contains(&channel)) {
      Refuse(channel, v1::REFUSAL_REASON_CREDENTIALS,
             absl::StrCat("uid ", channel.peer().uid,
                          " may not register with this broker"));
      return;
    }
    if (message.body_case() == v1::HandoffMessage::kUpgradeRequest &&
        on_upgrade_) {
      auto it = unregistered_.find(&channel);
      if (it == unregistered_.end()) return;
      std::unique_ptr<HandoffChannel> owned = std::move(it->second);
      unregistered_.erase(it);
      // Not a worker: later callbacks for it find no registry entry.
      owned->worker_id = kUpgradePeerId;
      on_upgrade_(std::move(owned), message.upgrade_request());
      return;
    }
    if (message.body_case() != v1::HandoffMessage::kHello) {
      ++stats_.protocol_errors;
      channel.Close(absl::InvalidArgumentError(
          absl::StrCat("expected hello, got ", wire::BodyName(message))));
      return;
    }
    OnHello(channel, message.hello());
    return;
  }
  Worker* worker = registry_.Find(channel.worker_id);
  if (worker == nullptr) return;  // Removed earlier in this turn.
  absl::Status status = OnWorkerMessage(*worker, message, std::move(fd));
  if (!status.ok()) {
    ++stats_.protocol_errors;
    channel.Close(status);
  }
}

absl::Status WorkerManager::OnWorkerMessage(Worker& worker,
                                            v1::HandoffMessage& message,
                                            wire::UniqueFd fd) {
  switch (message.body_case()) {
    case v1::HandoffMessage::kAck:
      return dispatcher_.OnAck(worker, message.ack());
    case v1::HandoffMessage::kReject:
      return dispatcher_.OnReject(worker, message.reject());
    case v1::HandoffMessage::kClosed:
      return dispatcher_.OnClosed(worker, message.closed());
    case v1::HandoffMessage::kHeartbeat:
      return absl::OkStatus();
    case v1::HandoffMessage::kGoodbye:
      spdlog::info("worker {} said goodbye ({})", worker.id,
                   message.goodbye().reason());
      lifecycle_.SaidGoodbye(worker);
      // Goodbye promises the worker owns nothing; whatever it still sent
      // is handled by the channel close that follows.
      worker.channel->Close(absl::OkStatus());
      return absl::OkStatus();
    case v1::HandoffMessage::kRelease:
      if (!worker.supports_release) {
        return absl::InvalidArgumentError(
            "release from a worker whose hello did not set supports_release");
      }
      return dispatcher_.OnRelease(worker, message.release(), std::move(fd));
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "unexpected ", wire::BodyName(message), " from a worker"));
  }
}

void WorkerManager::OnWritable(HandoffChannel& channel) {
  dispatcher_.PlacePending();
}

void WorkerManager::OnChannelClosed(HandoffChannel& channel,
                                    const absl::Status& reason) {
  if (channel.worker_id == 0) {
    if (!reason.ok() && !absl::IsPermissionDenied(reason)) {
      spdlog::warn("unregistered peer pid {} dropped: {}", channel.peer().pid,
                   reason.ToString());
    }
    disallowed_.erase(&channel);
    unregistered_.erase(&channel);
    return;
  }
  Worker* worker = registry_.Find(channel.worker_id);
  if (worker == nullptr) return;
  if (worker->retiring() && (reason.ok() || absl::IsUnavailable(reason))) {
    spdlog::info("worker {} (pid {}) disconnected", worker->id, worker->pid);
  } else {
    spdlog::warn("worker {} (pid {}) channel closed: {}", worker->id,
                 worker->pid, reason.ToString());
  }
  dispatcher_.ReclaimUnacked(*worker);
  worker->channel.reset();  // Safe: the channel invokes us from a fresh turn.
  if (!worker->supervised) {
    lifecycle_.Disconnected(*worker, reason);
    RemoveWorker(*worker);
    return;
  }
  // A supervised worker without a channel finishes its connections; if it
  // tries to re-register here it is refused (its replacement is already
  // started), so it drains and exits. Past the deadline Tick() ends it.
  // A heartbeat timeout is the one DeadlineExceeded close of a registered
  // worker's channel (Tick()).
  const DrainCause cause = absl::IsDeadlineExceeded(reason)
                               ? DrainCause::kHeartbeatTimeout
                               : DrainCause::kChannelLost;
  // Replaced now (with back-off), not when it finally exits: until then it
  // only finishes the connections it has.
  if (lifecycle_.ChannelLost(*worker, cause, reason)) NoteFailure(*worker);
  Reconcile();
}

void WorkerManager::RemoveWorker(Worker& worker) {
  if (!worker.owned.empty() && !worker.retiring()) {
    stats_.lost_with_worker += worker.owned.size();
  }
  const bool last_awaited = awaiting_scale_ready_.erase(worker.id) > 0 &&
                            awaiting_scale_ready_.empty();
  registry_.Remove(worker.id);
  MaybeFinishShutdown();
  // The scale-up's other workers are ready: rebalance onto them anyway
  // (from a fresh turn: this may run inside a channel callback).
  if (last_awaited) loop_.RunSoon([this] { RebalanceAfterScale(); });
}

// ---- Migration -----------------------------------------------------------

bool WorkerManager::OthersCanTake(
    const absl::flat_hash_set<uint64_t>& leaving) const {
  for (const auto& [id, other] : registry_.workers()) {
    if (!leaving.contains(id) && other->state == WorkerState::kReady &&
        other->channel != nullptr && !other->channel->closed() &&
        other->HasRoom()) {
      return true;
    }
  }
  return false;
}

void WorkerManager::RebalanceAfterScale() {
  absl::StatusOr<RebalanceResult> result = Rebalance("after scale-up");
  if (!result.ok()) {
    spdlog::info("no rebalance after scale-up: {}",
                 std::string(result.status().message()));
  }
}

absl::StatusOr<WorkerManager::RebalanceResult> WorkerManager::Rebalance(
    absl::string_view trigger) {
  if (shutting_down_) {
    return absl::FailedPreconditionError("the broker is shutting down");
  }
  if (pool_suspended_) {
    return absl::FailedPreconditionError(
        "the broker is drained (Drain with a timeout); Resume first");
  }
  std::vector<Worker*> ready;
  int64_t total = 0;
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->state == WorkerState::kReady && worker->channel != nullptr &&
        !worker->channel->closed()) {
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
    // Within one connection of the mean is balanced; above it by more, the
    // excess over ceil(mean) moves (it is at least 1 then).
    if (static_cast<double>(worker->load()) <= result.mean + 1) continue;
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

void WorkerManager::NoteMigration(uint64_t from, uint64_t to,
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

void WorkerManager::EmitMigrations() {
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

// ---- Supervision --------------------------------------------------------

void WorkerManager::NoteFailure(Worker& worker) {
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

void WorkerManager::MaybeEndRestartLoop(int64_t now) {
  if (crash_streak_ == 0) return;
  // A worker started after the last failure has stayed up long enough.
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->state == WorkerState::kReady &&
        worker->started_mono_nanos >= last_failure_nanos_ &&
        now - worker->started_mono_nanos >=
            absl::ToInt64Nanoseconds(options_.stable_after)) {
      if (crash_streak_ >= kRestartLoopStreak) {
        spdlog::info("restart loop over: worker {} has stayed up", id);
      }
      crash_streak_ = 0;
      return;
    }
  }
}

void WorkerManager::OnChildExited(pid_t pid, int wait_status) {
  Worker* worker = registry_.FindByPid(pid);
  if (worker == nullptr) return;
  if (worker->channel != nullptr) {
    // The exit was noticed before the channel's EOF.
    dispatcher_.ReclaimUnacked(*worker);
    worker->channel.reset();
  }
  const uint64_t id = worker->id;
  // After the event: a failure may report a restart loop.
  if (lifecycle_.Exited(*worker, wait_status)) NoteFailure(*worker);
  RemoveWorker(*worker);
  if (pending_replaces_.contains(id)) {
    OnReplacementDone(
        id,
        absl::UnavailableError(absl::StrCat(
            "the replacement worker ", id, " (pid ", pid,
            ") exited before registering: ", DescribeWaitStatus(wait_status))));
  }
  Reconcile();
}

bool WorkerManager::Serving(const Worker& worker) {
  return worker.supervised && (worker.state == WorkerState::kStarting ||
                               worker.state == WorkerState::kReady);
}

int WorkerManager::CountServing() const {
  int serving = 0;
  for (const auto& [id, worker] : registry_.workers()) {
    serving += Serving(*worker);
  }
  return serving;
}

void WorkerManager::Reconcile() {
  if (shutting_down_ || pool_suspended_ || adopting_ || handing_over_) return;
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
    if (shutting_down_ || pool_suspended_ || adopting_ || handing_over_ ||
        CountServing() >= options_.target_workers) {
      return;
    }
    SpawnOne(/*restart=*/pending_restarts_ > 0);
    // One at a time while crashing; Reconcile schedules the rest.
    Reconcile();
  });
}

uint64_t WorkerManager::SpawnOne(bool restart) {
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

// ---- Control-plane operations --------------------------------------------

absl::StatusOr<WorkerManager::ScaleResult> WorkerManager::Scale(
    int count, absl::Duration drain_timeout) {
  if (shutting_down_) {
    return absl::FailedPreconditionError("the broker is shutting down");
  }
  if (count < 0 || count > options_.max_workers) {
    return absl::InvalidArgumentError(
        absl::StrCat("count must be in 0..", options_.max_workers,
                     " (--max_workers), got ", count));
  }
  ScaleResult result;
  result.previous_count = options_.target_workers;
  result.count = count;
  options_.target_workers = count;
  std::vector<Worker*> serving;
  for (const auto& [id, worker] : registry_.workers()) {
    if (Serving(*worker)) serving.push_back(worker.get());
  }
  const int have = static_cast<int>(serving.size());
  if (have > count) {
    // Unregistered workers first (they serve nobody), then the least loaded;
    // among equals the youngest, so long-lived workers keep their caches.
    std::sort(serving.begin(), serving.end(), [](Worker* a, Worker* b) {
      const bool a_starting = a->state == WorkerState::kStarting;
      const bool b_starting = b->state == WorkerState::kStarting;
      if (a_starting != b_starting) return a_starting;
      if (a->load() != b->load()) return a->load() < b->load();
      return a->id > b->id;
    });
    serving.resize(have - count);
    DrainWorkers(serving, DrainCause::kScaleDown, drain_timeout);
    for (Worker* worker : serving) result.draining.push_back(worker->id);
  } else if (have < count && !pool_suspended_) {
    // An operator asked: start now, without the crash back-off.
    restart_timer_.Cancel();
    for (int i = have; i < count; ++i) {
      const uint64_t id = SpawnOne();
      if (id == 0) {
        return absl::InternalError(absl::StrCat("could not start a worker (",
                                                supervisor_.argv()[0],
                                                "); see the broker's log"));
      }
      result.started.push_back(id);
    }
    if (options_.rebalance_after_scale) {
      awaiting_scale_ready_.insert(result.started.begin(),
                                   result.started.end());
    }
  }
  lifecycle_.Emit(v1::EVENT_TYPE_SCALE_REQUESTED, nullptr,
                  absl::StrCat("count ", result.previous_count, " -> ", count,
                               ": ", result.started.size(), " started, ",
                               result.draining.size(), " draining"));
  return result;
}

void WorkerManager::DrainWorkerById(uint64_t id, absl::Duration timeout,
                                    bool replace, DrainCallback done) {
  Worker* worker = registry_.Find(id);
  if (worker == nullptr || worker->state == WorkerState::kExited) {
    done(absl::NotFoundError(absl::StrCat(
        "no worker with id ", id, " (ListWorkers shows the current ids)")));
    return;
  }
  if (shutting_down_) {
    done(absl::FailedPreconditionError("the broker is shutting down"));
    return;
  }
  if (worker->state == WorkerState::kDraining) {
    done(absl::FailedPreconditionError(
        absl::StrCat("worker ", id, " is already draining")));
    return;
  }
  if (replace && !worker->supervised) {
    done(absl::FailedPreconditionError(absl::StrCat(
        "worker ", id,
        " is external: replace applies to supervised workers only (the "
        "broker cannot start an external worker)")));
    return;
  }
  lifecycle_.Emit(v1::EVENT_TYPE_WORKER_DRAIN_REQUESTED, worker,
                  replace ? "with replacement" : "");
  if (!replace) {
    if (worker->supervised) {
      // The operator removes this worker: the pool shrinks rather than
      // restarting it.
      options_.target_workers = std::max(0, options_.target_workers - 1);
    }
    DrainWorker(*worker, DrainCause::kOperator, timeout);
    done(DrainResult{id, 0});
    return;
  }
  const uint64_t replacement = SpawnOne();
  if (replacement == 0) {
    done(
        absl::InternalError("could not start the replacement worker; see "
                            "the broker's log"));
    return;
  }
  pending_replaces_.emplace(replacement,
                            PendingReplace{id, timeout, std::move(done)});
}

void WorkerManager::OnReplacementDone(uint64_t replacement_id,
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
  if (!old->retiring()) {
    DrainWorker(*old, DrainCause::kReplaced, pending.timeout);
  }
  pending.done(DrainResult{pending.old_id, replacement_id});
}

std::vector<uint64_t> WorkerManager::SuspendPool(absl::Duration timeout) {
  pool_suspended_ = true;
  restart_timer_.Cancel();
  std::vector<uint64_t> draining;
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->state != WorkerState::kDraining) {
      DrainWorker(*worker, DrainCause::kPoolDrain, timeout);
      draining.push_back(id);
    }
  }
  return draining;
}

void WorkerManager::PrepareForUpgrade() {
  handing_over_ = true;
  restart_timer_.Cancel();
}

std::vector<uint64_t> WorkerManager::ResumePool() {
  pool_suspended_ = false;
  std::vector<uint64_t> started;
  for (int i = CountServing(); i < options_.target_workers; ++i) {
    const uint64_t id = SpawnOne();
    if (id != 0) started.push_back(id);
  }
  return started;
}

// ---- Heartbeats, deadlines, draining -------------------------------------

void WorkerManager::Tick() {
  tick_timer_.Arm(
      std::min(options_.heartbeat_interval / 2, absl::Milliseconds(500)),
      [this] { Tick(); });
  const int64_t now = loop_.clock().MonotonicNanos();
  const int64_t interval =
      absl::ToInt64Nanoseconds(options_.heartbeat_interval);
  const int64_t timeout = absl::ToInt64Nanoseconds(options_.heartbeat_timeout);
  MaybeEndRestartLoop(now);
  for (auto& [channel, owned] : unregistered_) {
    if (now - channel->last_received_nanos() > timeout && !channel->closed()) {
      channel->Close(absl::DeadlineExceededError("no hello in time"));
    }
  }
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->state == WorkerState::kStarting && worker->supervised &&
        now - worker->started_mono_nanos >
            absl::ToInt64Nanoseconds(options_.start_timeout)) {
      spdlog::warn("worker {} (pid {}) did not register within {}; killing it",
                   id, worker->pid,
                   absl::FormatDuration(options_.start_timeout));
      supervisor_.Signal(worker->pid, SIGKILL);
    }
    if (WorkerLifecycle::TakeExpiredDeadline(*worker, now)) {
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
    HandoffChannel* channel = worker->channel.get();
    if (channel == nullptr || channel->closed()) continue;
    if (now - channel->last_received_nanos() > timeout) {
      ++stats_.heartbeat_timeouts;
      channel->Close(absl::DeadlineExceededError(absl::StrCat(
          "no message for ", absl::FormatDuration(options_.heartbeat_timeout),
          "; declared dead")));
      if (worker->supervised) supervisor_.Signal(worker->pid, SIGKILL);
      continue;
    }
    if (now - channel->last_sent_nanos() >= interval) {
      v1::HandoffMessage heartbeat;
      heartbeat.mutable_heartbeat()->set_sent_unix_nanos(
          loop_.clock().UnixNanos());
      channel->SendControl(std::move(heartbeat));
    }
  }
  if (shutting_down_ && now > shutdown_deadline_nanos_) {
    // Reaping had its grace period; whatever is left is not waited for.
    spdlog::warn("shutdown deadline passed with {} worker(s) left",
                 registry_.size());
    supervisor_.SignalAll(SIGKILL);
    if (shutdown_done_) std::exchange(shutdown_done_, nullptr)();
  }
}

void WorkerManager::DrainWorker(Worker& worker, DrainCause cause,
                                absl::Duration timeout) {
  DrainWorkers({&worker}, cause, timeout);
}

void WorkerManager::DrainWorkers(const std::vector<Worker*>& workers,
                                 DrainCause cause, absl::Duration timeout) {
  // One worker leaves and others stay: its idle connections move to them
  // (released) instead of being closed. A broker-wide drain has nowhere to
  // move them. None of `workers` counts as a place to move the others' to.
  absl::flat_hash_set<uint64_t> leaving;
  for (const Worker* worker : workers) leaving.insert(worker->id);
  std::vector<bool> release_idle;
  for (const Worker* worker : workers) {
    release_idle.push_back(worker->supports_release && !shutting_down_ &&
                           !pool_suspended_ && OthersCanTake(leaving));
  }
  for (size_t i = 0; i < workers.size(); ++i) {
    Worker& worker = *workers[i];
    if (!lifecycle_.Drain(worker, cause, timeout, release_idle[i])) continue;
    if (worker.channel == nullptr) {
      // Not registered (or its channel is gone): nothing to tell it.
      if (worker.supervised) supervisor_.Signal(worker.pid, SIGTERM);
      continue;
    }
    v1::HandoffMessage drain;
    drain.mutable_drain()->set_deadline_unix_nanos(
        absl::ToUnixNanos(loop_.clock().Now() + timeout));
    drain.mutable_drain()->set_release_idle(release_idle[i]);
    worker.channel->SendControl(std::move(drain));
    spdlog::info(
        "worker {} (pid {}) draining ({}), deadline in {}{}", worker.id,
        worker.pid, std::string(DrainCauseName(cause)),
        absl::FormatDuration(timeout),
        release_idle[i] ? ", idle connections move to other workers" : "");
  }
}

void WorkerManager::DrainAll(absl::Duration timeout,
                             absl::AnyInvocable<void()> done) {
  shutting_down_ = true;
  shutdown_done_ = std::move(done);
  // Kill stragglers at the deadline, then give reaping a moment.
  shutdown_deadline_nanos_ = loop_.NowNanos() +
                             absl::ToInt64Nanoseconds(timeout) +
                             absl::ToInt64Nanoseconds(absl::Seconds(2));
  restart_timer_.Cancel();
  for (const auto& [id, worker] : registry_.workers()) {
    if (!worker->retiring()) {
      DrainWorker(*worker, DrainCause::kShutdown, timeout);
    }
  }
  MaybeFinishShutdown();
}

void WorkerManager::MaybeFinishShutdown() {
  if (!shutting_down_ || !registry_.workers().empty()) return;
  if (supervisor_.running() > 0) return;
  if (shutdown_done_) {
    // Run outside whatever callback removed the last worker.
    loop_.RunSoon([this] {
      if (shutdown_done_) std::exchange(shutdown_done_, nullptr)();
    });
  }
}

}  // namespace fdbroker
