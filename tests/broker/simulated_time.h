#ifndef FDBROKER_TESTS_BROKER_SIMULATED_TIME_H_
#define FDBROKER_TESTS_BROKER_SIMULATED_TIME_H_

#include <cstdint>
#include <memory>
#include <optional>

#include "absl/time/time.h"
#include "broker/clock.h"
#include "broker/event_loop.h"
#include "gtest/gtest.h"

namespace fdbroker {

// A clock that moves only when the test says so.
class FakeClock final : public Clock {
 public:
  int64_t MonotonicNanos() override { return mono_nanos_; }
  int64_t UnixNanos() override { return unix_nanos_; }
  void Advance(absl::Duration d) {
    mono_nanos_ += absl::ToInt64Nanoseconds(d);
    unix_nanos_ += absl::ToInt64Nanoseconds(d);
  }

 private:
  // Arbitrary, but not zero: code must not rely on the origin.
  int64_t mono_nanos_ = int64_t{1000} * 1000000000;
  int64_t unix_nanos_ = absl::ToUnixNanos(absl::FromCivil(
      absl::CivilSecond(2030, 1, 1, 0, 0, 0), absl::UTCTimeZone()));
};

// An EventLoop on a FakeClock, driven by the test (Envoy's simulated time):
// time passes only in Advance(), which stops at every timer deadline on the
// way, so each timer runs at exactly the time it was due and the timers it
// arms fire in order. I/O between real fds (socketpairs) is processed by
// RunUntilIdle() without waiting.
class SimulatedTime {
 public:
  SimulatedTime() : loop_(*EventLoop::Create(clock_)) {}

  EventLoop& loop() { return *loop_; }
  FakeClock& clock() { return clock_; }
  // Simulated time elapsed since construction.
  absl::Duration Elapsed() {
    return absl::Nanoseconds(clock_.MonotonicNanos() - start_nanos_);
  }

  // Runs loop turns until one does nothing.
  void RunUntilIdle() {
    for (int turns = 0; loop_->RunOnce() > 0; ++turns) {
      ASSERT_LT(turns, 100000) << "the loop never goes idle";
    }
  }

  // Lets `d` of simulated time pass.
  void Advance(absl::Duration d) {
    const int64_t target =
        clock_.MonotonicNanos() + absl::ToInt64Nanoseconds(d);
    RunUntilIdle();
    for (int steps = 0;; ++steps) {
      ASSERT_LT(steps, 1000000) << "timers keep re-arming at the same time";
      const std::optional<int64_t> next = loop_->NextTimerNanos();
      if (!next.has_value() || *next > target) break;
      if (*next > clock_.MonotonicNanos()) {
        clock_.Advance(absl::Nanoseconds(*next - clock_.MonotonicNanos()));
      }
      RunUntilIdle();
    }
    clock_.Advance(absl::Nanoseconds(target - clock_.MonotonicNanos()));
    RunUntilIdle();
  }

 private:
  FakeClock clock_;
  const int64_t start_nanos_ = clock_.MonotonicNanos();
  std::unique_ptr<EventLoop> loop_;
};

}  // namespace fdbroker

#endif  // FDBROKER_TESTS_BROKER_SIMULATED_TIME_H_
