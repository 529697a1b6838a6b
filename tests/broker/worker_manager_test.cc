// WorkerManager in simulated time with fake processes: restart back-off,
// restart-loop detection, heartbeat and start timeouts, drain deadlines.
// Asserted on events, stats and signals; no sleeps, no log text.
#include "broker/worker_manager.h"

#include <signal.h>
#include <sys/socket.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/broker/data_plane_fixture.h"

namespace fdbroker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class WorkerManagerTest : public DataPlaneTest {
 protected:
  WorkerManagerTest() {
    options_.target_workers = 1;
    options_.heartbeat_interval = absl::Seconds(1);
    options_.heartbeat_timeout = absl::Seconds(3);
  }

  // Crashes the newest worker and lets time pass until its replacement is
  // started; returns how long that took (from the RESTARTED event times).
  absl::Duration CrashAndTimeRestart() {
    const size_t restarts = EventsOf(v1::EVENT_TYPE_WORKER_RESTARTED).size();
    const absl::Time crashed_at = time_.clock().Now();
    launcher_.Exit(LastSpawnedPid(), FakeProcessLauncher::ExitedWith(1));
    time_.RunUntilIdle();
    time_.Advance(options_.restart_backoff_max + absl::Milliseconds(1));
    std::vector<WorkerEvent> restarted =
        EventsOf(v1::EVENT_TYPE_WORKER_RESTARTED);
    if (restarted.size() != restarts + 1) {
      ADD_FAILURE() << "expected one restart, got "
                    << restarted.size() - restarts;
      return absl::InfiniteDuration();
    }
    return restarted.back().time - crashed_at;
  }

  // A re-registration (was_supervised) from process `pid` claiming
  // `claims`; the broker's answers in `answers`.
  WorkerEnd HelloFrom(pid_t pid, const std::vector<uint64_t>& claims,
                      std::vector<v1::HandoffMessage>& answers) {
    v1::Hello hello;
    hello.set_was_supervised(true);
    for (uint64_t id : claims)
      hello.add_owned_connections()->set_connection_id(id);
    return SayHello(pid, std::move(hello), answers);
  }

  WorkerManager::Options options_;
};

TEST_F(WorkerManagerTest, CrashingWorkersRestartWithCappedExponentialBackoff) {
  StartManager(options_);
  ASSERT_EQ(launcher_.spawned.size(), 1u) << "the pool starts at once";
  EXPECT_THAT(launcher_.spawned[0].argv,
              ElementsAre("my-worker", "--threads=2"));
  EXPECT_THAT(launcher_.spawned[0].env, ::testing::Contains(absl::StrCat(
                                            "FDBROKER_SOCKET=", kSocketPath)));

  std::vector<absl::Duration> delays;
  for (int i = 0; i < 9; ++i) delays.push_back(CrashAndTimeRestart());
  EXPECT_THAT(delays,
              ElementsAre(absl::Milliseconds(100), absl::Milliseconds(200),
                          absl::Milliseconds(400), absl::Milliseconds(800),
                          absl::Milliseconds(1600), absl::Milliseconds(3200),
                          absl::Milliseconds(6400), absl::Seconds(10),
                          absl::Seconds(10)));
  EXPECT_EQ(launcher_.spawned.size(), 10u) << "one process per restart";
  EXPECT_EQ(manager_->stats().crashes, 9u);
  EXPECT_EQ(manager_->stats().restarts, 9u);
  const std::vector<WorkerEvent> crashed =
      EventsOf(v1::EVENT_TYPE_WORKER_CRASHED);
  ASSERT_EQ(crashed.size(), 9u);
  EXPECT_EQ(crashed[0].exit_status, "exit code 1");
  EXPECT_EQ(crashed[0].pid, launcher_.spawned[0].pid);
}

TEST_F(WorkerManagerTest, ARestartIsNotEarly) {
  StartManager(options_);
  launcher_.Exit(LastSpawnedPid(), FakeProcessLauncher::ExitedWith(1));
  time_.Advance(absl::Milliseconds(99));
  EXPECT_EQ(launcher_.spawned.size(), 1u);
  time_.Advance(absl::Milliseconds(1));
  EXPECT_EQ(launcher_.spawned.size(), 2u);
}

TEST_F(WorkerManagerTest, ThreeQuickFailuresAreARestartLoopUntilOneStaysUp) {
  StartManager(options_);
  CrashAndTimeRestart();
  CrashAndTimeRestart();
  EXPECT_FALSE(manager_->in_restart_loop());
  EXPECT_TRUE(EventsOf(v1::EVENT_TYPE_RESTART_LOOP).empty());
  CrashAndTimeRestart();
  EXPECT_TRUE(manager_->in_restart_loop());
  EXPECT_EQ(manager_->crash_streak(), 3);
  EXPECT_EQ(manager_->stats().restart_loops, 1u);
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_RESTART_LOOP).size(), 1u);
  CrashAndTimeRestart();
  EXPECT_EQ(manager_->stats().restart_loops, 1u) << "counted once per loop";
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_RESTART_LOOP).size(), 1u);

  // The newest worker has been up for 10s but has not registered: that does
  // not end the loop. Once registered (and up for stable_after), the next
  // check ends it, and its own later crash restarts after the initial delay.
  time_.Advance(absl::Seconds(1));
  EXPECT_TRUE(manager_->in_restart_loop());
  WorkerEnd end = Register(LastSpawnedPid());
  time_.Advance(absl::Milliseconds(500));
  EXPECT_FALSE(manager_->in_restart_loop());
  EXPECT_EQ(manager_->crash_streak(), 0);
  EXPECT_EQ(CrashAndTimeRestart(), absl::Milliseconds(100));
}

TEST_F(WorkerManagerTest, AWorkerThatDiesRightAfterRegisteringStillCounts) {
  StartManager(options_);
  for (int i = 0; i < 3; ++i) {
    WorkerEnd end = Register(LastSpawnedPid());
    time_.Advance(absl::Milliseconds(500));  // Less than stable_after (1s).
    EXPECT_EQ(manager_->crash_streak(), i) << "not reset by a short life";
    launcher_.Exit(LastSpawnedPid(), FakeProcessLauncher::ExitedWith(1));
    time_.Advance(options_.restart_backoff_initial * (1 << i));
    EXPECT_EQ(launcher_.spawned.size(), static_cast<size_t>(i + 2));
  }
  EXPECT_TRUE(manager_->in_restart_loop());
  EXPECT_EQ(manager_->stats().restart_loops, 1u);
}

TEST_F(WorkerManagerTest, AWorkerThatNeverRegistersIsARestartLoopHoweverSlow) {
  options_.start_timeout = absl::Seconds(60);
  StartManager(options_);
  for (int i = 0; i < 3; ++i) {
    time_.Advance(absl::Seconds(5));  // Slow to fail, but never registered.
    CrashAndTimeRestart();
  }
  EXPECT_TRUE(manager_->in_restart_loop());
}

TEST_F(WorkerManagerTest, ASilentWorkerIsDeclaredDeadAndReplaced) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid);
  time_.Advance(absl::Seconds(1));
  // The broker heartbeats after 1s of its own silence, stamped with its
  // (simulated) wall clock.
  std::vector<v1::HandoffMessage> got = end.Received();
  ASSERT_FALSE(got.empty());
  ASSERT_TRUE(got.back().has_heartbeat());
  EXPECT_EQ(got.back().heartbeat().sent_unix_nanos(),
            time_.clock().UnixNanos());

  // Silent for the 3s timeout: still alive at exactly 3s, dead at the next
  // check (every 500ms).
  time_.Advance(absl::Seconds(2));
  EXPECT_EQ(manager_->stats().heartbeat_timeouts, 0u);
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
  time_.Advance(absl::Milliseconds(500));
  EXPECT_EQ(manager_->stats().heartbeat_timeouts, 1u);
  EXPECT_TRUE(end.BrokerClosed());
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGKILL));
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_DRAINING).size(), 1u);
  EXPECT_THAT(EventsOf(v1::EVENT_TYPE_WORKER_DRAINING)[0].detail,
              HasSubstr("declared dead"));
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_CRASHED).size(), 1u);
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_CRASHED)[0].exit_status,
            "killed by signal 9 (SIGKILL)");
  // It lived longer than stable_after: replaced after the initial delay.
  time_.Advance(absl::Milliseconds(100));
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_RESTARTED).size(), 1u);
  EXPECT_EQ(manager_->stats().crashes, 1u);
}

// A supervised worker whose channel was lost but whose process lives takes
// its registration back when it says Hello again from the same process:
// same id, ready again, and the replacement started meanwhile is surplus.
// It may claim only what it owned. Before: refused as "already registered",
// drained and replaced.
TEST_F(WorkerManagerTest, ALostChannelIsTakenBackByTheSameProcess) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid);
  end.channel.reset();  // The worker's side closes (e.g. its protocol error).
  time_.RunUntilIdle();
  time_.Advance(absl::Seconds(1));
  ASSERT_EQ(launcher_.spawned.size(), 2u) << "replaced at once";
  const pid_t replacement = LastSpawnedPid();

  std::vector<v1::HandoffMessage> refused;
  WorkerEnd refused_end = HelloFrom(pid, {12345}, refused);
  ASSERT_EQ(refused.size(), 1u);
  ASSERT_TRUE(refused[0].has_refusal());
  EXPECT_THAT(refused[0].refusal().message(), HasSubstr("did not own"));

  std::vector<v1::HandoffMessage> welcomed;
  WorkerEnd again = HelloFrom(pid, {}, welcomed);
  ASSERT_EQ(welcomed.size(), 1u);
  ASSERT_TRUE(welcomed[0].has_welcome())
      << (welcomed[0].has_refusal() ? welcomed[0].refusal().message() : "");
  EXPECT_EQ(welcomed[0].welcome().worker_id(), end.id);
  const Worker* worker = registry_.Find(end.id);
  ASSERT_NE(worker, nullptr);
  EXPECT_EQ(worker->state, WorkerState::kReady);
  EXPECT_EQ(manager_->stats().readmitted, 1u);
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_READMITTED).size(), 1u);
  // The replacement (not registered yet) is the surplus: stopped.
  EXPECT_THAT(launcher_.SignalsTo(replacement), ::testing::Contains(SIGTERM));
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
}

// A worker the broker declared dead was killed: it is not taken back, even
// if it speaks before the SIGKILL lands.
TEST_F(WorkerManagerTest, AWorkerDeclaredDeadIsNotTakenBack) {
  launcher_.sigkill_kills = false;
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid);
  time_.Advance(absl::Seconds(4));  // Silent past the 3s timeout.
  ASSERT_EQ(manager_->stats().heartbeat_timeouts, 1u);
  std::vector<v1::HandoffMessage> answer;
  WorkerEnd again = HelloFrom(pid, {}, answer);
  ASSERT_EQ(answer.size(), 1u);
  EXPECT_TRUE(answer[0].has_refusal());
  EXPECT_EQ(manager_->stats().readmitted, 0u);
}

TEST_F(WorkerManagerTest, AWorkerThatHeartbeatsStaysRegistered) {
  StartManager(options_);
  WorkerEnd end = Register(LastSpawnedPid());
  for (int i = 0; i < 20; ++i) {
    v1::HandoffMessage heartbeat;
    heartbeat.mutable_heartbeat();
    ASSERT_TRUE(end.Send(std::move(heartbeat)).ok());
    time_.Advance(absl::Seconds(1));
    end.Received();
  }
  EXPECT_EQ(manager_->stats().heartbeat_timeouts, 0u);
  EXPECT_FALSE(end.BrokerClosed());
  EXPECT_EQ(registry_.CountInState(WorkerState::kReady), 1u);
}

// The watchdog (--worker_timeout 5s): heartbeats keep coming, but say that
// the application thread has been silent since registration (as the Python
// blocking API's do when its consumer loop hangs).
class WatchdogTest : public WorkerManagerTest {
 protected:
  WatchdogTest() { options_.worker_timeout = absl::Seconds(5); }

  // Heartbeats every second for `seconds`, each with app_silent_ms =
  // `silent_from` + the time since the first.
  void Heartbeat(WorkerEnd& end, int seconds, absl::Duration silent_from) {
    for (int i = 0; i < seconds; ++i) {
      v1::HandoffMessage heartbeat;
      heartbeat.mutable_heartbeat()->set_app_silent_ms(static_cast<uint32_t>(
          absl::ToInt64Milliseconds(silent_from + absl::Seconds(i))));
      ASSERT_TRUE(end.Send(std::move(heartbeat)).ok());
      time_.Advance(absl::Seconds(1));
      end.Received();
    }
  }
};

TEST_F(WatchdogTest, ASilentApplicationIsDumpedThenKilledAndReplaced) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid, 0, /*reports_liveness=*/true);
  // Silent 0..4s at the heartbeats of 0..4s: not yet.
  Heartbeat(end, 5, absl::ZeroDuration());
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
  EXPECT_EQ(manager_->stats().worker_timeouts, 0u);
  // Past 5s: SIGABRT (the stack dump), no SIGKILL yet, no connection for it
  // (draining), and its replacement starts at once.
  Heartbeat(end, 1, absl::Seconds(5));
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGABRT));
  EXPECT_EQ(manager_->stats().worker_timeouts, 1u);
  EXPECT_EQ(manager_->stats().heartbeat_timeouts, 0u);
  EXPECT_EQ(registry_.CountInState(WorkerState::kDraining), 1u);
  EXPECT_EQ(launcher_.spawned.size(), 2u);
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_HUNG).size(), 1u);
  EXPECT_THAT(EventsOf(v1::EVENT_TYPE_WORKER_HUNG)[0].detail,
              HasSubstr("application thread silent for"));
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_HUNG)[0].pid, pid);
  // The grace (1s): then SIGKILL, whatever the dump did.
  time_.Advance(WorkerManager::kStackDumpGrace + absl::Milliseconds(500));
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGABRT, SIGKILL));
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_CRASHED).size(), 1u);
}

TEST_F(WatchdogTest, AnApplicationThatKeepsProvingLifeIsNeverKilled) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid, 0, /*reports_liveness=*/true);
  for (int i = 0; i < 20; ++i) Heartbeat(end, 1, absl::Seconds(2));
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
  EXPECT_EQ(registry_.CountInState(WorkerState::kReady), 1u);
}

TEST_F(WatchdogTest, AWorkerThatDoesNotReportLivenessIsNotWatched) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid);
  Heartbeat(end, 20, absl::ZeroDuration());  // app_silent_ms is ignored
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
  EXPECT_EQ(manager_->stats().worker_timeouts, 0u);
}

TEST_F(WatchdogTest, ZeroTurnsItOff) {
  options_.worker_timeout = absl::ZeroDuration();
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid, 0, /*reports_liveness=*/true);
  Heartbeat(end, 20, absl::ZeroDuration());
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
}

// An external worker is never signalled (not the broker's process): it
// stops getting connections at once and its channel is closed after the
// grace, which re-places what it had not acked.
TEST_F(WatchdogTest, AHungExternalWorkerIsCutOffNotSignalled) {
  options_.target_workers = 0;
  StartManager(options_);
  constexpr pid_t kExternal = 4242;
  WorkerEnd end = Register(kExternal, 0, /*reports_liveness=*/true);
  Heartbeat(end, 6, absl::Seconds(5));
  EXPECT_EQ(manager_->stats().worker_timeouts, 1u);
  EXPECT_EQ(registry_.CountInState(WorkerState::kDraining), 1u);
  EXPECT_FALSE(end.BrokerClosed());
  time_.Advance(WorkerManager::kStackDumpGrace + absl::Milliseconds(500));
  EXPECT_TRUE(end.BrokerClosed());
  EXPECT_TRUE(launcher_.signals.empty());
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_HUNG).size(), 1u);
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_HUNG)[0].pid, kExternal);
}

// An event-loop SDK whose loop is stuck sends nothing at all: at
// --heartbeat_timeout (3s, before the 5s) it is dumped first as well.
TEST_F(WatchdogTest, ASilentLivenessReportingWorkerIsDumpedFirst) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid, 0, /*reports_liveness=*/true);
  time_.Advance(absl::Milliseconds(3500));
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGABRT));
  EXPECT_EQ(manager_->stats().heartbeat_timeouts, 1u);
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_HUNG).size(), 1u);
  EXPECT_THAT(EventsOf(v1::EVENT_TYPE_WORKER_HUNG)[0].detail,
              HasSubstr("no message for"));
  time_.Advance(WorkerManager::kStackDumpGrace + absl::Milliseconds(500));
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGABRT, SIGKILL));
}

TEST_F(WorkerManagerTest, AWorkerThatDoesNotRegisterInTimeIsKilled) {
  options_.start_timeout = absl::Seconds(30);
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  time_.Advance(absl::Seconds(30));
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
  time_.Advance(absl::Milliseconds(500));
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGKILL));
  EXPECT_EQ(manager_->stats().crashes, 1u);
}

TEST_F(WorkerManagerTest, ADrainingWorkerIsKilledAtItsDeadline) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid);
  bool answered = false;
  manager_->DrainWorkerById(
      end.id, absl::Seconds(5), /*replace=*/false,
      [&](absl::StatusOr<WorkerManager::DrainResult> result) {
        ASSERT_TRUE(result.ok()) << result.status();
        EXPECT_EQ(result->worker_id, end.id);
        answered = true;
      });
  EXPECT_TRUE(answered);
  EXPECT_EQ(manager_->target_workers(), 0) << "drained, not replaced";
  // The Drain carries the deadline in wall time.
  std::vector<v1::HandoffMessage> got = end.Received();
  ASSERT_EQ(got.size(), 1u);
  ASSERT_TRUE(got[0].has_drain());
  EXPECT_EQ(got[0].drain().deadline_unix_nanos(),
            absl::ToUnixNanos(time_.clock().Now() + absl::Seconds(5)));
  EXPECT_EQ(registry_.Find(end.id)->state, WorkerState::kDraining);

  // The worker keeps heartbeating but does not finish in time.
  for (int i = 0; i < 5; ++i) {
    v1::HandoffMessage heartbeat;
    heartbeat.mutable_heartbeat();
    ASSERT_TRUE(end.Send(std::move(heartbeat)).ok());
    time_.Advance(absl::Seconds(1));
  }
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty()) << "not before the deadline";
  time_.Advance(absl::Milliseconds(500));
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGKILL));
  // Its exit was expected: exited, not crashed, and not restarted.
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_WORKER_EXITED).size(), 1u);
  EXPECT_TRUE(EventsOf(v1::EVENT_TYPE_WORKER_CRASHED).empty());
  EXPECT_EQ(manager_->stats().crashes, 0u);
  EXPECT_EQ(registry_.size(), 0u);
  time_.Advance(absl::Seconds(20));
  EXPECT_EQ(launcher_.spawned.size(), 1u);
}

TEST_F(WorkerManagerTest, ShutdownKillsStragglersAtTheDrainDeadline) {
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid);
  bool done = false;
  manager_->DrainAll(absl::Seconds(4), [&] { done = true; });
  for (int i = 0; i < 4; ++i) {
    v1::HandoffMessage heartbeat;
    heartbeat.mutable_heartbeat();
    ASSERT_TRUE(end.Send(std::move(heartbeat)).ok());
    time_.Advance(absl::Seconds(1));
  }
  EXPECT_FALSE(done);
  EXPECT_TRUE(launcher_.SignalsTo(pid).empty());
  // Killed at the next check after the deadline; reaped, so the shutdown
  // completes then.
  time_.Advance(absl::Milliseconds(500));
  EXPECT_THAT(launcher_.SignalsTo(pid), ElementsAre(SIGKILL));
  EXPECT_TRUE(done);
  EXPECT_EQ(launcher_.spawned.size(), 1u) << "no restart while shutting down";
}

TEST_F(WorkerManagerTest, ShutdownDoesNotWaitForAnUnreapableWorker) {
  launcher_.sigkill_kills = false;  // Stuck in the kernel, say.
  StartManager(options_);
  const pid_t pid = LastSpawnedPid();
  WorkerEnd end = Register(pid);
  bool done = false;
  manager_->DrainAll(absl::Seconds(4), [&] { done = true; });
  end.channel.reset();  // It stops talking, but does not exit.
  time_.Advance(absl::Seconds(6));
  EXPECT_FALSE(done);
  // Deadline (4s) plus 2s of grace for reaping, at the next check.
  time_.Advance(absl::Milliseconds(500));
  EXPECT_TRUE(done);
  EXPECT_THAT(launcher_.SignalsTo(pid), ::testing::Contains(SIGKILL));
}

TEST_F(WorkerManagerTest, SpawnFailuresBackOffToo) {
  launcher_.next_spawn_error = absl::NotFoundError("my-worker: not found");
  options_.target_workers = 1;
  StartManager(options_);
  EXPECT_TRUE(launcher_.spawned.empty());
  EXPECT_EQ(manager_->crash_streak(), 1);
  time_.Advance(absl::Milliseconds(99));
  EXPECT_TRUE(launcher_.spawned.empty());
  time_.Advance(absl::Milliseconds(1));
  EXPECT_EQ(launcher_.spawned.size(), 1u);
}

}  // namespace
}  // namespace fdbroker
