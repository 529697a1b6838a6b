#include "broker/worker_manager.h"

#include <signal.h>

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"
#include "wire/message_channel.h"

namespace fdbroker {

WorkerManager::WorkerManager(EventLoop& loop, WorkerRegistry& registry,
                             ConnectionDispatcher& dispatcher,
                             Supervisor& supervisor, wire::SysCalls& sys,
                             const Options& options, EventCallback on_event)
    : loop_(loop),
      registry_(registry),
      dispatcher_(dispatcher),
      supervisor_(supervisor),
      options_(options),
      lifecycle_(loop, registry, options.drain_timeout, stats_,
                 std::move(on_event)),
      pool_(loop, registry, supervisor, lifecycle_, stats_,
            WorkerPool::Options{options.target_workers, options.start_timeout,
                                options.restart_backoff_initial,
                                options.restart_backoff_max,
                                options.stable_after}),
      registration_(loop, registry, dispatcher, supervisor, sys, lifecycle_,
                    stats_, *this,
                    WorkerRegistration::Options{
                        options.max_workers, options.heartbeat_interval,
                        options.heartbeat_timeout, options.worker_timeout}),
      drainer_(loop, registry, dispatcher, supervisor, lifecycle_, pool_,
               stats_),
      recycler_(loop, registry, supervisor, lifecycle_, pool_, drainer_, stats_,
                [&options] {
                  WorkerRecycler::Options recycle = options.recycle;
                  recycle.drain_timeout = options.drain_timeout;
                  return recycle;
                }()) {}

WorkerManager::~WorkerManager() = default;

absl::Status WorkerManager::EnableKernelPlacement(
    int group_fd, const KernelPlacement::Options& options, wire::SysCalls& sys,
    Listener::AcceptCallback accepted, KernelPlacement::Inherited* inherited) {
  absl::StatusOr<std::unique_ptr<KernelPlacement>> placement =
      KernelPlacement::Create(loop_, registry_, group_fd, stats_, options, sys,
                              std::move(accepted), inherited);
  if (!placement.ok()) return placement.status();
  placement_ = *std::move(placement);
  registration_.set_listener_load_interval_ms(placement_->load_interval_ms());
  registration_.set_listener_return_handler(
      [placement = placement_.get()](Worker& worker, wire::UniqueFd listener) {
        return placement->OnListenerReturned(worker, std::move(listener));
      });
  placement_->set_rebalance([this] {
    absl::StatusOr<RebalanceResult> result =
        drainer_.Rebalance("kernel placement uneven", /*slack=*/0);
    if (!result.ok())
      spdlog::debug("no rebalance: {}", result.status().ToString());
  });
  return absl::OkStatus();
}

void WorkerManager::Start(absl::Duration adopt_grace) {
  Tick();
  pool_.Start(adopt_grace);
}

// ---- Messages -----------------------------------------------------------

void WorkerManager::OnMessage(HandoffChannel& channel,
                              v1::HandoffMessage& message, wire::UniqueFd fd) {
  if (channel.worker_id == 0) {
    const uint64_t readmitted = stats_.readmitted;
    Worker* worker = registration_.OnMessage(channel, message, std::move(fd));
    if (worker == nullptr) return;
    if (placement_ != nullptr) placement_->OnRegistered(*worker);
    dispatcher_.PlacePending();
    drainer_.OnRegistered(*worker);
    // A worker back on a new channel was replaced already: the replacement
    // (still starting, or the least loaded) is surplus now.
    const int surplus = pool_.CountServing() - pool_.target();
    if (stats_.readmitted != readmitted && surplus > 0) {
      drainer_.DrainSurplus(surplus, options_.drain_timeout);
    }
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
    case v1::HandoffMessage::kAck: {
      absl::Status status = dispatcher_.OnAck(worker, message.ack());
      if (status.ok()) recycler_.OnHanded(worker);
      return status;
    }
    case v1::HandoffMessage::kReject:
      return dispatcher_.OnReject(worker, message.reject());
    case v1::HandoffMessage::kClosed:
      return dispatcher_.OnClosed(worker, message.closed());
    case v1::HandoffMessage::kHeartbeat:
      if (worker.reports_liveness) {
        // Never in the future, never backwards: a late report of an older
        // sign of life changes nothing.
        worker.app_alive_mono_nanos = std::max(
            worker.app_alive_mono_nanos,
            loop_.NowNanos() -
                int64_t{message.heartbeat().app_silent_ms()} * 1'000'000);
      }
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
      if (!fd.valid()) {
        // Out of fds here: the socket is gone, the channel is fine.
        return dispatcher_.OnReleaseTruncated(worker, message.release());
      }
      return dispatcher_.OnRelease(worker, message.release(), std::move(fd));
    case v1::HandoffMessage::kListenerLoad:
      if (placement_ == nullptr) {
        return absl::InvalidArgumentError(
            "listener_load, but this broker granted no listener "
            "(--placement=handoff)");
      }
      return placement_->OnListenerLoad(worker, message.listener_load());
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
    registration_.OnChannelClosed(channel, reason);
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
  if (placement_ != nullptr) placement_->OnWorkerGone(*worker);
  if (!worker->supervised) {
    lifecycle_.Disconnected(*worker, reason);
    RemoveWorker(*worker);
    return;
  }
  // A supervised worker without a channel finishes its connections; if it
  // tries to re-register here it is refused (its replacement is already
  // started), so it drains and exits. Past the deadline the drainer ends
  // it. One the broker declared dead was killed (DeclareDead).
  auto dead = declared_dead_.find(worker->id);
  const DrainCause cause =
      dead != declared_dead_.end() ? dead->second : DrainCause::kChannelLost;
  // Replaced now (with back-off), not when it finally exits: until then it
  // only finishes the connections it has.
  if (lifecycle_.ChannelLost(*worker, cause, reason))
    pool_.NoteFailure(*worker);
  pool_.Reconcile();
}

void WorkerManager::OnChildExited(pid_t pid, int wait_status) {
  Worker* worker = registry_.FindByPid(pid);
  if (worker == nullptr) return;
  if (worker->channel != nullptr) {
    // The exit was noticed before the channel's EOF.
    dispatcher_.ReclaimUnacked(*worker);
    worker->channel.reset();
  }
  if (placement_ != nullptr) placement_->OnWorkerGone(*worker);
  const uint64_t id = worker->id;
  // After the event: a failure may report a restart loop.
  if (lifecycle_.Exited(*worker, wait_status)) pool_.NoteFailure(*worker);
  RemoveWorker(*worker);
  drainer_.OnExited(id, pid, wait_status);
  pool_.Reconcile();
}

void WorkerManager::RemoveWorker(Worker& worker) {
  // Connections it still owned when it went: a drained worker reports each
  // one Closed before it leaves, so these were cut.
  const uint64_t cut =
      worker.owned.size() + static_cast<uint64_t>(worker.kernel_active);
  if (cut != 0 && worker.drain_cause == DrainCause::kWorkerTimeout) {
    stats_.lost_worker_timeout += cut;
  } else if (cut != 0 && !IsRequested(worker.drain_cause)) {
    stats_.lost_worker_crash += cut;
  } else if (cut != 0 && worker.drain_cause == DrainCause::kShutdown) {
    stats_.lost_shutdown += cut;
  } else if (cut != 0) {
    stats_.lost_drain_deadline += cut;
  }
  const uint64_t id = worker.id;
  declared_dead_.erase(id);
  congested_since_.erase(id);
  registry_.Remove(id);
  MaybeFinishShutdown();
  drainer_.OnRemoved(id);
  recycler_.OnRemoved(id);
}

// ---- Control-plane operations --------------------------------------------

absl::StatusOr<WorkerManager::ScaleResult> WorkerManager::Scale(
    int count, absl::Duration drain_timeout) {
  if (pool_.shutting_down()) {
    return absl::FailedPreconditionError("the broker is shutting down");
  }
  if (count < 0 || count > options_.max_workers) {
    return absl::InvalidArgumentError(
        absl::StrCat("count must be in 0..", options_.max_workers,
                     " (--max_workers), got ", count));
  }
  ScaleResult result;
  result.previous_count = pool_.target();
  result.count = count;
  pool_.set_target(count);
  const int have = pool_.CountServing();
  if (have > count) {
    result.draining = drainer_.DrainSurplus(have - count, drain_timeout);
  } else if (have < count && !pool_.suspended()) {
    absl::StatusOr<std::vector<uint64_t>> started =
        pool_.StartNow(count - have);
    if (!started.ok()) return started.status();
    result.started = *std::move(started);
    if (options_.rebalance_after_scale) drainer_.AwaitScaleUp(result.started);
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
  if (pool_.shutting_down()) {
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
      pool_.set_target(std::max(0, pool_.target() - 1));
    }
    drainer_.Drain(*worker, DrainCause::kOperator, timeout);
    done(DrainResult{id, 0});
    return;
  }
  const uint64_t replacement = pool_.SpawnOne();
  if (replacement == 0) {
    done(
        absl::InternalError("could not start the replacement worker; see "
                            "the broker's log"));
    return;
  }
  drainer_.AwaitReplacement(replacement, id, timeout, std::move(done));
}

std::vector<uint64_t> WorkerManager::SuspendPool(absl::Duration timeout) {
  pool_.Suspend();
  std::vector<Worker*> draining;
  std::vector<uint64_t> ids;
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->state != WorkerState::kDraining) {
      draining.push_back(worker.get());
      ids.push_back(id);
    }
  }
  drainer_.Drain(draining, DrainCause::kPoolDrain, timeout);
  return ids;
}

// ---- Heartbeats, shutdown ------------------------------------------------

void WorkerManager::Tick() {
  tick_timer_.Arm(
      std::min(options_.heartbeat_interval / 2, absl::Milliseconds(500)),
      [this] { Tick(); });
  const int64_t now = loop_.clock().MonotonicNanos();
  const int64_t interval =
      absl::ToInt64Nanoseconds(options_.heartbeat_interval);
  const int64_t timeout = absl::ToInt64Nanoseconds(options_.heartbeat_timeout);
  pool_.Check(now);
  registration_.ExpireSilentPeers(now);
  drainer_.Check(now);
  recycler_.Check(now);
  for (uint64_t id : dispatcher_.WorkersOverdueSince(
           now - absl::ToInt64Nanoseconds(options_.ack_timeout))) {
    Worker* worker = registry_.Find(id);
    if (worker == nullptr || worker->channel == nullptr ||
        worker->channel->closed()) {
      continue;
    }
    ++stats_.ack_timeouts;
    DeclareDead(*worker, DrainCause::kAckTimeout,
                absl::StrCat("a connection not acked within ",
                             absl::FormatDuration(options_.ack_timeout)));
  }
  // Hung() drains (and may start a replacement): not while iterating.
  std::vector<std::pair<Worker*, DrainCause>> hung;
  for (const auto& [id, worker] : registry_.workers()) {
    HandoffChannel* channel = worker->channel.get();
    if (channel == nullptr || channel->closed()) continue;
    // A worker that reports liveness and is silent is hung as well (an
    // event-loop SDK heartbeats from the application thread): both get the
    // stack dump first.
    const bool watched = options_.worker_timeout != absl::ZeroDuration() &&
                         worker->reports_liveness &&
                         worker->state == WorkerState::kReady;
    if (watched && now - worker->app_alive_mono_nanos >
                       absl::ToInt64Nanoseconds(options_.worker_timeout)) {
      ++stats_.worker_timeouts;
      hung.emplace_back(worker.get(), DrainCause::kWorkerTimeout);
      continue;
    }
    if (now - channel->last_received_nanos() > timeout) {
      ++stats_.heartbeat_timeouts;
      if (watched) {
        hung.emplace_back(worker.get(), DrainCause::kHeartbeatTimeout);
        continue;
      }
      DeclareDead(
          *worker, DrainCause::kHeartbeatTimeout,
          absl::StrCat("no message for ",
                       absl::FormatDuration(options_.heartbeat_timeout)));
      continue;
    }
    if (!channel->congested()) {
      congested_since_.erase(id);
    } else if (auto [it, first] = congested_since_.try_emplace(id, now);
               !first && now - it->second > timeout) {
      ++stats_.stuck_channels;
      DeclareDead(
          *worker, DrainCause::kChannelStuck,
          absl::StrCat("its channel stayed full for ",
                       absl::FormatDuration(options_.heartbeat_timeout)));
      continue;
    }
    if (now - channel->last_sent_nanos() >= interval) {
      v1::HandoffMessage heartbeat;
      heartbeat.mutable_heartbeat()->set_sent_unix_nanos(
          loop_.clock().UnixNanos());
      channel->SendControl(std::move(heartbeat));
    }
  }
  for (auto [worker, cause] : hung) Hung(*worker, cause, now);
  if (pool_.shutting_down() && now > shutdown_deadline_nanos_) {
    // Reaping had its grace period; whatever is left is not waited for.
    spdlog::warn("shutdown deadline passed with {} worker(s) left",
                 registry_.size());
    supervisor_.SignalAll(SIGKILL);
    if (shutdown_done_) std::exchange(shutdown_done_, nullptr)();
  }
}

void WorkerManager::DeclareDead(Worker& worker, DrainCause cause,
                                const std::string& why) {
  declared_dead_[worker.id] = cause;
  congested_since_.erase(worker.id);
  // Killed first: the close below re-places its un-acked connections (a
  // turn later), and a live worker might still serve one.
  if (worker.supervised) supervisor_.Signal(worker.pid, SIGKILL);
  worker.channel->Close(
      absl::DeadlineExceededError(absl::StrCat(why, "; declared dead")));
}

void WorkerManager::Hung(Worker& worker, DrainCause cause, int64_t now_nanos) {
  const std::string silent =
      cause == DrainCause::kWorkerTimeout
          ? absl::StrCat(
                "application thread silent for ",
                absl::FormatDuration(absl::Milliseconds(
                    (now_nanos - worker.app_alive_mono_nanos) / 1'000'000)),
                " (--worker_timeout ",
                absl::FormatDuration(options_.worker_timeout), ")")
          : absl::StrCat("no message for ",
                         absl::FormatDuration(options_.heartbeat_timeout),
                         " (--heartbeat_timeout)");
  // Draining: no new connection goes to it, and the drainer ends it at the
  // deadline (SIGKILL to its group, or the channel closed if external).
  // Its channel's close then re-places what it had not acked.
  if (!lifecycle_.Drain(worker, cause, kStackDumpGrace,
                        /*release_idle=*/false)) {
    return;
  }
  if (worker.supervised) {
    // The SDKs dump stacks to stderr on SIGABRT (Python's faulthandler:
    // every thread; the C++ SDK: the thread it lands on), then abort; its
    // default action dumps core.
    supervisor_.Signal(worker.pid, SIGABRT);
  }
  spdlog::warn("worker {} (pid {}) hung: {}; {}", worker.id, worker.pid, silent,
               worker.supervised
                   ? absl::StrCat("sent SIGABRT for a stack dump, killing it "
                                  "within ",
                                  absl::FormatDuration(kStackDumpGrace))
                   : absl::StrCat("cutting it off within ",
                                  absl::FormatDuration(kStackDumpGrace)));
  lifecycle_.Emit(v1::EVENT_TYPE_WORKER_HUNG, &worker,
                  worker.supervised
                      ? absl::StrCat(silent, "; SIGABRT sent (stack dump)")
                      : silent);
  pool_.Reconcile();
}

void WorkerManager::DrainAll(absl::Duration timeout,
                             absl::AnyInvocable<void()> done) {
  pool_.ShutDown();
  registration_.StopAccepting();
  shutdown_done_ = std::move(done);
  // Kill stragglers at the deadline, then give reaping a moment.
  shutdown_deadline_nanos_ = loop_.NowNanos() +
                             absl::ToInt64Nanoseconds(timeout) +
                             absl::ToInt64Nanoseconds(absl::Seconds(2));
  std::vector<Worker*> draining;
  for (const auto& [id, worker] : registry_.workers()) {
    if (!worker->retiring()) draining.push_back(worker.get());
  }
  drainer_.Drain(draining, DrainCause::kShutdown, timeout);
  MaybeFinishShutdown();
}

void WorkerManager::MaybeFinishShutdown() {
  if (!pool_.shutting_down() || !registry_.workers().empty()) return;
  if (supervisor_.running() > 0) return;
  if (shutdown_done_) {
    // Run outside whatever callback removed the last worker.
    loop_.RunSoon([this] {
      if (shutdown_done_) std::exchange(shutdown_done_, nullptr)();
    });
  }
}

}  // namespace fdbroker
