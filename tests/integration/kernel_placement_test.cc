// --placement=kernel with the real broker and real fdbroker-http-worker
// workers: each worker accepts from its own listener of the broker's
// SO_REUSEPORT group, the broker steers the kernel by weights, and a worker
// that drains or dies loses nothing queued on its listener (the broker
// accepts it and hands it off).
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "fdbroker/v1/broker.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/integration/control_client.h"
#include "tests/integration/request_load.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "wire/files.h"

namespace fdbroker::testing {
namespace {

// The pid of the worker that answered GET / on a new connection (from the
// local address `source`, if given); 0 if the request failed.
int ServedBy(int port, const std::string& source = "") {
  absl::StatusOr<wire::UniqueFd> fd =
      ConnectTcp("127.0.0.1", port, absl::Seconds(10), source);
  if (!fd.ok()) return 0;
  absl::StatusOr<HttpResponse> r =
      HttpGet(fd->get(), "/", /*keep_alive=*/false, absl::Seconds(10));
  if (!r.ok() || r->status != 200) return 0;
  int pid = 0;
  return absl::SimpleAtoi(r->headers["x-worker-pid"], &pid) ? pid : 0;
}

double MetricOf(const std::string& metrics, const std::string& sample) {
  std::map<std::string, double> samples =
      MetricSamples(ScrapeMetrics(metrics).value_or(""));
  auto it = samples.find(sample);
  return it == samples.end() ? -1 : it->second;
}

// Waits until the placement program of the broker behind `metrics` weighs
// the workers: of 10 fresh connections at least `min_kernel` are accepted
// by workers themselves (10 when every worker has a listener: the broker's
// own socket then weighs nothing).
bool KernelPlaced(int port, const std::string& metrics, int min_kernel = 10) {
  return WaitFor(
      [&] {
        const double before =
            MetricOf(metrics, "fdbroker_connections_kernel_accepted_total");
        for (int i = 0; i < 10; ++i) ServedBy(port);
        return WaitFor(
            [&] {
              return MetricOf(metrics,
                              "fdbroker_connections_kernel_accepted_total") >=
                     before + min_kernel;
            },
            absl::Seconds(2));
      },
      absl::Seconds(30));
}

// A new keep-alive connection after one request on it; `pid` is the worker
// that served it.
absl::StatusOr<wire::UniqueFd> KeepAliveClient(int port, int* pid) {
  absl::StatusOr<wire::UniqueFd> fd = ConnectTcp("127.0.0.1", port);
  if (!fd.ok()) return fd.status();
  absl::StatusOr<HttpResponse> r =
      HttpGet(fd->get(), "/", /*keep_alive=*/true, absl::Seconds(10));
  if (!r.ok()) return r.status();
  if (r->status != 200 || !absl::SimpleAtoi(r->headers["x-worker-pid"], pid)) {
    return absl::InternalError(absl::StrCat("status ", r->status));
  }
  return fd;
}

class KernelPlacementTest : public ::testing::Test {
 protected:
  void Start(std::vector<std::string> flags, size_t workers) {
    ASSERT_NO_FATAL_FAILURE(StartControlledBroker(std::move(flags), workers,
                                                  broker_, stub_, metrics_));
  }

  std::vector<v1::Worker> Ready() { return ReadyWorkers(*stub_); }

  double Metric(const std::string& sample) {
    return MetricOf(metrics_, sample);
  }

  bool WaitForKernelPlacement(int port, int min_kernel = 10) {
    return KernelPlaced(port, metrics_, min_kernel);
  }

  // Once a ready worker (of pid `pid`, if given) holds exactly one
  // connection, drains it (30 s); that worker, or id 0 on failure.
  v1::Worker DrainWorkerWithOneConnection(int pid = 0) {
    v1::Worker victim;
    const bool found = WaitFor(
        [&] {
          for (const v1::Worker& w : Ready()) {
            if (w.active_connections() == 1 && (pid == 0 || w.pid() == pid)) {
              victim = w;
            }
          }
          return victim.id() != 0;
        },
        absl::Seconds(10));
    EXPECT_TRUE(found) << "no worker holds one connection";
    if (!found) return v1::Worker();
    v1::DrainWorkerRequest request;
    request.set_worker_id(victim.id());
    request.mutable_timeout()->set_seconds(30);
    v1::DrainWorkerResponse response;
    const grpc::Status status =
        stub_->DrainWorker(RpcContext().get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return status.ok() ? victim : v1::Worker();
  }

  std::unique_ptr<BrokerProcess> broker_;
  std::string metrics_;
  std::unique_ptr<v1::BrokerService::Stub> stub_;
};

TEST_F(KernelPlacementTest, WorkersAcceptTheirOwnConnectionsOnBothListeners) {
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=2", "--placement=kernel"}, 2));
  const int port = broker_->port();
  ASSERT_TRUE(WaitForKernelPlacement(port)) << broker_->process().Output();
  const double handed = Metric("fdbroker_connections_handed_off_total");
  const double kernel = Metric("fdbroker_connections_kernel_accepted_total");
  std::map<int, int> by_pid;
  constexpr int kRequests = 200;
  for (int i = 0; i < kRequests; ++i) ++by_pid[ServedBy(port)];
  EXPECT_EQ(by_pid.count(0), 0u) << "failed requests: " << by_pid[0];
  ASSERT_EQ(by_pid.size(), 2u);
  std::printf("spread over the two workers: %d / %d of %d\n",
              by_pid.begin()->second, by_pid.rbegin()->second, kRequests);
  for (const auto& [pid, count] : by_pid) {
    // Random placement with equal weights: 100 each on average, a binomial
    // spread of about 7.
    EXPECT_GT(count, 50) << "pid " << pid;
  }
  // None went through the broker; the workers report every one.
  EXPECT_TRUE(WaitFor(
      [&] {
        return Metric("fdbroker_connections_kernel_accepted_total") ==
               kernel + kRequests;
      },
      absl::Seconds(10)));
  EXPECT_EQ(Metric("fdbroker_connections_handed_off_total"), handed);
  // And the load figures return to zero from the workers' reports.
  EXPECT_TRUE(
      WaitFor([&] { return Metric("fdbroker_connections_active") == 0; },
              absl::Seconds(10)));
}

TEST_F(KernelPlacementTest, DrainingWorkerGetsNoNewConnectionsAndLosesNone) {
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=2", "--placement=kernel"}, 2));
  const int port = broker_->port();
  ASSERT_TRUE(WaitForKernelPlacement(port)) << broker_->process().Output();
  // A slow request keeps one worker draining for a while.
  absl::StatusOr<wire::UniqueFd> slow = ConnectTcp("127.0.0.1", port);
  ASSERT_TRUE(slow.ok());
  std::thread slow_request([&] {
    absl::StatusOr<HttpResponse> r =
        HttpGet(slow->get(), "/sleep?ms=4000",
                /*keep_alive=*/false, absl::Seconds(20));
    EXPECT_TRUE(r.ok() && r->status == 200) << r.status();
  });
  // Which worker holds it: the one with an active connection.
  const v1::Worker victim = DrainWorkerWithOneConnection();
  ASSERT_NE(victim.id(), 0u);
  // From the Drain on, every new connection is served by the other worker,
  // including any the kernel queued on the victim's listener before the
  // placement program dropped it (the broker accepts and hands those off).
  int failed = 0;
  int on_victim = 0;
  for (int i = 0; i < 150; ++i) {
    const int pid = ServedBy(port);
    failed += pid == 0;
    on_victim += pid == victim.pid();
  }
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(on_victim, 0);
  slow_request.join();
  EXPECT_TRUE(
      WaitFor([&] { return ProcessGone(victim.pid()); }, absl::Seconds(20)));
}

TEST_F(KernelPlacementTest, DrainMovesIdleWorkerAcceptedConnections) {
  // round_robin: no automatic rebalance moves the clients before the drain
  // does (least_conn's would, were the random split to stay uneven 1 s).
  ASSERT_NO_FATAL_FAILURE(
      Start({"--workers=2", "--placement=kernel", "--policy=round_robin"}, 2));
  const int port = broker_->port();
  ASSERT_TRUE(WaitForKernelPlacement(port)) << broker_->process().Output();
  // Keep-alive clients, each accepted by a worker itself; which one?
  constexpr int kClients = 8;
  std::vector<wire::UniqueFd> clients;
  std::map<int, std::vector<int>> clients_of;  // pid -> client indexes
  for (int i = 0; i < kClients; ++i) {
    int pid = 0;
    absl::StatusOr<wire::UniqueFd> fd = KeepAliveClient(port, &pid);
    ASSERT_TRUE(fd.ok()) << fd.status();
    clients_of[pid].push_back(i);
    clients.push_back(*std::move(fd));
  }
  // The victim: a worker holding some of them (the split is random).
  std::vector<v1::Worker> ready = Ready();
  ASSERT_EQ(ready.size(), 2u);
  const v1::Worker& victim =
      clients_of[ready[0].pid()].empty() ? ready[1] : ready[0];
  const int other =
      victim.pid() == ready[0].pid() ? ready[1].pid() : ready[0].pid();
  const std::vector<int> moving = clients_of[victim.pid()];
  ASSERT_FALSE(moving.empty());
  v1::DrainWorkerRequest request;
  request.set_worker_id(victim.id());
  request.mutable_timeout()->set_seconds(30);
  v1::DrainWorkerResponse response;
  ASSERT_TRUE(stub_->DrainWorker(RpcContext().get(), request, &response).ok());
  // Its idle connections are released and handed to the other worker: the
  // clients' next request on the same TCP connection is answered there.
  ASSERT_TRUE(
      WaitFor([&] { return ProcessGone(victim.pid()); }, absl::Seconds(20)));
  for (int i : moving) {
    absl::StatusOr<HttpResponse> r =
        HttpGet(clients[i].get(), "/",
                /*keep_alive=*/true, absl::Seconds(10));
    ASSERT_TRUE(r.ok() && r->status == 200)
        << "client " << i << ": " << r.status();
    EXPECT_EQ(r->headers["x-worker-pid"], absl::StrCat(other));
  }
  EXPECT_TRUE(WaitFor(
      [&] {
        return Metric(
                   "fdbroker_connections_migrated_total{reason=\"drain\"}") ==
               static_cast<double>(moving.size());
      },
      absl::Seconds(10)));
}

// Which worker serves each client address: `connects` connections from
// each of 127.0.0.<first> ... (count addresses); a pid per address, or 0 if
// a request failed or the address was served by two workers.
std::map<std::string, int> WorkerOfAddress(int port, int first, int count,
                                           int connects) {
  std::map<std::string, int> worker_of;
  for (int host = first; host < first + count; ++host) {
    const std::string source = absl::StrCat("127.0.0.", host);
    std::set<int> pids;
    for (int i = 0; i < connects; ++i) pids.insert(ServedBy(port, source));
    worker_of[source] = pids.size() == 1 ? *pids.begin() : 0;
    if (pids.size() != 1) {
      std::printf("%s served by %zu pids (0: failed)\n", source.c_str(),
                  pids.size());
    }
  }
  return worker_of;
}

TEST_F(KernelPlacementTest, IpHashKeepsEachClientAddressOnOneWorker) {
  ASSERT_NO_FATAL_FAILURE(
      Start({"--workers=2", "--placement=kernel", "--policy=ip_hash"}, 2));
  const int port = broker_->port();
  ASSERT_TRUE(WaitForKernelPlacement(port)) << broker_->process().Output();
  const double handed = Metric("fdbroker_connections_handed_off_total");
  // 16 addresses, 20 connections each: one worker per address, both used.
  constexpr int kAddresses = 16;
  std::map<std::string, int> worker_of =
      WorkerOfAddress(port, 10, kAddresses, 20);
  std::map<int, std::vector<std::string>> addresses_of;
  for (const auto& [source, pid] : worker_of) {
    EXPECT_NE(pid, 0) << source;
    addresses_of[pid].push_back(source);
  }
  ASSERT_EQ(addresses_of.size(), 2u);
  std::printf("ip_hash: %zu / %zu of %d addresses\n",
              addresses_of.begin()->second.size(),
              addresses_of.rbegin()->second.size(), kAddresses);
  // The kernel placed them all; none went through the broker.
  EXPECT_EQ(Metric("fdbroker_connections_handed_off_total"), handed);

  // A slow request from one of its addresses keeps the victim draining.
  const int victim_pid = addresses_of.begin()->first;
  const int other_pid = addresses_of.rbegin()->first;
  const std::string victim_address = addresses_of[victim_pid][0];
  absl::StatusOr<wire::UniqueFd> slow =
      ConnectTcp("127.0.0.1", port, absl::Seconds(10), victim_address);
  ASSERT_TRUE(slow.ok()) << slow.status();
  std::thread slow_request([&] {
    absl::StatusOr<HttpResponse> r =
        HttpGet(slow->get(), "/sleep?ms=4000",
                /*keep_alive=*/false, absl::Seconds(20));
    EXPECT_TRUE(r.ok() && r->status == 200) << r.status();
    EXPECT_EQ(r.ok() ? r->headers["x-worker-pid"] : "",
              absl::StrCat(victim_pid));
  });
  ASSERT_NE(DrainWorkerWithOneConnection(victim_pid).id(), 0u);
  // While it drains, its addresses move to the other worker and the other
  // worker's stay: nothing fails.
  worker_of = WorkerOfAddress(port, 10, kAddresses, 3);
  for (const auto& [source, pid] : worker_of) {
    EXPECT_EQ(pid, other_pid) << source;
  }
  slow_request.join();
  EXPECT_TRUE(
      WaitFor([&] { return ProcessGone(victim_pid); }, absl::Seconds(20)));
}

TEST_F(KernelPlacementTest, UnevenKeepAliveLoadIsRebalanced) {
  // least_conn (the default): one worker takes all 16 keep-alive clients,
  // then a second registers. The kernel cannot move them; the broker sees
  // the loads stay uneven and rebalances them to 8 / 8.
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=1", "--placement=kernel"}, 1));
  const int port = broker_->port();
  ASSERT_TRUE(WaitForKernelPlacement(port)) << broker_->process().Output();
  constexpr int kClients = 16;
  std::vector<wire::UniqueFd> clients;
  for (int i = 0; i < kClients; ++i) {
    int pid = 0;
    absl::StatusOr<wire::UniqueFd> fd = KeepAliveClient(port, &pid);
    ASSERT_TRUE(fd.ok()) << fd.status();
    clients.push_back(*std::move(fd));
  }
  auto external = Subprocess::Start({BinaryPath("fdbroker-http-worker"),
                                     "--socket=" + broker_->socket_path()});
  ASSERT_TRUE(external.ok()) << external.status();
  std::vector<int64_t> active;
  const bool even = WaitFor(
      [&] {
        active.clear();
        for (const v1::Worker& w : Ready()) {
          active.push_back(w.active_connections());
        }
        return active == std::vector<int64_t>{8, 8};
      },
      absl::Seconds(15));
  EXPECT_TRUE(even) << "active connections per worker: "
                    << absl::StrJoin(active, " / ");
  // Every client keeps its connection, wherever it is served now.
  std::set<std::string> pids;
  for (wire::UniqueFd& client : clients) {
    absl::StatusOr<HttpResponse> r =
        HttpGet(client.get(), "/", /*keep_alive=*/true, absl::Seconds(10));
    ASSERT_TRUE(r.ok() && r->status == 200) << r.status();
    pids.insert(r->headers["x-worker-pid"]);
  }
  EXPECT_EQ(pids.size(), 2u);
}

TEST_F(KernelPlacementTest, MixedPoolServesHandoffOnlyWorkersByHandoff) {
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=1", "--placement=kernel"}, 1));
  const int port = broker_->port();
  auto external = Subprocess::Start({BinaryPath("fdbroker-http-worker"),
                                     "--socket=" + broker_->socket_path(),
                                     "--no_listener_grant"});
  ASSERT_TRUE(external.ok()) << external.status();
  ASSERT_TRUE(WaitFor([&] { return Ready().size() == 2; }, absl::Seconds(20)))
      << broker_->process().Output() << (*external)->Output();
  ASSERT_TRUE(WaitForKernelPlacement(port, /*min_kernel=*/1))
      << broker_->process().Output();
  const double handed = Metric("fdbroker_connections_handed_off_total");
  std::map<int, int> by_pid;
  for (int i = 0; i < 200; ++i) ++by_pid[ServedBy(port)];
  EXPECT_EQ(by_pid.count(0), 0u);
  // The external worker is reached through the broker's own listener
  // (group index 0, weighted by the hand-off workers).
  EXPECT_GT(by_pid[(*external)->pid()], 50);
  EXPECT_TRUE(WaitFor(
      [&] {
        return Metric("fdbroker_connections_handed_off_total") > handed + 50;
      },
      absl::Seconds(10)));
  EXPECT_EQ(by_pid.size(), 2u);
}

TEST_F(KernelPlacementTest, QueueOfAKilledWorkersListenerIsServedByOthers) {
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=1", "--placement=kernel"}, 1));
  const int port = broker_->port();
  // An external worker is not restarted: its listener stays without a
  // worker, and only the broker can serve what is queued there.
  auto external = Subprocess::Start({BinaryPath("fdbroker-http-worker"),
                                     "--socket=" + broker_->socket_path()});
  ASSERT_TRUE(external.ok()) << external.status();
  ASSERT_TRUE(WaitFor([&] { return Ready().size() == 2; }, absl::Seconds(20)));
  ASSERT_TRUE(WaitForKernelPlacement(port)) << broker_->process().Output();
  // Stopped, it still weighs as much as the other: the kernel queues about
  // half of the next connections on its listener, unaccepted.
  ASSERT_TRUE((*external)->Signal(SIGSTOP).ok());
  // 40, so that the kernel's draw leaves at least 5 to the running worker
  // but for a chance of about 1e-7 (with 20 and 5, 0.6 %: it happened).
  constexpr int kClients = 40;
  std::atomic<int> served{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&] {
      absl::StatusOr<HttpResponse> r =
          HttpGetOnce("127.0.0.1", port, "/", absl::Seconds(20));
      if (r.ok() && r->status == 200) ++served;
    });
  }
  // Until the queue holds some: connections the stopped worker has not
  // accepted and that are not served yet.
  const bool queued = WaitFor([&] { return served < kClients && served >= 5; },
                              absl::Seconds(10));
  ASSERT_TRUE((*external)->Signal(SIGKILL).ok());
  for (std::thread& t : clients) t.join();
  EXPECT_TRUE(queued);
  EXPECT_EQ(served, kClients) << broker_->process().Output();
}

// Connections per request from several threads for `duration` while a
// worker is SIGKILLed every few hundred ms (only while the pool is
// complete). Returns the clients' outcome.
struct ChaosOutcome {
  int served = 0;
  int cut = 0;       // Reset or closed early: the request's worker died.
  int timeouts = 0;  // No answer at all: stranded (never accepted).
  int kills = 0;
};

ChaosOutcome RunKillChaos(BrokerProcess& broker, size_t workers,
                          absl::Duration duration) {
  constexpr int kClients = 4;
  std::atomic<int> served{0}, cut{0}, timeouts{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> clients;
  const int port = broker.port();
  for (int t = 0; t < kClients; ++t) {
    clients.emplace_back([&] {
      while (!done) {
        absl::StatusOr<wire::UniqueFd> fd =
            ConnectTcp("127.0.0.1", port, absl::Seconds(10));
        if (!fd.ok()) {
          ++cut;
          continue;
        }
        // Generous: a timeout means a stranded connection, not a slow one
        // (sanitizer builds on a busy machine).
        absl::StatusOr<HttpResponse> r =
            HttpGet(fd->get(), "/", /*keep_alive=*/false, absl::Seconds(15));
        if (r.ok() && r->status == 200) {
          ++served;
        } else if (absl::IsDeadlineExceeded(r.status())) {
          ++timeouts;
        } else {
          ++cut;
        }
      }
    });
  }
  ChaosOutcome outcome;
  std::mt19937 random(20261205);
  const absl::Time end = absl::Now() + duration;
  while (absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(300));
    std::vector<pid_t> pids = broker.WorkerPids();
    if (pids.size() != workers) continue;
    ::kill(pids[random() % pids.size()], SIGKILL);
    ++outcome.kills;
  }
  done = true;
  for (std::thread& t : clients) t.join();
  outcome.served = served;
  outcome.cut = cut;
  outcome.timeouts = timeouts;
  return outcome;
}

TEST_F(KernelPlacementTest, SigkillUnderLoadLosesNoMoreThanHandoffMode) {
  std::map<std::string, ChaosOutcome> outcomes;
  for (const std::string mode : {"handoff", "kernel"}) {
    ASSERT_NO_FATAL_FAILURE(
        Start({"--workers=3", "--placement=" + mode, "--drain_timeout=5s"}, 3));
    if (mode == "kernel") {
      ASSERT_TRUE(WaitForKernelPlacement(broker_->port()));
    }
    outcomes[mode] = RunKillChaos(*broker_, 3, absl::Seconds(5));
    const ChaosOutcome& o = outcomes[mode];
    std::printf(
        "--placement=%s: %d kills, %d served, %d cut with their worker, %d "
        "timed out\n",
        mode.c_str(), o.kills, o.served, o.cut, o.timeouts);
    broker_.reset();
  }
  const ChaosOutcome& kernel = outcomes["kernel"];
  const ChaosOutcome& handoff = outcomes["handoff"];
  EXPECT_GT(kernel.kills, 5);
  EXPECT_GT(kernel.served, 100);
  // Nothing is stranded on a dead worker's listener: the broker accepts
  // what was queued there. Only requests in progress on the killed worker
  // fail, as in handoff mode (at most one per client thread and kill).
  EXPECT_EQ(kernel.timeouts, 0);
  EXPECT_EQ(handoff.timeouts, 0);
  EXPECT_LE(kernel.cut, 4 * kernel.kills);
}

// ---- Upgrades and crash adoption (the listeners travel too) -------------

// A broker on `first`'s hand-off socket (an --upgrade one, or a restart
// after a crash) with `placement`, writing `ready`.
absl::StatusOr<std::unique_ptr<Subprocess>> StartNextBroker(
    const BrokerProcess& first, const std::string& ready,
    std::vector<std::string> extra, const std::string& placement = "kernel") {
  std::vector<std::string> argv = {
      BinaryPath("fdbroker"),
      "--control=127.0.0.1:0",
      "--metrics=127.0.0.1:0",
      "--listen=127.0.0.1:" + std::to_string(first.port()),
      "--socket=" + first.socket_path(),
      "--ready_file=" + ready,
      "--placement=" + placement,
      "--drain_timeout=5s"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return Subprocess::Start(argv);
}

std::string ReadyValue(const std::string& ready, const std::string& key) {
  std::string value;
  WaitFor(
      [&] {
        absl::StatusOr<std::map<std::string, std::string>> values =
            ReadKeyValueFile(ready);
        if (!values.ok()) return false;
        value = (*values)[key];
        return !value.empty();
      },
      absl::Seconds(30));
  return value;
}

std::unique_ptr<v1::BrokerService::Stub> StubFor(const std::string& control) {
  return v1::BrokerService::NewStub(
      grpc::CreateChannel(control, grpc::InsecureChannelCredentials()));
}

// Three upgrades in a row under connection-per-request load: the workers'
// listeners travel in the UpgradeHandover, each moving worker returns its
// own with its Hello and keeps accepting from it, and the group's indexes
// stay valid (protocol.md §7.9, §7.10).
TEST_F(KernelPlacementTest, ThreeUpgradesUnderLoadFailNothing) {
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=2", "--placement=kernel"}, 2));
  BrokerProcess* broker = broker_.get();
  const std::string& metrics = metrics_;
  const std::vector<pid_t> workers = broker->WorkerPids();
  for (pid_t w : workers) broker->process().KillOnDestruction(w);
  const std::set<int> pool(workers.begin(), workers.end());
  const int port = broker->port();
  ASSERT_TRUE(KernelPlaced(port, metrics)) << broker->process().Output();

  RequestLoad load(port, 2);
  ASSERT_TRUE(WaitFor([&] { return load.served() > 100; }, absl::Seconds(20)));
  std::vector<std::unique_ptr<Subprocess>> brokers;
  Subprocess* running = &broker->process();
  for (int i = 0; i < 3; ++i) {
    const std::string ready = absl::StrCat(broker->dir(), "/ready-up-", i);
    auto next = StartNextBroker(*broker, ready, {"--upgrade", "--workers=2"});
    ASSERT_TRUE(next.ok()) << next.status();
    for (pid_t w : workers) (*next)->KillOnDestruction(w);
    absl::StatusOr<int> old_exit = running->Wait(absl::Seconds(30));
    ASSERT_TRUE(old_exit.ok()) << running->Output() << (*next)->Output();
    EXPECT_EQ(*old_exit, 0) << running->Output();
    const std::string control = ReadyValue(ready, "control");
    const std::string next_metrics = ReadyValue(ready, "metrics");
    ASSERT_FALSE(control.empty() || next_metrics.empty()) << (*next)->Output();
    auto next_stub = StubFor(control);
    // The same workers (same pids), none started anew.
    ASSERT_TRUE(WaitFor([&] { return ReadyPids(*next_stub) == pool; },
                        absl::Seconds(20)))
        << (*next)->Output();
    const int served = load.served();
    ASSERT_TRUE(WaitFor([&] { return load.served() > served + 100; },
                        absl::Seconds(20)));
    // Still placed by the kernel: the workers accept on their listeners.
    ASSERT_TRUE(KernelPlaced(port, next_metrics)) << (*next)->Output();
    EXPECT_NE((*next)->Output().find("back on its listener"), std::string::npos)
        << (*next)->Output();
    brokers.push_back(*std::move(next));
    running = brokers.back().get();
  }
  load.Stop();
  std::printf("3 upgrades under load: %d served, %d failed\n", load.served(),
              load.failed());
  EXPECT_EQ(load.failed(), 0) << load.first_failure() << "\n"
                              << running->Output();
  EXPECT_EQ(std::set<int>(workers.begin(), workers.end()), pool);
  for (pid_t w : workers) EXPECT_FALSE(ProcessGone(w));
}

// An upgrade whose new broker fails before it is up (an unusable
// certificate) leaves the running broker's kernel placement as it was.
TEST_F(KernelPlacementTest, FailedUpgradeLeavesPlacementWorking) {
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=2", "--placement=kernel"}, 2));
  BrokerProcess* broker = broker_.get();
  const std::string& metrics = metrics_;
  const std::vector<pid_t> workers = broker->WorkerPids();
  const int port = broker->port();
  ASSERT_TRUE(KernelPlaced(port, metrics)) << broker->process().Output();
  const std::string garbage = broker->dir() + "/garbage.pem";
  ASSERT_TRUE(wire::WriteFileAtomically(garbage, "not a certificate\n").ok());
  RequestLoad load(port, 2);
  auto failing =
      StartNextBroker(*broker, broker->dir() + "/ready-failing",
                      {"--upgrade", "--workers=2", "--tls_cert=" + garbage,
                       "--tls_key=" + garbage});
  ASSERT_TRUE(failing.ok());
  absl::StatusOr<int> failed_exit = (*failing)->Wait(absl::Seconds(30));
  ASSERT_TRUE(failed_exit.ok());
  EXPECT_NE(*failed_exit, 0) << (*failing)->Output();
  const int served = load.served();
  ASSERT_TRUE(
      WaitFor([&] { return load.served() > served + 100; }, absl::Seconds(20)));
  load.Stop();
  EXPECT_EQ(load.failed(), 0) << load.first_failure();
  EXPECT_TRUE(broker->process().Running()) << broker->process().Output();
  // Still placed by the kernel, on the same workers.
  ASSERT_TRUE(KernelPlaced(port, metrics)) << broker->process().Output();
  std::set<int> served_by;
  for (int i = 0; i < 20; ++i) served_by.insert(ServedBy(port));
  EXPECT_EQ(served_by, std::set<int>(workers.begin(), workers.end()));
}

// The inodes of the TCP listeners on 127.0.0.1:`port` (the members of its
// SO_REUSEPORT group) that `pids` hold, from /proc.
std::set<std::string> ListenersHeldBy(int port,
                                      const std::vector<pid_t>& pids) {
  char local[32];
  std::snprintf(local, sizeof(local), "0100007F:%04X", port);
  std::set<std::string> group;
  std::ifstream tcp("/proc/net/tcp");
  std::string line;
  while (std::getline(tcp, line)) {
    std::vector<std::string> fields =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() > 9 && fields[1] == local && fields[3] == "0A") {
      group.insert(fields[9]);
    }
  }
  std::set<std::string> held;
  for (pid_t pid : pids) {
    const std::string dir = absl::StrCat("/proc/", pid, "/fd");
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
      const std::string target =
          std::filesystem::read_symlink(entry.path(), error).string();
      absl::string_view inode = target;
      if (absl::ConsumePrefix(&inode, "socket:[") &&
          absl::ConsumeSuffix(&inode, "]") &&
          group.count(std::string(inode)) > 0) {
        held.insert(std::string(inode));
      }
    }
  }
  return held;
}

// The broker is SIGKILLed under connection-per-request load and started
// again with the same flags; its supervised workers survive and re-register
// (protocol.md §7.8). In kernel mode they keep accepting from their
// listeners meanwhile and return them with their Hello; the new broker,
// which cannot know their group indexes, lets the kernel hash (§7.10).
// Client errors are counted against --placement=handoff under the same
// kill; afterwards both workers still get connections and a drained one
// gets none (the broker holds its listener and accepts what lands there).
TEST_F(KernelPlacementTest, BrokerSigkillUnderLoadIsAdoptedWithTheListeners) {
  std::map<std::string, int> failed;
  for (const std::string mode : {"handoff", "kernel"}) {
    ASSERT_NO_FATAL_FAILURE(
        Start({"--workers=2", "--placement=" + mode, "--drain_timeout=5s"}, 2));
    const std::vector<pid_t> workers = broker_->WorkerPids();
    for (pid_t w : workers) broker_->process().KillOnDestruction(w);
    const std::set<int> pool(workers.begin(), workers.end());
    const int port = broker_->port();
    if (mode == "kernel") {
      ASSERT_TRUE(WaitForKernelPlacement(port));
    }
    const std::set<std::string> worker_listeners =
        ListenersHeldBy(port, workers);
    RequestLoad load(port, 2);
    ASSERT_TRUE(
        WaitFor([&] { return load.served() > 100; }, absl::Seconds(20)));
    ASSERT_TRUE(broker_->process().Signal(SIGKILL).ok());
    ASSERT_TRUE(broker_->process().Wait(absl::Seconds(10)).ok());
    const std::string ready = broker_->dir() + "/ready-restarted";
    auto next = StartNextBroker(*broker_, ready, {"--workers=2"}, mode);
    ASSERT_TRUE(next.ok()) << next.status();
    for (pid_t w : workers) (*next)->KillOnDestruction(w);
    const std::string control = ReadyValue(ready, "control");
    const std::string metrics = ReadyValue(ready, "metrics");
    ASSERT_FALSE(control.empty() || metrics.empty()) << (*next)->Output();
    auto stub = StubFor(control);
    ASSERT_TRUE(
        WaitFor([&] { return ReadyPids(*stub) == pool; }, absl::Seconds(20)))
        << (*next)->Output();
    const int served = load.served();
    ASSERT_TRUE(WaitFor([&] { return load.served() > served + 200; },
                        absl::Seconds(20)));
    load.Stop();
    failed[mode] = load.failed();
    std::printf(
        "--placement=%s, broker SIGKILLed and started again under load: %d "
        "served, %d failed (first: %s)\n",
        mode.c_str(), load.served(), load.failed(),
        load.first_failure().c_str());
    if (mode == "kernel") {
      // Every worker listener stayed in the group (nothing queued on one was
      // reset): the new broker holds each (the workers returned them; they
      // may have moved to fresh ones since, see below).
      ASSERT_EQ(worker_listeners.size(), 2u);
      const std::set<std::string> broker_holds =
          ListenersHeldBy(port, {(*next)->pid()});
      EXPECT_TRUE(std::includes(broker_holds.begin(), broker_holds.end(),
                                worker_listeners.begin(),
                                worker_listeners.end()))
          << (*next)->Output();
      // Once it holds every member the broker moves the workers to fresh
      // listeners at indexes it knows: the weights apply again, so a batch
      // of fresh connections is accepted by the workers themselves, none
      // handed off (the broker's own socket weighs 0 without hand-off-only
      // workers). Metrics sync twice a second: no growth within 1.5 s.
      auto all_kernel_placed = [&] {
        const double handed =
            MetricOf(metrics, "fdbroker_connections_handed_off_total");
        for (int i = 0; i < 20; ++i) ServedBy(port);
        return !WaitFor(
            [&] {
              return MetricOf(metrics,
                              "fdbroker_connections_handed_off_total") !=
                     handed;
            },
            absl::Milliseconds(1500));
      };
      ASSERT_TRUE(WaitFor(all_kernel_placed, absl::Seconds(30)))
          << (*next)->Output();
      EXPECT_NE((*next)->Output().find("weights apply again"),
                std::string::npos)
          << (*next)->Output();
      std::map<int, int> by_pid;
      for (int i = 0; i < 100; ++i) ++by_pid[ServedBy(port)];
      EXPECT_EQ(by_pid[0], 0);
      for (pid_t w : workers) EXPECT_GT(by_pid[w], 10) << "pid " << w;
      // A drained worker gets no new connection, and none is lost; the
      // kernel itself places them on the other worker (the indexes are
      // right), the broker hands none off.
      v1::Worker victim = ReadyWorkers(*stub).front();
      v1::DrainWorkerRequest request;
      request.set_worker_id(victim.id());
      request.mutable_timeout()->set_seconds(30);
      v1::DrainWorkerResponse response;
      ASSERT_TRUE(
          stub->DrainWorker(RpcContext().get(), request, &response).ok());
      int lost = 0, on_victim = 0;
      for (int i = 0; i < 150; ++i) {
        const int pid = ServedBy(port);
        lost += pid == 0;
        on_victim += pid == victim.pid();
      }
      EXPECT_EQ(lost, 0) << (*next)->Output();
      EXPECT_EQ(on_victim, 0) << (*next)->Output();
      EXPECT_TRUE(WaitFor(all_kernel_placed, absl::Seconds(30)))
          << (*next)->Output();
    }
    next->reset();
    broker_.reset();
  }
  // The workers kept accepting from their listeners while no broker ran.
  EXPECT_LE(failed["kernel"], failed["handoff"]);
}

// A broker that adopted a crashed one's listeners and regained the layout
// (fresh sockets at indexes it knows, the old ones held with weight 0) is
// upgraded: the new broker gets every member but not their layout
// (kernel_layout_unknown), hashes until the workers are back, then regains
// it itself. No request fails throughout.
TEST_F(KernelPlacementTest, UpgradeAfterCrashAdoptionRegainsTheLayout) {
  ASSERT_NO_FATAL_FAILURE(Start({"--workers=2", "--placement=kernel"}, 2));
  const std::vector<pid_t> workers = broker_->WorkerPids();
  for (pid_t w : workers) broker_->process().KillOnDestruction(w);
  const std::set<int> pool(workers.begin(), workers.end());
  const int port = broker_->port();
  ASSERT_TRUE(WaitForKernelPlacement(port));
  ASSERT_TRUE(broker_->process().Signal(SIGKILL).ok());
  ASSERT_TRUE(broker_->process().Wait(absl::Seconds(10)).ok());
  RequestLoad load(port, 2);
  std::vector<std::unique_ptr<Subprocess>> brokers;
  for (const bool upgrade : {false, true}) {
    const std::string ready =
        absl::StrCat(broker_->dir(), "/ready-", upgrade ? "upgrade" : "crash");
    auto next = StartNextBroker(
        *broker_, ready,
        upgrade ? std::vector<std::string>{"--upgrade", "--workers=2"}
                : std::vector<std::string>{"--workers=2"});
    ASSERT_TRUE(next.ok()) << next.status();
    for (pid_t w : workers) (*next)->KillOnDestruction(w);
    if (upgrade) {
      absl::StatusOr<int> old_exit = brokers.back()->Wait(absl::Seconds(30));
      ASSERT_TRUE(old_exit.ok()) << brokers.back()->Output();
      EXPECT_EQ(*old_exit, 0) << brokers.back()->Output();
    }
    const std::string control = ReadyValue(ready, "control");
    ASSERT_FALSE(control.empty()) << (*next)->Output();
    auto stub = StubFor(control);
    ASSERT_TRUE(
        WaitFor([&] { return ReadyPids(*stub) == pool; }, absl::Seconds(20)))
        << (*next)->Output();
    ASSERT_TRUE(WaitFor(
        [&] {
          return (*next)->Output().find("weights apply again") !=
                 std::string::npos;
        },
        absl::Seconds(20)))
        << (*next)->Output();
    const int served = load.served();
    ASSERT_TRUE(WaitFor([&] { return load.served() > served + 100; },
                        absl::Seconds(20)));
    brokers.push_back(*std::move(next));
  }
  load.Stop();
  std::printf("crash, adoption, upgrade: %d served, %d failed\n", load.served(),
              load.failed());
  EXPECT_EQ(load.failed(), 0) << load.first_failure() << "\n"
                              << brokers.back()->Output();
}

}  // namespace
}  // namespace fdbroker::testing
