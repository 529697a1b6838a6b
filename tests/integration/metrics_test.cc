// The Prometheus endpoint of the real broker after real traffic.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/socket.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "fdbroker/v1/broker.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {
namespace {

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto broker = BrokerProcess::Start(
        {"--workers=2", "--metrics=127.0.0.1:0", "--max_pending=4096"});
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *std::move(broker);
    ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(30)));
    absl::StatusOr<std::map<std::string, std::string>> ready =
        ReadKeyValueFile(broker_->dir() + "/ready");
    ASSERT_TRUE(ready.ok());
    metrics_ = (*ready)["metrics"];
    ASSERT_FALSE(metrics_.empty());
  }

  double Value(const std::string& series) {
    return MetricValue(metrics_, series);
  }

  std::unique_ptr<BrokerProcess> broker_;
  std::string metrics_;
};

TEST_F(MetricsTest, CountersMatchTheTrafficAndPromtoolAcceptsTheScrape) {
  // WaitForWorkers sent some requests: take the baseline once the metrics
  // show them (they are synced from the data plane twice a second).
  ASSERT_TRUE(WaitFor(
      [&] {
        const double accepted = Value("fdbroker_connections_accepted_total");
        return accepted >= 2 &&
               accepted == Value("fdbroker_connections_handed_off_total");
      },
      absl::Seconds(5)));
  const double before = Value("fdbroker_connections_accepted_total");
  ASSERT_GE(before, 2);
  constexpr int kRequests = 500;
  for (int i = 0; i < kRequests; ++i) {
    absl::StatusOr<HttpResponse> r =
        HttpGetOnce("127.0.0.1", broker_->port(), "/");
    ASSERT_TRUE(r.ok() && r->status == 200);
  }
  std::vector<wire::UniqueFd> held;
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<wire::UniqueFd> fd =
        ConnectTcp("127.0.0.1", broker_->port());
    ASSERT_TRUE(fd.ok());
    ASSERT_TRUE(HttpGet(fd->get(), "/", true).ok());
    held.push_back(*std::move(fd));
  }
  // One control RPC, so fdbroker_control_requests_total has a series.
  auto stub = v1::BrokerService::NewStub(grpc::CreateChannel(
      broker_->control_address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::GetLoadResponse load;
  ASSERT_TRUE(stub->GetLoad(&context, v1::GetLoadRequest(), &load).ok());
  // Metrics are synced from the data plane twice a second: poll.
  std::map<std::string, double> s;
  std::string text;
  ASSERT_TRUE(WaitFor(
      [&] {
        absl::StatusOr<std::string> scraped = ScrapeMetrics(metrics_);
        if (!scraped.ok()) return false;
        text = *scraped;
        s = MetricSamples(text);
        return s["fdbroker_connections_accepted_total"] ==
                   before + kRequests + 5 &&
               s["fdbroker_connections_active"] == 5;
      },
      absl::Seconds(10)))
      << text;
  EXPECT_EQ(s["fdbroker_connections_handed_off_total"], before + kRequests + 5);
  EXPECT_EQ(s["fdbroker_handoff_latency_seconds_count"],
            before + kRequests + 5);
  EXPECT_GT(s["fdbroker_handoff_latency_seconds_sum"], 0);
  EXPECT_EQ(s["fdbroker_handoff_latency_seconds_bucket{le=\"+Inf\"}"],
            before + kRequests + 5);
  EXPECT_EQ(s["fdbroker_workers{state=\"ready\"}"], 2);
  EXPECT_EQ(s["fdbroker_pending_connections"], 0);
  EXPECT_EQ(s["fdbroker_accepting"], 1);
  EXPECT_EQ(s["fdbroker_connections_rejected_total{reason=\"overload\"}"], 0);
  EXPECT_EQ(
      s["fdbroker_control_requests_total{code=\"OK\",method=\"GetLoad\"}"], 1);
  double per_worker = 0;
  for (const auto& [series, value] : s) {
    if (series.rfind("fdbroker_worker_connections_active{", 0) == 0) {
      per_worker += value;
    }
  }
  EXPECT_EQ(per_worker, 5);
  // The standard process metrics describe the broker itself.
  absl::StatusOr<int> fds = CountOpenFds(broker_->pid());
  ASSERT_TRUE(fds.ok());
  EXPECT_NEAR(s["process_open_fds"], *fds, 3);
  EXPECT_GT(s["process_max_fds"], s["process_open_fds"]);
  EXPECT_GT(s["process_resident_memory_bytes"], 1 << 20);
  EXPECT_GT(s["process_start_time_seconds"], 1.7e9);
  EXPECT_GE(s["process_cpu_seconds_total"], 0);

  // Every family the deployment artifacts rely on is really exported.
  absl::StatusOr<std::string> names = ReadFile(
      absl::StrCat(FDBROKER_SOURCE_DIR, "/tests/deploy/exported_metrics.txt"));
  ASSERT_TRUE(names.ok()) << names.status();
  int listed = 0;
  for (absl::string_view line : absl::StrSplit(*names, '\n')) {
    // "NAME TYPE LABELS"; '#' starts a comment.
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() < 2 || fields[0][0] == '#') continue;
    ++listed;
    EXPECT_NE(text.find(absl::StrCat("\n# TYPE ", fields[0], " ", fields[1])),
              std::string::npos)
        << fields[0] << " (" << fields[1]
        << ") is listed as exported but missing from the scrape";
  }
  EXPECT_GT(listed, 20);

  // promtool (Debian's prometheus package) lints the exposition format.
  const std::string file = broker_->dir() + "/scrape.txt";
  std::ofstream(file) << text;
  auto promtool =
      Subprocess::Start({"/bin/sh", "-c", "promtool check metrics < " + file});
  ASSERT_TRUE(promtool.ok());
  absl::StatusOr<int> code = (*promtool)->Wait(absl::Seconds(30));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0) << (*promtool)->Output();
}

TEST_F(MetricsTest, PerWorkerSeriesLeaveWithTheWorker) {
  auto stub = v1::BrokerService::NewStub(grpc::CreateChannel(
      broker_->control_address(), grpc::InsecureChannelCredentials()));
  v1::ListWorkersResponse workers;
  grpc::ClientContext list_context;
  ASSERT_TRUE(
      stub->ListWorkers(&list_context, v1::ListWorkersRequest(), &workers)
          .ok());
  ASSERT_EQ(workers.workers_size(), 2);
  const std::string gone =
      absl::StrCat("fdbroker_worker_connections_active{worker=\"",
                   workers.workers(1).id(), "\"}");
  ASSERT_TRUE(WaitFor([&] { return Value(gone) == 0; }, absl::Seconds(5)));
  v1::DrainWorkerRequest drain;
  drain.set_worker_id(workers.workers(1).id());
  v1::DrainWorkerResponse drained;
  grpc::ClientContext drain_context;
  ASSERT_TRUE(stub->DrainWorker(&drain_context, drain, &drained).ok());
  ASSERT_TRUE(WaitFor([&] { return Value(gone) == -1; }, absl::Seconds(10)))
      << "the drained worker's series must disappear";
  EXPECT_EQ(Value("fdbroker_workers{state=\"ready\"}"), 1);
  EXPECT_GE(Value("fdbroker_control_requests_total{code=\"OK\",method="
                  "\"DrainWorker\"}"),
            1);
}

// A worker serving one long request (GET /sleep?ms=30000), as the tests of
// connections cut at a drain deadline need it.
struct LongRequest {
  wire::UniqueFd client;
  uint64_t owner = 0;  // Worker id.
  pid_t owner_pid = 0;
};

// Starts the long request and finds its owner (the worker whose active
// count grew), then drains that worker with a 1 s deadline.
void StartLongRequestThenDrain(BrokerProcess& broker, LongRequest& request,
                               const std::function<void()>& before_drain) {
  auto stub = v1::BrokerService::NewStub(grpc::CreateChannel(
      broker.control_address(), grpc::InsecureChannelCredentials()));
  // Active connections and pid per worker.
  auto workers = [&] {
    std::map<uint64_t, std::pair<int64_t, pid_t>> by_worker;
    v1::ListWorkersResponse list;
    grpc::ClientContext context;
    if (stub->ListWorkers(&context, v1::ListWorkersRequest(), &list).ok()) {
      for (const v1::Worker& w : list.workers()) {
        by_worker[w.id()] = {w.active_connections(), w.pid()};
      }
    }
    return by_worker;
  };
  // The start-up probes' connections close first: then the request's is
  // the only one.
  ASSERT_TRUE(WaitFor(
      [&] {
        for (const auto& [id, load] : workers()) {
          if (load.first != 0) return false;
        }
        return true;
      },
      absl::Seconds(10)));
  absl::StatusOr<wire::UniqueFd> client =
      ConnectTcp("127.0.0.1", broker.port());
  ASSERT_TRUE(client.ok());
  request.client = *std::move(client);
  const std::string get = "GET /sleep?ms=30000 HTTP/1.1\r\nHost: t\r\n\r\n";
  ASSERT_EQ(::send(request.client.get(), get.data(), get.size(), 0),
            static_cast<ssize_t>(get.size()));
  ASSERT_TRUE(WaitFor(
      [&] {
        for (const auto& [id, load] : workers()) {
          if (load.first == 1) {
            request.owner = id;
            request.owner_pid = load.second;
          }
        }
        return request.owner != 0;
      },
      absl::Seconds(10)));
  ASSERT_GT(request.owner_pid, 0);
  before_drain();
  v1::DrainWorkerRequest drain;
  drain.set_worker_id(request.owner);
  drain.mutable_timeout()->set_seconds(1);
  v1::DrainWorkerResponse drained;
  grpc::ClientContext context;
  ASSERT_TRUE(stub->DrainWorker(&context, drain, &drained).ok());
}

TEST_F(MetricsTest, ConnectionsCutAtTheDrainDeadlineAreCountedAsLost) {
  // A request still running when its worker's drain deadline passes and the
  // broker ends the worker: the connection is lost and counted so (before,
  // only a crash's were counted). Stopped, the worker cannot finish (or
  // cut) the request itself: the broker ends it at the deadline with the
  // connection still its own.
  LongRequest request;
  ASSERT_NO_FATAL_FAILURE(StartLongRequestThenDrain(*broker_, request, [&] {
    ASSERT_EQ(::kill(request.owner_pid, SIGSTOP), 0);
  }));
  EXPECT_TRUE(WaitFor(
      [&] {
        return Value(
                   "fdbroker_connections_lost_total{reason="
                   "\"drain_deadline\"}") == 1;
      },
      absl::Seconds(15)))
      << broker_->process().Stderr();
  EXPECT_EQ(Value("fdbroker_connections_lost_total{reason=\"worker_crash\"}"),
            0);
}

TEST_F(MetricsTest, ConnectionsAWorkerCutsAtItsDrainDeadlineAreCountedAsLost) {
  // The worker cuts the request itself at its drain deadline and says so
  // (Closed.cut_connection_ids, protocol 1.4): counted cut_by_worker. Before,
  // it reported an ordinary Closed and nothing was counted.
  LongRequest request;
  ASSERT_NO_FATAL_FAILURE(StartLongRequestThenDrain(*broker_, request, [] {}));
  EXPECT_TRUE(WaitFor(
      [&] {
        return Value(
                   "fdbroker_connections_lost_total{reason="
                   "\"cut_by_worker\"}") == 1;
      },
      absl::Seconds(15)))
      << broker_->process().Stderr();
  EXPECT_EQ(Value("fdbroker_connections_lost_total{reason=\"drain_deadline\"}"),
            0);
  EXPECT_EQ(Value("fdbroker_connections_lost_total{reason=\"worker_crash\"}"),
            0);
}

}  // namespace
}  // namespace fdbroker::testing
