#include "broker/metrics.h"

#include <exception>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "wire/socket_address.h"

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

prometheus::Family<prometheus::Counter>& Failures(prometheus::Registry& r) {
  return BuildCounter()
      .Name("fdbroker_handoff_failures_total")
      .Help(
          "Hand-off attempts that did not end in an Ack, by reason "
          "(the connection is re-placed unless the reason is "
          "too_many_attempts).")
      .Register(r);
}

prometheus::Family<prometheus::Counter>& Rejected(prometheus::Registry& r) {
  return BuildCounter()
      .Name("fdbroker_connections_rejected_total")
      .Help("Accepted connections closed without being served, by reason.")
      .Register(r);
}

prometheus::Family<prometheus::Counter>& Migrated(prometheus::Registry& r) {
  return BuildCounter()
      .Name("fdbroker_connections_migrated_total")
      .Help(
          "Idle connections a worker released and another worker acked, by "
          "reason (rebalance, drain).")
      .Register(r);
}

prometheus::Family<prometheus::Gauge>& Workers(prometheus::Registry& r) {
  return BuildGauge()
      .Name("fdbroker_workers")
      .Help("Registered and starting workers, by state.")
      .Register(r);
}

}  // namespace

BrokerMetrics::BrokerMetrics(prometheus::Registry& registry)
    : accepted_(BuildCounter()
                    .Name("fdbroker_connections_accepted_total")
                    .Help("Client connections accepted.")
                    .Register(registry)
                    .Add({})),
      handed_off_(BuildCounter()
                      .Name("fdbroker_connections_handed_off_total")
                      .Help("Client connections acked by a worker.")
                      .Register(registry)
                      .Add({})),
      failures_(Failures(registry)),
      failure_worker_lost_(failures_.Add({{"reason", "worker_lost"}})),
      failure_rejected_(failures_.Add({{"reason", "rejected_by_worker"}})),
      failure_send_error_(failures_.Add({{"reason", "send_error"}})),
      failure_channel_full_(failures_.Add({{"reason", "channel_full"}})),
      failure_attempts_(failures_.Add({{"reason", "too_many_attempts"}})),
      rejected_overload_(Rejected(registry).Add({{"reason", "overload"}})),
      rejected_shutdown_(Rejected(registry).Add({{"reason", "shutdown"}})),
      restarts_(BuildCounter()
                    .Name("fdbroker_worker_restarts_total")
                    .Help("Supervised workers started to replace failed ones.")
                    .Register(registry)
                    .Add({})),
      crashes_(BuildCounter()
                   .Name("fdbroker_worker_crashes_total")
                   .Help("Supervised workers that exited unexpectedly.")
                   .Register(registry)
                   .Add({})),
      lost_(BuildCounter()
                .Name("fdbroker_connections_lost_total")
                .Help("Connections a worker owned when it crashed (the "
                      "only way an accepted connection can go unserved "
                      "besides rejected_total).")
                .Register(registry)
                .Add({})),
      accept_pauses_(BuildCounter()
                         .Name("fdbroker_accept_pauses_total")
                         .Help("Times accepting paused for lack of fds "
                               "(EMFILE, ENFILE, ENOBUFS, ENOMEM).")
                         .Register(registry)
                         .Add({})),
      protocol_errors_(BuildCounter()
                           .Name("fdbroker_protocol_errors_total")
                           .Help("Worker channels closed for a protocol "
                                 "violation.")
                           .Register(registry)
                           .Add({})),
      migrated_rebalance_(Migrated(registry).Add({{"reason", "rebalance"}})),
      migrated_drain_(Migrated(registry).Add({{"reason", "drain"}})),
      active_(BuildGauge()
                  .Name("fdbroker_connections_active")
                  .Help("Connections owned by workers (acked, not closed).")
                  .Register(registry)
                  .Add({})),
      pending_(BuildGauge()
                   .Name("fdbroker_pending_connections")
                   .Help("Accepted connections waiting for a worker.")
                   .Register(registry)
                   .Add({})),
      unacked_(BuildGauge()
                   .Name("fdbroker_unacked_connections")
                   .Help("Connections sent to workers and not acked yet.")
                   .Register(registry)
                   .Add({})),
      accepting_(BuildGauge()
                     .Name("fdbroker_accepting")
                     .Help("1 while the broker takes new connections.")
                     .Register(registry)
                     .Add({})),
      restart_loop_(BuildGauge()
                        .Name("fdbroker_worker_restart_loop")
                        .Help("1 while workers keep failing soon after "
                              "start (3 or more in a row).")
                        .Register(registry)
                        .Add({})),
      workers_starting_(Workers(registry).Add({{"state", "starting"}})),
      workers_ready_(Workers(registry).Add({{"state", "ready"}})),
      workers_draining_(Workers(registry).Add({{"state", "draining"}})),
      worker_active_(BuildGauge()
                         .Name("fdbroker_worker_connections_active")
                         .Help("Connections owned by each worker.")
                         .Register(registry)),
      latency_(BuildHistogram()
                   .Name("fdbroker_handoff_latency_seconds")
                   .Help("From accept to the worker's Ack.")
                   .Register(registry)
                   .Add({}, prometheus::Histogram::BucketBoundaries(
                                LatencyHistogram::kBounds.begin(),
                                LatencyHistogram::kBounds.end()))),
      control_requests_(BuildCounter()
                            .Name("fdbroker_control_requests_total")
                            .Help("Control-plane RPCs, by method and code.")
                            .Register(registry)) {}

void BrokerMetrics::Advance(prometheus::Counter& counter, uint64_t now,
                            uint64_t& last) {
  if (now > last) counter.Increment(static_cast<double>(now - last));
  last = now;
}

void BrokerMetrics::Sync(const Listener& listener,
                         const WorkerRegistry& registry,
                         const ConnectionDispatcher& dispatcher,
                         const WorkerManager& manager) {
  const ConnectionDispatcher::Stats& d = dispatcher.stats();
  Advance(accepted_, d.dispatched, last_.accepted);
  Advance(handed_off_, d.handed_off, last_.handed_off);
  Advance(failure_worker_lost_, d.worker_lost, last_.worker_lost);
  Advance(failure_rejected_, d.rejected_by_worker, last_.rejected);
  Advance(failure_send_error_, d.send_errors, last_.send_errors);
  Advance(failure_channel_full_, d.send_would_block, last_.channel_full);
  Advance(failure_attempts_, d.failed_attempts, last_.attempts);
  Advance(rejected_overload_, d.rejected_overload, last_.overload);
  Advance(rejected_shutdown_, d.rejected_shutdown, last_.shutdown);
  Advance(migrated_rebalance_, d.migrated_rebalance, last_.migrated_rebalance);
  Advance(migrated_drain_, d.migrated_drain, last_.migrated_drain);
  const WorkerManager::Stats& m = manager.stats();
  Advance(restarts_, m.restarts, last_.restarts);
  Advance(crashes_, m.crashes, last_.crashes);
  Advance(lost_, m.lost_with_worker, last_.lost);
  Advance(protocol_errors_, m.protocol_errors, last_.protocol_errors);
  Advance(accept_pauses_, listener.stats().exhaustion_pauses,
          last_.accept_pauses);

  const LatencyHistogram& latency = dispatcher.latency();
  std::vector<double> increments(latency.counts().size());
  bool grew = false;
  for (size_t i = 0; i < increments.size(); ++i) {
    increments[i] = static_cast<double>(latency.counts()[i] - last_.latency[i]);
    grew |= increments[i] > 0;
  }
  if (grew) {
    latency_.ObserveMultiple(increments,
                             latency.sum_seconds() - last_.latency_sum);
    last_.latency = latency.counts();
    last_.latency_sum = latency.sum_seconds();
  }

  int64_t unacked = 0;
  std::set<uint64_t> present;
  for (const auto& [id, worker] : registry.workers()) {
    unacked += worker->unacked;
    present.insert(id);
    auto it = worker_gauges_.find(id);
    if (it == worker_gauges_.end()) {
      it = worker_gauges_
               .emplace(id, &worker_active_.Add({{"worker", absl::StrCat(id)}}))
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
  active_.Set(static_cast<double>(registry.TotalActive()));
  unacked_.Set(static_cast<double>(unacked));
  pending_.Set(static_cast<double>(dispatcher.pending()));
  accepting_.Set(listener.accepting() && !manager.shutting_down() ? 1 : 0);
  restart_loop_.Set(manager.in_restart_loop() ? 1 : 0);
  workers_starting_.Set(
      static_cast<double>(registry.CountInState(WorkerState::kStarting)));
  workers_ready_.Set(
      static_cast<double>(registry.CountInState(WorkerState::kReady)));
  workers_draining_.Set(
      static_cast<double>(registry.CountInState(WorkerState::kDraining)));
}

void BrokerMetrics::CountControlRequest(absl::string_view method,
                                        int grpc_code) {
  control_requests_
      .Add({{"method", std::string(method)}, {"code", GrpcCodeName(grpc_code)}})
      .Increment();
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
