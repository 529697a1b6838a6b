// Soak: 200,000 connections through the real broker while workers are
// SIGKILLed at random moments. Afterwards the broker's fds and memory are
// back to their baseline, and every connection it accepted was served or is
// counted as lost with its worker (or rejected) — none silently dropped.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {
namespace {

constexpr int kConnections = 200000;
constexpr int kClientThreads = 4;
constexpr int kWorkers = 4;

// Every sample of the broker's scrape; empty if the scrape failed.
std::map<std::string, double> Scrape(const std::string& address) {
  return MetricSamples(ScrapeMetrics(address).value_or(""));
}

// Both scrapes have the same fdbroker_connections_* samples (the process
// metrics move on their own).
bool Settled(const std::map<std::string, double>& a,
             const std::map<std::string, double>& b) {
  auto connection_samples = [](const std::map<std::string, double>& m) {
    std::map<std::string, double> out;
    for (const auto& [name, value] : m) {
      if (name.rfind("fdbroker_connections_", 0) == 0) out[name] = value;
    }
    return out;
  };
  return connection_samples(a) == connection_samples(b);
}

int64_t RssKiB(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  int64_t value = 0;
  while (status >> key) {
    if (key == "VmRSS:") {
      status >> value;
      return value;
    }
  }
  return -1;
}

TEST(SoakTest, RandomWorkerKillsLoseNothingSilentlyAndLeakNothing) {
  auto broker = BrokerProcess::Start(
      {"--workers=4", "--metrics=127.0.0.1:0", "--drain_timeout=5s"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(kWorkers, absl::Seconds(30)));
  auto ready = ReadKeyValueFile((*broker)->dir() + "/ready");
  ASSERT_TRUE(ready.ok());
  const std::string metrics = (*ready)["metrics"];
  const int port = (*broker)->port();
  const pid_t pid = (*broker)->pid();

  // Warm up, then take the baseline with the pool complete and idle.
  for (int i = 0; i < 2000; ++i) {
    ASSERT_TRUE(HttpGetOnce("127.0.0.1", port, "/").ok());
  }
  int baseline_fds = -1;
  std::map<std::string, double> before;
  ASSERT_TRUE(WaitFor(
      [&] {
        before = Scrape(metrics);
        return before["fdbroker_connections_active"] == 0 &&
               before["fdbroker_connections_accepted_total"] ==
                   before["fdbroker_connections_handed_off_total"] &&
               before["fdbroker_connections_accepted_total"] > 0;
      },
      absl::Seconds(10)));
  // The idle count: the lowest over a short window, since the exposer
  // closes the test's own scrape connection on its thread, a moment after
  // the response.
  for (int i = 0; i < 20; ++i) {
    const int n = *CountOpenFds(pid);
    baseline_fds = baseline_fds < 0 ? n : std::min(baseline_fds, n);
    absl::SleepFor(absl::Milliseconds(10));
  }
  const int64_t baseline_rss = RssKiB(pid);

  std::atomic<int> next{0}, served{0}, failed{0}, connect_failed{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> clients;
  for (int t = 0; t < kClientThreads; ++t) {
    clients.emplace_back([&] {
      while (next.fetch_add(1) < kConnections) {
        absl::StatusOr<wire::UniqueFd> fd =
            ConnectTcp("127.0.0.1", port, absl::Seconds(10));
        if (!fd.ok()) {
          ++connect_failed;
          continue;
        }
        absl::StatusOr<HttpResponse> r =
            HttpGet(fd->get(), "/", /*keep_alive=*/false, absl::Seconds(15));
        (r.ok() && r->status == 200 ? served : failed)++;
      }
    });
  }
  int kills = 0;
  std::thread killer([&] {
    std::mt19937 random(20261125);
    std::uniform_int_distribution<int> pause_ms(200, 900);
    while (!done) {
      absl::SleepFor(absl::Milliseconds(pause_ms(random)));
      // Kill only while the pool is complete, so that it never collapses
      // (a collapse would only show the restart back-off, not losses).
      std::vector<pid_t> workers = (*broker)->WorkerPids();
      if (workers.size() != kWorkers || done) continue;
      ::kill(workers[random() % workers.size()], SIGKILL);
      ++kills;
    }
  });
  for (std::thread& t : clients) t.join();
  done = true;
  killer.join();

  // The pool recovers and the broker settles back to its baseline.
  ASSERT_TRUE((*broker)->WaitForWorkers(kWorkers, absl::Seconds(60)));
  // The broker publishes its figures every 500 ms, and one scrape can
  // straddle such an update (some families new, some old): settled means
  // idle, and two scrapes at least 600 ms apart agree on every figure.
  std::map<std::string, double> after;
  std::map<std::string, double> earlier;
  absl::Time earlier_at;
  ASSERT_TRUE(WaitFor(
      [&] {
        after = Scrape(metrics);
        const bool idle = after["fdbroker_connections_active"] == 0 &&
                          after["fdbroker_pending_connections"] == 0 &&
                          after["fdbroker_unacked_connections"] == 0;
        if (!idle) {
          earlier.clear();
          return false;
        }
        if (!earlier.empty() &&
            absl::Now() - earlier_at < absl::Milliseconds(600)) {
          return false;
        }
        if (!earlier.empty() && Settled(earlier, after)) return true;
        earlier = after;
        earlier_at = absl::Now();
        return false;
      },
      absl::Seconds(30)));
  int fds_now = -1;
  EXPECT_TRUE(WaitFor(
      [&] {
        fds_now = *CountOpenFds(pid);
        return fds_now == baseline_fds;
      },
      absl::Seconds(10)))
      << "broker fds " << baseline_fds << " -> " << fds_now;
  const int64_t rss_now = RssKiB(pid);
  // Memory returns to its baseline within allocator slack: tables sized
  // for the peak are kept, nothing grows with the connection count.
  EXPECT_LE(rss_now, baseline_rss + baseline_rss / 4 + 4096)
      << "RSS " << baseline_rss << " KiB -> " << rss_now << " KiB";

  const double accepted = after["fdbroker_connections_accepted_total"] -
                          before["fdbroker_connections_accepted_total"];
  // Every reason (the workers killed here are crashes: worker_crash).
  auto total_lost = [](const std::map<std::string, double>& samples) {
    double sum = 0;
    for (const auto& [name, value] : samples) {
      if (name.rfind("fdbroker_connections_lost_total{", 0) == 0) sum += value;
    }
    return sum;
  };
  const double lost = total_lost(after) - total_lost(before);
  const double rejected =
      after["fdbroker_connections_rejected_total{reason=\"overload\"}"] -
      before["fdbroker_connections_rejected_total{reason=\"overload\"}"];
  // The WaitForWorkers probes above also went through the broker.
  EXPECT_GE(accepted, kConnections - connect_failed);
  EXPECT_EQ(connect_failed, 0);
  // Every client that was not served is accounted for by the broker.
  EXPECT_LE(failed, lost + rejected)
      << failed << " failed, " << lost << " lost with their worker, "
      << rejected << " rejected";
  EXPECT_GE(served, kConnections - failed);
  EXPECT_GE(kills, 10);
  RecordProperty("kills", kills);
  RecordProperty("failed", failed.load());
  RecordProperty("lost", static_cast<int>(lost));
  std::printf(
      "soak: %d connections, %d served, %d failed, %d workers "
      "killed, broker counted %.0f lost and %.0f rejected; fds "
      "%d -> %d, RSS %lld -> %lld KiB\n",
      kConnections, served.load(), failed.load(), kills, lost, rejected,
      baseline_fds, fds_now, static_cast<long long>(baseline_rss),
      static_cast<long long>(rss_now));
}

}  // namespace
}  // namespace fdbroker::testing
