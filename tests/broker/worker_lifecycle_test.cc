// WorkerLifecycle: every legal transition, with its state, cause, deadline,
// event and counter; every illegal one refused without a change. Deadlines
// in simulated time.
#include "broker/worker_lifecycle.h"

#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "broker/handoff_channel.h"
#include "broker/worker_registry.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/broker/simulated_time.h"
#include "wire/sys_calls.h"

namespace fdbroker {
namespace {

using ::testing::ElementsAre;

constexpr absl::Duration kDrainTimeout = absl::Seconds(30);

class NullDelegate : public HandoffChannel::Delegate {
 public:
  void OnMessage(HandoffChannel&, v1::HandoffMessage&,
                 wire::UniqueFd) override {}
  void OnChannelClosed(HandoffChannel&, const absl::Status&) override {}
  void OnWritable(HandoffChannel&) override {}
};

class WorkerLifecycleTest : public ::testing::Test {
 protected:
  WorkerLifecycleTest()
      : lifecycle_(time_.loop(), registry_, kDrainTimeout, stats_,
                   [this](const WorkerEvent& e) { events_.push_back(e); }) {}

  ~WorkerLifecycleTest() override { registry_ = WorkerRegistry(); }

  // A registered supervised worker, with a channel (as after Hello).
  Worker& ReadyWorker() {
    Worker& worker = lifecycle_.Spawned(4242, /*restart=*/false);
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    peer_.push_back(wire::UniqueFd(sv[1]));
    worker.channel = *HandoffChannel::Create(
        time_.loop(), wire::UniqueFd(sv[0]), ucred{4242, ::getuid(), 0},
        wire::SysCalls::Real(), delegate_);
    EXPECT_TRUE(lifecycle_.Registered(worker));
    events_.clear();
    return worker;
  }

  std::vector<v1::EventType> EventTypes() const {
    std::vector<v1::EventType> types;
    for (const WorkerEvent& e : events_) types.push_back(e.type);
    return types;
  }

  int64_t Now() { return time_.loop().NowNanos(); }

  SimulatedTime time_;
  WorkerRegistry registry_;
  WorkerStats stats_;
  std::vector<WorkerEvent> events_;
  NullDelegate delegate_;
  std::vector<wire::UniqueFd> peer_;
  WorkerLifecycle lifecycle_;
};

TEST_F(WorkerLifecycleTest, SpawnedIsStartingAndARestartIsCounted) {
  Worker& first = lifecycle_.Spawned(100, /*restart=*/false);
  EXPECT_EQ(first.state, WorkerState::kStarting);
  EXPECT_TRUE(first.supervised);
  Worker& second = lifecycle_.Spawned(101, /*restart=*/true);
  EXPECT_EQ(stats_.restarts, 1u);
  EXPECT_THAT(EventTypes(), ElementsAre(v1::EVENT_TYPE_WORKER_STARTED,
                                        v1::EVENT_TYPE_WORKER_RESTARTED));
  EXPECT_EQ(events_[1].worker_id, second.id);
  EXPECT_EQ(events_[1].pid, 101);
}

TEST_F(WorkerLifecycleTest, ArrivedWorkersAreAdoptedOrExternal) {
  Worker& adopted = lifecycle_.Arrived(200, /*adopted=*/true);
  EXPECT_TRUE(adopted.supervised);
  EXPECT_TRUE(adopted.adopted);
  Worker& external = lifecycle_.Arrived(201, /*adopted=*/false);
  EXPECT_FALSE(external.supervised);
  EXPECT_TRUE(events_.empty()) << "READY comes with the registration";
  EXPECT_TRUE(lifecycle_.Registered(external));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].detail, "external");
}

TEST_F(WorkerLifecycleTest, RegisteredMakesAStartingWorkerReady) {
  Worker& worker = lifecycle_.Spawned(100, false);
  events_.clear();
  time_.Advance(absl::Seconds(2));
  EXPECT_TRUE(lifecycle_.Registered(worker));
  EXPECT_EQ(worker.state, WorkerState::kReady);
  EXPECT_EQ(worker.registered_mono_nanos, Now());
  EXPECT_EQ(stats_.registered, 1u);
  ASSERT_THAT(EventTypes(), ElementsAre(v1::EVENT_TYPE_WORKER_READY));
  EXPECT_EQ(events_[0].detail, "supervised");
  // Once.
  EXPECT_FALSE(lifecycle_.Registered(worker));
  EXPECT_EQ(stats_.registered, 1u);
}

TEST_F(WorkerLifecycleTest, DrainSetsCauseDeadlineAndEvent) {
  Worker& worker = ReadyWorker();
  EXPECT_TRUE(lifecycle_.Drain(worker, DrainCause::kOperator, absl::Seconds(5),
                               /*release_idle=*/true));
  EXPECT_EQ(worker.state, WorkerState::kDraining);
  EXPECT_EQ(worker.drain_cause, DrainCause::kOperator);
  EXPECT_TRUE(worker.retiring());
  EXPECT_EQ(worker.drain_deadline_mono_nanos,
            Now() + absl::ToInt64Nanoseconds(absl::Seconds(5)));
  ASSERT_THAT(EventTypes(), ElementsAre(v1::EVENT_TYPE_WORKER_DRAINING));
  EXPECT_EQ(events_[0].detail, "deadline in 5s; idle connections move");

  // A requested drain is not requested again, nor its cause replaced.
  EXPECT_FALSE(
      lifecycle_.Drain(worker, DrainCause::kShutdown, absl::Seconds(9), false));
  EXPECT_EQ(worker.drain_cause, DrainCause::kOperator);
  EXPECT_EQ(events_.size(), 1u);
}

TEST_F(WorkerLifecycleTest, AStartingWorkerIsStoppedBeforeItRegisters) {
  Worker& worker = lifecycle_.Spawned(100, false);
  events_.clear();
  EXPECT_TRUE(lifecycle_.Drain(worker, DrainCause::kScaleDown, absl::Seconds(5),
                               false));
  EXPECT_EQ(worker.state, WorkerState::kDraining);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].detail, "stopped before it registered");
  // Nor can it register afterwards.
  EXPECT_FALSE(lifecycle_.Registered(worker));
  EXPECT_EQ(worker.state, WorkerState::kDraining);
}

TEST_F(WorkerLifecycleTest, GoodbyeDrainsWithTheDefaultDeadlineQuietly) {
  Worker& worker = ReadyWorker();
  EXPECT_TRUE(lifecycle_.SaidGoodbye(worker));
  EXPECT_EQ(worker.state, WorkerState::kDraining);
  EXPECT_EQ(worker.drain_cause, DrainCause::kGoodbye);
  EXPECT_TRUE(worker.retiring());
  EXPECT_EQ(worker.drain_deadline_mono_nanos,
            Now() + absl::ToInt64Nanoseconds(kDrainTimeout));
  EXPECT_TRUE(events_.empty());

  // Asked to drain first: the goodbye ends that drain, which stands.
  Worker& asked = ReadyWorker();
  ASSERT_TRUE(
      lifecycle_.Drain(asked, DrainCause::kReplaced, absl::Seconds(5), false));
  const int64_t deadline = asked.drain_deadline_mono_nanos;
  EXPECT_TRUE(lifecycle_.SaidGoodbye(asked));
  EXPECT_EQ(asked.drain_cause, DrainCause::kReplaced);
  EXPECT_EQ(asked.drain_deadline_mono_nanos, deadline);
}

TEST_F(WorkerLifecycleTest, ALostChannelIsAFailureCountedOnce) {
  Worker& worker = ReadyWorker();
  EXPECT_TRUE(lifecycle_.ChannelLost(worker, DrainCause::kHeartbeatTimeout,
                                     absl::DeadlineExceededError("silent")));
  EXPECT_EQ(worker.state, WorkerState::kDraining);
  EXPECT_EQ(worker.drain_cause, DrainCause::kHeartbeatTimeout);
  EXPECT_FALSE(worker.retiring());
  EXPECT_EQ(worker.drain_deadline_mono_nanos,
            Now() + absl::ToInt64Nanoseconds(kDrainTimeout));
  ASSERT_THAT(EventTypes(), ElementsAre(v1::EVENT_TYPE_WORKER_DRAINING));
  EXPECT_EQ(events_[0].detail, "channel lost: silent");

  // Its exit is a crash, but not a second failure.
  EXPECT_FALSE(lifecycle_.Exited(worker, 9));  // Killed by SIGKILL.
  EXPECT_EQ(worker.state, WorkerState::kExited);
  EXPECT_EQ(stats_.crashes, 1u);
  EXPECT_EQ(events_.back().type, v1::EVENT_TYPE_WORKER_CRASHED);
  EXPECT_EQ(events_.back().exit_status, "killed by signal 9 (SIGKILL)");
}

TEST_F(WorkerLifecycleTest, ALostChannelOfADrainingWorkerIsNoFailure) {
  Worker& worker = ReadyWorker();
  ASSERT_TRUE(lifecycle_.SaidGoodbye(worker));
  EXPECT_FALSE(lifecycle_.ChannelLost(worker, DrainCause::kChannelLost,
                                      absl::OkStatus()));
  EXPECT_EQ(worker.drain_cause, DrainCause::kGoodbye);
  EXPECT_TRUE(events_.empty());
  EXPECT_FALSE(lifecycle_.Exited(worker, 0));
  EXPECT_EQ(stats_.crashes, 0u);
  EXPECT_THAT(EventTypes(), ElementsAre(v1::EVENT_TYPE_WORKER_EXITED));
  EXPECT_EQ(events_[0].exit_status, "exit code 0");
}

TEST_F(WorkerLifecycleTest, ALostWorkerMayBeDrainedOnRequestAfterAll) {
  Worker& worker = ReadyWorker();
  ASSERT_TRUE(lifecycle_.ChannelLost(worker, DrainCause::kChannelLost,
                                     absl::InternalError("eof")));
  worker.channel.reset();
  // Shutdown: the broker stops it now, so its exit is expected.
  EXPECT_TRUE(
      lifecycle_.Drain(worker, DrainCause::kShutdown, absl::Seconds(4), false));
  EXPECT_EQ(worker.drain_cause, DrainCause::kShutdown);
  EXPECT_TRUE(worker.retiring());
  EXPECT_EQ(events_.back().detail, "stopped before it registered");
  EXPECT_FALSE(lifecycle_.Exited(worker, 15 << 8));
  EXPECT_EQ(stats_.crashes, 0u);
  EXPECT_EQ(events_.back().type, v1::EVENT_TYPE_WORKER_EXITED);
}

TEST_F(WorkerLifecycleTest, AnUnexpectedExitIsAFailureToCount) {
  Worker& starting = lifecycle_.Spawned(100, false);
  EXPECT_TRUE(lifecycle_.Exited(starting, 1 << 8));
  EXPECT_EQ(starting.state, WorkerState::kExited);
  EXPECT_EQ(starting.registered_mono_nanos, 0) << "never registered";
  Worker& ready = ReadyWorker();
  EXPECT_TRUE(lifecycle_.Exited(ready, 1 << 8));
  EXPECT_EQ(stats_.crashes, 2u);
  EXPECT_EQ(events_.back().type, v1::EVENT_TYPE_WORKER_CRASHED);
  EXPECT_EQ(events_.back().exit_status, "exit code 1");
  // Exited is final.
  EXPECT_FALSE(lifecycle_.Exited(ready, 0));
  EXPECT_FALSE(
      lifecycle_.Drain(ready, DrainCause::kShutdown, absl::Seconds(1), false));
  EXPECT_FALSE(lifecycle_.Registered(ready));
  EXPECT_EQ(stats_.crashes, 2u);
  EXPECT_EQ(ready.state, WorkerState::kExited);
}

TEST_F(WorkerLifecycleTest, AnExternalWorkerEndsWithItsChannel) {
  Worker& left = lifecycle_.Arrived(300, /*adopted=*/false);
  ASSERT_TRUE(lifecycle_.Registered(left));
  ASSERT_TRUE(
      lifecycle_.Drain(left, DrainCause::kOperator, absl::Seconds(5), false));
  events_.clear();
  EXPECT_TRUE(lifecycle_.Disconnected(left, absl::OkStatus()));
  EXPECT_EQ(left.state, WorkerState::kExited);
  ASSERT_THAT(EventTypes(), ElementsAre(v1::EVENT_TYPE_WORKER_EXITED));
  EXPECT_EQ(events_[0].detail, "unregistered");

  Worker& lost = lifecycle_.Arrived(301, /*adopted=*/false);
  ASSERT_TRUE(lifecycle_.Registered(lost));
  events_.clear();
  EXPECT_TRUE(lifecycle_.Disconnected(lost, absl::InternalError("reset")));
  ASSERT_THAT(EventTypes(), ElementsAre(v1::EVENT_TYPE_WORKER_CRASHED));
  EXPECT_EQ(events_[0].detail, "reset");
  EXPECT_EQ(stats_.crashes, 0u) << "crashes counts supervised workers";
}

TEST_F(WorkerLifecycleTest, TheDrainDeadlinePassesOnceAfterItIsDue) {
  Worker& worker = ReadyWorker();
  EXPECT_FALSE(WorkerLifecycle::TakeExpiredDeadline(worker, Now() + 1))
      << "not draining";
  ASSERT_TRUE(
      lifecycle_.Drain(worker, DrainCause::kOperator, absl::Seconds(5), false));
  time_.Advance(absl::Seconds(5));
  EXPECT_FALSE(WorkerLifecycle::TakeExpiredDeadline(
      worker, time_.clock().MonotonicNanos()))
      << "due, not passed";
  time_.Advance(absl::Nanoseconds(1));
  EXPECT_TRUE(WorkerLifecycle::TakeExpiredDeadline(
      worker, time_.clock().MonotonicNanos()));
  EXPECT_FALSE(WorkerLifecycle::TakeExpiredDeadline(
      worker, time_.clock().MonotonicNanos()))
      << "once";
  EXPECT_EQ(worker.state, WorkerState::kDraining);
}

// The whole table: from each state (and, for draining, each kind of cause)
// to each target state with each kind of cause.
TEST(WorkerLifecycleTableTest, OnlyTheDiagramsTransitionsAreAllowed) {
  using S = WorkerState;
  using C = DrainCause;
  auto allowed = [](S from, C from_cause, S to, C cause) {
    Worker worker;
    worker.state = from;
    worker.drain_cause = from_cause;
    return WorkerLifecycle::Allowed(worker, to, cause);
  };
  for (S to : {S::kStarting, S::kReady, S::kDraining, S::kExited}) {
    for (C cause : {C::kNone, C::kOperator, C::kChannelLost}) {
      const bool drain = to == S::kDraining;
      const bool requested = cause == C::kOperator;
      const bool has_cause = cause != C::kNone;
      SCOPED_TRACE(
          absl::StrCat(WorkerStateName(to), " ", DrainCauseName(cause)));
      EXPECT_EQ(allowed(S::kStarting, C::kNone, to, cause),
                (to == S::kReady && !has_cause) ||
                    (to == S::kExited && !has_cause) || (drain && requested));
      EXPECT_EQ(allowed(S::kReady, C::kNone, to, cause),
                (drain && has_cause) || (to == S::kExited && !has_cause));
      EXPECT_EQ(allowed(S::kDraining, C::kScaleDown, to, cause),
                to == S::kExited && !has_cause);
      EXPECT_EQ(allowed(S::kDraining, C::kHeartbeatTimeout, to, cause),
                (to == S::kExited && !has_cause) || (drain && requested));
      EXPECT_FALSE(allowed(S::kExited, C::kNone, to, cause));
    }
  }
  for (C cause : {C::kOperator, C::kReplaced, C::kScaleDown, C::kPoolDrain,
                  C::kShutdown, C::kGoodbye}) {
    EXPECT_TRUE(IsRequested(cause)) << DrainCauseName(cause);
  }
  for (C cause : {C::kNone, C::kChannelLost, C::kHeartbeatTimeout,
                  C::kAckTimeout, C::kChannelStuck}) {
    EXPECT_FALSE(IsRequested(cause)) << DrainCauseName(cause);
  }
}

}  // namespace
}  // namespace fdbroker
