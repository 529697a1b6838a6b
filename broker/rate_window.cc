#include "broker/rate_window.h"

namespace fdbroker {

void RateWindow::Sample(int64_t now_nanos, uint64_t value) {
  samples_.emplace_back(now_nanos, value);
  // Keep one sample at or beyond the window's start as the baseline.
  while (samples_.size() > 1 &&
         now_nanos - samples_[1].first >= window_nanos_) {
    samples_.pop_front();
  }
}

double RateWindow::PerSecond(int64_t now_nanos, uint64_t value) const {
  for (const auto& [when, then_value] : samples_) {
    if (now_nanos - when <= window_nanos_ && now_nanos > when) {
      return static_cast<double>(value - then_value) * 1e9 /
             static_cast<double>(now_nanos - when);
    }
  }
  return 0;
}

}  // namespace fdbroker
