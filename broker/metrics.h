#ifndef FDBROKER_BROKER_METRICS_H_
#define FDBROKER_BROKER_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "broker/connection_dispatcher.h"
#include "broker/listener.h"
#include "broker/worker_manager.h"
#include "broker/worker_registry.h"

namespace fdbroker {

// The broker's Prometheus metrics (prefix fdbroker_; see docs/metrics in the
// README). The data plane never touches them: it keeps plain integer stats,
// and Sync() — on the loop thread, twice a second — moves their growth into
// the Prometheus objects. Scrapes run on the exposer's thread and only read
// those (prometheus-cpp synchronises), so collection never blocks the loop.
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
  // Adds what `now` grew by since the last call.
  static void Advance(prometheus::Counter& counter, uint64_t now,
                      uint64_t& last);

  prometheus::Counter& accepted_;
  prometheus::Counter& handed_off_;
  prometheus::Family<prometheus::Counter>& failures_;
  prometheus::Counter& failure_worker_lost_;
  prometheus::Counter& failure_rejected_;
  prometheus::Counter& failure_send_error_;
  prometheus::Counter& failure_channel_full_;
  prometheus::Counter& failure_attempts_;
  prometheus::Counter& rejected_overload_;
  prometheus::Counter& rejected_shutdown_;
  prometheus::Counter& restarts_;
  prometheus::Counter& crashes_;
  prometheus::Counter& lost_;
  prometheus::Counter& accept_pauses_;
  prometheus::Counter& protocol_errors_;
  prometheus::Counter& migrated_rebalance_;
  prometheus::Counter& migrated_drain_;
  prometheus::Gauge& active_;
  prometheus::Gauge& pending_;
  prometheus::Gauge& unacked_;
  prometheus::Gauge& accepting_;
  prometheus::Gauge& restart_loop_;
  prometheus::Gauge& workers_starting_;
  prometheus::Gauge& workers_ready_;
  prometheus::Gauge& workers_draining_;
  prometheus::Family<prometheus::Gauge>& worker_active_;
  prometheus::Histogram& latency_;
  prometheus::Family<prometheus::Counter>& control_requests_;

  // Loop thread only: what was already moved into the counters.
  struct Last {
    uint64_t accepted = 0, handed_off = 0, worker_lost = 0, rejected = 0,
             send_errors = 0, channel_full = 0, attempts = 0, overload = 0,
             shutdown = 0, restarts = 0, crashes = 0, lost = 0,
             accept_pauses = 0, protocol_errors = 0, migrated_rebalance = 0,
             migrated_drain = 0;
    std::array<uint64_t, LatencyHistogram::kBounds.size() + 1> latency{};
    double latency_sum = 0;
  } last_;
  std::map<uint64_t, prometheus::Gauge*> worker_gauges_;
};

// Serves the registry over HTTP (GET /metrics) on its own thread.
class MetricsServer {
 public:
  // `address` is HOST:PORT; port 0 picks one.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& address,
      std::weak_ptr<prometheus::Collectable> collectable);
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
