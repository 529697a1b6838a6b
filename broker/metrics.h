#ifndef FDBROKER_BROKER_METRICS_H_
#define FDBROKER_BROKER_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "broker/connection_dispatcher.h"
#include "broker/latency_histogram.h"
#include "broker/listener.h"
#include "broker/worker_manager.h"
#include "broker/worker_registry.h"

namespace fdbroker {

// What the metrics are read from (the `s` of the expressions in
// broker/metrics_list.h). Loop thread only.
struct MetricSources {
  const Listener& listener;
  const WorkerRegistry& registry;
  const ConnectionDispatcher& dispatcher;
  const WorkerManager& manager;
};

// The broker's Prometheus metrics (prefix fdbroker_; declared in
// broker/metrics_list.h, listed in the README). The data plane never touches
// them: it keeps plain integer stats, and Sync() — on the loop thread, twice
// a second — moves their growth into the Prometheus objects. Scrapes run on
// the exposer's thread and only read those (prometheus-cpp synchronises), so
// collection never blocks the loop.
class BrokerMetrics {
 public:
  explicit BrokerMetrics(prometheus::Registry& registry);

  // Loop thread: brings every metric up to date with the parts' stats.
  void Sync(const Listener& listener, const WorkerRegistry& registry,
            const ConnectionDispatcher& dispatcher,
            const WorkerManager& manager);

  // Any thread (gRPC): one finished control RPC.
  void CountControlRequest(absl::string_view method, int grpc_code);

 private:
  // A counter fed by one Stats field; `synced` is what was already moved
  // into it (loop thread only).
  struct CounterFeed {
    prometheus::Counter* counter;
    uint64_t (*read)(const MetricSources& s);
    uint64_t synced = 0;
  };
  struct GaugeFeed {
    prometheus::Gauge* gauge;
    double (*read)(const MetricSources& s);
  };
  struct HistogramFeed {
    prometheus::Histogram* histogram;
    const LatencyHistogram& (*read)(const MetricSources& s);
    std::array<uint64_t, LatencyHistogram::kBounds.size() + 1> synced{};
    double synced_sum = 0;
  };

  void SyncWorkerGauges(const WorkerRegistry& registry);
  void SyncListenerCounters(const Listener& listener);

  std::vector<CounterFeed> counters_;
  std::vector<GaugeFeed> gauges_;
  std::vector<HistogramFeed> histograms_;
  prometheus::Family<prometheus::Gauge>& worker_active_;
  prometheus::Family<prometheus::Counter>& control_requests_;
  std::map<uint64_t, prometheus::Gauge*> worker_gauges_;
  prometheus::Family<prometheus::Counter>& listener_accepted_;
  // By listener name: the series and what was already moved into it.
  std::map<std::string, std::pair<prometheus::Counter*, uint64_t>>
      listener_counters_;
};

// Serves the registry over HTTP (GET /metrics) on its own thread.
class MetricsServer {
 public:
  // `address` is HOST:PORT; port 0 picks one.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& address,
      std::weak_ptr<prometheus::Collectable> collectable);
  // Stops serving: about 10 ms, not civetweb's 1.7 s (see the .cc).
  ~MetricsServer();
  const std::string& address() const { return address_; }
  // Adds another source of metrics (e.g. ProcessMetrics).
  void Register(std::weak_ptr<prometheus::Collectable> collectable);

 private:
  MetricsServer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string address_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_METRICS_H_
