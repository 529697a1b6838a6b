#ifndef FDBROKER_BROKER_PROCESS_METRICS_H_
#define FDBROKER_BROKER_PROCESS_METRICS_H_

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <vector>

namespace fdbroker {

// The standard process_* metrics, read from /proc/self at scrape time (on
// the exposer's thread): open and max fds, resident and virtual memory, CPU
// seconds and start time.
class ProcessMetrics final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_PROCESS_METRICS_H_
