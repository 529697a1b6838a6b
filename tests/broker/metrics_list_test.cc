#include "broker/metrics_list.h"

#include <prometheus/registry.h>

#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "broker/metrics.h"
#include "broker/process_metrics.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"
#include "wire/socket_address.h"

namespace fdbroker {
namespace {

std::string TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "?";
}

std::string TypeName(prometheus::MetricType type) {
  switch (type) {
    case prometheus::MetricType::Counter:
      return "counter";
    case prometheus::MetricType::Gauge:
      return "gauge";
    case prometheus::MetricType::Histogram:
      return "histogram";
    case prometheus::MetricType::Summary:
      return "summary";
    case prometheus::MetricType::Untyped:
      return "untyped";
  }
  return "?";
}

// "NAME TYPE LABELS", as in tests/deploy/exported_metrics.txt.
std::string Line(absl::string_view name, absl::string_view type,
                 absl::string_view labels) {
  return absl::StrCat(name, " ", type, " ", labels.empty() ? "-" : labels);
}

// The families of tests/deploy/exported_metrics.txt, one normalised line
// each.
std::set<std::string> ExportedMetricsFile() {
  std::ifstream in(std::string(FDBROKER_SOURCE_DIR) +
                   "/tests/deploy/exported_metrics.txt");
  EXPECT_TRUE(in.good());
  std::set<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.empty() || fields[0][0] == '#') continue;
    EXPECT_EQ(fields.size(), 3u) << line;
    if (fields.size() != 3) continue;
    lines.insert(Line(fields[0], fields[1],
                      fields[2] == "-" ? absl::string_view() : fields[2]));
  }
  return lines;
}

// The lines of `file` that start with `prefix`.
std::set<std::string> WithPrefix(const std::set<std::string>& file,
                                 absl::string_view prefix) {
  std::set<std::string> out;
  for (const std::string& line : file) {
    if (absl::StartsWith(line, prefix)) out.insert(line);
  }
  return out;
}

std::string Diff(const std::set<std::string>& want,
                 const std::set<std::string>& have) {
  std::vector<std::string> missing, extra;
  for (const std::string& line : want) {
    if (have.count(line) == 0) missing.push_back(line);
  }
  for (const std::string& line : have) {
    if (want.count(line) == 0) extra.push_back(line);
  }
  return absl::StrCat(
      "\n  declared, not in the file: ", absl::StrJoin(missing, "; "),
      "\n  in the file, not declared: ", absl::StrJoin(extra, "; "));
}

TEST(MetricsListTest, ExportedMetricsFileIsTheDeclaredList) {
  std::set<std::string> declared;
  for (const MetricFamilyDef& def : kDeclaredMetricFamilies) {
    EXPECT_TRUE(absl::StartsWith(def.name, "fdbroker_")) << def.name;
    EXPECT_TRUE(
        declared.insert(Line(def.name, TypeName(def.type), def.labels)).second)
        << def.name << " is declared twice";
  }
  const std::set<std::string> file = ExportedMetricsFile();
  EXPECT_TRUE(WithPrefix(file, "fdbroker_") == declared)
      << "tests/deploy/exported_metrics.txt and broker/metrics_list.h differ:"
      << Diff(declared, WithPrefix(file, "fdbroker_"));

  // The process_* families are ProcessMetrics'.
  std::set<std::string> process;
  for (const prometheus::MetricFamily& family : ProcessMetrics().Collect()) {
    process.insert(Line(family.name, TypeName(family.type), ""));
  }
  EXPECT_TRUE(WithPrefix(file, "process_") == process)
      << "tests/deploy/exported_metrics.txt and ProcessMetrics differ:"
      << Diff(process, WithPrefix(file, "process_"));

  // Nothing else but prometheus-cpp's exposer_* families, which only a real
  // scrape shows (tests/integration/metrics_test.cc checks every line there).
  for (const std::string& line : file) {
    EXPECT_TRUE(absl::StartsWith(line, "fdbroker_") ||
                absl::StartsWith(line, "process_") ||
                absl::StartsWith(line, "exposer_"))
        << line << " has no declaration to check it against";
  }
}

TEST(MetricsListTest, BrokerMetricsRegistersTheDeclaredFamilies) {
  prometheus::Registry registry;
  BrokerMetrics metrics(registry);
  metrics.CountControlRequest("GetLoad", 0);  // A series of the family.
  std::map<std::string, prometheus::MetricFamily> collected;
  for (prometheus::MetricFamily& family : registry.Collect()) {
    collected.emplace(family.name, std::move(family));
  }
  for (const MetricFamilyDef& def : kDeclaredMetricFamilies) {
    SCOPED_TRACE(def.name);
    auto it = collected.find(std::string(def.name));
    if (def.name == metric_family::kWorkerConnectionsActive.name ||
        def.name == metric_family::kListenerAccepted.name) {
      // No worker or listener, no series (the integration tests see it).
      EXPECT_EQ(it, collected.end());
      continue;
    }
    ASSERT_NE(it, collected.end()) << "not registered";
    const prometheus::MetricFamily& family = it->second;
    EXPECT_EQ(family.help, def.help);
    EXPECT_EQ(TypeName(family.type), TypeName(def.type));
    ASSERT_FALSE(family.metric.empty());
    std::set<std::string> want_labels;
    for (absl::string_view label : absl::StrSplit(def.labels, ',')) {
      if (!label.empty()) want_labels.emplace(label);
    }
    for (const prometheus::ClientMetric& metric : family.metric) {
      std::set<std::string> labels;
      for (const prometheus::ClientMetric::Label& label : metric.label) {
        labels.insert(label.name);
      }
      EXPECT_EQ(labels, want_labels);
    }
    collected.erase(it);
  }
  for (const auto& [name, family] : collected) {
    ADD_FAILURE() << name << " is registered but not declared";
  }
}

TEST(MetricsListTest, LabelledFamiliesHaveTheirDeclaredValues) {
  prometheus::Registry registry;
  BrokerMetrics metrics(registry);
  std::map<std::string, std::set<std::string>> values;
  for (const prometheus::MetricFamily& family : registry.Collect()) {
    for (const prometheus::ClientMetric& metric : family.metric) {
      for (const prometheus::ClientMetric::Label& label : metric.label) {
        values[family.name].insert(label.value);
      }
    }
  }
  using Values = std::set<std::string>;
  EXPECT_EQ(values["fdbroker_handoff_failures_total"],
            (Values{"worker_lost", "rejected_by_worker", "send_error",
                    "channel_full", "too_many_attempts"}));
  EXPECT_EQ(values["fdbroker_connections_rejected_total"],
            (Values{"overload", "shutdown", "proxy_protocol"}));
  EXPECT_EQ(values["fdbroker_connections_migrated_total"],
            (Values{"rebalance", "drain"}));
  EXPECT_EQ(values["fdbroker_workers"],
            (Values{"starting", "ready", "draining"}));
}

// A stopping metrics server frees its port at once: an upgrade's new broker
// waits for it, and a stopping broker for the server. civetweb alone took
// 1.7 s per stop (its master thread polls for 2 s); the bound leaves room
// for a loaded machine.
TEST(MetricsServerTest, StopsWithinASecondAndFreesItsPort) {
  auto registry = std::make_shared<prometheus::Registry>();
  absl::StatusOr<std::unique_ptr<MetricsServer>> server =
      MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string address = (*server)->address();
  // Serving (its master thread is in its poll) before it is stopped.
  absl::StatusOr<wire::HostPort> bound = wire::HostPort::Parse(address);
  ASSERT_TRUE(bound.ok());
  absl::StatusOr<fdbroker::testing::HttpResponse> scrape =
      fdbroker::testing::HttpGetOnce("127.0.0.1", bound->port, "/metrics");
  ASSERT_TRUE(scrape.ok()) << scrape.status();
  EXPECT_EQ(scrape->status, 200);
  const absl::Time start = absl::Now();
  server->reset();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  absl::StatusOr<std::unique_ptr<MetricsServer>> again =
      MetricsServer::Start(address, registry);
  EXPECT_TRUE(again.ok()) << again.status();
}

}  // namespace
}  // namespace fdbroker
