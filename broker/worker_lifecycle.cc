#include "broker/worker_lifecycle.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "broker/event_loop.h"
#include "broker/supervisor.h"
#include "broker/worker_registry.h"
#include "spdlog/spdlog.h"

namespace fdbroker {

absl::string_view WorkerStateName(WorkerState state) {
  switch (state) {
    case WorkerState::kStarting:
      return "starting";
    case WorkerState::kReady:
      return "ready";
    case WorkerState::kDraining:
      return "draining";
    case WorkerState::kExited:
      return "exited";
  }
  return "unknown";
}

absl::string_view DrainCauseName(DrainCause cause) {
  switch (cause) {
    case DrainCause::kNone:
      return "none";
    case DrainCause::kOperator:
      return "operator";
    case DrainCause::kReplaced:
      return "replaced";
    case DrainCause::kScaleDown:
      return "scale-down";
    case DrainCause::kPoolDrain:
      return "pool drain";
    case DrainCause::kShutdown:
      return "shutdown";
    case DrainCause::kGoodbye:
      return "goodbye";
    case DrainCause::kChannelLost:
      return "channel lost";
    case DrainCause::kHeartbeatTimeout:
      return "heartbeat timeout";
    case DrainCause::kAckTimeout:
      return "ack timeout";
    case DrainCause::kChannelStuck:
      return "channel stuck";
    case DrainCause::kRestarted:
      return "rolling restart";
    case DrainCause::kRecycled:
      return "recycled";
    case DrainCause::kWorkerTimeout:
      return "worker timeout";
  }
  return "unknown";
}

bool IsRequested(DrainCause cause) {
  switch (cause) {
    case DrainCause::kNone:
    case DrainCause::kChannelLost:
    case DrainCause::kHeartbeatTimeout:
    case DrainCause::kAckTimeout:
    case DrainCause::kChannelStuck:
    case DrainCause::kWorkerTimeout:
      return false;
    default:
      return true;
  }
}

WorkerLifecycle::WorkerLifecycle(EventLoop& loop, WorkerRegistry& registry,
                                 absl::Duration drain_timeout,
                                 WorkerStats& stats, EventCallback on_event)
    : loop_(loop),
      registry_(registry),
      drain_timeout_(drain_timeout),
      stats_(stats),
      on_event_(std::move(on_event)) {}

bool WorkerLifecycle::Allowed(const Worker& worker, WorkerState to,
                              DrainCause cause) {
  if ((to == WorkerState::kDraining) != (cause != DrainCause::kNone)) {
    return false;  // Draining always has a cause, nothing else has one.
  }
  switch (worker.state) {
    case WorkerState::kStarting:
      return to == WorkerState::kReady || to == WorkerState::kExited ||
             (to == WorkerState::kDraining && IsRequested(cause));
    case WorkerState::kReady:
      return to == WorkerState::kDraining || to == WorkerState::kExited;
    case WorkerState::kDraining:
      // Once requested, a drain keeps its cause; a loss may become a
      // requested drain (the broker stops the worker after all). A lost
      // channel (not a worker declared dead: that one was killed) may be
      // replaced by a new one.
      return to == WorkerState::kExited ||
             (to == WorkerState::kReady &&
              worker.drain_cause == DrainCause::kChannelLost) ||
             (to == WorkerState::kDraining &&
              !IsRequested(worker.drain_cause) && IsRequested(cause));
    case WorkerState::kExited:
      return false;
  }
  return false;
}

bool WorkerLifecycle::Enter(Worker& worker, WorkerState to, DrainCause cause) {
  if (!Allowed(worker, to, cause)) {
    spdlog::error("worker {}: illegal transition {} ({}) -> {} ({}) refused",
                  worker.id, std::string(WorkerStateName(worker.state)),
                  std::string(DrainCauseName(worker.drain_cause)),
                  std::string(WorkerStateName(to)),
                  std::string(DrainCauseName(cause)));
    return false;
  }
  worker.state = to;
  // An exited worker keeps the cause it left for (was its exit expected?).
  if (to != WorkerState::kExited) worker.drain_cause = cause;
  if (to != WorkerState::kDraining) worker.drain_deadline_mono_nanos = 0;
  return true;
}

void WorkerLifecycle::Emit(WorkerEvent::Type type, const Worker* worker,
                           std::string detail, std::string exit_status) {
  WorkerEvent event;
  event.type = type;
  if (worker != nullptr) {
    event.worker_id = worker->id;
    event.pid = worker->pid;
  }
  event.detail = std::move(detail);
  event.exit_status = std::move(exit_status);
  Emit(std::move(event));
}

void WorkerLifecycle::Emit(WorkerEvent event) {
  if (!on_event_) return;
  event.time = loop_.clock().Now();
  on_event_(event);
}

Worker& WorkerLifecycle::Spawned(pid_t pid, bool restart) {
  Worker& worker =
      registry_.Add(pid, /*supervised=*/true, WorkerState::kStarting,
                    loop_.clock().Now(), loop_.NowNanos());
  if (restart) ++stats_.restarts;
  Emit(
      restart ? v1::EVENT_TYPE_WORKER_RESTARTED : v1::EVENT_TYPE_WORKER_STARTED,
      &worker);
  return worker;
}

Worker& WorkerLifecycle::Arrived(pid_t pid, bool adopted) {
  Worker& worker =
      registry_.Add(pid, /*supervised=*/adopted, WorkerState::kStarting,
                    loop_.clock().Now(), loop_.NowNanos());
  worker.adopted = adopted;
  return worker;
}

bool WorkerLifecycle::Registered(Worker& worker) {
  if (!Enter(worker, WorkerState::kReady, DrainCause::kNone)) return false;
  worker.registered_mono_nanos = loop_.NowNanos();
  ++stats_.registered;
  Emit(v1::EVENT_TYPE_WORKER_READY, &worker,
       worker.adopted      ? "adopted"
       : worker.supervised ? "supervised"
                           : "external");
  return true;
}

bool WorkerLifecycle::Readmitted(Worker& worker) {
  if (worker.state != WorkerState::kDraining ||
      !Enter(worker, WorkerState::kReady, DrainCause::kNone)) {
    return false;
  }
  Emit(v1::EVENT_TYPE_WORKER_READMITTED, &worker,
       absl::StrCat("channel restored with ", worker.owned.size(),
                    " connection(s) it still owns"));
  return true;
}

bool WorkerLifecycle::Drain(Worker& worker, DrainCause cause,
                            absl::Duration timeout, bool release_idle) {
  if (!Enter(worker, WorkerState::kDraining, cause)) return false;
  worker.drain_deadline_mono_nanos =
      loop_.NowNanos() + absl::ToInt64Nanoseconds(timeout);
  Emit(v1::EVENT_TYPE_WORKER_DRAINING, &worker,
       worker.channel == nullptr
           ? std::string("stopped before it registered")
           : absl::StrCat("deadline in ", absl::FormatDuration(timeout),
                          release_idle ? "; idle connections move" : ""));
  return true;
}

bool WorkerLifecycle::SaidGoodbye(Worker& worker) {
  if (worker.state == WorkerState::kDraining &&
      IsRequested(worker.drain_cause)) {
    return true;  // Asked to drain, and it is done: the drain stands.
  }
  const bool was_draining = worker.state == WorkerState::kDraining;
  if (!Enter(worker, WorkerState::kDraining, DrainCause::kGoodbye)) {
    return false;
  }
  if (!was_draining) {
    worker.drain_deadline_mono_nanos =
        loop_.NowNanos() + absl::ToInt64Nanoseconds(drain_timeout_);
  }
  return true;
}

bool WorkerLifecycle::ChannelLost(Worker& worker, DrainCause cause,
                                  const absl::Status& reason) {
  if (worker.state == WorkerState::kDraining) {
    // Lost while leaving: a failure only if the drain was not asked for
    // (a worker has one channel, so a loss is never counted twice).
    return !IsRequested(worker.drain_cause);
  }
  if (IsRequested(cause) || !Enter(worker, WorkerState::kDraining, cause)) {
    return false;
  }
  worker.drain_deadline_mono_nanos =
      loop_.NowNanos() + absl::ToInt64Nanoseconds(drain_timeout_);
  Emit(v1::EVENT_TYPE_WORKER_DRAINING, &worker,
       absl::StrCat("channel lost: ", reason.message()));
  return true;
}

bool WorkerLifecycle::Exited(Worker& worker, int wait_status) {
  const bool crashed = !IsRequested(worker.drain_cause);
  // A loss counted when the channel went is not counted again.
  const bool uncounted = worker.drain_cause == DrainCause::kNone;
  if (!Enter(worker, WorkerState::kExited, DrainCause::kNone)) return false;
  const std::string status = DescribeWaitStatus(wait_status);
  if (crashed) {
    ++stats_.crashes;
    spdlog::warn("worker {} (pid {}) crashed: {}", worker.id, worker.pid,
                 status);
  } else {
    spdlog::info("worker {} (pid {}) exited: {}", worker.id, worker.pid,
                 status);
  }
  Emit(crashed ? v1::EVENT_TYPE_WORKER_CRASHED : v1::EVENT_TYPE_WORKER_EXITED,
       &worker, "", status);
  return crashed && uncounted;
}

bool WorkerLifecycle::Disconnected(Worker& worker, const absl::Status& reason) {
  const bool expected = IsRequested(worker.drain_cause);
  if (!Enter(worker, WorkerState::kExited, DrainCause::kNone)) return false;
  if (expected) {
    Emit(v1::EVENT_TYPE_WORKER_EXITED, &worker, "unregistered");
  } else {
    Emit(v1::EVENT_TYPE_WORKER_CRASHED, &worker, std::string(reason.message()));
  }
  return true;
}

bool WorkerLifecycle::TakeExpiredDeadline(Worker& worker, int64_t now_nanos) {
  if (worker.state != WorkerState::kDraining ||
      worker.drain_deadline_mono_nanos == 0 ||
      now_nanos <= worker.drain_deadline_mono_nanos) {
    return false;
  }
  worker.drain_deadline_mono_nanos = 0;
  return true;
}

}  // namespace fdbroker
