#include "broker/event_loop.h"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

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

}  // namespace
}  // namespace fdbroker
