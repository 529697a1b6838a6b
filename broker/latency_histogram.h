#ifndef FDBROKER_BROKER_LATENCY_HISTOGRAM_H_
#define FDBROKER_BROKER_LATENCY_HISTOGRAM_H_

#include <algorithm>
#include <array>
#include <cstdint>

namespace fdbroker {

// Plain (non-atomic) histogram of hand-off latencies, owned by the loop
// thread. The metrics sync moves its growth into the Prometheus histogram,
// so the data path pays one array increment per connection.
class LatencyHistogram {
 public:
  // Upper bounds in seconds: microseconds to seconds.
  static constexpr std::array<double, 19> kBounds = {
      1e-5,   2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
      2.5e-2, 5e-2,   0.1,  0.25, 0.5,    1,    2.5,  5,      10};

  void Observe(int64_t nanos) {
    const double seconds = static_cast<double>(nanos) * 1e-9;
    const size_t bucket = static_cast<size_t>(
        std::lower_bound(kBounds.begin(), kBounds.end(), seconds) -
        kBounds.begin());
    ++counts_[bucket];
    sum_seconds_ += seconds;
  }
  // counts()[i] counts observations <= kBounds[i] (and > kBounds[i-1]); the
  // last entry is the +Inf bucket.
  const std::array<uint64_t, kBounds.size() + 1>& counts() const {
    return counts_;
  }
  double sum_seconds() const { return sum_seconds_; }

 private:
  std::array<uint64_t, kBounds.size() + 1> counts_{};
  double sum_seconds_ = 0;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_LATENCY_HISTOGRAM_H_
