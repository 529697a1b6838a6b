// The hung-worker watchdog (--worker_timeout) end to end: the real fdbroker
// and fdbroker-http-worker on loopback port 0, real clients.
#include <sys/types.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {
namespace {

// TSan defers an asynchronous signal to the thread's next intercepted call,
// which a thread blocked outside one may never reach before the SIGKILL:
// there the kill is asserted, not the dump.
#if defined(__SANITIZE_THREAD__)
constexpr bool kDumpIsReliable = false;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kDumpIsReliable = false;
#else
constexpr bool kDumpIsReliable = true;
#endif
#else
constexpr bool kDumpIsReliable = true;
#endif

class WatchdogTest : public ::testing::Test {
 protected:
  void StartBroker(std::vector<std::string> flags) {
    auto broker = BrokerProcess::Start(std::move(flags));
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *std::move(broker);
    ASSERT_TRUE(broker_->WaitForWorkers(1, absl::Seconds(30)))
        << broker_->process().Output();
    absl::StatusOr<std::map<std::string, std::string>> ready =
        ReadKeyValueFile(broker_->dir() + "/ready");
    ASSERT_TRUE(ready.ok());
    metrics_ = (*ready)["metrics"];
  }

  double Metric(const std::string& series) {
    return MetricValue(metrics_, series);
  }

  std::unique_ptr<BrokerProcess> broker_;
  std::string metrics_;
};

// A worker whose loop thread blocks (GET /block) stops proving life. Before
// --worker_timeout it kept its clients until --heartbeat_timeout (30 s
// here; forever for an SDK whose heartbeats come from another thread): now
// it is sent SIGABRT (its stack on stderr), killed within the timeout plus
// the 1 s grace, replaced, and new clients are served; what it held is
// counted as lost with reason worker_timeout.
TEST_F(WatchdogTest, HungHttpWorkerIsDumpedKilledAndReplaced) {
  StartBroker({"--workers=1", "--heartbeat_interval=100ms",
               "--heartbeat_timeout=30s", "--worker_timeout=1s"});
  const pid_t hung = broker_->WorkerPids()[0];
  // An idle keep-alive client of the worker that will hang.
  absl::StatusOr<wire::UniqueFd> idle =
      ConnectTcp("127.0.0.1", broker_->port());
  ASSERT_TRUE(idle.ok());
  absl::StatusOr<HttpResponse> first = HttpGet(idle->get(), "/", true);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(WorkerPid(*first), hung);

  const absl::Time blocked_at = absl::Now();
  std::thread blocker([&] {
    // Never answered: the worker is killed while it blocks.
    (void)HttpGetOnce("127.0.0.1", broker_->port(), "/block?ms=60000",
                      absl::Seconds(30));
  });
  pid_t replacement = 0;
  const bool served = WaitFor(
      [&] {
        absl::StatusOr<HttpResponse> r = HttpGetOnce(
            "127.0.0.1", broker_->port(), "/", absl::Milliseconds(500));
        if (!r.ok() || r->status != 200 || WorkerPid(*r) == hung) return false;
        replacement = WorkerPid(*r);
        return true;
      },
      absl::Seconds(20), absl::Milliseconds(50));
  const absl::Duration took = absl::Now() - blocked_at;
  blocker.join();
  ASSERT_TRUE(served) << broker_->process().Output();
  // worker_timeout 1 s + grace 1 s + a tick, a restart and a busy machine.
  EXPECT_LT(took, absl::Seconds(10));
  std::cerr << "hung worker replaced and serving after "
            << absl::FormatDuration(took) << "\n";
  EXPECT_NE(replacement, 0);
  EXPECT_TRUE(WaitFor([&] { return ProcessGone(hung); }, absl::Seconds(10)));
  const std::string err = broker_->process().Stderr();
  if (kDumpIsReliable) {
    // Its stack went to its stderr (the broker's, which workers inherit).
    EXPECT_NE(
        err.find(absl::StrCat("fdbroker worker: SIGABRT: stack of pid ", hung)),
        std::string::npos)
        << err;
    EXPECT_NE(err.find("fdbroker worker: end of stack dump"),
              std::string::npos);
    // The frames show where it hung (libc's symbol names are exported).
    EXPECT_NE(err.find("nanosleep"), std::string::npos) << err;
  }
  EXPECT_NE(err.find("application thread silent"), std::string::npos);
  // The idle client was the hung worker's: cut (counted), never answered.
  absl::StatusOr<HttpResponse> after = HttpGet(idle->get(), "/", true);
  EXPECT_FALSE(after.ok());
  // (The scrape lags the loop by up to a sync period.)
  EXPECT_TRUE(WaitFor(
      [&] {
        return Metric(
                   "fdbroker_workers_declared_dead_total{reason=\"worker_"
                   "timeout\"}") == 1 &&
               Metric(
                   "fdbroker_connections_lost_total{reason=\"worker_"
                   "timeout\"}") >= 1;
      },
      absl::Seconds(10)))
      << ScrapeMetrics(metrics_).value_or("");
}

// Busy is not hung: under 4 s of steady connection-per-request traffic (the
// channel never silent, so no heartbeat is needed for the channel) and a
// slow but non-blocking request (/sleep) of 3 s, a worker with
// --worker_timeout=2s keeps proving life and is never killed.
TEST_F(WatchdogTest, BusyWorkerWithASlowRequestIsNotHung) {
  StartBroker({"--workers=1", "--heartbeat_interval=100ms",
               "--heartbeat_timeout=30s", "--worker_timeout=2s"});
  const pid_t worker = broker_->WorkerPids()[0];
  std::thread slow([&] {
    absl::StatusOr<HttpResponse> r = HttpGetOnce(
        "127.0.0.1", broker_->port(), "/sleep?ms=3000", absl::Seconds(20));
    EXPECT_TRUE(r.ok() && r->status == 200)
        << (r.ok() ? "" : r.status().ToString());
  });
  int answered = 0;
  const absl::Time end = absl::Now() + absl::Seconds(4);
  while (absl::Now() < end) {
    absl::StatusOr<HttpResponse> r =
        HttpGetOnce("127.0.0.1", broker_->port(), "/", absl::Seconds(5));
    ASSERT_TRUE(r.ok()) << r.status() << broker_->process().Output();
    EXPECT_EQ(WorkerPid(*r), worker);
    ++answered;
  }
  slow.join();
  EXPECT_GT(answered, 10);
  EXPECT_EQ(
      Metric("fdbroker_workers_declared_dead_total{reason=\"worker_timeout\"}"),
      0);
  EXPECT_EQ(broker_->WorkerPids(), std::vector<pid_t>{worker});
}

}  // namespace
}  // namespace fdbroker::testing
