#include "broker/metrics.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <set>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "wire/socket_address.h"
#include "wire/unique_fd.h"

namespace fdbroker {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

const char* GrpcCodeName(int code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  if (code < 0 || code > 16) return "UNKNOWN";
  return kNames[code];
}

// The family `def` (registering the same family again returns the first:
// the registry merges by name).
template <typename T>
prometheus::Family<T>& Register(prometheus::Registry& registry,
                                const MetricFamilyDef& def) {
  auto builder = [] {
    if constexpr (std::is_same_v<T, prometheus::Counter>) {
      return BuildCounter();
    } else if constexpr (std::is_same_v<T, prometheus::Gauge>) {
      return BuildGauge();
    } else {
      return BuildHistogram();
    }
  }();
  return builder.Name(std::string(def.name))
      .Help(std::string(def.help))
      .Register(registry);
}

template <typename T>
T& Series(prometheus::Registry& registry, const MetricFamilyDef& def,
          absl::string_view label_value) {
  return Register<T>(registry, def)
      .Add({{std::string(def.labels), std::string(label_value)}});
}

// Which object of MetricSources holds a component's Stats.
template <typename Stats>
const Stats& StatsOf(const MetricSources& s);
#define FDBROKER_STATS_OF(Class, member, LIST)          \
  template <>                                           \
  const Class::Stats& StatsOf(const MetricSources& s) { \
    return s.member.stats();                            \
  }
FDBROKER_STATS_COMPONENTS(FDBROKER_STATS_OF)
#undef FDBROKER_STATS_OF

template <typename Stats, uint64_t Stats::*kField>
uint64_t ReadStat(const MetricSources& s) {
  return StatsOf<Stats>(s).*kField;
}

}  // namespace

BrokerMetrics::BrokerMetrics(prometheus::Registry& registry)
    : worker_active_(Register<prometheus::Gauge>(
          registry, metric_family::kWorkerConnectionsActive)),
      control_requests_(Register<prometheus::Counter>(
          registry, metric_family::kControlRequests)),
      listener_accepted_(Register<prometheus::Counter>(
          registry, metric_family::kListenerAccepted)) {
  // Generated from broker/metrics_list.h: each entry becomes one series
  // and the function that reads its value at each Sync().
#define FDBROKER_FEED_COUNTER(field, name, help)                              \
  counters_.push_back({&Register<prometheus::Counter>(                        \
                            registry, {name, MetricType::kCounter, "", help}) \
                            .Add({}),                                         \
                       &ReadStat<Stats, &Stats::field>});
#define FDBROKER_FEED_COUNTER_IN(field, family, label_value)              \
  counters_.push_back({&Series<prometheus::Counter>(                      \
                           registry, metric_family::family, label_value), \
                       &ReadStat<Stats, &Stats::field>});
#define FDBROKER_FEED_NONE(...)
#define FDBROKER_FEED_COMPONENT(Class, member, LIST)                          \
  {                                                                           \
    using Stats = Class::Stats;                                               \
    LIST(FDBROKER_FEED_COUNTER, FDBROKER_FEED_COUNTER_IN, FDBROKER_FEED_NONE) \
  }
#define FDBROKER_FEED_GAUGE(name, help, value)                            \
  gauges_.push_back(                                                      \
      {&Register<prometheus::Gauge>(registry,                             \
                                    {name, MetricType::kGauge, "", help}) \
            .Add({}),                                                     \
       [](const MetricSources& s) { return static_cast<double>(value); }});
#define FDBROKER_FEED_GAUGE_IN(family, label_value, value)         \
  gauges_.push_back(                                               \
      {&Series<prometheus::Gauge>(registry, metric_family::family, \
                                  label_value),                    \
       [](const MetricSources& s) { return static_cast<double>(value); }});
#define FDBROKER_FEED_HISTOGRAM(name, help, source)             \
  histograms_.push_back(                                        \
      {&Register<prometheus::Histogram>(                        \
            registry, {name, MetricType::kHistogram, "", help}) \
            .Add({}, prometheus::Histogram::BucketBoundaries(   \
                         LatencyHistogram::kBounds.begin(),     \
                         LatencyHistogram::kBounds.end())),     \
       [](const MetricSources& s) -> const LatencyHistogram& {  \
         return source;                                         \
       }});
  FDBROKER_STATS_COMPONENTS(FDBROKER_FEED_COMPONENT)
  FDBROKER_GAUGES(FDBROKER_FEED_GAUGE, FDBROKER_FEED_GAUGE_IN)
  FDBROKER_HISTOGRAMS(FDBROKER_FEED_HISTOGRAM)
#undef FDBROKER_FEED_COUNTER
#undef FDBROKER_FEED_COUNTER_IN
#undef FDBROKER_FEED_NONE
#undef FDBROKER_FEED_COMPONENT
#undef FDBROKER_FEED_GAUGE
#undef FDBROKER_FEED_GAUGE_IN
#undef FDBROKER_FEED_HISTOGRAM
}

void BrokerMetrics::Sync(const Listener& listener,
                         const WorkerRegistry& registry,
                         const ConnectionDispatcher& dispatcher,
                         const WorkerManager& manager) {
  const MetricSources s{listener, registry, dispatcher, manager};
  for (CounterFeed& feed : counters_) {
    // Adds what the stat grew by since the last sync.
    const uint64_t now = feed.read(s);
    if (now > feed.synced) {
      feed.counter->Increment(static_cast<double>(now - feed.synced));
    }
    feed.synced = now;
  }
  for (HistogramFeed& feed : histograms_) {
    const LatencyHistogram& latency = feed.read(s);
    std::vector<double> increments(latency.counts().size());
    bool grew = false;
    for (size_t i = 0; i < increments.size(); ++i) {
      increments[i] = static_cast<double>(latency.counts()[i] - feed.synced[i]);
      grew |= increments[i] > 0;
    }
    if (grew) {
      feed.histogram->ObserveMultiple(increments,
                                      latency.sum_seconds() - feed.synced_sum);
      feed.synced = latency.counts();
      feed.synced_sum = latency.sum_seconds();
    }
  }
  for (const GaugeFeed& feed : gauges_) feed.gauge->Set(feed.read(s));
  SyncWorkerGauges(registry);
  SyncListenerCounters(listener);
}

void BrokerMetrics::SyncListenerCounters(const Listener& listener) {
  // A broker's listeners are fixed (--listen), so the series are bounded.
  for (size_t i = 0; i < listener.size(); ++i) {
    auto it = listener_counters_.find(listener.name(i));
    if (it == listener_counters_.end()) {
      prometheus::Counter* counter = &listener_accepted_.Add(
          {{std::string(metric_family::kListenerAccepted.labels),
            listener.name(i)}});
      it = listener_counters_.emplace(listener.name(i), std::pair{counter, 0})
               .first;
    }
    auto& [counter, synced] = it->second;
    const uint64_t now = listener.accepted(i);
    if (now > synced) counter->Increment(static_cast<double>(now - synced));
    synced = now;
  }
}

void BrokerMetrics::SyncWorkerGauges(const WorkerRegistry& registry) {
  std::set<uint64_t> present;
  for (const auto& [id, worker] : registry.workers()) {
    present.insert(id);
    auto it = worker_gauges_.find(id);
    if (it == worker_gauges_.end()) {
      it =
          worker_gauges_
              .emplace(
                  id, &worker_active_.Add(
                          {{std::string(
                                metric_family::kWorkerConnectionsActive.labels),
                            absl::StrCat(id)}}))
              .first;
    }
    it->second->Set(static_cast<double>(worker->active()));
  }
  // Bounded labels: a worker's series goes with the worker.
  for (auto it = worker_gauges_.begin(); it != worker_gauges_.end();) {
    if (present.count(it->first) == 0) {
      worker_active_.Remove(it->second);
      it = worker_gauges_.erase(it);
    } else {
      ++it;
    }
  }
}

void BrokerMetrics::CountControlRequest(absl::string_view method,
                                        int grpc_code) {
  control_requests_
      .Add({{"method", std::string(method)}, {"code", GrpcCodeName(grpc_code)}})
      .Increment();
}

namespace {

// One connection to `address` (a wildcard means the loopback), closed at
// once; waits at most 100 ms.
void Poke(wire::SocketAddress address) {
  if (address.IsWildcard()) {
    if (address.family() == AF_INET6) {
      reinterpret_cast<sockaddr_in6*>(&address.storage)->sin6_addr =
          in6addr_loopback;
    } else {
      reinterpret_cast<sockaddr_in*>(&address.storage)->sin_addr.s_addr =
          htonl(INADDR_LOOPBACK);
    }
  }
  wire::UniqueFd fd(::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return;
  const timeval timeout{0, 100'000};  // connect() honours SO_SNDTIMEO.
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  (void)::connect(fd.get(), address.addr(), address.length);
}

}  // namespace

MetricsServer::~MetricsServer() {
  absl::StatusOr<wire::SocketAddress> address =
      wire::SocketAddress::Parse(address_);
  if (exposer_ == nullptr || !address.ok()) return;
  // civetweb's mg_stop() sets a flag and waits for its master thread, which
  // sees the flag only when its poll() of the listening socket returns: at
  // a connection, or after 2 s (1.7 s measured per stop, during which an
  // upgrade's new broker waits for the port and a stopping broker for its
  // exit). Connections while it stops wake it: 10 ms.
  std::atomic<bool> stopped{false};
  std::thread waker([&stopped, address = *address] {
    while (!stopped.load()) {
      Poke(address);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  exposer_.reset();
  stopped = true;
  waker.join();
}

void MetricsServer::Register(
    std::weak_ptr<prometheus::Collectable> collectable) {
  exposer_->RegisterCollectable(collectable);
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& address,
    std::weak_ptr<prometheus::Collectable> collectable) {
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  try {
    // civetweb reports a failed bind by throwing; it is caught right here.
    server->exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  server->exposer_->RegisterCollectable(collectable);
  const std::vector<int> ports = server->exposer_->GetListeningPorts();
  absl::StatusOr<wire::HostPort> asked = wire::HostPort::Parse(address);
  server->address_ =
      wire::HostPort{asked.ok() ? asked->host : "",
                     static_cast<uint16_t>(ports.empty() ? 0 : ports.front())}
          .ToString();
  return server;
}

}  // namespace fdbroker
