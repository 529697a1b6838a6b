#ifndef FDBROKER_BROKER_METRICS_LIST_H_
#define FDBROKER_BROKER_METRICS_LIST_H_

#include "absl/strings/string_view.h"

// Every metric the broker exports, declared once, in the manner of Envoy's
// stat macros. The lists below expand into
//   - each component's `Stats` struct: plain uint64_t fields that the data
//     plane increments on the loop thread (it never sees Prometheus);
//   - BrokerMetrics (broker/metrics.cc): the Prometheus registration, and
//     Sync(), which moves the stats' growth into it on the loop thread;
//   - kDeclaredMetricFamilies, which tests/broker/metrics_list_test.cc checks
//     against tests/deploy/exported_metrics.txt.
// A new counter is one line in its component's list and the `++` where it
// happens. Names, types, labels and help texts are a contract: the
// dashboard and the alerting rules in deploy/ query them.
//
// The entries of a component's list (the first argument is the field):
//   COUNTER(field, name, help)             a counter family of one series
//   COUNTER_IN(field, family, label_value) one series of a labelled family
//                                          (FDBROKER_METRIC_FAMILIES)
//   INTERNAL(field, doc)                   kept for logs, tests and GetLoad;
//                                          not exported

#define FDBROKER_LISTENER_STATS(COUNTER, COUNTER_IN, INTERNAL)                \
  INTERNAL(accepted, "Connections accept4 returned.")                         \
  COUNTER(exhaustion_pauses, "fdbroker_accept_pauses_total",                  \
          "Times accepting paused for lack of fds (EMFILE, ENFILE, ENOBUFS, " \
          "ENOMEM).")                                                         \
  COUNTER_IN(rejected_proxy_protocol, kConnectionsRejected, "proxy_protocol")

#define FDBROKER_DISPATCHER_STATS(COUNTER, COUNTER_IN, INTERNAL)            \
  COUNTER(dispatched, "fdbroker_connections_accepted_total",                \
          "Client connections accepted.")                                   \
  COUNTER(handed_off, "fdbroker_connections_handed_off_total",              \
          "Client connections acked by a worker.")                          \
  INTERNAL(replaced, "Re-placed after a Reject or a lost worker.")          \
  COUNTER_IN(rejected_by_worker, kHandoffFailures, "rejected_by_worker")    \
  COUNTER_IN(rejected_overload, kConnectionsRejected, "overload")           \
  COUNTER_IN(rejected_shutdown, kConnectionsRejected, "shutdown")           \
  COUNTER_IN(failed_attempts, kHandoffFailures, "too_many_attempts")        \
  INTERNAL(batches_sent, "Packets with more than one connection.")          \
  COUNTER_IN(send_would_block, kHandoffFailures, "channel_full")            \
  COUNTER_IN(send_errors, kHandoffFailures, "send_error")                   \
  COUNTER_IN(worker_lost, kHandoffFailures, "worker_lost")                  \
  INTERNAL(released, "Release messages taken.")                             \
  COUNTER_IN(migrated_rebalance, kConnectionsMigrated, "rebalance")         \
  COUNTER_IN(migrated_drain, kConnectionsMigrated, "drain")                 \
  COUNTER_IN(lost_upgrade_deadline, kConnectionsLost, "upgrade_deadline")   \
  COUNTER_IN(lost_release_truncated, kConnectionsLost, "release_truncated") \
  COUNTER_IN(lost_cut_by_worker, kConnectionsLost, "cut_by_worker")

#define FDBROKER_WORKER_MANAGER_STATS(COUNTER, COUNTER_IN, INTERNAL)        \
  INTERNAL(registered, "Hello answered with Welcome.")                      \
  INTERNAL(refused, "Hello answered with a refusal.")                       \
  INTERNAL(readmitted, "Lost channels replaced by the same process's.")     \
  COUNTER(crashes, "fdbroker_worker_crashes_total",                         \
          "Supervised workers that exited unexpectedly.")                   \
  COUNTER(restarts, "fdbroker_worker_restarts_total",                       \
          "Supervised workers started to replace failed ones.")             \
  COUNTER(protocol_errors, "fdbroker_protocol_errors_total",                \
          "Worker channels closed for a protocol violation.")               \
  COUNTER_IN(heartbeat_timeouts, kWorkersDeclaredDead, "heartbeat_timeout") \
  COUNTER_IN(ack_timeouts, kWorkersDeclaredDead, "ack_timeout")             \
  COUNTER_IN(stuck_channels, kWorkersDeclaredDead, "channel_stuck")         \
  COUNTER_IN(worker_timeouts, kWorkersDeclaredDead, "worker_timeout")       \
  COUNTER_IN(lost_worker_crash, kConnectionsLost, "worker_crash")           \
  COUNTER_IN(lost_drain_deadline, kConnectionsLost, "drain_deadline")       \
  COUNTER_IN(lost_shutdown, kConnectionsLost, "shutdown")                   \
  COUNTER_IN(lost_worker_timeout, kConnectionsLost, "worker_timeout")       \
  INTERNAL(restart_loops,                                                   \
           "Restart loops entered (3 workers in a row failed early).")      \
  INTERNAL(rebalances, "Rebalance runs (RPC or automatic).")                \
  INTERNAL(release_requests, "ReleaseRequest messages sent.")               \
  COUNTER(kernel_accepted, "fdbroker_connections_kernel_accepted_total",    \
          "Client connections workers accepted themselves from the "        \
          "listeners granted to them (--placement=kernel), as they report " \
          "them.")                                                          \
  INTERNAL(placement_loads, "Placement programs attached (kernel mode).")   \
  INTERNAL(placement_rebalances,                                            \
           "Rebalances kernel placement asked for (loads stayed uneven).")  \
  COUNTER_IN(recycled_restart, kWorkerRecycles, "restart")                  \
  COUNTER_IN(recycled_max_connections, kWorkerRecycles, "max_connections")  \
  COUNTER_IN(recycled_max_rss, kWorkerRecycles, "max_rss")                  \
  COUNTER_IN(recycled_max_age, kWorkerRecycles, "max_age")                  \
  COUNTER_IN(rolling_restarts_done, kRollingRestarts, "done")               \
  COUNTER_IN(rolling_restarts_failed, kRollingRestarts, "failed")

// The components whose stats feed metrics: COMPONENT(Class, member of
// MetricSources, list). Class::Stats is the struct its list generates.
#define FDBROKER_STATS_COMPONENTS(COMPONENT)                             \
  COMPONENT(ConnectionDispatcher, dispatcher, FDBROKER_DISPATCHER_STATS) \
  COMPONENT(WorkerManager, manager, FDBROKER_WORKER_MANAGER_STATS)       \
  COMPONENT(Listener, listener, FDBROKER_LISTENER_STATS)

// Families with labels: FAMILY(id, type, name, labels, help). The series of
// a family with a fixed set of label values are its COUNTER_IN/GAUGE_IN
// entries (one label, one entry per value); the others (per worker, per
// RPC) add series at run time in broker/metrics.cc.
#define FDBROKER_METRIC_FAMILIES(FAMILY)                                     \
  FAMILY(kHandoffFailures, kCounter, "fdbroker_handoff_failures_total",      \
         "reason",                                                           \
         "Hand-off attempts that did not end in an Ack, by reason (the "     \
         "connection is re-placed unless the reason is too_many_attempts).") \
  FAMILY(kConnectionsRejected, kCounter,                                     \
         "fdbroker_connections_rejected_total", "reason",                    \
         "Accepted connections closed without being served, by reason.")     \
  FAMILY(kConnectionsLost, kCounter, "fdbroker_connections_lost_total",      \
         "reason",                                                           \
         "Connections cut before they were finished, by why: worker_crash "  \
         "(owned by a worker that crashed or was declared dead), "           \
         "worker_timeout (hung past --worker_timeout), "                     \
         "drain_deadline (owned by a worker the broker ended at its drain "  \
         "deadline), cut_by_worker (closed unfinished by the worker itself " \
         "at its drain deadline, as its Closed says), shutdown (owned at "   \
         "the broker's shutdown deadline), upgrade_deadline (unacked when "  \
         "an upgrading broker left), release_truncated (released while "     \
         "the broker was out of fds: the kernel dropped the socket). With "  \
         "rejected_total and handoff_failures_total{reason=\"too_many_"      \
         "attempts\"}, the only ways an accepted connection goes unserved.") \
  FAMILY(kConnectionsMigrated, kCounter,                                     \
         "fdbroker_connections_migrated_total", "reason",                    \
         "Idle connections a worker released and another worker acked, by "  \
         "reason (rebalance, drain).")                                       \
  FAMILY(kWorkersDeclaredDead, kCounter,                                     \
         "fdbroker_workers_declared_dead_total", "reason",                   \
         "Workers the broker cut off (supervised ones killed with their "    \
         "process group), by reason: silent (heartbeat_timeout), holding a " \
         "connection unacked (ack_timeout), not reading (channel_stuck), "   \
         "application thread hung (worker_timeout).")                        \
  FAMILY(kWorkerRecycles, kCounter, "fdbroker_worker_recycles_total",        \
         "reason",                                                           \
         "Supervised workers replaced surge-first (the replacement "         \
         "registered, then the worker drained, its idle connections "        \
         "moving), by reason: restart (RestartWorkers, SIGHUP), "            \
         "max_connections, max_rss, max_age.")                               \
  FAMILY(kRollingRestarts, kCounter, "fdbroker_rolling_restarts_total",      \
         "result",                                                           \
         "Rolling restarts (RestartWorkers, SIGHUP) that ended, by result: " \
         "done, or failed (a replacement did not start or register).")       \
  FAMILY(kControlRequests, kCounter, "fdbroker_control_requests_total",      \
         "method,code", "Control-plane RPCs, by method and code.")           \
  FAMILY(kWorkers, kGauge, "fdbroker_workers", "state",                      \
         "Registered and starting workers, by state.")                       \
  FAMILY(kWorkerConnectionsActive, kGauge,                                   \
         "fdbroker_worker_connections_active", "worker",                     \
         "Connections owned by each worker.")                                \
  FAMILY(kListenerAccepted, kCounter,                                        \
         "fdbroker_listener_connections_accepted_total", "listener",         \
         "Connections each listening socket accepted (named by its bound "   \
         "address, as Connection.listener), PROXY-protocol rejects "         \
         "included.")

// Gauges, set at each sync from the state of the parts: GAUGE(name, help,
// value) and GAUGE_IN(family, label_value, value), where `value` is an
// expression over `const MetricSources& s` (broker/metrics.h).
#define FDBROKER_GAUGES(GAUGE, GAUGE_IN)                                      \
  GAUGE("fdbroker_connections_active",                                        \
        "Connections owned by workers (acked, not closed).",                  \
        s.registry.TotalActive())                                             \
  GAUGE("fdbroker_pending_connections",                                       \
        "Accepted connections waiting for a worker.", s.dispatcher.pending()) \
  GAUGE("fdbroker_unacked_connections",                                       \
        "Connections sent to workers and not acked yet.",                     \
        s.registry.TotalUnacked())                                            \
  GAUGE("fdbroker_accepting", "1 while the broker takes new connections.",    \
        s.listener.accepting() && !s.manager.shutting_down())                 \
  GAUGE("fdbroker_worker_restart_loop",                                       \
        "1 while workers keep failing soon after start (3 or more in a "      \
        "row).",                                                              \
        s.manager.in_restart_loop())                                          \
  GAUGE_IN(kWorkers, "starting",                                              \
           s.registry.CountInState(WorkerState::kStarting))                   \
  GAUGE_IN(kWorkers, "ready", s.registry.CountInState(WorkerState::kReady))   \
  GAUGE_IN(kWorkers, "draining",                                              \
           s.registry.CountInState(WorkerState::kDraining))

// Histograms: HISTOGRAM(name, help, source), `source` a LatencyHistogram
// (whose kBounds are the buckets) over `const MetricSources& s`.
#define FDBROKER_HISTOGRAMS(HISTOGRAM)          \
  HISTOGRAM("fdbroker_handoff_latency_seconds", \
            "From accept to the worker's Ack.", s.dispatcher.latency())

// Expands a component's list into the fields of its Stats struct.
#define FDBROKER_STATS_FIELD(field, ...) uint64_t field = 0;
#define FDBROKER_STATS_STRUCT_FIELDS(LIST) \
  LIST(FDBROKER_STATS_FIELD, FDBROKER_STATS_FIELD, FDBROKER_STATS_FIELD)

namespace fdbroker {

enum class MetricType { kCounter, kGauge, kHistogram };

// One exported family: what its "# HELP" and "# TYPE" lines say and the
// names of its labels (comma-separated, empty for none).
struct MetricFamilyDef {
  absl::string_view name;
  MetricType type;
  absl::string_view labels;
  absl::string_view help;
};

// The labelled families, by id (metric_family::kHandoffFailures, ...).
namespace metric_family {
#define FDBROKER_FAMILY_CONSTANT(id, type, name, labels, help) \
  inline constexpr MetricFamilyDef id{name, MetricType::type, labels, help};
FDBROKER_METRIC_FAMILIES(FDBROKER_FAMILY_CONSTANT)
#undef FDBROKER_FAMILY_CONSTANT
}  // namespace metric_family

#define FDBROKER_DEF_NONE(...)
#define FDBROKER_DEF_COUNTER(field, name, help) \
  MetricFamilyDef{name, MetricType::kCounter, "", help},
#define FDBROKER_DEF_COMPONENT(Class, member, LIST) \
  LIST(FDBROKER_DEF_COUNTER, FDBROKER_DEF_NONE, FDBROKER_DEF_NONE)
#define FDBROKER_DEF_FAMILY(id, ...) metric_family::id,
#define FDBROKER_DEF_GAUGE(name, help, value) \
  MetricFamilyDef{name, MetricType::kGauge, "", help},
#define FDBROKER_DEF_HISTOGRAM(name, help, source) \
  MetricFamilyDef{name, MetricType::kHistogram, "", help},

// Every family the broker itself declares (the process_* metrics are
// ProcessMetrics', the exposer_* ones prometheus-cpp's).
inline constexpr MetricFamilyDef kDeclaredMetricFamilies[] = {
    FDBROKER_STATS_COMPONENTS(FDBROKER_DEF_COMPONENT)
        FDBROKER_METRIC_FAMILIES(FDBROKER_DEF_FAMILY)
            FDBROKER_GAUGES(FDBROKER_DEF_GAUGE, FDBROKER_DEF_NONE)
                FDBROKER_HISTOGRAMS(FDBROKER_DEF_HISTOGRAM)};

#undef FDBROKER_DEF_NONE
#undef FDBROKER_DEF_COUNTER
#undef FDBROKER_DEF_COMPONENT
#undef FDBROKER_DEF_FAMILY
#undef FDBROKER_DEF_GAUGE
#undef FDBROKER_DEF_HISTOGRAM

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_METRICS_LIST_H_
