// End-to-end tests: the real fdbroker and fdbroker-http-worker binaries on
// loopback port 0, driven by real TCP clients.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "wire/sanitized.h"

namespace fdbroker::testing {
namespace {

struct LoadResult {
  int ok = 0;
  int failed = 0;
  std::map<pid_t, int> by_worker;
  std::string first_error;
};

// `threads` clients, each opening `connections` connections and sending
// `requests_per_connection` requests on each (1 = connection per request).
LoadResult RunLoad(int port, int threads, int connections,
                   int requests_per_connection) {
  std::vector<LoadResult> results(threads);
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      LoadResult& r = results[t];
      for (int c = 0; c < connections; ++c) {
        absl::StatusOr<wire::UniqueFd> fd = ConnectTcp("127.0.0.1", port);
        if (!fd.ok()) {
          ++r.failed;
          if (r.first_error.empty()) r.first_error = fd.status().ToString();
          continue;
        }
        for (int q = 0; q < requests_per_connection; ++q) {
          const bool last = q + 1 == requests_per_connection;
          absl::StatusOr<HttpResponse> response =
              HttpGet(fd->get(), "/", /*keep_alive=*/!last);
          if (!response.ok() || response->status != 200) {
            ++r.failed;
            if (r.first_error.empty()) {
              r.first_error = response.ok()
                                  ? absl::StrCat("status ", response->status)
                                  : response.status().ToString();
            }
            break;
          }
          ++r.ok;
          ++r.by_worker[WorkerPid(*response)];
        }
      }
    });
  }
  for (std::thread& t : workers) t.join();
  LoadResult total;
  for (const LoadResult& r : results) {
    total.ok += r.ok;
    total.failed += r.failed;
    for (const auto& [pid, n] : r.by_worker) total.by_worker[pid] += n;
    if (total.first_error.empty()) total.first_error = r.first_error;
  }
  return total;
}

TEST(BrokerIntegrationTest, SeveralWorkersServeBothTrafficShapes) {
  auto broker = BrokerProcess::Start({"--workers=3"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(3, absl::Seconds(30)))
      << (*broker)->process().Output();
  const std::vector<pid_t> pids = (*broker)->WorkerPids();

  // Keep-alive: 8 clients x 5 connections x 50 requests.
  LoadResult keep_alive = RunLoad((*broker)->port(), 8, 5, 50);
  EXPECT_EQ(keep_alive.failed, 0) << keep_alive.first_error;
  EXPECT_EQ(keep_alive.ok, 8 * 5 * 50);
  // Connection per request: 4 clients x 250 connections.
  LoadResult per_request = RunLoad((*broker)->port(), 4, 250, 1);
  EXPECT_EQ(per_request.failed, 0) << per_request.first_error;
  EXPECT_EQ(per_request.ok, 1000);

  for (const LoadResult* load : {&keep_alive, &per_request}) {
    ASSERT_EQ(load->by_worker.size(), 3u) << "every worker served";
    for (const auto& [pid, n] : load->by_worker) {
      EXPECT_NE(std::find(pids.begin(), pids.end(), pid), pids.end())
          << pid << " is not a supervised worker";
      // least_conn keeps the spread fair.
      EXPECT_GT(n, load->ok / 6) << "worker " << pid;
    }
  }
}

TEST(BrokerIntegrationTest, SigkilledWorkerIsRespawnedAndServes) {
  auto broker = BrokerProcess::Start({"--workers=2"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(2, absl::Seconds(30)));
  const std::vector<pid_t> before = (*broker)->WorkerPids();
  ASSERT_EQ(::kill(before[0], SIGKILL), 0);

  ASSERT_TRUE(WaitFor(
      [&] {
        std::vector<pid_t> now = (*broker)->WorkerPids();
        return now.size() == 2 &&
               std::find(now.begin(), now.end(), before[0]) == now.end();
      },
      absl::Seconds(20)))
      << (*broker)->process().Output();
  ASSERT_TRUE((*broker)->WaitForWorkers(2, absl::Seconds(20)));
  const std::vector<pid_t> after = (*broker)->WorkerPids();
  EXPECT_NE(std::find(after.begin(), after.end(), before[1]), after.end())
      << "the healthy worker was left alone";
  EXPECT_NE((*broker)->process().Stderr().find("crashed: killed by signal 9"),
            std::string::npos);
}

TEST(BrokerIntegrationTest, WorkerDyingBeforeAckLosesNoConnection) {
  // No supervised workers: the only worker is a fake one that dies as soon
  // as it receives a connection, before acking it.
  auto broker = BrokerProcess::Start({"--workers=0"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  Subprocess::Options env;
  env.env["FDBROKER_SOCKET"] = (*broker)->socket_path();
  auto fake = Subprocess::Start(
      {BinaryPath("fdbroker-fake-worker"), "--mode=die_before_ack"}, env);
  ASSERT_TRUE(fake.ok()) << fake.status();
  ASSERT_TRUE(WaitFor([&] { return (*fake)->Stdout() == "registered\n"; },
                      absl::Seconds(10)))
      << (*fake)->Output();

  // The client connects and sends its request; the fake receives the
  // connection and dies without acking.
  absl::StatusOr<wire::UniqueFd> client =
      ConnectTcp("127.0.0.1", (*broker)->port());
  ASSERT_TRUE(client.ok());
  const std::string request = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
  ASSERT_EQ(::send(client->get(), request.data(), request.size(), 0),
            static_cast<ssize_t>(request.size()));
  absl::StatusOr<int> code = (*fake)->Wait(absl::Seconds(10));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 1) << (*fake)->Output();

  // A real worker registers later and serves the very same connection,
  // request bytes included: the broker kept its copy of the socket.
  auto real = Subprocess::Start({BinaryPath("fdbroker-http-worker")}, env);
  ASSERT_TRUE(real.ok()) << real.status();
  char buf[4096];
  std::string response;
  ASSERT_TRUE(WaitFor(
      [&] {
        ssize_t n = ::recv(client->get(), buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) response.append(buf, static_cast<size_t>(n));
        return response.find("\r\n\r\n") != std::string::npos;
      },
      absl::Seconds(10)))
      << (*broker)->process().Output() << (*real)->Output();
  EXPECT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << response;
  EXPECT_NE(response.find(absl::StrCat("X-Worker-Pid: ", (*real)->pid())),
            std::string::npos)
      << response;
  EXPECT_NE((*broker)->process().Stderr().find("re-queued"), std::string::npos);
}

TEST(BrokerIntegrationTest, SilentWorkerIsDeclaredDeadAndItsConnectionsMove) {
  auto broker = BrokerProcess::Start({"--workers=1", "--policy=round_robin",
                                      "--heartbeat_interval=100ms",
                                      "--heartbeat_timeout=1s"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(1, absl::Seconds(30)));
  Subprocess::Options env;
  env.env["FDBROKER_SOCKET"] = (*broker)->socket_path();
  // Registers, then never reads its channel again: connections sent to it
  // are never acked and it sends no heartbeats.
  auto stalled = Subprocess::Start(
      {BinaryPath("fdbroker-fake-worker"), "--mode=stall"}, env);
  ASSERT_TRUE(stalled.ok());
  ASSERT_TRUE(WaitFor([&] { return (*stalled)->Stdout() == "registered\n"; },
                      absl::Seconds(10)));
  // Round robin sends every other connection to the silent worker. After
  // the heartbeat timeout the broker drops it and hands what it never acked
  // to the healthy worker: every request is answered, none is lost.
  LoadResult load = RunLoad((*broker)->port(), 4, 10, 1);
  EXPECT_EQ(load.failed, 0) << load.first_error;
  EXPECT_EQ(load.ok, 40);
  EXPECT_EQ(load.by_worker.size(), 1u);
  EXPECT_NE((*broker)->process().Stderr().find("declared dead"),
            std::string::npos);
}

// Whether `pid` has exited: no such process, or a zombie (an orphan is
// reaped by whoever adopted it, maybe never, here).
bool Exited(pid_t pid) {
  absl::StatusOr<std::string> stat =
      ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  if (!stat.ok()) return true;
  const size_t close = stat->rfind(')');
  return close != std::string::npos && close + 2 < stat->size() &&
         (*stat)[close + 2] == 'Z';
}

// The single grandchild of the broker (the child of its one supervised
// wrapper) once it is there, or 0.
pid_t WrappedWorkerPid(BrokerProcess& broker) {
  pid_t grandchild = 0;
  WaitFor(
      [&] {
        std::vector<pid_t> wrappers = broker.WorkerPids();
        if (wrappers.size() != 1) return false;
        std::vector<pid_t> children = ChildPids(wrappers[0]);
        if (children.size() != 1) return false;
        grandchild = children[0];
        return true;
      },
      absl::Seconds(10));
  return grandchild;
}

// A worker command that is a wrapper running the real worker as a child (no
// exec): the broker's signals go to the wrapper's whole process group, so
// the worker gets them too. Here the SIGKILL of a worker declared dead (it
// registered, then went silent).
TEST(BrokerIntegrationTest, KillOfAWrappedWorkerReachesItsChild) {
  auto broker = BrokerProcess::Start(
      {"--workers=1", "--heartbeat_interval=100ms", "--heartbeat_timeout=1s",
       absl::StrCat("--worker_cmd=/bin/sh -c '",
                    BinaryPath("fdbroker-fake-worker"),
                    " --mode=stall; true'")});
  ASSERT_TRUE(broker.ok()) << broker.status();
  const pid_t worker = WrappedWorkerPid(**broker);
  ASSERT_NE(worker, 0) << (*broker)->process().Output();
  EXPECT_TRUE(WaitFor([&] { return Exited(worker); }, absl::Seconds(10)))
      << "the wrapped worker " << worker << " outlived its wrapper\n"
      << (*broker)->process().Output();
  EXPECT_NE((*broker)->process().Stderr().find("declared dead"),
            std::string::npos)
      << (*broker)->process().Output();
  if (!Exited(worker)) ::kill(worker, SIGKILL);
}

// The same for a drain: the broker's SIGTERM to a wrapped worker that has
// not registered yet reaches the wrapper's child.
TEST(BrokerIntegrationTest, DrainSignalOfAWrappedWorkerReachesItsChild) {
  auto broker =
      BrokerProcess::Start({"--workers=1", "--drain_timeout=5s",
                            "--worker_cmd=/bin/sh -c 'sleep 1000; true'"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  const pid_t worker = WrappedWorkerPid(**broker);
  ASSERT_NE(worker, 0) << (*broker)->process().Output();
  ASSERT_TRUE((*broker)->process().Signal(SIGTERM).ok());
  absl::StatusOr<int> code = (*broker)->process().Wait(absl::Seconds(15));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << (*broker)->process().Output();
  EXPECT_TRUE(WaitFor([&] { return Exited(worker); }, absl::Seconds(5)))
      << "the wrapped worker " << worker << " outlived the drain\n"
      << (*broker)->process().Output();
  if (!Exited(worker)) ::kill(worker, SIGKILL);
}

// The broker raises its soft fd limit to the hard one: --max_pending alone
// (4096 by default) is more than the usual soft limit of 1024.
TEST(BrokerIntegrationTest, RaisesItsSoftFdLimitToTheHardLimit) {
  const std::string socket = absl::StrCat(MakeTempDir(), "/h.sock");
  auto process = Subprocess::Start(
      {"prlimit", "--nofile=256:8192", BinaryPath("fdbroker"),
       "--listen=127.0.0.1:0", "--control=", "--metrics=", "--workers=0",
       absl::StrCat("--socket=", socket)});
  ASSERT_TRUE(process.ok()) << process.status();
  std::string limits;
  EXPECT_TRUE(WaitFor(
      [&] {
        limits = ReadFile(absl::StrCat("/proc/", (*process)->pid(), "/limits"))
                     .value_or("");
        return (*process)->Stderr().find("listening on") != std::string::npos;
      },
      absl::Seconds(10)))
      << (*process)->Output();
  EXPECT_NE(limits.find("Max open files            8192                 8192"),
            std::string::npos)
      << limits;
  EXPECT_NE(
      (*process)->Stderr().find("open file limit raised from 256 to 8192"),
      std::string::npos)
      << (*process)->Output();
}

// Out of fds, no cascade (issue 13): the broker and its two workers under
// RLIMIT_NOFILE 128 (soft and hard: nothing to raise), 300 clients at once
// holding their connections. A worker with no free slot for a passed fd gets
// the Connection with its ancillary data truncated (MSG_CTRUNC); it rejects
// that connection and keeps its channel, so nothing cascades: no worker is
// replaced, every client is either answered or closed unserved and counted.
// Before: both workers closed their channels on "ancillary data truncated",
// were refused on re-registering ("already registered"), drained and
// replaced.
TEST(BrokerIntegrationTest, OutOfFdsRejectsConnectionsWithoutLosingWorkers) {
  if (wire::kSanitized) {
    GTEST_SKIP() << "a sanitized process out of fds reports false errors "
                    "(wire/sanitized.h); the plain build runs this";
  }
  auto broker = BrokerProcess::Start(
      {"--workers=2", "--pending_timeout=3s", "--ack_timeout=20s"},
      {"prlimit", "--nofile=128"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(2, absl::Seconds(30)))
      << (*broker)->process().Output();
  std::vector<pid_t> workers = (*broker)->WorkerPids();
  std::sort(workers.begin(), workers.end());
  absl::StatusOr<std::map<std::string, std::string>> ready =
      ReadKeyValueFile((*broker)->dir() + "/ready");
  ASSERT_TRUE(ready.ok());
  const std::string metrics = (*ready)["metrics"];

  constexpr int kClients = 300;
  enum Outcome { kPending, kServed, kRefused, kTimedOut };
  std::vector<std::atomic<int>> outcomes(kClients);
  for (auto& o : outcomes) o = kPending;
  std::atomic<int> done{0};
  std::atomic<bool> hang_up{false};
  std::vector<std::thread> clients;
  const int port = (*broker)->port();
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      // A served client holds its connection (the worker its fd) until
      // every client has its outcome: that is what exhausts the workers.
      absl::StatusOr<wire::UniqueFd> fd =
          ConnectTcp("127.0.0.1", port, absl::Seconds(30));
      Outcome outcome = kRefused;
      if (fd.ok()) {
        absl::StatusOr<HttpResponse> r =
            HttpGet(fd->get(), "/", /*keep_alive=*/true, absl::Seconds(60));
        if (r.ok() && r->status == 200) {
          outcome = kServed;
        } else if (!r.ok() && absl::IsDeadlineExceeded(r.status())) {
          outcome = kTimedOut;
        }
      }
      outcomes[i] = outcome;
      ++done;
      WaitFor([&] { return hang_up.load(); }, absl::Seconds(90),
              absl::Milliseconds(20));
    });
  }
  EXPECT_TRUE(WaitFor([&] { return done == kClients; }, absl::Seconds(90)));
  hang_up = true;
  for (std::thread& t : clients) t.join();
  int served = 0, refused = 0, timed_out = 0;
  for (auto& o : outcomes) {
    served += o == kServed;
    refused += o == kRefused;
    timed_out += o == kTimedOut;
  }
  std::printf("out of fds: %d served, %d refused, %d timed out of %d\n", served,
              refused, timed_out, kClients);
  EXPECT_EQ(timed_out, 0);
  EXPECT_EQ(served + refused, kClients);
  // Each worker had about 110 free slots.
  EXPECT_GE(served, 150) << (*broker)->process().Output();

  // No worker replaced, none re-registered.
  std::vector<pid_t> after = (*broker)->WorkerPids();
  std::sort(after.begin(), after.end());
  EXPECT_EQ(after, workers) << (*broker)->process().Output();
  const std::string log = (*broker)->process().Stderr();
  EXPECT_EQ(log.find("ancillary data truncated"), std::string::npos) << log;
  EXPECT_EQ(log.find("channel closed"), std::string::npos) << log;
  EXPECT_EQ(log.find("already registered"), std::string::npos) << log;

  // The metrics add up once everything has settled: every accepted
  // connection was handed off or closed unserved and counted, and every
  // refused client is among the counted ones.
  std::map<std::string, double> m;
  auto get = [&](const std::string& series) {
    auto it = m.find(series);
    return it == m.end() ? 0.0 : it->second;
  };
  auto sum = [&](const std::string& family) {
    double total = 0;
    for (const auto& [series, value] : m) {
      if (absl::StartsWith(series, family + "{")) total += value;
    }
    return total;
  };
  EXPECT_TRUE(WaitFor(
      [&] {
        absl::StatusOr<std::string> text = ScrapeMetrics(metrics);
        if (!text.ok()) return false;
        m = MetricSamples(*text);
        // (Synced twice a second: at first everything reads 0.)
        return get("fdbroker_connections_accepted_total") >= kClients &&
               get("fdbroker_pending_connections") == 0 &&
               get("fdbroker_unacked_connections") == 0 &&
               get("fdbroker_connections_active") == 0 &&
               get("fdbroker_connections_accepted_total") ==
                   get("fdbroker_connections_handed_off_total") +
                       sum("fdbroker_connections_rejected_total") +
                       get("fdbroker_handoff_failures_total{reason=\"too_"
                           "many_attempts\"}") +
                       sum("fdbroker_connections_lost_total");
      },
      absl::Seconds(30), absl::Milliseconds(200)))
      << "accepted " << get("fdbroker_connections_accepted_total")
      << " handed off " << get("fdbroker_connections_handed_off_total")
      << " rejected " << sum("fdbroker_connections_rejected_total")
      << " too many attempts "
      << get("fdbroker_handoff_failures_total{reason=\"too_many_attempts\"}")
      << " lost " << sum("fdbroker_connections_lost_total") << " pending "
      << get("fdbroker_pending_connections") << " unacked "
      << get("fdbroker_unacked_connections") << " active "
      << get("fdbroker_connections_active");
  EXPECT_EQ(get("fdbroker_worker_restarts_total"), 0);
  EXPECT_EQ(sum("fdbroker_workers_declared_dead_total"), 0);
  EXPECT_EQ(sum("fdbroker_connections_lost_total"), 0);
  EXPECT_LE(refused, sum("fdbroker_connections_rejected_total") +
                         get("fdbroker_handoff_failures_total{reason=\"too_"
                             "many_attempts\"}"));
  std::printf(
      "accepted %.0f, handed off %.0f, rejected %.0f, too many attempts "
      "%.0f, rejected by a worker %.0f, accept pauses %.0f\n",
      get("fdbroker_connections_accepted_total"),
      get("fdbroker_connections_handed_off_total"),
      sum("fdbroker_connections_rejected_total"),
      get("fdbroker_handoff_failures_total{reason=\"too_many_attempts\"}"),
      get("fdbroker_handoff_failures_total{reason=\"rejected_by_worker\"}"),
      get("fdbroker_accept_pauses_total"));

  // And the same two workers serve new clients.
  std::set<pid_t> answered;
  for (int i = 0; i < 40; ++i) {
    absl::StatusOr<HttpResponse> r =
        HttpGetOnce("127.0.0.1", port, "/", absl::Seconds(10));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, 200);
    answered.insert(WorkerPid(*r));
  }
  EXPECT_EQ(std::vector<pid_t>(answered.begin(), answered.end()), workers);
}

// A supervised worker whose channel is lost while its process lives takes
// its registration back when it says Hello again (same worker id), and only
// the very process that registered may: a child of it (the same process
// tree, the broker's uid) is refused. The replacement the broker started
// meanwhile is the surplus and goes. Before: the worker itself was refused
// ("already registered"), drained and replaced.
TEST(BrokerIntegrationTest, ALostChannelIsTakenBackOnlyByTheSameProcess) {
  const std::string marker = MakeTempDir() + "/rejoined";
  auto broker = BrokerProcess::Start(
      {"--workers=1", "--heartbeat_interval=100ms",
       absl::StrCat("--worker_cmd=", BinaryPath("fdbroker-fake-worker"),
                    " --mode=rejoin --rejoin_marker=", marker)});
  ASSERT_TRUE(broker.ok()) << broker.status();
  Subprocess& process = (*broker)->process();
  ASSERT_TRUE(WaitFor(
      [&] { return process.Stdout().find("rejoined: ") != std::string::npos; },
      absl::Seconds(20)))
      << process.Output();
  int worker = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        const std::string out = process.Stdout();
        const size_t at = out.find("\npid ");
        return at != std::string::npos &&
               absl::SimpleAtoi(absl::StripAsciiWhitespace(out.substr(
                                    at + 5, out.find('\n', at + 1) - at - 5)),
                                &worker);
      },
      absl::Seconds(5)))
      << process.Output();
  EXPECT_NE(process.Stdout().find("child: worker 1 is already registered"),
            std::string::npos)
      << process.Output();
  EXPECT_NE(process.Stdout().find("rejoined: welcome 1\n"), std::string::npos)
      << process.Output();
  EXPECT_NE(process.Stderr().find("worker 1 re-admitted"), std::string::npos)
      << process.Output();
  // The replacement goes; the worker that rejoined stays.
  EXPECT_TRUE(WaitFor(
      [&] {
        std::vector<pid_t> pids = (*broker)->WorkerPids();
        return pids.size() == 1 && pids.front() == worker;
      },
      absl::Seconds(10)))
      << process.Output();
}

TEST(BrokerIntegrationTest, OpenFdCountsReturnToBaselineAfterManyConnections) {
  auto broker = BrokerProcess::Start({"--workers=2"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(2, absl::Seconds(30)));
  const pid_t pid = (*broker)->pid();
  // Warm up so that lazily created fds (none expected) exist.
  ASSERT_EQ(RunLoad((*broker)->port(), 2, 50, 1).failed, 0);
  auto fds_of = [](pid_t p) {
    absl::StatusOr<int> n = CountOpenFds(p);
    return n.ok() ? *n : -1;
  };
  // The baseline is taken once it holds still: right after the warm-up the
  // broker may still hold a handed-off connection whose Ack is on its way.
  std::map<pid_t, int> baseline, previous;
  ASSERT_TRUE(WaitFor(
      [&] {
        previous = std::move(baseline);
        baseline.clear();
        baseline[pid] = fds_of(pid);
        for (pid_t w : (*broker)->WorkerPids()) baseline[w] = fds_of(w);
        return baseline.size() == 3 && baseline == previous;
      },
      absl::Seconds(5), absl::Milliseconds(100)));

  LoadResult per_request = RunLoad((*broker)->port(), 4, 2500, 1);
  LoadResult keep_alive = RunLoad((*broker)->port(), 4, 25, 20);
  EXPECT_EQ(per_request.failed + keep_alive.failed, 0)
      << per_request.first_error << keep_alive.first_error;
  EXPECT_EQ(per_request.ok, 10000);

  std::map<pid_t, int> now;
  const bool back = WaitFor(
      [&] {
        now.clear();
        for (const auto& [p, n] : baseline) now[p] = fds_of(p);
        return now == baseline;
      },
      absl::Seconds(10));
  std::string counts;
  for (const auto& [p, n] : baseline) {
    absl::StrAppend(&counts, p == pid ? " broker " : " worker ", n, " -> ",
                    now[p]);
  }
  EXPECT_TRUE(back) << "open fds:" << counts;
}

// True once the server side of the client's TCP connection has no unread
// bytes and at least one request was sent (its rx_queue in /proc/net/tcp).
bool ServerReadEverything(int client_fd) {
  sockaddr_in local{}, remote{};
  socklen_t len = sizeof(local);
  ::getsockname(client_fd, reinterpret_cast<sockaddr*>(&local), &len);
  len = sizeof(remote);
  ::getpeername(client_fd, reinterpret_cast<sockaddr*>(&remote), &len);
  absl::StatusOr<std::string> table = ReadFile("/proc/net/tcp");
  if (!table.ok()) return false;
  // Server side: local port = the broker's port, remote = the client's.
  const std::string needle = absl::StrCat(
      absl::StrFormat(":%04X ", ntohs(remote.sin_port)), "0100007F",
      absl::StrFormat(":%04X ", ntohs(local.sin_port)));
  size_t at = table->find(needle);
  if (at == std::string::npos) return false;
  // "... st tx_queue:rx_queue ...": the fields after the remote address.
  std::istringstream fields(table->substr(at + needle.size(), 40));
  std::string state, queues;
  fields >> state >> queues;
  return queues.size() == 17 && queues.substr(9) == "00000000";
}

// No signal an operator sends by habit ends the broker without a drain:
// SIGHUP, SIGUSR1 and SIGUSR2 are logged and ignored (the default action of
// each would kill it on the spot), SIGQUIT drains like SIGTERM.
TEST(BrokerIntegrationTest, HabitualSignalsNeverKillWithoutADrain) {
  auto broker = BrokerProcess::Start({"--workers=1"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(1, absl::Seconds(30)));
  for (int signal : {SIGHUP, SIGUSR1, SIGUSR2}) {
    ASSERT_TRUE((*broker)->process().Signal(signal).ok());
    // SIGHUP restarts the workers (surge-first, so the request below is
    // served); the other two are ignored.
    const std::string logged =
        signal == SIGHUP
            ? "received SIGHUP: rolling restart of 1 worker(s)"
            : absl::StrCat("received SIG", sigabbrev_np(signal), ": ignored");
    EXPECT_TRUE(WaitFor(
        [&] {
          return (*broker)->process().Stderr().find(logged) !=
                 std::string::npos;
        },
        absl::Seconds(5)))
        << logged << "\n"
        << (*broker)->process().Output();
    absl::StatusOr<HttpResponse> r =
        HttpGetOnce("127.0.0.1", (*broker)->port(), "/");
    ASSERT_TRUE(r.ok()) << sigabbrev_np(signal) << ": " << r.status();
    EXPECT_EQ(r->status, 200);
  }
  ASSERT_TRUE((*broker)->process().Signal(SIGQUIT).ok());
  absl::StatusOr<int> code = (*broker)->process().Wait(absl::Seconds(15));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << (*broker)->process().Output();
  EXPECT_NE((*broker)->process().Stderr().find("received SIGQUIT: draining"),
            std::string::npos);
}

TEST(BrokerIntegrationTest, SigtermLetsInFlightRequestsFinishAndExitsZero) {
  auto broker = BrokerProcess::Start({"--workers=2", "--drain_timeout=10s"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(2, absl::Seconds(30)));
  const std::vector<pid_t> workers = (*broker)->WorkerPids();

  absl::StatusOr<wire::UniqueFd> slow =
      ConnectTcp("127.0.0.1", (*broker)->port());
  ASSERT_TRUE(slow.ok());
  const std::string request = "GET /sleep?ms=700 HTTP/1.1\r\nHost: t\r\n\r\n";
  ASSERT_EQ(::send(slow->get(), request.data(), request.size(), 0),
            static_cast<ssize_t>(request.size()));
  // An idle keep-alive connection, which the drain closes.
  absl::StatusOr<wire::UniqueFd> idle =
      ConnectTcp("127.0.0.1", (*broker)->port());
  ASSERT_TRUE(idle.ok());
  ASSERT_TRUE(HttpGet(idle->get(), "/", true).ok());
  // The slow request must be in the worker's hands (read from the socket)
  // before the signal; otherwise it is legitimately an idle connection.
  ASSERT_TRUE(WaitFor([&] { return ServerReadEverything(slow->get()); },
                      absl::Seconds(5)));
  ASSERT_TRUE((*broker)->process().Signal(SIGTERM).ok());
  // The in-flight request completes, then the draining worker closes.
  std::string response;
  char buf[4096];
  ASSERT_TRUE(WaitFor(
      [&] {
        ssize_t n = ::recv(slow->get(), buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) response.append(buf, static_cast<size_t>(n));
        return n == 0;
      },
      absl::Seconds(10)));
  EXPECT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << response;
  absl::StatusOr<int> code = (*broker)->process().Wait(absl::Seconds(15));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0) << (*broker)->process().Output();
  char c;
  EXPECT_EQ(::recv(idle->get(), &c, 1, 0), 0) << "idle connection closed";
  for (pid_t w : workers) EXPECT_TRUE(ProcessGone(w)) << w;
}

// The broker's own timestamp ("2026-11-26T01:07:28.826 info ...") of the
// first log line containing `needle`.
absl::StatusOr<absl::Time> LogLineTime(const std::string& log,
                                       const std::string& needle) {
  size_t at = log.find(needle);
  if (at == std::string::npos) return absl::NotFoundError(needle);
  size_t line = log.rfind('\n', at);
  line = line == std::string::npos ? 0 : line + 1;
  const std::string stamp = log.substr(line, log.find(' ', line) - line);
  absl::Time t;
  std::string err;
  if (!absl::ParseTime("%Y-%m-%dT%H:%M:%E3S", stamp, absl::LocalTimeZone(), &t,
                       &err)) {
    return absl::InvalidArgumentError(absl::StrCat(stamp, ": ", err));
  }
  return t;
}

TEST(BrokerIntegrationTest, CrashingWorkersAreRestartedWithGrowingBackoff) {
  // A worker command that exits at once: the broker must not spin, but wait
  // 100 ms, 200 ms, 400 ms, ... (capped at 10 s) between restarts.
  auto broker =
      BrokerProcess::Start({"--workers=1", "--worker_cmd=/bin/false"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE(WaitFor(
      [&] {
        return (*broker)->process().Stderr().find(
                   "restarting worker(s) in 800ms") != std::string::npos;
      },
      absl::Seconds(20)))
      << (*broker)->process().Stderr();
  const std::string log = (*broker)->process().Stderr();
  for (const char* step : {"in 100ms", "in 200ms", "in 400ms"}) {
    EXPECT_NE(log.find(step), std::string::npos) << step;
  }
  EXPECT_NE(log.find("crashed: exit code 1"), std::string::npos);
  // 100 + 200 + 400 ms of back-off passed between the first and the fourth
  // decision, measured by the broker's own (millisecond-truncated) clock,
  // so the test's start-up latency cannot blur it.
  absl::StatusOr<absl::Time> first =
      LogLineTime(log, "restarting worker(s) in 100ms");
  absl::StatusOr<absl::Time> fourth =
      LogLineTime(log, "restarting worker(s) in 800ms");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(fourth.ok()) << fourth.status();
  EXPECT_GE(*fourth - *first, absl::Milliseconds(699)) << log;
}

// The scheduler slice of a thread in ns (se.slice of /proc/.../sched), or
// -1 when the kernel does not show it.
int64_t SchedSlice(pid_t pid, pid_t tid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/task/", tid, "/sched"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("se.slice", 0) != 0) continue;
    int64_t nanos = -1;
    const size_t colon = line.find(':');
    if (colon != std::string::npos &&
        absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(colon + 1)),
                         &nanos)) {
      return nanos;
    }
  }
  return -1;
}

TEST(BrokerIntegrationTest, OnlyTheDataPlaneThreadGetsTheShortSlice) {
  auto broker = BrokerProcess::Start({"--workers=1", "--loop_slice=250us"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(1, absl::Seconds(30)))
      << (*broker)->process().Output();
  const pid_t pid = (*broker)->pid();
  if ((*broker)->process().Output().find("keeps its default slice") !=
          std::string::npos ||
      SchedSlice(pid, pid) < 0) {
    GTEST_SKIP() << "custom slices need Linux 6.12+ (and /proc/PID/sched)";
  }
  EXPECT_NE((*broker)->process().Output().find(
                "data-plane thread: 250us scheduler slice"),
            std::string::npos)
      << (*broker)->process().Output();
  // Run() and so the event loop are on the main thread.
  EXPECT_EQ(SchedSlice(pid, pid), 250'000);
  // Workers spawned by that thread start with the default slice.
  const std::vector<pid_t> workers = (*broker)->WorkerPids();
  ASSERT_EQ(workers.size(), 1u);
  const int64_t fallback = SchedSlice(workers[0], workers[0]);
  EXPECT_GT(fallback, 0);
  EXPECT_NE(fallback, 250'000);

  auto plain = BrokerProcess::Start({"--workers=0", "--loop_slice=0"});
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(SchedSlice((*plain)->pid(), (*plain)->pid()), fallback);
}

TEST(BrokerIntegrationTest, BadFlagsAreOneLineErrorsWithExitCode2) {
  const std::vector<std::vector<std::string>> bad = {
      {"--workers=-1"},
      {"--workers=65"},
      {"--listen=nonsense"},
      {"--listen=127.0.0.1:99999"},
      {"--policy=random"},
      {"--no_such_flag=1"},
      {"--drain_timeout=soon"},
      {"--drain_timeout=-1s"},
      {"--worker_cmd=/nonexistent/worker", "--workers=1"},
      {"--max_workers=0"},
      {"--loop_slice=50us"},
      {"--loop_slice=1s"},
      {"stray-argument"},
      {"--worker_cmd='unterminated", "--workers=1"},
  };
  for (const std::vector<std::string>& flags : bad) {
    std::vector<std::string> argv = {BinaryPath("fdbroker"),
                                     "--socket=/tmp/never-bound.sock"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    auto process = Subprocess::Start(argv);
    ASSERT_TRUE(process.ok());
    absl::StatusOr<int> code = (*process)->Wait(absl::Seconds(10));
    ASSERT_TRUE(code.ok());
    EXPECT_EQ(*code, 2) << flags[0] << "\n" << (*process)->Output();
    const std::string err = (*process)->Stderr();
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_EQ(err.rfind("fdbroker: ", 0), 0u) << err;
  }
}

// The hand-off socket's directory decides who could replace the socket:
// the broker refuses, in one line, a directory another uid owns or may
// write (unless sticky, like /tmp), and a socket another uid left in a
// sticky one. A sticky root-owned directory (the default under /tmp) is
// fine, and so is a missing last component (created 0700).
TEST(BrokerIntegrationTest, RefusesAHandoffSocketDirectoryOthersControl) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to chown to another uid";
  constexpr uid_t kOther = 65534;
  struct Setup {
    const char* name;
    // Prepares `dir` (a fresh temp dir) and returns the --socket path.
    std::function<std::string(const std::string& dir)> prepare;
    const char* refusal;  // nullptr: the broker starts
  };
  const auto chmod_dir = [](const std::string& dir, mode_t mode) {
    EXPECT_EQ(::chmod(dir.c_str(), mode), 0) << dir;
    return dir + "/h.sock";
  };
  const std::vector<Setup> setups = {
      {"world-writable",
       [&](const std::string& d) { return chmod_dir(d, 0777); },
       "is writable by others (mode 0777) and not sticky"},
      {"group-writable",
       [&](const std::string& d) { return chmod_dir(d, 0770); },
       "is writable by its group (mode 0770) and not sticky"},
      {"another uid's",
       [&](const std::string& d) {
         EXPECT_EQ(::chown(d.c_str(), kOther, kOther), 0);
         return d + "/h.sock";
       },
       "belongs to uid 65534, not to the broker's uid 0 or root"},
      {"a symlink to another uid's",
       [&](const std::string& d) {
         const std::string target = d + "/theirs";
         EXPECT_EQ(::mkdir(target.c_str(), 0700), 0);
         EXPECT_EQ(::chown(target.c_str(), kOther, kOther), 0);
         EXPECT_EQ(::symlink(target.c_str(), (d + "/link").c_str()), 0);
         return d + "/link/h.sock";
       },
       "belongs to uid 65534"},
      {"a socket another uid left in a sticky one",
       [&](const std::string& d) {
         const std::string path = chmod_dir(d, 01777);
         // Bound, then closed: a stale socket file nobody listens on.
         wire::UniqueFd planted(::socket(AF_UNIX, SOCK_SEQPACKET, 0));
         sockaddr_un address{};
         address.sun_family = AF_UNIX;
         path.copy(address.sun_path, sizeof(address.sun_path) - 1);
         EXPECT_EQ(
             ::bind(planted.get(), reinterpret_cast<const sockaddr*>(&address),
                    sizeof(address)),
             0);
         EXPECT_EQ(::lchown(path.c_str(), kOther, kOther), 0);
         return path;
       },
       "is a socket of uid 65534, not of the broker's uid 0: another user "
       "created it"},
      {"sticky, like /tmp",
       [&](const std::string& d) { return chmod_dir(d, 01777); }, nullptr},
      {"missing (created 0700)",
       [&](const std::string& d) { return d + "/new/h.sock"; }, nullptr},
  };
  for (const Setup& setup : setups) {
    SCOPED_TRACE(setup.name);
    const std::string dir = MakeTempDir();
    const std::string socket = setup.prepare(dir);
    auto broker =
        Subprocess::Start({BinaryPath("fdbroker"), "--listen=127.0.0.1:0",
                           "--control=", "--metrics=", "--workers=0",
                           absl::StrCat("--socket=", socket)});
    ASSERT_TRUE(broker.ok()) << broker.status();
    if (setup.refusal == nullptr) {
      EXPECT_TRUE(WaitFor(
          [&] {
            return (*broker)->Stderr().find("listening on") !=
                   std::string::npos;
          },
          absl::Seconds(10)))
          << (*broker)->Output();
      struct stat st;
      ASSERT_EQ(::lstat(socket.c_str(), &st), 0);
      EXPECT_TRUE(S_ISSOCK(st.st_mode));
      ASSERT_TRUE((*broker)->Signal(SIGTERM).ok());
      absl::StatusOr<int> code = (*broker)->Wait(absl::Seconds(10));
      ASSERT_TRUE(code.ok());
      EXPECT_EQ(*code, 0) << (*broker)->Output();
      continue;
    }
    absl::StatusOr<int> code = (*broker)->Wait(absl::Seconds(10));
    ASSERT_TRUE(code.ok()) << code.status();
    EXPECT_EQ(*code, 1) << (*broker)->Output();
    const std::string err = (*broker)->Stderr();
    EXPECT_NE(err.find(setup.refusal), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_NE(err.find("cannot start"), std::string::npos) << err;
  }
}

TEST(BrokerIntegrationTest, SecondBrokerOnTheSameSocketRefusesToStart) {
  auto first = BrokerProcess::Start({"--workers=0"});
  ASSERT_TRUE(first.ok()) << first.status();
  auto second =
      Subprocess::Start({BinaryPath("fdbroker"), "--listen=127.0.0.1:0",
                         "--socket=" + (*first)->socket_path(), "--workers=0"});
  ASSERT_TRUE(second.ok());
  absl::StatusOr<int> code = (*second)->Wait(absl::Seconds(10));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 1);
  EXPECT_NE((*second)->Stderr().find("another broker is listening"),
            std::string::npos)
      << (*second)->Output();
  EXPECT_TRUE((*first)->process().Running());
}

}  // namespace
}  // namespace fdbroker::testing
