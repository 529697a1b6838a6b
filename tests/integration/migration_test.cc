// Connection migration against the real broker: Release, Rebalance and
// draining that moves idle connections, with fdbroker-fake-worker in its
// line-server mode as the worker (it answers each line with its pid, so a
// client sees which worker serves it after a move).
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "fdbroker/v1/broker.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/integration/control_client.h"
#include "tests/integration/line_client.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "wire/message_channel.h"

namespace fdbroker::testing {
namespace {

class MigrationTest : public ::testing::Test {
 protected:
  // Supervised fake line-server workers; with `http`, the broker's default
  // worker (fdbroker-http-worker) instead.
  void StartBroker(int workers, std::vector<std::string> flags = {},
                   bool http = false) {
    flags.push_back(absl::StrCat("--workers=", workers));
    if (!http) {
      flags.push_back(
          absl::StrCat("--worker_cmd=", BinaryPath("fdbroker-fake-worker"),
                       " --mode=release"));
    }
    ASSERT_NO_FATAL_FAILURE(StartControlledBroker(std::move(flags), workers,
                                                  broker_, stub_, metrics_));
  }

  std::vector<v1::Worker> Ready() { return ReadyWorkers(*stub_); }

  bool WaitForReady(size_t n) {
    return WaitFor([&] { return Ready().size() == n; }, absl::Seconds(20));
  }

  // Every ready worker within one connection of the mean, `total` in all.
  bool Balanced(int64_t total) {
    std::vector<v1::Worker> ready = Ready();
    if (ready.empty()) return false;
    int64_t sum = 0;
    for (const v1::Worker& w : ready) sum += w.active_connections();
    const double mean = static_cast<double>(sum) / ready.size();
    for (const v1::Worker& w : ready) {
      if (std::abs(w.active_connections() - mean) > 1.0) return false;
    }
    return sum == total;
  }

  double Metric(const std::string& sample) {
    absl::StatusOr<std::string> text = ScrapeMetrics(metrics_);
    if (!text.ok()) return -1;
    std::map<std::string, double> samples = MetricSamples(*text);
    auto it = samples.find(sample);
    return it == samples.end() ? -1 : it->second;
  }

  // DrainWorker on `victim`, timed until the ready workers left (one fewer)
  // hold all `total` connections and the victim's process is gone; the
  // drain must take under a second.
  void DrainAllMoved(const v1::Worker& victim, int64_t total) {
    const size_t remaining = Ready().size() - 1;
    const absl::Time start = absl::Now();
    v1::DrainWorkerRequest request;
    request.set_worker_id(victim.id());
    v1::DrainWorkerResponse response;
    ASSERT_TRUE(
        stub_->DrainWorker(RpcContext().get(), request, &response).ok());
    ASSERT_TRUE(WaitFor(
        [&] {
          std::vector<v1::Worker> ready = Ready();
          int64_t sum = 0;
          for (const v1::Worker& w : ready) sum += w.active_connections();
          return ready.size() == remaining && sum == total &&
                 ProcessGone(victim.pid());
        },
        absl::Seconds(10), absl::Milliseconds(5)))
        << broker_->process().Output();
    const absl::Duration took = absl::Now() - start;
    EXPECT_LT(took, absl::Seconds(1)) << took;
    std::printf("drain of a worker with %lld idle clients took %s\n",
                static_cast<long long>(victim.active_connections()),
                absl::FormatDuration(took).c_str());
  }

  // DrainWorker on the ready worker whose process is `pid`.
  void DrainWorkerWithPid(int pid) {
    v1::DrainWorkerRequest request;
    for (const v1::Worker& w : Ready()) {
      if (w.pid() == pid) request.set_worker_id(w.id());
    }
    ASSERT_NE(request.worker_id(), 0u) << "no ready worker with pid " << pid;
    v1::DrainWorkerResponse response;
    grpc::Status status =
        stub_->DrainWorker(RpcContext().get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }

  // Connects `n` clients and asks each once; returns them with their pids.
  void ConnectClients(int n, std::vector<LineClient>& clients,
                      std::vector<int>& pids) {
    for (int i = 0; i < n; ++i) {
      absl::StatusOr<LineClient> client = LineClient::Connect(broker_->port());
      ASSERT_TRUE(client.ok()) << client.status();
      absl::StatusOr<int> pid = client->Ask(absl::StrCat("hello ", i));
      ASSERT_TRUE(pid.ok()) << pid.status();
      clients.push_back(*std::move(client));
      pids.push_back(*pid);
    }
  }

  std::unique_ptr<BrokerProcess> broker_;
  std::unique_ptr<v1::BrokerService::Stub> stub_;
  std::string metrics_;
};

TEST_F(MigrationTest, RebalanceAfterScaleUpEvensOutAndNoClientNotices) {
  ASSERT_NO_FATAL_FAILURE(StartBroker(2));
  std::vector<LineClient> clients;
  std::vector<int> pids;
  ASSERT_NO_FATAL_FAILURE(ConnectClients(100, clients, pids));
  // The last Acks may still be on their way to the broker.
  ASSERT_TRUE(WaitFor([&] { return Balanced(100); }, absl::Seconds(5)));

  // Events are watched from before the scale-up.
  grpc::ClientContext watch_context;
  std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> events =
      stub_->WatchEvents(&watch_context, v1::WatchEventsRequest());
  events->WaitForInitialMetadata();
  std::atomic<int> migrated_in_events{0};
  std::atomic<bool> rebalance_event{false};
  std::thread watcher([&] {
    v1::WatchEventsResponse event;
    while (events->Read(&event)) {
      if (event.type() == v1::EVENT_TYPE_REBALANCE_REQUESTED) {
        rebalance_event = true;
      }
      if (event.type() == v1::EVENT_TYPE_CONNECTIONS_MIGRATED) {
        int n = 0;
        (void)absl::SimpleAtoi(
            event.detail().substr(0, event.detail().find(' ')), &n);
        migrated_in_events += n;
      }
    }
  });

  v1::ScaleWorkersRequest scale;
  scale.set_count(4);
  v1::ScaleWorkersResponse scaled;
  ASSERT_TRUE(stub_->ScaleWorkers(RpcContext().get(), scale, &scaled).ok());
  ASSERT_TRUE(WaitForReady(4));
  EXPECT_FALSE(Balanced(100)) << "long-lived connections stay put";

  v1::RebalanceResponse response;
  grpc::Status status =
      stub_->Rebalance(RpcContext().get(), v1::RebalanceRequest(), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_DOUBLE_EQ(response.mean_connections(), 25.0);
  ASSERT_EQ(response.asked_size(), 2);
  for (const v1::WorkerRelease& asked : response.asked()) {
    EXPECT_EQ(asked.requested_connections(), 25u);
    EXPECT_EQ(asked.worker().active_connections(), 50);
  }
  EXPECT_EQ(response.skipped_size(), 0);
  EXPECT_TRUE(WaitFor([&] { return Balanced(100); }, absl::Seconds(10)))
      << broker_->process().Output();

  // Every client's next request on the same connection is answered; those
  // that moved are answered by another process.
  int moved = 0;
  for (size_t i = 0; i < clients.size(); ++i) {
    absl::StatusOr<int> pid = clients[i].Ask(absl::StrCat("again ", i));
    ASSERT_TRUE(pid.ok()) << "client " << i << ": " << pid.status();
    moved += *pid != pids[i];
  }
  EXPECT_EQ(moved, 50);
  EXPECT_TRUE(WaitFor(
      [&] {
        return Metric(
                   "fdbroker_connections_migrated_total{reason="
                   "\"rebalance\"}") == 50;
      },
      absl::Seconds(5)));
  EXPECT_TRUE(
      WaitFor([&] { return migrated_in_events == 50; }, absl::Seconds(5)))
      << migrated_in_events;
  EXPECT_TRUE(rebalance_event);
  watch_context.TryCancel();
  watcher.join();

  // Balanced now: a second Rebalance asks nobody.
  status =
      stub_->Rebalance(RpcContext().get(), v1::RebalanceRequest(), &response);
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(response.asked_size(), 0);
}

TEST_F(MigrationTest, DrainWorkerMovesHundredsOfIdleClientsInUnderASecond) {
  ASSERT_NO_FATAL_FAILURE(StartBroker(3));
  std::vector<LineClient> clients;
  std::vector<int> pids;
  ASSERT_NO_FATAL_FAILURE(ConnectClients(300, clients, pids));
  ASSERT_TRUE(WaitFor([&] { return Balanced(300); }, absl::Seconds(5)));
  const v1::Worker victim = Ready().front();
  ASSERT_EQ(victim.active_connections(), 100);

  ASSERT_NO_FATAL_FAILURE(DrainAllMoved(victim, 300));

  int moved = 0;
  for (size_t i = 0; i < clients.size(); ++i) {
    absl::StatusOr<int> pid = clients[i].Ask(absl::StrCat("after ", i));
    ASSERT_TRUE(pid.ok()) << "client " << i << ": " << pid.status();
    EXPECT_NE(*pid, victim.pid());
    moved += *pid != pids[i];
  }
  EXPECT_EQ(moved, 100);
  EXPECT_TRUE(WaitFor(
      [&] {
        return Metric(
                   "fdbroker_connections_migrated_total{reason=\"drain\"}") ==
               100;
      },
      absl::Seconds(5)));
  EXPECT_NE(broker_->process().Output().find("drain release_idle=1"),
            std::string::npos);
}

TEST_F(MigrationTest, UnreadBytesAreServedByTheNextWorker) {
  ASSERT_NO_FATAL_FAILURE(StartBroker(2));
  absl::StatusOr<LineClient> client = LineClient::Connect(broker_->port());
  ASSERT_TRUE(client.ok());
  // The worker reads both lines, answers "ping" and keeps "DEFER me" unread:
  // once "ping" is answered, "DEFER me" is in its buffer.
  ASSERT_TRUE(client->Send("DEFER me\nping\n").ok());
  absl::StatusOr<int> first =
      LineClient::PidOf(client->ReadLine(absl::Seconds(10)), "ping");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_NO_FATAL_FAILURE(DrainWorkerWithPid(*first));
  // The next worker gets the deferred line as initial_data and answers it.
  absl::StatusOr<int> second =
      LineClient::PidOf(client->ReadLine(absl::Seconds(10)), "DEFER me");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_NE(*second, *first);
}

TEST_F(MigrationTest, AHalfReadRequestIsNeverReleased) {
  ASSERT_NO_FATAL_FAILURE(StartBroker(2));
  absl::StatusOr<LineClient> client = LineClient::Connect(broker_->port());
  ASSERT_TRUE(client.ok());
  // One packet on loopback, read by one recv: once "sync" is answered, the
  // worker holds "half" too, as part of a line.
  ASSERT_TRUE(client->Send("sync\nhalf").ok());
  absl::StatusOr<int> first =
      LineClient::PidOf(client->ReadLine(absl::Seconds(10)), "sync");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_NO_FATAL_FAILURE(DrainWorkerWithPid(*first));
  // Still busy, so still there: the rest of the line goes to the same worker.
  ASSERT_TRUE(WaitFor(
      [&] {
        return broker_->process().Output().find("drain release_idle=1") !=
               std::string::npos;
      },
      absl::Seconds(10)));
  ASSERT_TRUE(client->Send(" done\n").ok());
  absl::StatusOr<int> answered =
      LineClient::PidOf(client->ReadLine(absl::Seconds(10)), "half done");
  ASSERT_TRUE(answered.ok()) << answered.status();
  EXPECT_EQ(*answered, *first) << "finished where it started";
  // Idle now: released, and served elsewhere from then on.
  absl::StatusOr<int> next = client->Ask("next");
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_NE(*next, *first);
}

TEST_F(MigrationTest, BrokerWideDrainClosesInsteadOfReleasing) {
  ASSERT_NO_FATAL_FAILURE(StartBroker(2));
  absl::StatusOr<LineClient> client = LineClient::Connect(broker_->port());
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE(client->Ask("hi").ok());
  v1::DrainRequest request;
  request.mutable_timeout()->set_seconds(5);
  v1::DrainResponse response;
  ASSERT_TRUE(stub_->Drain(RpcContext().get(), request, &response).ok());
  // Nowhere to move it: closed.
  EXPECT_TRUE(
      absl::IsUnavailable(client->ReadLine(absl::Seconds(10)).status()));
  EXPECT_NE(broker_->process().Output().find("drain release_idle=0"),
            std::string::npos);
  EXPECT_EQ(broker_->process().Output().find("drain release_idle=1"),
            std::string::npos);

  // And Rebalance is refused while drained, with a reason.
  v1::RebalanceResponse rebalanced;
  grpc::Status status =
      stub_->Rebalance(RpcContext().get(), v1::RebalanceRequest(), &rebalanced);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(status.error_message().find("Resume"), std::string::npos)
      << status.error_message();
}

TEST_F(MigrationTest, RebalanceNeedsTwoReadyWorkers) {
  ASSERT_NO_FATAL_FAILURE(StartBroker(1));
  v1::RebalanceResponse response;
  grpc::Status status =
      stub_->Rebalance(RpcContext().get(), v1::RebalanceRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(status.error_message().find("at least 2 ready workers"),
            std::string::npos)
      << status.error_message();
}

TEST_F(MigrationTest, RebalanceAfterScaleFlagRebalancesOnItsOwn) {
  ASSERT_NO_FATAL_FAILURE(StartBroker(2, {"--rebalance_after_scale"}));
  std::vector<LineClient> clients;
  std::vector<int> pids;
  ASSERT_NO_FATAL_FAILURE(ConnectClients(40, clients, pids));
  v1::ScaleWorkersRequest scale;
  scale.set_count(4);
  v1::ScaleWorkersResponse scaled;
  ASSERT_TRUE(stub_->ScaleWorkers(RpcContext().get(), scale, &scaled).ok());
  ASSERT_TRUE(WaitForReady(4));
  EXPECT_TRUE(WaitFor([&] { return Balanced(40); }, absl::Seconds(10)))
      << broker_->process().Output();
  for (size_t i = 0; i < clients.size(); ++i) {
    ASSERT_TRUE(clients[i].Ask("again").ok()) << i;
  }
}

// The same with the real fdbroker-http-worker (the broker's default worker):
// the numbers the issue asks for.
class HttpMigrationTest : public MigrationTest {
 protected:
  void StartHttpBroker(int workers) {
    ASSERT_NO_FATAL_FAILURE(StartBroker(workers, {}, /*http=*/true));
    for (const v1::Worker& w : Ready()) ASSERT_TRUE(w.supports_release());
  }

  // Opens `n` keep-alive connections, one request each; their pids.
  void Connect(int n, std::vector<wire::UniqueFd>& clients,
               std::vector<int>& pids) {
    for (int i = 0; i < n; ++i) {
      absl::StatusOr<wire::UniqueFd> fd =
          ConnectTcp("127.0.0.1", broker_->port());
      ASSERT_TRUE(fd.ok()) << fd.status();
      absl::StatusOr<HttpResponse> r = HttpGet(fd->get(), "/", true);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(r->status, 200);
      clients.push_back(*std::move(fd));
      pids.push_back(PidOf(*r));
    }
  }

  // One more request on every connection: all answered with 200; returns
  // how many came from another process than before.
  int RequestAgain(std::vector<wire::UniqueFd>& clients,
                   const std::vector<int>& pids, int not_pid = 0) {
    int moved = 0;
    for (size_t i = 0; i < clients.size(); ++i) {
      absl::StatusOr<HttpResponse> r = HttpGet(clients[i].get(), "/", true);
      EXPECT_TRUE(r.ok()) << "client " << i << ": " << r.status();
      if (!r.ok()) continue;
      EXPECT_EQ(r->status, 200);
      EXPECT_NE(PidOf(*r), not_pid);
      moved += PidOf(*r) != pids[i];
    }
    return moved;
  }

  static int PidOf(const HttpResponse& response) {
    auto it = response.headers.find("x-worker-pid");
    int pid = 0;
    if (it != response.headers.end()) (void)absl::SimpleAtoi(it->second, &pid);
    return pid;
  }
};

TEST_F(HttpMigrationTest, TwoHundredClientsRebalancedFromTwoToFourWorkers) {
  ASSERT_NO_FATAL_FAILURE(StartHttpBroker(2));
  std::vector<wire::UniqueFd> clients;
  std::vector<int> pids;
  ASSERT_NO_FATAL_FAILURE(Connect(200, clients, pids));
  ASSERT_TRUE(WaitFor([&] { return Balanced(200); }, absl::Seconds(5)));

  v1::ScaleWorkersRequest scale;
  scale.set_count(4);
  v1::ScaleWorkersResponse scaled;
  ASSERT_TRUE(stub_->ScaleWorkers(RpcContext().get(), scale, &scaled).ok());
  ASSERT_TRUE(WaitForReady(4));
  v1::RebalanceResponse response;
  grpc::Status status =
      stub_->Rebalance(RpcContext().get(), v1::RebalanceRequest(), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_DOUBLE_EQ(response.mean_connections(), 50.0);
  EXPECT_EQ(response.asked_size(), 2);
  // Every worker ends within one connection of the mean (ListWorkers).
  ASSERT_TRUE(WaitFor([&] { return Balanced(200); }, absl::Seconds(10)))
      << broker_->process().Output();
  for (const v1::Worker& w : Ready()) {
    EXPECT_LE(std::abs(w.active_connections() - 50), 1) << w.ShortDebugString();
  }
  // Every client's next request on the same TCP connection succeeds; those
  // that moved report a new X-Worker-Pid.
  const int moved = RequestAgain(clients, pids);
  EXPECT_EQ(moved, 100) << "every client was idle: exactly the excess moved";
  std::printf("rebalance 2 -> 4 workers: %d of 200 connections moved\n", moved);
}

TEST_F(HttpMigrationTest, DrainWorkerWithHundredsOfIdleClients) {
  ASSERT_NO_FATAL_FAILURE(StartHttpBroker(2));
  std::vector<wire::UniqueFd> clients;
  std::vector<int> pids;
  ASSERT_NO_FATAL_FAILURE(Connect(400, clients, pids));
  ASSERT_TRUE(WaitFor([&] { return Balanced(400); }, absl::Seconds(5)));
  const v1::Worker victim = Ready().front();
  ASSERT_NO_FATAL_FAILURE(DrainAllMoved(victim, 400));
  // Zero client errors: every connection still serves, none by the victim.
  EXPECT_EQ(RequestAgain(clients, pids, victim.pid()),
            victim.active_connections());
  EXPECT_TRUE(WaitFor(
      [&] {
        return Metric(
                   "fdbroker_connections_migrated_total{reason=\"drain\"}") ==
               victim.active_connections();
      },
      absl::Seconds(5)));
}

TEST(MigrationProtocolTest, ReleaseFromAWorkerWithoutSupportIsAProtocolError) {
  auto broker = BrokerProcess::Start({"--workers=0"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  Subprocess::Options env;
  env.env["FDBROKER_SOCKET"] = (*broker)->socket_path();
  auto fake = Subprocess::Start(
      {BinaryPath("fdbroker-fake-worker"), "--mode=release_unsupported"}, env);
  ASSERT_TRUE(fake.ok()) << fake.status();
  ASSERT_TRUE(WaitFor([&] { return (*fake)->Stdout() == "registered\n"; },
                      absl::Seconds(10)))
      << (*fake)->Output();
  // Its first connection: acked, then released without supports_release.
  absl::StatusOr<LineClient> client = LineClient::Connect((*broker)->port());
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE(client->Send("hi\n").ok());
  EXPECT_TRUE(WaitFor(
      [&] {
        return (*broker)->process().Stderr().find(
                   "did not set supports_release") != std::string::npos;
      },
      absl::Seconds(10)))
      << (*broker)->process().Output();
  absl::StatusOr<int> code = (*fake)->Wait(absl::Seconds(10));
  ASSERT_TRUE(code.ok());
  EXPECT_NE(*code, 0) << "its channel was closed";
}

}  // namespace
}  // namespace fdbroker::testing
