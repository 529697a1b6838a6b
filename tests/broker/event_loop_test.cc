#include "broker/event_loop.h"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/broker/simulated_time.h"

namespace fdbroker {
namespace {

TEST(EventLoopTest, TimersFireInDeadlineOrderAndCancelWorks) {
  auto loop = *EventLoop::Create();
  std::vector<int> order;
  loop->RunAfter(absl::Milliseconds(20), [&] { order.push_back(2); });
  loop->RunAfter(absl::Milliseconds(5), [&] { order.push_back(1); });
  EventLoop::TimerId cancelled =
      loop->RunAfter(absl::Milliseconds(10), [&] { order.push_back(99); });
  loop->Cancel(cancelled);
  loop->RunAfter(absl::Milliseconds(30), [&] { loop->Stop(); });
  const int64_t start = loop->clock().MonotonicNanos();
  loop->Run();
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  EXPECT_GE(loop->clock().MonotonicNanos() - start, 30'000'000);
}

TEST(EventLoopTest, PostFromAnotherThreadRunsOnTheLoop) {
  auto loop = *EventLoop::Create();
  std::atomic<bool> ran_on_loop{false};
  std::thread poster([&] {
    loop->Post([&] {
      ran_on_loop = loop->IsLoopThread();
      loop->Stop();
    });
  });
  loop->Run();
  poster.join();
  EXPECT_TRUE(ran_on_loop);
}

TEST(EventLoopTest, UnwatchingAnotherFdInsideACallbackIsSafe) {
  auto loop = *EventLoop::Create();
  int a[2], b[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, a), 0);
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, b), 0);
  wire::UniqueFd a0(a[0]), a1(a[1]), b0(b[0]), b1(b[1]);
  // Both fds are readable in the same batch; whichever runs first destroys
  // the other's watch, which must then never be called.
  std::unique_ptr<IoWatch> wa, wb;
  int calls = 0;
  wa = *loop->Watch(a0.get(), EPOLLIN, [&](uint32_t) {
    ++calls;
    wb.reset();
    wa.reset();
  });
  wb = *loop->Watch(b0.get(), EPOLLIN, [&](uint32_t) {
    ++calls;
    wa.reset();
    wb.reset();
  });
  ASSERT_EQ(::write(a1.get(), "x", 1), 1);
  ASSERT_EQ(::write(b1.get(), "x", 1), 1);
  loop->RunAfter(absl::Milliseconds(20), [&] { loop->Stop(); });
  loop->Run();
  EXPECT_EQ(calls, 1);
}

TEST(EventLoopTest, RunSoonRunsAfterTheCurrentCallback) {
  auto loop = *EventLoop::Create();
  std::vector<int> order;
  loop->RunAfter(absl::ZeroDuration(), [&] {
    loop->RunSoon([&] {
      order.push_back(2);
      loop->Stop();
    });
    order.push_back(1);
  });
  loop->Run();
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

TEST(TimerTest, FiresOnceAtItsDeadline) {
  SimulatedTime time;
  Timer timer(time.loop());
  int fired = 0;
  EXPECT_FALSE(timer.armed());
  timer.Arm(absl::Milliseconds(100), [&] { ++fired; });
  EXPECT_TRUE(timer.armed());
  time.Advance(absl::Milliseconds(99));
  EXPECT_EQ(fired, 0);
  time.Advance(absl::Milliseconds(1));
  EXPECT_EQ(fired, 1);
  EXPECT_FALSE(timer.armed()) << "fired";
  time.Advance(absl::Seconds(10));
  EXPECT_EQ(fired, 1);
}

TEST(TimerTest, RearmingReplacesTheArmedTask) {
  SimulatedTime time;
  Timer timer(time.loop());
  std::vector<int> fired;
  timer.Arm(absl::Milliseconds(100), [&] { fired.push_back(1); });
  timer.Arm(absl::Milliseconds(300), [&] { fired.push_back(2); });
  time.Advance(absl::Milliseconds(200));
  EXPECT_TRUE(fired.empty()) << "the first task was cancelled";
  time.Advance(absl::Milliseconds(100));
  EXPECT_EQ(fired, (std::vector<int>{2}));
}

TEST(TimerTest, CancelAndDestructionDisarm) {
  SimulatedTime time;
  int fired = 0;
  Timer cancelled(time.loop());
  cancelled.Arm(absl::Milliseconds(10), [&] { ++fired; });
  cancelled.Cancel();
  EXPECT_FALSE(cancelled.armed());
  cancelled.Cancel();  // Not armed: nothing to do.
  {
    Timer destroyed(time.loop());
    destroyed.Arm(absl::Milliseconds(10), [&] { ++fired; });
  }
  time.Advance(absl::Seconds(1));
  EXPECT_EQ(fired, 0);
}

TEST(TimerTest, ItsTaskMayRearmOrDestroyIt) {
  SimulatedTime time;
  Timer ticker(time.loop());
  int ticks = 0;
  std::function<void()> tick = [&] {
    ++ticks;
    ticker.Arm(absl::Milliseconds(100), tick);
  };
  ticker.Arm(absl::Milliseconds(100), tick);
  time.Advance(absl::Milliseconds(350));
  EXPECT_EQ(ticks, 3);
  EXPECT_TRUE(ticker.armed());

  auto once = std::make_unique<Timer>(time.loop());
  bool ran = false;
  once->Arm(absl::Milliseconds(10), [&] {
    once.reset();  // The owner goes away from inside the task.
    ran = true;
  });
  time.Advance(absl::Milliseconds(10));
  EXPECT_TRUE(ran);
  EXPECT_EQ(once, nullptr);
}

}  // namespace
}  // namespace fdbroker
