#ifndef FDBROKER_BROKER_CLOCK_H_
#define FDBROKER_BROKER_CLOCK_H_

#include <cstdint>

#include "absl/time/time.h"

namespace fdbroker {

// The data plane's source of time (Envoy's TimeSource). Every timer,
// deadline and timestamp of the broker's loop-thread parts comes from the
// EventLoop's clock, so tests can run them in simulated time
// (tests/broker/simulated_time.h) instead of sleeping.
//
// Cost: the loop reads MonotonicNanos() once per turn and caches it
// (EventLoop::NowNanos()); the accept path makes one UnixNanos() call per
// connection, as it made one clock_gettime(CLOCK_REALTIME) before.
class Clock {
 public:
  virtual ~Clock() = default;

  // CLOCK_MONOTONIC in nanoseconds: deadlines, timers, durations.
  virtual int64_t MonotonicNanos() = 0;
  // CLOCK_REALTIME in nanoseconds since the Unix epoch: timestamps that
  // leave the process (accept time, Drain deadlines, events).
  virtual int64_t UnixNanos() = 0;

  absl::Time Now() { return absl::FromUnixNanos(UnixNanos()); }
};

// The system's clocks (clock_gettime through the vDSO; no syscall).
class RealClock final : public Clock {
 public:
  int64_t MonotonicNanos() override;
  int64_t UnixNanos() override;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_CLOCK_H_
