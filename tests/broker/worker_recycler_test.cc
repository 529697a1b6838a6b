// WorkerRecycler through WorkerManager, in simulated time with fake
// processes: max_surge, the order "replacement registered, then the
// predecessor drains", a failing replacement ending the restart, the
// command change and its rollback, recycling one at a time.
#include "broker/worker_recycler.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>
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

class WorkerRecyclerTest : public DataPlaneTest {
 protected:
  WorkerRecyclerTest() {
    options_.target_workers = 3;
    // The test's worker ends do not heartbeat: keep them alive.
    options_.heartbeat_timeout = absl::Hours(1);
  }

  // Starts the manager and registers its `target_workers` workers.
  void StartPool() {
    StartManager(options_);
    for (const auto& spawned : launcher_.spawned) {
      ends_.push_back(Register(spawned.pid));
    }
  }

  absl::StatusOr<WorkerRecycler::RestartPlan> Restart(
      int max_surge,
      std::optional<Supervisor::Command> command = std::nullopt) {
    return manager_->RestartWorkers(WorkerRecycler::RestartRequest{
        max_surge, absl::Seconds(5), std::move(command)});
  }

  int Draining() const {
    int n = 0;
    for (const auto& [id, worker] : registry_.workers()) {
      n += worker->state == WorkerState::kDraining;
    }
    return n;
  }

  WorkerManager::Options options_;
  std::vector<WorkerEnd> ends_;
};

TEST_F(WorkerRecyclerTest, MaxSurgeReplacementsAtOnceEachReadyBeforeItsDrain) {
  StartPool();
  const std::vector<pid_t> old = {launcher_.spawned[0].pid,
                                  launcher_.spawned[1].pid,
                                  launcher_.spawned[2].pid};
  absl::StatusOr<WorkerRecycler::RestartPlan> plan = Restart(2);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->replacing, ElementsAre(1, 2, 3));
  time_.RunUntilIdle();
  ASSERT_EQ(launcher_.spawned.size(), 5u) << "two replacements at once";
  EXPECT_EQ(Draining(), 0) << "nobody drains before a replacement is ready";

  // The first replacement registers: the oldest worker drains, and the third
  // replacement starts (still two in flight).
  ends_.push_back(Register(launcher_.spawned[3].pid));
  time_.RunUntilIdle();
  EXPECT_EQ(Draining(), 1);
  EXPECT_EQ(registry_.Find(1)->drain_cause, DrainCause::kRestarted);
  ASSERT_EQ(launcher_.spawned.size(), 6u);
  std::vector<WorkerEvent> recycled = EventsOf(v1::EVENT_TYPE_WORKER_RECYCLED);
  ASSERT_EQ(recycled.size(), 1u);
  EXPECT_EQ(recycled[0].worker_id, 1u);
  EXPECT_EQ(recycled[0].reason, "restart");

  // A second request while this one runs is refused.
  absl::StatusOr<WorkerRecycler::RestartPlan> again = Restart(1);
  EXPECT_TRUE(absl::IsFailedPrecondition(again.status())) << again.status();

  ends_.push_back(Register(launcher_.spawned[4].pid));
  ends_.push_back(Register(launcher_.spawned[5].pid));
  time_.RunUntilIdle();
  EXPECT_EQ(Draining(), 3);
  EXPECT_TRUE(EventsOf(v1::EVENT_TYPE_RESTART_DONE).empty())
      << "done only once the predecessors are gone";
  for (pid_t pid : old) {
    launcher_.Exit(pid, FakeProcessLauncher::ExitedWith(0));
  }
  time_.RunUntilIdle();
  ASSERT_EQ(EventsOf(v1::EVENT_TYPE_RESTART_DONE).size(), 1u);
  EXPECT_EQ(manager_->stats().recycled_restart, 3u);
  EXPECT_EQ(manager_->stats().rolling_restarts_done, 1u);
  EXPECT_EQ(manager_->stats().crashes, 0u);
  EXPECT_FALSE(manager_->restarting());
}

TEST_F(WorkerRecyclerTest, AReplacementThatNeverRegistersEndsTheRestart) {
  options_.start_timeout = absl::Seconds(5);
  StartPool();
  ASSERT_TRUE(
      Restart(1, Supervisor::Command{{"new-worker", "--v2"}, {{"V", "2"}}})
          .ok());
  time_.RunUntilIdle();
  ASSERT_EQ(launcher_.spawned.size(), 4u);
  EXPECT_THAT(launcher_.spawned[3].argv, ElementsAre("new-worker", "--v2"));
  EXPECT_THAT(launcher_.spawned[3].env, ::testing::Contains("V=2"));
  const pid_t stuck = launcher_.spawned[3].pid;
  // Past --worker_start_timeout the pool kills it (the fake process exits
  // on SIGKILL); its exit ends the restart.
  time_.Advance(absl::Seconds(6));
  EXPECT_THAT(launcher_.SignalsTo(stuck), ::testing::Contains(SIGKILL));
  time_.RunUntilIdle();
  std::vector<WorkerEvent> failed = EventsOf(v1::EVENT_TYPE_RESTART_FAILED);
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_THAT(failed[0].detail, HasSubstr("0 of 3"));
  EXPECT_THAT(failed[0].detail, HasSubstr("previous worker command"));
  EXPECT_EQ(Draining(), 0) << "the good workers keep serving";
  EXPECT_EQ(manager_->stats().rolling_restarts_failed, 1u);
  EXPECT_FALSE(manager_->restarting());
  // The previous command is back for every later start.
  EXPECT_THAT(manager_->worker_command().argv,
              ElementsAre("my-worker", "--threads=2"));
  EXPECT_TRUE(manager_->worker_command().env.empty());
  time_.Advance(absl::Seconds(30));
  EXPECT_EQ(launcher_.spawned.size(), 4u) << "nothing else was started";
}

TEST_F(WorkerRecyclerTest, MaxAgeRecyclesOneWorkerAtATime) {
  options_.recycle.max_age = absl::Seconds(60);
  StartPool();
  time_.Advance(absl::Seconds(61));
  ASSERT_EQ(launcher_.spawned.size(), 4u) << "one recycle at a time";
  time_.Advance(absl::Seconds(5));
  EXPECT_EQ(launcher_.spawned.size(), 4u) << "the next waits for this one";
  ends_.push_back(Register(launcher_.spawned[3].pid));
  EXPECT_EQ(Draining(), 1);
  EXPECT_EQ(registry_.Find(1)->drain_cause, DrainCause::kRecycled);
  std::vector<WorkerEvent> recycled = EventsOf(v1::EVENT_TYPE_WORKER_RECYCLED);
  ASSERT_EQ(recycled.size(), 1u);
  EXPECT_EQ(recycled[0].reason, "max_age");
  EXPECT_THAT(recycled[0].detail, HasSubstr("limit 1m"));
  time_.Advance(absl::Seconds(1));
  EXPECT_EQ(launcher_.spawned.size(), 5u) << "then the next one";
  EXPECT_EQ(manager_->stats().recycled_max_age, 1u);
}

TEST_F(WorkerRecyclerTest, AFailedRecyclePausesRecycling) {
  options_.recycle.max_age = absl::Seconds(60);
  StartPool();
  time_.Advance(absl::Seconds(61));
  ASSERT_EQ(launcher_.spawned.size(), 4u);
  launcher_.Exit(launcher_.spawned[3].pid, FakeProcessLauncher::ExitedWith(1));
  time_.RunUntilIdle();
  EXPECT_EQ(Draining(), 0);
  time_.Advance(absl::Seconds(5));
  EXPECT_EQ(launcher_.spawned.size(), 4u) << "paused after the failure";
  time_.Advance(absl::Seconds(6));
  EXPECT_EQ(launcher_.spawned.size(), 5u) << "tried again after 10s";
}

TEST(ProcessTreeResidentBytesTest, CountsThisProcessAndIsZeroForNone) {
  EXPECT_GT(ProcessTreeResidentBytes(::getpid()), uint64_t{1} << 20);
  EXPECT_EQ(ProcessTreeResidentBytes(0x3fffffff), 0u);
}

TEST(ProcessTreeResidentBytesTest, IsCheapEnoughForTheLoop) {
  // What one worker costs the loop once a second (this test process has a
  // few threads, as a worker does). Bounded generously for sanitizers.
  constexpr int kRounds = 200;
  const absl::Time start = absl::Now();
  for (int i = 0; i < kRounds; ++i) ProcessTreeResidentBytes(::getpid());
  const absl::Duration each = (absl::Now() - start) / kRounds;
  std::printf("ProcessTreeResidentBytes: %s per process\n",
              absl::FormatDuration(each).c_str());
  EXPECT_LT(each, absl::Milliseconds(2));
}

}  // namespace
}  // namespace fdbroker
