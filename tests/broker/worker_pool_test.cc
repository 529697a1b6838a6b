// WorkerPool's modes in simulated time with fake processes: the adopt
// grace, suspend and resume, hand-over and shutdown, and which of them
// start workers. (The back-off itself: worker_manager_test.cc.)
#include "broker/worker_pool.h"

#include <memory>
#include <vector>

#include "broker/supervisor.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_registry.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/broker/fake_process_launcher.h"
#include "tests/broker/simulated_time.h"

namespace fdbroker {
namespace {

class WorkerPoolTest : public ::testing::Test {
 protected:
  WorkerPoolTest()
      : supervisor_(time_.loop(), Supervisor::Options{{"my-worker"}, "/s"},
                    launcher_,
                    [this](pid_t pid, int status) { OnExit(pid, status); }),
        lifecycle_(time_.loop(), registry_, absl::Seconds(30), stats_,
                   nullptr) {
    options_.target_workers = 2;
  }
  ~WorkerPoolTest() override {
    pool_.reset();
    registry_ = WorkerRegistry();
  }

  void StartPool(absl::Duration adopt_grace = absl::ZeroDuration()) {
    pool_ = std::make_unique<WorkerPool>(time_.loop(), registry_, supervisor_,
                                         lifecycle_, stats_, options_);
    pool_->Start(adopt_grace);
    time_.RunUntilIdle();
  }

  // What WorkerManager::OnChildExited does for the pool.
  void OnExit(pid_t pid, int status) {
    Worker* worker = registry_.FindByPid(pid);
    if (worker == nullptr || pool_ == nullptr) return;
    if (lifecycle_.Exited(*worker, status)) pool_->NoteFailure(*worker);
    registry_.Remove(worker->id);
    pool_->Reconcile();
  }

  // Spawned process `index` exits with status 1.
  void Crash(size_t index = 0) {
    launcher_.Exit(launcher_.spawned.at(index).pid,
                   FakeProcessLauncher::ExitedWith(1));
    time_.RunUntilIdle();
  }

  SimulatedTime time_;
  FakeProcessLauncher launcher_;
  WorkerRegistry registry_;
  WorkerStats stats_;
  Supervisor supervisor_;
  WorkerLifecycle lifecycle_;
  WorkerPool::Options options_;
  std::unique_ptr<WorkerPool> pool_;
};

TEST_F(WorkerPoolTest, RunningKeepsTheTarget) {
  StartPool();
  EXPECT_EQ(pool_->mode(), PoolMode::kRunning);
  EXPECT_EQ(launcher_.spawned.size(), 2u);
  EXPECT_EQ(pool_->CountServing(), 2);
  Crash();
  time_.Advance(options_.restart_backoff_initial);
  EXPECT_EQ(launcher_.spawned.size(), 3u);
  EXPECT_EQ(stats_.restarts, 1u);
}

TEST_F(WorkerPoolTest, TheAdoptGraceDelaysThePool) {
  StartPool(absl::Seconds(5));
  EXPECT_EQ(pool_->mode(), PoolMode::kAdopting);
  time_.Advance(absl::Seconds(5) - absl::Nanoseconds(1));
  EXPECT_TRUE(launcher_.spawned.empty());
  // A worker of the previous broker re-registered meanwhile: it counts.
  Worker& adopted = lifecycle_.Arrived(7777, /*adopted=*/true);
  ASSERT_TRUE(lifecycle_.Registered(adopted));
  time_.Advance(absl::Nanoseconds(1));
  EXPECT_EQ(pool_->mode(), PoolMode::kRunning);
  EXPECT_EQ(launcher_.spawned.size(), 1u);
}

TEST_F(WorkerPoolTest, ASuspendedPoolStartsNothingUntilResumed) {
  StartPool();
  pool_->Suspend();
  EXPECT_TRUE(pool_->suspended());
  Crash();
  time_.Advance(absl::Seconds(20));
  EXPECT_EQ(launcher_.spawned.size(), 2u);
  std::vector<uint64_t> started = pool_->Resume();
  EXPECT_EQ(pool_->mode(), PoolMode::kRunning);
  EXPECT_EQ(started.size(), 1u);
  EXPECT_EQ(pool_->CountServing(), 2);
  EXPECT_TRUE(pool_->Resume().empty()) << "not suspended any more";
}

TEST_F(WorkerPoolTest, TheAdoptGraceEndingDoesNotResumeASuspendedPool) {
  StartPool(absl::Seconds(5));
  pool_->Suspend();
  time_.Advance(absl::Seconds(10));
  EXPECT_TRUE(pool_->suspended());
  EXPECT_TRUE(launcher_.spawned.empty());
}

TEST_F(WorkerPoolTest, HandOverStopsRestartsAndShutdownIsFinal) {
  StartPool();
  Crash();  // A restart is due in 100ms...
  pool_->HandOver();
  EXPECT_EQ(pool_->mode(), PoolMode::kHandingOver);
  time_.Advance(absl::Seconds(20));
  EXPECT_EQ(launcher_.spawned.size(), 2u) << "...and never comes";
  EXPECT_TRUE(pool_->Resume().empty());
  pool_->ShutDown();
  EXPECT_TRUE(pool_->shutting_down());
  pool_->Suspend();
  pool_->HandOver();
  EXPECT_EQ(pool_->mode(), PoolMode::kShuttingDown);
  pool_->Reconcile();
  EXPECT_EQ(launcher_.spawned.size(), 2u);
}

TEST_F(WorkerPoolTest, AnOperatorsStartSkipsTheBackoff) {
  StartPool();
  Crash(0);
  Crash(1);  // The streak makes the next restart wait 200ms.
  EXPECT_EQ(pool_->crash_streak(), 2);
  absl::StatusOr<std::vector<uint64_t>> started = pool_->StartNow(1);
  ASSERT_TRUE(started.ok());
  EXPECT_EQ(started->size(), 1u);
  EXPECT_EQ(launcher_.spawned.size(), 3u) << "at once";
}

}  // namespace
}  // namespace fdbroker
