// Nothing lost: the broker's own crash, planned upgrades under load, socket
// activation and hostile peers on the hand-off socket. Real binaries, real
// sockets.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "fdbroker/v1/broker.grpc.pb.h"
#include "fdbroker/v1/handoff.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/integration/line_client.h"
#include "tests/integration/request_load.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "wire/files.h"
#include "wire/message_channel.h"
#include "wire/socket_address.h"

namespace fdbroker::testing {
namespace {

int PidOf(const HttpResponse& response) {
  auto it = response.headers.find("x-worker-pid");
  int pid = 0;
  if (it != response.headers.end()) (void)absl::SimpleAtoi(it->second, &pid);
  return pid;
}

std::vector<v1::Worker> ListWorkers(const std::string& control) {
  auto stub = v1::BrokerService::NewStub(
      grpc::CreateChannel(control, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(5));
  v1::ListWorkersResponse response;
  if (!stub->ListWorkers(&context, v1::ListWorkersRequest(), &response).ok()) {
    return {};
  }
  return {response.workers().begin(), response.workers().end()};
}

std::set<int> ReadyPids(const std::string& control) {
  std::set<int> pids;
  for (const v1::Worker& w : ListWorkers(control)) {
    if (w.state() == v1::WORKER_STATE_READY) pids.insert(w.pid());
  }
  return pids;
}

// A second broker on the same socket (after a crash, or --upgrade).
absl::StatusOr<std::unique_ptr<Subprocess>> StartSecondBroker(
    const BrokerProcess& first, const std::string& ready_file,
    std::vector<std::string> extra) {
  std::vector<std::string> argv = {
      BinaryPath("fdbroker"), "--control=127.0.0.1:0",
      "--metrics=", "--socket=" + first.socket_path(),
      "--ready_file=" + ready_file};
  // --listen may be repeated: the default only when `extra` gives none.
  if (std::none_of(extra.begin(), extra.end(), [](const std::string& flag) {
        return absl::StartsWith(flag, "--listen=");
      })) {
    argv.push_back("--listen=127.0.0.1:0");
  }
  argv.insert(argv.end(), extra.begin(), extra.end());
  return Subprocess::Start(argv);
}

// A minimal systemd stand-in, written to `dir`/activate.py: binds
// `sockets` TCP listeners on 127.0.0.1, puts them at fds 3, 4, ..., writes
// their ports (space-separated) to argv[1] and sets LISTEN_PID/LISTEN_FDS
// for the process it becomes (argv[2...]; exec keeps the pid).
std::string WriteActivationScript(const std::string& dir, int sockets) {
  const std::string script = dir + "/activate.py";
  std::ofstream(script)
      << "import os, socket, sys\n"
      << "n = " << sockets << "\n"
      << "socks = [socket.socket() for _ in range(n)]\n"
         "for s in socks: s.bind(('127.0.0.1', 0)); s.listen(128)\n"
         "open(sys.argv[1] + '.tmp', 'w').write("
         "' '.join(str(s.getsockname()[1]) for s in socks))\n"
         "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
         "for i, s in enumerate(socks):\n"
         "    os.dup2(s.fileno(), 3 + i); os.set_inheritable(3 + i, True)\n"
         "os.environ['LISTEN_FDS'] = str(n)\n"
         "os.environ['LISTEN_PID'] = str(os.getpid())\n"
         "os.execv(sys.argv[2], sys.argv[2:])\n";
  return script;
}

// fdbroker (`--workers=1`, no control or metrics, then `flags`) started
// through WriteActivationScript with `sockets` inherited sockets; `ports`
// are theirs, once the script has bound them.
absl::StatusOr<std::unique_ptr<Subprocess>> StartActivated(
    const std::string& dir, int sockets, std::vector<std::string> flags,
    std::vector<int>& ports) {
  std::vector<std::string> argv = {
      "/usr/bin/python3", WriteActivationScript(dir, sockets),
      dir + "/ports",     BinaryPath("fdbroker"),
      "--workers=1",      "--control=",
      "--metrics=",       "--socket=" + dir + "/s.sock"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  auto broker = Subprocess::Start(argv);
  if (!broker.ok()) return broker.status();
  absl::StatusOr<std::string> text;
  if (!WaitFor(
          [&] {
            text = ReadFile(dir + "/ports");
            return text.ok();
          },
          absl::Seconds(10))) {
    return absl::DeadlineExceededError("the activation script bound nothing");
  }
  ports.clear();
  for (absl::string_view word : absl::StrSplit(*text, ' ')) {
    int port = 0;
    if (!absl::SimpleAtoi(word, &port)) {
      return absl::InternalError(absl::StrCat("ports: ", *text));
    }
    ports.push_back(port);
  }
  return broker;
}

std::string WaitForReadyValue(const std::string& ready_file,
                              const std::string& key) {
  std::string value;
  WaitFor(
      [&] {
        auto values = ReadKeyValueFile(ready_file);
        if (!values.ok()) return false;
        value = (*values)[key];
        return !value.empty();
      },
      absl::Seconds(20));
  return value;
}

// A broker with `count` supervised workers, which outlive it on purpose in
// these tests: they are ended with the broker's process handle (or a later
// broker's, see ExpectHandOver).
void StartPool(std::vector<std::string> flags, int count,
               std::unique_ptr<BrokerProcess>& broker,
               std::vector<pid_t>& workers) {
  auto started = BrokerProcess::Start(std::move(flags));
  ASSERT_TRUE(started.ok()) << started.status();
  broker = *std::move(started);
  ASSERT_TRUE(broker->WaitForWorkers(count, absl::Seconds(30)));
  workers = broker->WorkerPids();
  for (pid_t w : workers) broker->process().KillOnDestruction(w);
}

// `old` hands over to `next`, an --upgrade broker writing `ready`: `old`
// finishes its hand-offs and exits 0, and `next` has every one of
// `workers` registered and ready (none started anew).
void ExpectHandOver(Subprocess& old, Subprocess& next, const std::string& ready,
                    const std::vector<pid_t>& workers) {
  for (pid_t w : workers) next.KillOnDestruction(w);
  absl::StatusOr<int> old_exit = old.Wait(absl::Seconds(20));
  ASSERT_TRUE(old_exit.ok()) << old.Output() << next.Output();
  EXPECT_EQ(*old_exit, 0) << old.Output();
  const std::string control = WaitForReadyValue(ready, "control");
  ASSERT_FALSE(control.empty()) << next.Output();
  const std::set<int> pool(workers.begin(), workers.end());
  ASSERT_TRUE(
      WaitFor([&] { return ReadyPids(control) == pool; }, absl::Seconds(20)))
      << next.Output() << old.Output();
}

// Upgrades `running` (`first` or a broker that took over from it) to a new
// `--upgrade --workers=2` broker writing `ready`, checked as ExpectHandOver
// does; `next` is the new broker.
void Upgrade(const BrokerProcess& first, Subprocess& running,
             const std::string& ready, const std::vector<pid_t>& workers,
             std::unique_ptr<Subprocess>& next) {
  auto started = StartSecondBroker(first, ready, {"--upgrade", "--workers=2"});
  ASSERT_TRUE(started.ok());
  next = *std::move(started);
  ASSERT_NO_FATAL_FAILURE(ExpectHandOver(running, *next, ready, workers));
}

TEST(LifecycleTest, BrokerSigkillCostsNoEstablishedConnection) {
  std::unique_ptr<BrokerProcess> broker;
  std::vector<pid_t> workers;
  ASSERT_NO_FATAL_FAILURE(StartPool({"--workers=2"}, 2, broker, workers));

  std::vector<wire::UniqueFd> clients;
  std::set<int> serving;
  for (int i = 0; i < 10; ++i) {
    absl::StatusOr<wire::UniqueFd> fd = ConnectTcp("127.0.0.1", broker->port());
    ASSERT_TRUE(fd.ok());
    absl::StatusOr<HttpResponse> r = HttpGet(fd->get(), "/", true);
    ASSERT_TRUE(r.ok() && r->status == 200);
    serving.insert(PidOf(*r));
    clients.push_back(*std::move(fd));
  }
  ASSERT_EQ(serving.size(), 2u);

  ASSERT_TRUE(broker->process().Signal(SIGKILL).ok());
  ASSERT_TRUE(broker->process().Wait(absl::Seconds(10)).ok());
  // Established connections belong to the workers: they keep working.
  for (wire::UniqueFd& fd : clients) {
    absl::StatusOr<HttpResponse> r = HttpGet(fd.get(), "/", true);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, 200);
  }

  // A new broker on the same socket adopts the surviving workers: they count
  // toward --workers, so it starts none of its own.
  const std::string ready = broker->dir() + "/ready2";
  auto second = StartSecondBroker(*broker, ready, {"--workers=2"});
  ASSERT_TRUE(second.ok());
  for (pid_t w : workers) (*second)->KillOnDestruction(w);
  const std::string control = WaitForReadyValue(ready, "control");
  ASSERT_FALSE(control.empty()) << (*second)->Output();
  const std::set<int> survivors(workers.begin(), workers.end());
  ASSERT_TRUE(WaitFor([&] { return ReadyPids(control) == survivors; },
                      absl::Seconds(20)))
      << (*second)->Output();
  for (const v1::Worker& w : ListWorkers(control)) {
    EXPECT_TRUE(w.supervised()) << "adopted into the pool";
    EXPECT_EQ(w.labels().at("program"), "fdbroker-http-worker");
  }
  // Each still leads the process group its first broker made: the new
  // broker's signals (a kill at a deadline) reach the group as before.
  for (pid_t w : workers) EXPECT_EQ(::getpgid(w), w);
  // Past the adoption grace: still exactly the two survivors, no spawns.
  absl::StatusOr<int> grace_over = (*second)->Wait(absl::Seconds(3));
  EXPECT_FALSE(grace_over.ok()) << "the new broker keeps running";
  EXPECT_TRUE(ChildPids((*second)->pid()).empty());
  EXPECT_EQ(ReadyPids(control), survivors);
  // Old connections keep working; the adopted workers report their closes
  // to the new broker, which counted them as active.
  int64_t active = 0;
  for (const v1::Worker& w : ListWorkers(control)) {
    active += w.active_connections();
  }
  EXPECT_EQ(active, 10);
  for (wire::UniqueFd& fd : clients) {
    absl::StatusOr<HttpResponse> r = HttpGet(fd.get(), "/", true);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  clients.clear();
  EXPECT_TRUE(WaitFor(
      [&] {
        int64_t now = 0;
        for (const v1::Worker& w : ListWorkers(control)) {
          now += w.active_connections();
        }
        return now == 0;
      },
      absl::Seconds(10)));
}

TEST(LifecycleTest, UpgradeUnderLoadLosesNothing) {
  std::unique_ptr<BrokerProcess> broker;
  std::vector<pid_t> workers;
  ASSERT_NO_FATAL_FAILURE(StartPool({"--workers=2"}, 2, broker, workers));
  const int port = broker->port();

  // wrk keeps 16 keep-alive connections busy; in-test clients open a new
  // connection per request. Both run through the whole upgrade.
  auto wrk = Subprocess::Start({"wrk", "-t1", "-c16", "-d6s",
                                absl::StrCat("http://127.0.0.1:", port, "/")});
  ASSERT_TRUE(wrk.ok()) << wrk.status();
  RequestLoad load(port, 2, absl::Seconds(10));
  ASSERT_TRUE(WaitFor([&] { return load.served() > 200; }, absl::Seconds(10)));

  const std::string ready = broker->dir() + "/ready-upgrade";
  // The old broker finishes its hand-offs and exits cleanly.
  std::unique_ptr<Subprocess> upgraded;
  ASSERT_NO_FATAL_FAILURE(
      Upgrade(*broker, broker->process(), ready, workers, upgraded));
  const int before = load.served();
  ASSERT_TRUE(
      WaitFor([&] { return load.served() > before + 200; }, absl::Seconds(10)));
  load.Stop();

  absl::StatusOr<int> wrk_exit = (*wrk)->Wait(absl::Seconds(30));
  ASSERT_TRUE(wrk_exit.ok());
  const std::string report = (*wrk)->Stdout();
  EXPECT_EQ(report.find("Socket errors"), std::string::npos) << report;
  EXPECT_EQ(report.find("Non-2xx"), std::string::npos) << report;
  EXPECT_NE(report.find("requests in"), std::string::npos) << report;
  EXPECT_EQ(load.failed(), 0)
      << "connection-per-request clients failed, first: "
      << load.first_failure() << "\nold broker:\n"
      << broker->process().Output() << "\nnew broker:\n"
      << upgraded->Output();
  EXPECT_GT(load.served(), 400);
}

// Upgrades in a row under connection-per-request load from `clients`
// threads, `pause` apart. Requests are timed as during an upgrade (start of
// the new broker to the old one's exit) or steady.
struct UpgradeRun {
  int failed = 0;
  std::string first_failure;
  std::vector<double> steady_ms, upgrade_ms;  // Sorted.
};

void RunUpgradesUnderLoad(int clients, int upgrades, absl::Duration pause,
                          UpgradeRun& run) {
  std::unique_ptr<BrokerProcess> broker;
  std::vector<pid_t> workers;
  ASSERT_NO_FATAL_FAILURE(StartPool({"--workers=2"}, 2, broker, workers));
  const int port = broker->port();

  std::atomic<bool> upgrading{false}, stop{false};
  absl::Mutex mu;  // Guards `run`.
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([&] {
      while (!stop) {
        const bool during = upgrading;
        const absl::Time start = absl::Now();
        absl::StatusOr<HttpResponse> r =
            HttpGetOnce("127.0.0.1", port, "/", absl::Seconds(10));
        const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
        absl::MutexLock lock(&mu);
        if (!r.ok() || r->status != 200) {
          if (run.failed++ == 0) {
            run.first_failure = r.ok() ? absl::StrCat("HTTP ", r->status)
                                       : r.status().ToString();
          }
        }
        (during || upgrading ? run.upgrade_ms : run.steady_ms).push_back(ms);
      }
    });
  }
  absl::Cleanup join = [&] {
    stop = true;
    for (std::thread& t : threads) t.join();
  };
  absl::SleepFor(absl::Seconds(1));  // Steady state, for comparison.

  std::vector<std::unique_ptr<Subprocess>> brokers;
  Subprocess* running = &broker->process();
  for (int i = 0; i < upgrades; ++i) {
    const std::string ready = absl::StrCat(broker->dir(), "/ready-upgrade-", i);
    upgrading = true;
    std::unique_ptr<Subprocess> next;
    ASSERT_NO_FATAL_FAILURE(Upgrade(*broker, *running, ready, workers, next));
    upgrading = false;
    absl::SleepFor(pause);
    brokers.push_back(std::move(next));
    running = brokers.back().get();
  }
  std::move(join).Invoke();
  std::sort(run.steady_ms.begin(), run.steady_ms.end());
  std::sort(run.upgrade_ms.begin(), run.upgrade_ms.end());
}

// Three upgrades under `clients` connection-per-request clients: no request
// fails and none takes over 1 s (asserted), and the line printed gives the
// worst request during the upgrades against the steady state's p99 (the
// issue's target: 5x).
void ExpectThreeUpgradesUnderLoad(int clients) {
  UpgradeRun run;
  ASSERT_NO_FATAL_FAILURE(
      RunUpgradesUnderLoad(clients, 3, absl::Milliseconds(300), run));
  EXPECT_EQ(run.failed, 0) << run.first_failure;
  ASSERT_GT(run.steady_ms.size(), 100u);
  ASSERT_FALSE(run.upgrade_ms.empty());
  const double steady_p99 = run.steady_ms[run.steady_ms.size() * 99 / 100];
  const double worst_upgrade = run.upgrade_ms.back();
  const double worst_steady = run.steady_ms.back();
  // Like for like: the steady state's quantile that the worst of as many
  // requests as the upgrades saw stands for (the worst of n is about the
  // 1 - 1/n quantile).
  const double steady_same_rank =
      run.steady_ms[run.steady_ms.size() -
                    std::max<size_t>(
                        1, run.steady_ms.size() / run.upgrade_ms.size())];
  std::printf(
      "%d clients, 3 upgrades: %zu requests during them, worst %.2f ms; "
      "steady state: %zu requests, p99 %.2f ms, worst %.2f ms, quantile "
      "1-1/%zu %.2f ms; worst/p99 %.1fx\n",
      clients, run.upgrade_ms.size(), worst_upgrade, run.steady_ms.size(),
      steady_p99, worst_steady, run.upgrade_ms.size(), steady_same_rank,
      worst_upgrade / steady_p99);
  EXPECT_LT(worst_upgrade, 1000.0);
}

// The workers move to each new broker as soon as it is up (Reconnect), so
// no request waits for a worker's reconnect back-off. Two clients: a light
// load, whose p99 (under 1 ms) is far below this 2-core machine's own
// scheduling stalls of 3-6 ms. The README's light-load figure comes from
// the line this prints (the bound asserted is the issue's: nothing over
// 1 s).
TEST(LifecycleTest, ThreeUpgradesUnderLoadFailNothingAndStallNothing) {
  ExpectThreeUpgradesUnderLoad(2);
}

// The same under the load of the wrk run (32 connections, one per
// request), with each request timed from its connect and attributed to the
// upgrades exactly; tests/bench/upgrade.sh measures it with wrk itself.
TEST(LifecycleTest, ThreeUpgradesUnderThirtyTwoClients) {
  ExpectThreeUpgradesUnderLoad(32);
}

// Ten quick upgrades under eight clients: connections staged for a worker's
// next batch at the commit used to reach it after its Reconnect, which it
// never read; they waited for the old broker's 5 s deadline and were closed
// (3 of 5 runs failed).
TEST(LifecycleTest, ConnectionsStagedAtTheCommitAreServed) {
  UpgradeRun run;
  ASSERT_NO_FATAL_FAILURE(
      RunUpgradesUnderLoad(8, 10, absl::Milliseconds(50), run));
  EXPECT_EQ(run.failed, 0) << run.first_failure;
  ASSERT_FALSE(run.upgrade_ms.empty());
  EXPECT_LT(run.upgrade_ms.back(), 1000.0);
}

// A connection still queued in the running broker once its workers have
// moved (here both are full: capacity 1, each held by a keep-alive client)
// goes to the new broker, which serves it when a worker has room. Before
// (protocol 1.3), it waited for the old broker's 5 s deadline and was
// closed.
TEST(LifecycleTest, ConnectionQueuedAtTheCommitGoesToTheNewBroker) {
  std::unique_ptr<BrokerProcess> broker;
  std::vector<pid_t> workers;
  ASSERT_NO_FATAL_FAILURE(StartPool(
      {"--workers=2",
       "--worker_cmd=" + BinaryPath("fdbroker-http-worker") + " --capacity=1"},
      2, broker, workers));
  const int port = broker->port();
  std::vector<wire::UniqueFd> holders;
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<wire::UniqueFd> fd = ConnectTcp("127.0.0.1", port);
    ASSERT_TRUE(fd.ok());
    absl::StatusOr<HttpResponse> r = HttpGet(fd->get(), "/", true);
    ASSERT_TRUE(r.ok() && r->status == 200);
    holders.push_back(*std::move(fd));
  }
  absl::StatusOr<HttpResponse> queued = absl::UnknownError("not yet");
  std::thread client(
      [&] { queued = HttpGetOnce("127.0.0.1", port, "/", absl::Seconds(30)); });
  absl::Cleanup join = [&] { client.join(); };
  const std::string metrics =
      WaitForReadyValue(broker->dir() + "/ready", "metrics");
  ASSERT_TRUE(WaitFor(
      [&] {
        absl::StatusOr<std::string> scrape = ScrapeMetrics(metrics);
        return scrape.ok() &&
               MetricSamples(*scrape)["fdbroker_pending_connections"] == 1;
      },
      absl::Seconds(10)));

  const std::string ready = broker->dir() + "/ready-upgrade";
  std::unique_ptr<Subprocess> upgraded;
  ASSERT_NO_FATAL_FAILURE(
      Upgrade(*broker, broker->process(), ready, workers, upgraded));
  EXPECT_TRUE(absl::StrContains(broker->process().Stderr(),
                                "1 queued connection(s) passed on"))
      << broker->process().Output();
  holders[0].Reset();  // A worker has room again.
  std::move(join).Invoke();
  ASSERT_TRUE(queued.ok()) << queued.status() << upgraded->Output();
  EXPECT_EQ(queued->status, 200);
}

// Nobody accepts without a worker to place on (protocol 1.4,
// UpgradeAccepting): the running broker moves half of its workers first and
// places with the others until the new broker has one of them. These
// workers take 400 ms to move. Before, both moved at once and the new
// broker, accepting from the start, kept its clients waiting for them.
TEST(LifecycleTest, NoClientWaitsForAWorkerThatIsMoving) {
  auto started = BrokerProcess::Start(
      {"--workers=2", "--worker_cmd=" + BinaryPath("fdbroker-fake-worker") +
                          " --mode=release --reconnect_delay_ms=400"});
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<BrokerProcess> broker = *std::move(started);
  const std::string control =
      WaitForReadyValue(broker->dir() + "/ready", "control");
  std::set<int> pool;
  ASSERT_TRUE(WaitFor([&] { return (pool = ReadyPids(control)).size() == 2; },
                      absl::Seconds(30)));
  const std::vector<pid_t> workers(pool.begin(), pool.end());
  for (pid_t w : workers) broker->process().KillOnDestruction(w);
  const int port = broker->port();
  std::atomic<bool> stop{false};
  absl::Mutex mu;
  int failed = 0, answered = 0;
  std::string first_failure;
  absl::Duration worst;
  std::thread client([&] {
    while (!stop) {
      const absl::Time start = absl::Now();
      absl::StatusOr<LineClient> line = LineClient::Connect(port);
      absl::StatusOr<int> pid = line.ok() ? line->Ask("ping") : line.status();
      const absl::Duration took = absl::Now() - start;
      absl::MutexLock lock(&mu);
      if (!pid.ok()) {
        if (failed++ == 0) first_failure = pid.status().ToString();
        continue;
      }
      ++answered;
      worst = std::max(worst, took);
    }
  });
  absl::Cleanup join = [&] {
    stop = true;
    client.join();
  };
  const std::string ready = broker->dir() + "/ready-upgrade";
  std::unique_ptr<Subprocess> upgraded;
  ASSERT_NO_FATAL_FAILURE(
      Upgrade(*broker, broker->process(), ready, workers, upgraded));
  std::move(join).Invoke();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(failed, 0) << first_failure;
  EXPECT_GT(answered, 10);
  EXPECT_LT(worst, absl::Milliseconds(300))
      << "old broker:\n"
      << broker->process().Output() << "\nnew broker:\n"
      << upgraded->Output();
}

// A planned upgrade is two-phase: the running broker keeps serving until
// the new one says it is fully up. A new broker that fails after taking the
// sockets (here: its TLS key cannot be read) changes nothing.
TEST(LifecycleTest, UpgradeThatFailsBeforeItIsUpChangesNothing) {
  std::unique_ptr<BrokerProcess> broker;
  std::vector<pid_t> workers;
  ASSERT_NO_FATAL_FAILURE(StartPool({"--workers=2"}, 2, broker, workers));
  const std::set<int> pool(workers.begin(), workers.end());
  // Readable, so the flags pass validation; not PEM, so the control plane
  // cannot start once the sockets are taken.
  const std::string garbage = broker->dir() + "/garbage.pem";
  ASSERT_TRUE(wire::WriteFileAtomically(garbage, "not a certificate\n").ok());
  auto failing =
      StartSecondBroker(*broker, broker->dir() + "/ready-failing",
                        {"--upgrade", "--workers=2", "--tls_cert=" + garbage,
                         "--tls_key=" + garbage});
  ASSERT_TRUE(failing.ok());
  absl::StatusOr<int> failed_exit = (*failing)->Wait(absl::Seconds(30));
  ASSERT_TRUE(failed_exit.ok());
  EXPECT_NE(*failed_exit, 0) << (*failing)->Output();
  EXPECT_NE((*failing)->Stderr().find("is not a PEM file"), std::string::npos)
      << (*failing)->Output();

  // The running broker carries on: it accepts, places, answers its control
  // plane, with the same workers, and it can still be upgraded.
  EXPECT_TRUE(broker->process().Running()) << broker->process().Output();
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<HttpResponse> r =
        HttpGetOnce("127.0.0.1", broker->port(), "/", absl::Seconds(5));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(pool.count(PidOf(*r)), 1u);
  }
  EXPECT_TRUE(
      WaitFor([&] { return ReadyPids(broker->control_address()) == pool; },
              absl::Seconds(20)))
      << broker->process().Output();

  const std::string ready = broker->dir() + "/ready-upgrade";
  std::unique_ptr<Subprocess> upgraded;
  ASSERT_NO_FATAL_FAILURE(
      Upgrade(*broker, broker->process(), ready, workers, upgraded));
}

// Several listeners: the upgrade hands every one over (same names), and
// clients are served on each before, across and after it.
TEST(LifecycleTest, UpgradeCarriesEveryListener) {
  const std::string dir = MakeTempDir();
  const std::string unix_path = dir + "/clients.sock";
  const std::vector<std::string> listen = {
      "--listen=127.0.0.1:0", "--listen=[::1]:0",
      "--listen=unix:" + unix_path + ",mode=0600"};
  std::vector<std::string> flags = listen;
  flags.push_back("--workers=1");
  std::unique_ptr<BrokerProcess> broker;
  std::vector<pid_t> workers;
  ASSERT_NO_FATAL_FAILURE(StartPool(flags, 1, broker, workers));
  const std::string names =
      WaitForReadyValue(broker->dir() + "/ready", "listeners");
  const std::vector<std::string> listeners = absl::StrSplit(names, ' ');
  ASSERT_EQ(listeners.size(), 3u) << names;
  // A connection to each listener, HTTP on every one.
  const auto connect = [&](size_t i) -> absl::StatusOr<wire::UniqueFd> {
    if (i < 2) {
      absl::StatusOr<wire::HostPort> hp = wire::HostPort::Parse(listeners[i]);
      if (!hp.ok()) return hp.status();
      return ConnectTcp(hp->host, hp->port);
    }
    return ConnectUnix(unix_path);
  };
  const auto served = [&](size_t i) {
    absl::StatusOr<wire::UniqueFd> fd = connect(i);
    if (!fd.ok()) return false;
    absl::StatusOr<HttpResponse> r = HttpGet(fd->get(), "/", false);
    return r.ok() && r->status == 200;
  };
  std::vector<wire::UniqueFd> kept;
  for (size_t i = 0; i < listeners.size(); ++i) {
    EXPECT_TRUE(served(i)) << listeners[i];
    absl::StatusOr<wire::UniqueFd> fd = connect(i);
    ASSERT_TRUE(fd.ok()) << fd.status();
    kept.push_back(*std::move(fd));
  }

  const std::string ready = broker->dir() + "/ready-upgrade";
  flags.push_back("--upgrade");
  auto upgraded = StartSecondBroker(*broker, ready, flags);
  ASSERT_TRUE(upgraded.ok());
  for (pid_t w : workers) (*upgraded)->KillOnDestruction(w);
  absl::StatusOr<int> old_exit = broker->process().Wait(absl::Seconds(20));
  ASSERT_TRUE(old_exit.ok());
  EXPECT_EQ(*old_exit, 0) << broker->process().Output();
  EXPECT_EQ(WaitForReadyValue(ready, "listeners"), names)
      << (*upgraded)->Output();
  for (size_t i = 0; i < listeners.size(); ++i) {
    EXPECT_TRUE(WaitFor([&] { return served(i); }, absl::Seconds(20)))
        << listeners[i] << "\n"
        << (*upgraded)->Output();
    // The connection made before the upgrade is served too.
    absl::StatusOr<HttpResponse> r = HttpGet(kept[i].get(), "/", true);
    ASSERT_TRUE(r.ok()) << listeners[i] << ": " << r.status();
    EXPECT_EQ(r->status, 200);
  }
  kept.clear();
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

TEST(LifecycleTest, SocketActivationServesOnTheInheritedSocket) {
  const std::string dir = MakeTempDir();
  std::vector<int> ports;
  auto broker = StartActivated(dir, 1, {"--listen=127.0.0.1:1"}, ports);
  ASSERT_TRUE(broker.ok()) << broker.status();
  const int port = ports[0];
  absl::StatusOr<HttpResponse> r;
  ASSERT_TRUE(WaitFor(
      [&] {
        r = HttpGetOnce("127.0.0.1", port, "/");
        return r.ok() && r->status == 200;
      },
      absl::Seconds(20)))
      << (*broker)->Output();
  // The worker did not inherit the activation variables.
  const int worker = PidOf(*r);
  absl::StatusOr<std::string> environ =
      ReadFile(absl::StrCat("/proc/", worker, "/environ"));
  ASSERT_TRUE(environ.ok());
  EXPECT_EQ(environ->find("LISTEN_PID"), std::string::npos);
  EXPECT_EQ(environ->find("LISTEN_FDS"), std::string::npos);
}

// LISTEN_FDS=2: both inherited sockets serve, and the i-th takes the i-th
// --listen's options (here the second speaks the PROXY protocol).
TEST(LifecycleTest, SocketActivationServesEveryInheritedSocket) {
  const std::string dir = MakeTempDir();
  std::vector<int> ports;
  auto broker = StartActivated(
      dir, 2, {"--listen=127.0.0.1:1", "--listen=127.0.0.1:1,proxy_protocol"},
      ports);
  ASSERT_TRUE(broker.ok()) << broker.status();
  const int plain = ports[0], proxied = ports[1];
  ASSERT_TRUE(WaitFor(
      [&] {
        absl::StatusOr<HttpResponse> r = HttpGetOnce("127.0.0.1", plain, "/");
        return r.ok() && r->status == 200;
      },
      absl::Seconds(20)))
      << (*broker)->Output();
  absl::StatusOr<wire::UniqueFd> fd = ConnectTcp("127.0.0.1", proxied);
  ASSERT_TRUE(fd.ok()) << fd.status();
  const std::string header = "PROXY TCP4 192.0.2.5 127.0.0.1 5000 80\r\n";
  ASSERT_EQ(::send(fd->get(), header.data(), header.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(header.size()));
  absl::StatusOr<HttpResponse> r = HttpGet(fd->get(), "/", false);
  ASSERT_TRUE(r.ok()) << r.status() << (*broker)->Output();
  EXPECT_EQ(r->headers["x-client-address"], "192.0.2.5:5000");
  ASSERT_TRUE((*broker)->Signal(SIGTERM).ok());
  absl::StatusOr<int> code = (*broker)->Wait(absl::Seconds(20));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0) << (*broker)->Output();
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace
}  // namespace fdbroker::testing
