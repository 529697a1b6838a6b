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
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"

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

TEST(BrokerIntegrationTest, WorkerThatHeartbeatsButNeverAcksIsCutOff) {
  // The fake reads its channel and heartbeats, so it never times out, but
  // it never acks: without an ack deadline, every other client waited
  // forever (round robin). Each must be answered by the healthy worker
  // within --ack_timeout plus one --heartbeat_timeout.
  auto broker = BrokerProcess::Start(
      {"--workers=1", "--policy=round_robin", "--heartbeat_interval=100ms",
       "--heartbeat_timeout=1s", "--ack_timeout=1s"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  ASSERT_TRUE((*broker)->WaitForWorkers(1, absl::Seconds(30)));
  const pid_t healthy = (*broker)->WorkerPids()[0];
  Subprocess::Options env;
  env.env["FDBROKER_SOCKET"] = (*broker)->socket_path();
  auto stuck = Subprocess::Start(
      {BinaryPath("fdbroker-fake-worker"), "--mode=never_ack"}, env);
  ASSERT_TRUE(stuck.ok());
  ASSERT_TRUE(WaitFor([&] { return (*stuck)->Stdout() == "registered\n"; },
                      absl::Seconds(10)));
  std::atomic<int> answered{0}, slow{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < 20; ++i) {
    clients.emplace_back([&] {
      const absl::Time start = absl::Now();
      absl::StatusOr<HttpResponse> r =
          HttpGetOnce("127.0.0.1", (*broker)->port(), "/", absl::Seconds(10));
      if (r.ok() && r->status == 200 &&
          r->headers["x-worker-pid"] == absl::StrCat(healthy)) {
        ++answered;
      }
      // Ack deadline + heartbeat timeout, and a second for a busy machine.
      if (absl::Now() - start > absl::Seconds(3)) ++slow;
    });
  }
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(answered, 20) << (*broker)->process().Output();
  EXPECT_EQ(slow, 0);
  // Cut off: its channel was closed (the fake exits when it sees that).
  absl::StatusOr<int> code = (*stuck)->Wait(absl::Seconds(10));
  ASSERT_TRUE(code.ok()) << (*broker)->process().Output();
  EXPECT_NE((*broker)->process().Stderr().find("not acked within"),
            std::string::npos)
      << (*broker)->process().Stderr();
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
    const std::string logged =
        absl::StrCat("received SIG", sigabbrev_np(signal), ": ignored");
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
