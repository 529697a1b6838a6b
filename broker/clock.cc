#include "broker/clock.h"

#include <time.h>

namespace fdbroker {
namespace {

int64_t Read(clockid_t id) {
  timespec ts;
  ::clock_gettime(id, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace

int64_t RealClock::MonotonicNanos() { return Read(CLOCK_MONOTONIC); }

int64_t RealClock::UnixNanos() { return Read(CLOCK_REALTIME); }

}  // namespace fdbroker
