#ifndef FDBROKER_BROKER_RATE_WINDOW_H_
#define FDBROKER_BROKER_RATE_WINDOW_H_

#include <cstdint>
#include <deque>
#include <utility>

namespace fdbroker {

// The rate of a monotonic counter over a sliding window, from periodic
// samples (the loop samples once a second; GetLoad reports over 10 s).
class RateWindow {
 public:
  explicit RateWindow(int64_t window_nanos) : window_nanos_(window_nanos) {}

  // Records the counter's value at `now_nanos` (monotonic clock).
  void Sample(int64_t now_nanos, uint64_t value);
  // Per second between the oldest sample inside the window and `value` now;
  // 0 without an earlier sample.
  double PerSecond(int64_t now_nanos, uint64_t value) const;

 private:
  int64_t window_nanos_;
  std::deque<std::pair<int64_t, uint64_t>> samples_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_RATE_WINDOW_H_
