// The control plane against the real broker and real workers, through the
// generated C++ stub (and, in ReflectionWithBufCurl, through reflection only).
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "broker/event_hub.h"
#include "fdbroker/v1/broker.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {
namespace {

using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

std::unique_ptr<grpc::ClientContext> Context() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::seconds(20));
  return context;
}

class ControlPlaneTest : public ::testing::Test {
 protected:
  void StartBroker(std::vector<std::string> flags) {
    auto broker = BrokerProcess::Start(std::move(flags));
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *std::move(broker);
    channel_ = grpc::CreateChannel(broker_->control_address(),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::BrokerService::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
  }

  std::vector<v1::Worker> Workers() {
    v1::ListWorkersResponse response;
    grpc::Status status = stub_->ListWorkers(
        Context().get(), v1::ListWorkersRequest(), &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return {response.workers().begin(), response.workers().end()};
  }

  // Supervised workers that serve (ready and not draining).
  std::set<int> ReadyPids() {
    std::set<int> pids;
    for (const v1::Worker& w : Workers()) {
      if (w.state() == v1::WORKER_STATE_READY) pids.insert(w.pid());
    }
    return pids;
  }

  bool WaitForProcessCount(size_t n) {
    return WaitFor([&] { return broker_->WorkerPids().size() == n; },
                   absl::Seconds(20));
  }

  HealthCheckResponse::ServingStatus Health(const std::string& service) {
    HealthCheckRequest request;
    request.set_service(service);
    HealthCheckResponse response;
    grpc::Status status = health_->Check(Context().get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.status();
  }

  grpc::Status Scale(int count, v1::ScaleWorkersResponse* response) {
    v1::ScaleWorkersRequest request;
    request.set_count(count);
    return stub_->ScaleWorkers(Context().get(), request, response);
  }

  std::unique_ptr<BrokerProcess> broker_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::BrokerService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

int PidOf(const HttpResponse& response) {
  auto it = response.headers.find("x-worker-pid");
  int pid = 0;
  if (it != response.headers.end()) (void)absl::SimpleAtoi(it->second, &pid);
  return pid;
}

TEST_F(ControlPlaneTest, ListWorkersAndHealthFollowTheWorkers) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=2"}));
  ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(30)));
  std::vector<pid_t> children = broker_->WorkerPids();
  std::set<int> expected(children.begin(), children.end());
  ASSERT_TRUE(
      WaitFor([&] { return ReadyPids() == expected; }, absl::Seconds(10)));
  for (const v1::Worker& w : Workers()) {
    EXPECT_TRUE(w.supervised());
    EXPECT_GT(w.id(), 0u);
    EXPECT_GT(w.started_at().seconds(), 0);
    EXPECT_EQ(w.labels().at("program"), "fdbroker-http-worker");
  }
  EXPECT_TRUE(WaitFor(
      [&] {
        return Health("") == HealthCheckResponse::SERVING &&
               Health("fdbroker.v1.BrokerService") ==
                   HealthCheckResponse::SERVING;
      },
      absl::Seconds(10)));

  // No ready worker: NOT_SERVING.
  v1::ScaleWorkersResponse scaled;
  ASSERT_TRUE(Scale(0, &scaled).ok());
  EXPECT_TRUE(
      WaitFor([&] { return Health("") == HealthCheckResponse::NOT_SERVING; },
              absl::Seconds(10)));
}

TEST_F(ControlPlaneTest, ScaleUpAndDownChangesTheProcessesThatServe) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=2"}));
  ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(30)));

  v1::ScaleWorkersResponse up;
  ASSERT_TRUE(Scale(4, &up).ok());
  EXPECT_EQ(up.previous_count(), 2);
  EXPECT_EQ(up.count(), 4);
  EXPECT_EQ(up.started_size(), 2);
  EXPECT_EQ(up.draining_size(), 0);
  ASSERT_TRUE(broker_->WaitForWorkers(4, absl::Seconds(30)));
  EXPECT_EQ(ReadyPids().size(), 4u);

  // Idempotent: asking again changes nothing.
  v1::ScaleWorkersResponse again;
  ASSERT_TRUE(Scale(4, &again).ok());
  EXPECT_EQ(again.started_size(), 0);
  EXPECT_EQ(again.draining_size(), 0);

  // One keep-alive connection makes its worker the most loaded: scaling
  // down to 1 must keep exactly that one (the least loaded drain first).
  absl::StatusOr<wire::UniqueFd> held =
      ConnectTcp("127.0.0.1", broker_->port());
  ASSERT_TRUE(held.ok());
  absl::StatusOr<HttpResponse> first = HttpGet(held->get(), "/", true);
  ASSERT_TRUE(first.ok());
  const int busy_pid = PidOf(*first);
  // Workers report closed connections in batches (within a few ms): wait
  // until the probes of WaitForWorkers() are reported and only the held
  // connection counts.
  ASSERT_TRUE(WaitFor(
      [&] {
        for (const v1::Worker& w : Workers()) {
          if (w.active_connections() != (w.pid() == busy_pid ? 1 : 0)) {
            return false;
          }
        }
        return true;
      },
      absl::Seconds(5)));
  v1::ScaleWorkersResponse down;
  ASSERT_TRUE(Scale(1, &down).ok());
  EXPECT_EQ(down.previous_count(), 4);
  EXPECT_EQ(down.draining_size(), 3);
  for (const v1::Worker& w : down.draining()) {
    EXPECT_NE(w.pid(), busy_pid) << "the loaded worker was drained";
  }
  ASSERT_TRUE(WaitForProcessCount(1));
  EXPECT_EQ(broker_->WorkerPids()[0], busy_pid);
  // The held connection still works: its worker was kept.
  absl::StatusOr<HttpResponse> r = HttpGet(held->get(), "/", true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(PidOf(*r), busy_pid);
}

TEST_F(ControlPlaneTest, ConcurrentScaleRequestsEndInTheLastAppliedCount) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=1", "--max_workers=8"}));
  ASSERT_TRUE(broker_->WaitForWorkers(1, absl::Seconds(30)));
  // Distinct and never 1 (the start), so every previous_count is unique.
  const std::vector<int> counts = {3, 5, 2, 4, 6, 7};
  std::vector<v1::ScaleWorkersResponse> responses(counts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < counts.size(); ++i) {
    threads.emplace_back(
        [&, i] { ASSERT_TRUE(Scale(counts[i], &responses[i]).ok()); });
  }
  for (std::thread& t : threads) t.join();
  // The loop applied them one at a time: previous_count links them into one
  // chain from 1; its end is the final count.
  std::map<int, int> next;  // previous -> count
  for (const auto& r : responses) next[r.previous_count()] = r.count();
  int final_count = 1;
  for (size_t i = 0; i < counts.size(); ++i) {
    ASSERT_TRUE(next.count(final_count)) << "broken chain at " << final_count;
    final_count = next[final_count];
  }
  ASSERT_TRUE(WaitForProcessCount(static_cast<size_t>(final_count)));
  ASSERT_TRUE(WaitFor(
      [&] { return ReadyPids().size() == static_cast<size_t>(final_count); },
      absl::Seconds(20)));
}

TEST_F(ControlPlaneTest, EveryErrorPathHasTheRightCodeAndAMessage) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=1"}));
  ASSERT_TRUE(broker_->WaitForWorkers(1, absl::Seconds(30)));
  v1::ScaleWorkersResponse scaled;
  for (int bad : {-1, 65, 100000}) {
    grpc::Status s = Scale(bad, &scaled);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_NE(s.error_message().find("count must be in 0..64"),
              std::string::npos)
        << s.error_message();
  }
  v1::ScaleWorkersRequest negative;
  negative.set_count(1);
  negative.mutable_drain_timeout()->set_seconds(-5);
  EXPECT_EQ(
      stub_->ScaleWorkers(Context().get(), negative, &scaled).error_code(),
      grpc::StatusCode::INVALID_ARGUMENT);
  v1::ScaleWorkersRequest malformed;
  malformed.set_count(1);
  malformed.mutable_drain_timeout()->set_seconds(1);
  malformed.mutable_drain_timeout()->set_nanos(-5);
  EXPECT_EQ(
      stub_->ScaleWorkers(Context().get(), malformed, &scaled).error_code(),
      grpc::StatusCode::INVALID_ARGUMENT);

  v1::DrainWorkerResponse drained;
  v1::DrainWorkerRequest unknown;
  unknown.set_worker_id(424242);
  grpc::Status s = stub_->DrainWorker(Context().get(), unknown, &drained);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(s.error_message().find("424242"), std::string::npos);
  v1::DrainWorkerRequest zero;
  EXPECT_EQ(stub_->DrainWorker(Context().get(), zero, &drained).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  v1::DrainWorkerRequest too_long;
  too_long.set_worker_id(Workers()[0].id());
  too_long.mutable_timeout()->set_seconds(7 * 24 * 3600);
  EXPECT_EQ(
      stub_->DrainWorker(Context().get(), too_long, &drained).error_code(),
      grpc::StatusCode::INVALID_ARGUMENT);

  // Draining a worker twice is a precondition failure. A worker that never
  // reads its channel stays draining until its deadline, so the second
  // request meets it for sure.
  Subprocess::Options env;
  env.env["FDBROKER_SOCKET"] = broker_->socket_path();
  auto stalled = Subprocess::Start(
      {BinaryPath("fdbroker-fake-worker"), "--mode=stall"}, env);
  ASSERT_TRUE(stalled.ok());
  ASSERT_TRUE(WaitFor([&] { return (*stalled)->Stdout() == "registered\n"; },
                      absl::Seconds(10)));
  uint64_t stalled_id = 0;
  for (const v1::Worker& w : Workers()) {
    if (w.pid() == (*stalled)->pid()) stalled_id = w.id();
  }
  ASSERT_NE(stalled_id, 0u);
  v1::DrainWorkerRequest once;
  once.set_worker_id(stalled_id);
  once.mutable_timeout()->set_seconds(60);
  ASSERT_TRUE(stub_->DrainWorker(Context().get(), once, &drained).ok());
  s = stub_->DrainWorker(Context().get(), once, &drained);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("already draining"), std::string::npos);

  v1::DrainRequest drain;
  drain.mutable_timeout()->set_seconds(-1);
  v1::DrainResponse drain_response;
  EXPECT_EQ(stub_->Drain(Context().get(), drain, &drain_response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ControlPlaneTest, DrainWorkerWithReplaceIsARollingRestart) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=2"}));
  ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(30)));
  const v1::Worker old = Workers()[0];
  v1::DrainWorkerRequest request;
  request.set_worker_id(old.id());
  request.set_replace(true);
  v1::DrainWorkerResponse response;
  grpc::Status s = stub_->DrainWorker(Context().get(), request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.worker().id(), old.id());
  EXPECT_EQ(response.worker().state(), v1::WORKER_STATE_DRAINING);
  // The replacement had registered before the old worker was drained.
  EXPECT_EQ(response.replacement().state(), v1::WORKER_STATE_READY);
  EXPECT_NE(response.replacement().pid(), old.pid());
  ASSERT_TRUE(
      WaitFor([&] { return ProcessGone(old.pid()); }, absl::Seconds(20)));
  ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(20)));
  std::set<int> ready = ReadyPids();
  EXPECT_TRUE(ready.count(response.replacement().pid()));
  EXPECT_FALSE(ready.count(old.pid()));
}

TEST_F(ControlPlaneTest, DrainWorkerOnAnExternalWorkerUnregistersIt) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=1"}));
  ASSERT_TRUE(broker_->WaitForWorkers(1, absl::Seconds(30)));
  Subprocess::Options env;
  env.env["FDBROKER_SOCKET"] = broker_->socket_path();
  auto external = Subprocess::Start({BinaryPath("fdbroker-http-worker")}, env);
  ASSERT_TRUE(external.ok());
  v1::Worker ext;
  ASSERT_TRUE(WaitFor(
      [&] {
        for (const v1::Worker& w : Workers()) {
          if (!w.supervised() && w.state() == v1::WORKER_STATE_READY) {
            ext = w;
            return true;
          }
        }
        return false;
      },
      absl::Seconds(10)));
  EXPECT_EQ(ext.pid(), (*external)->pid());

  v1::DrainWorkerRequest replace;
  replace.set_worker_id(ext.id());
  replace.set_replace(true);
  v1::DrainWorkerResponse response;
  grpc::Status s = stub_->DrainWorker(Context().get(), replace, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("external"), std::string::npos);

  v1::DrainWorkerRequest drain;
  drain.set_worker_id(ext.id());
  ASSERT_TRUE(stub_->DrainWorker(Context().get(), drain, &response).ok());
  absl::StatusOr<int> code = (*external)->Wait(absl::Seconds(10));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0);
  ASSERT_TRUE(WaitFor(
      [&] {
        for (const v1::Worker& w : Workers()) {
          if (w.id() == ext.id()) return false;
        }
        return true;
      },
      absl::Seconds(10)));
}

TEST_F(ControlPlaneTest, DrainQueuesNewClientsAndResumeServesThem) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=1"}));
  ASSERT_TRUE(broker_->WaitForWorkers(1, absl::Seconds(30)));
  v1::DrainResponse drained;
  ASSERT_TRUE(stub_->Drain(Context().get(), v1::DrainRequest(), &drained).ok());
  EXPECT_FALSE(drained.accepting());
  EXPECT_TRUE(
      WaitFor([&] { return Health("") == HealthCheckResponse::NOT_SERVING; },
              absl::Seconds(5)));
  v1::GetLoadResponse load;
  ASSERT_TRUE(
      stub_->GetLoad(Context().get(), v1::GetLoadRequest(), &load).ok());
  EXPECT_FALSE(load.accepting());

  // The listening socket is still bound: the connect succeeds (backlog) and
  // the request waits instead of being refused.
  absl::StatusOr<wire::UniqueFd> client =
      ConnectTcp("127.0.0.1", broker_->port());
  ASSERT_TRUE(client.ok()) << client.status();
  const std::string request = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
  ASSERT_EQ(::send(client->get(), request.data(), request.size(), 0),
            static_cast<ssize_t>(request.size()));
  // Not served while drained (a bounded look, then Resume proves it waited).
  char c;
  timeval tv{0, 300000};
  ::setsockopt(client->get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  EXPECT_EQ(::recv(client->get(), &c, 1, MSG_PEEK), -1);
  EXPECT_EQ(errno, EAGAIN);

  v1::ResumeResponse resumed;
  ASSERT_TRUE(
      stub_->Resume(Context().get(), v1::ResumeRequest(), &resumed).ok());
  EXPECT_TRUE(resumed.accepting());
  std::string response;
  char buf[4096];
  ASSERT_TRUE(WaitFor(
      [&] {
        ssize_t n = ::recv(client->get(), buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) response.append(buf, static_cast<size_t>(n));
        return response.find("\r\n\r\n") != std::string::npos;
      },
      absl::Seconds(10)));
  EXPECT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << response;
  EXPECT_TRUE(
      WaitFor([&] { return Health("") == HealthCheckResponse::SERVING; },
              absl::Seconds(5)));
}

TEST_F(ControlPlaneTest, DrainWithTimeoutStopsWorkersAndResumeRestoresThem) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=2"}));
  ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(30)));
  v1::DrainRequest drain;
  drain.mutable_timeout()->set_seconds(5);
  v1::DrainResponse drained;
  ASSERT_TRUE(stub_->Drain(Context().get(), drain, &drained).ok());
  EXPECT_EQ(drained.draining_size(), 2);
  ASSERT_TRUE(WaitForProcessCount(0)) << "nobody restarts them";
  v1::ResumeResponse resumed;
  ASSERT_TRUE(
      stub_->Resume(Context().get(), v1::ResumeRequest(), &resumed).ok());
  EXPECT_EQ(resumed.started_size(), 2);
  ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(30)));
}

TEST_F(ControlPlaneTest, GetLoadMatchesTheTrafficSent) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=2"}));
  ASSERT_TRUE(broker_->WaitForWorkers(2, absl::Seconds(30)));
  v1::GetLoadResponse before;
  ASSERT_TRUE(
      stub_->GetLoad(Context().get(), v1::GetLoadRequest(), &before).ok());
  constexpr int kRequests = 300;
  for (int i = 0; i < kRequests; ++i) {
    absl::StatusOr<HttpResponse> r =
        HttpGetOnce("127.0.0.1", broker_->port(), "/");
    ASSERT_TRUE(r.ok() && r->status == 200);
  }
  constexpr int kHeld = 7;
  std::vector<wire::UniqueFd> held;
  for (int i = 0; i < kHeld; ++i) {
    absl::StatusOr<wire::UniqueFd> fd =
        ConnectTcp("127.0.0.1", broker_->port());
    ASSERT_TRUE(fd.ok());
    ASSERT_TRUE(HttpGet(fd->get(), "/", true).ok());
    held.push_back(*std::move(fd));
  }
  v1::GetLoadResponse load;
  // Closed reports trail the responses slightly: poll for the exact figure.
  ASSERT_TRUE(WaitFor(
      [&] {
        load.Clear();
        return stub_->GetLoad(Context().get(), v1::GetLoadRequest(), &load)
                   .ok() &&
               load.active_connections() == kHeld;
      },
      absl::Seconds(10)))
      << load.ShortDebugString();
  EXPECT_EQ(load.accepted_total() - before.accepted_total(),
            static_cast<uint64_t>(kRequests + kHeld));
  EXPECT_EQ(load.handed_off_total() - before.handed_off_total(),
            static_cast<uint64_t>(kRequests + kHeld));
  EXPECT_EQ(load.pending_connections(), 0);
  EXPECT_EQ(load.unacked_connections(), 0);
  EXPECT_TRUE(load.accepting());
  ASSERT_EQ(load.workers_size(), 2);
  int64_t per_worker = 0;
  for (const v1::WorkerLoad& w : load.workers()) {
    per_worker += w.active_connections();
  }
  EXPECT_EQ(per_worker, kHeld);
  // The rates come from once-a-second samples (over the history there is,
  // up to 10 s): positive once traffic has been sampled.
  ASSERT_TRUE(WaitFor(
      [&] {
        load.Clear();
        return stub_->GetLoad(Context().get(), v1::GetLoadRequest(), &load)
                   .ok() &&
               load.accepted_per_second() > 0;
      },
      absl::Seconds(5)));
}

TEST_F(ControlPlaneTest, WatchEventsSeesACrashAndTheRestart) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=1"}));
  ASSERT_TRUE(broker_->WaitForWorkers(1, absl::Seconds(30)));
  const pid_t victim = broker_->WorkerPids()[0];
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(30));
  std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> reader =
      stub_->WatchEvents(&context, v1::WatchEventsRequest());
  // Initial metadata arrives once the stream is subscribed.
  reader->WaitForInitialMetadata();
  // A scale request shows up as an event too.
  v1::ScaleWorkersResponse scaled;
  ASSERT_TRUE(Scale(1, &scaled).ok());
  v1::WatchEventsResponse event;
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.type(), v1::EVENT_TYPE_SCALE_REQUESTED);

  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  std::vector<v1::EventType> seen;
  pid_t restarted_pid = 0;
  while (reader->Read(&event)) {
    seen.push_back(event.type());
    if (event.type() == v1::EVENT_TYPE_WORKER_CRASHED) {
      EXPECT_EQ(event.pid(), victim);
      EXPECT_EQ(event.exit_status(), "killed by signal 9 (SIGKILL)");
    }
    if (event.type() == v1::EVENT_TYPE_WORKER_RESTARTED) {
      restarted_pid = event.pid();
    }
    if (event.type() == v1::EVENT_TYPE_WORKER_READY &&
        event.pid() == restarted_pid) {
      break;
    }
  }
  context.TryCancel();
  // The lost channel (draining) and the exit (crashed) may come in either
  // order; both are reported.
  EXPECT_NE(std::find(seen.begin(), seen.end(), v1::EVENT_TYPE_WORKER_CRASHED),
            seen.end());
  EXPECT_NE(
      std::find(seen.begin(), seen.end(), v1::EVENT_TYPE_WORKER_RESTARTED),
      seen.end());
  EXPECT_NE(restarted_pid, 0);
}

TEST_F(ControlPlaneTest, WatchEventsSubscribersAreBounded) {
  // A client of the control plane cannot make the broker hold an unbounded
  // number of event streams (each queues up to 4096 events): past the limit
  // a stream ends at once with RESOURCE_EXHAUSTED, and everything else keeps
  // answering.
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=0"}));
  struct Stream {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> reader;
  };
  auto open = [&] {
    auto stream = std::make_unique<Stream>();
    stream->context.set_deadline(std::chrono::system_clock::now() +
                                 std::chrono::seconds(30));
    stream->reader =
        stub_->WatchEvents(&stream->context, v1::WatchEventsRequest());
    stream->reader->WaitForInitialMetadata();
    return stream;
  };
  std::vector<std::unique_ptr<Stream>> streams;
  for (size_t i = 0; i < EventHub::kMaxSubscribers; ++i) {
    streams.push_back(open());
  }
  std::unique_ptr<Stream> one_too_many = open();
  grpc::Status refused = one_too_many->reader->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.error_message();
  EXPECT_NE(refused.error_message().find("WatchEvents"), std::string::npos)
      << refused.error_message();
  // The subscribed streams still get events; other RPCs still answer.
  v1::ScaleWorkersResponse scaled;
  ASSERT_TRUE(Scale(0, &scaled).ok());
  v1::WatchEventsResponse event;
  ASSERT_TRUE(streams.back()->reader->Read(&event));
  EXPECT_EQ(event.type(), v1::EVENT_TYPE_SCALE_REQUESTED);
  EXPECT_EQ(Workers().size(), 0u);
  // A slot freed is a slot to take.
  streams.front()->context.TryCancel();
  (void)streams.front()->reader->Finish();
  streams.erase(streams.begin());
  std::unique_ptr<Stream> again;
  EXPECT_TRUE(WaitFor(
      [&] {
        again = open();
        return Scale(0, &scaled).ok() && again->reader->Read(&event);
      },
      absl::Seconds(10)));
  again->context.TryCancel();
  for (auto& stream : streams) stream->context.TryCancel();
}

TEST_F(ControlPlaneTest, RestartLoopIsStreamedAndMakesTheBrokerUnhealthy) {
  // The supervised command dies at once, again and again. The pool starts
  // only once the stream is up, so every event is seen.
  ASSERT_NO_FATAL_FAILURE(
      StartBroker({"--workers=0", "--worker_cmd=/bin/false"}));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(30));
  auto reader = stub_->WatchEvents(&context, v1::WatchEventsRequest());
  reader->WaitForInitialMetadata();
  v1::ScaleWorkersResponse scaled;
  ASSERT_TRUE(Scale(1, &scaled).ok());
  v1::WatchEventsResponse event;
  int crashes = 0;
  bool loop = false;
  while (!loop && reader->Read(&event)) {
    crashes += event.type() == v1::EVENT_TYPE_WORKER_CRASHED;
    loop = event.type() == v1::EVENT_TYPE_RESTART_LOOP;
  }
  context.TryCancel();
  ASSERT_TRUE(loop);
  EXPECT_EQ(crashes, 3);
  EXPECT_NE(event.detail().find("in a row"), std::string::npos);
  EXPECT_TRUE(
      WaitFor([&] { return Health("") == HealthCheckResponse::NOT_SERVING; },
              absl::Seconds(5)));
}

TEST_F(ControlPlaneTest, PlaintextControlOffLoopbackNeedsAnExplicitFlag) {
  auto process = Subprocess::Start(
      {BinaryPath("fdbroker"), "--listen=127.0.0.1:0", "--control=0.0.0.0:0",
       "--socket=" + MakeTempDir() + "/s.sock"});
  ASSERT_TRUE(process.ok());
  absl::StatusOr<int> code = (*process)->Wait(absl::Seconds(10));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 2);
  EXPECT_NE((*process)->Stderr().find("--allow_insecure_control"),
            std::string::npos)
      << (*process)->Output();
}

std::string BufPath() {
  if (const char* env = std::getenv("FDBROKER_BUF")) return env;
  return "buf";
}

// Runs `buf curl` (gRPC over plaintext, learned by reflection) as `uid`
// (root: as the test runs); returns its exit code and output.
std::pair<int, std::string> BufCurlAs(uid_t uid,
                                      std::vector<std::string> args) {
  std::vector<std::string> argv;
  const std::string home = MakeTempDir();
  if (uid != 0) {
    ::chmod(home.c_str(), 0777);
    argv = {"setpriv",
            absl::StrCat("--reuid=", uid),
            absl::StrCat("--regid=", uid),
            "--clear-groups",
            "env",
            "HOME=" + home};
  }
  argv.push_back(BufPath());
  argv.insert(argv.end(),
              {"curl", "--protocol", "grpc", "--http2-prior-knowledge"});
  argv.insert(argv.end(), args.begin(), args.end());
  auto process = Subprocess::Start(argv);
  EXPECT_TRUE(process.ok())
      << process.status() << " (tests/run.sh installs buf from npm)";
  if (!process.ok()) return {-1, ""};
  absl::StatusOr<int> code = (*process)->Wait(absl::Seconds(30));
  return {code.ok() ? *code : -1, (*process)->Stdout() + (*process)->Stderr()};
}

TEST_F(ControlPlaneTest, PlaintextMutationsOnlyFromTheBrokersUidOrRoot) {
  // Without TLS a caller has no certificate, but a loopback caller has a
  // uid: the control plane is no weaker than the hand-off socket (0600,
  // the broker's uid). Anyone local may read; only root and the broker's
  // uid may change anything.
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=0"}));
  const std::string url = "http://" + broker_->control_address();
  const uid_t nobody = 65534;
  auto [list_code, list] =
      BufCurlAs(nobody, {url + "/fdbroker.v1.BrokerService/ListWorkers"});
  EXPECT_EQ(list_code, 0) << list;
  auto [scale_code, scale] =
      BufCurlAs(nobody, {"-d", "{\"count\": 1}",
                         url + "/fdbroker.v1.BrokerService/ScaleWorkers"});
  EXPECT_NE(scale_code, 0) << scale;
  EXPECT_NE(scale.find("permission_denied"), std::string::npos) << scale;
  EXPECT_NE(scale.find("uid 65534"), std::string::npos) << scale;
  EXPECT_TRUE(WaitFor(
      [&] {
        return broker_->process().Stderr().find(
                   "method=ScaleWorkers request={count: 1} "
                   "result=PERMISSION_DENIED") != std::string::npos;
      },
      absl::Seconds(5)))
      << broker_->process().Stderr();
  EXPECT_TRUE(Workers().empty());  // Nothing was started.
  // The broker's own uid (root here) may.
  v1::ScaleWorkersResponse scaled;
  grpc::Status ok = Scale(0, &scaled);
  EXPECT_TRUE(ok.ok()) << ok.error_message();
}

// Creates a CA, a server certificate for 127.0.0.1 and a client certificate
// with openssl; returns the directory.
std::string MakeCertificates() {
  const std::string dir = MakeTempDir();
  const std::string script = absl::StrCat(
      "set -e; cd ", dir,
      "; openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca "
      "-keyout ca.key -out ca.pem 2>/dev/null;"
      " printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext;"
      " openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 "
      "-keyout server.key -out server.csr 2>/dev/null;"
      " openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key "
      "-CAcreateserial -days 2 -extfile san.ext -out server.pem 2>/dev/null;"
      " for who in operator viewer; do"
      " openssl req -newkey rsa:2048 -nodes -subj /CN=$who "
      "-keyout $who.key -out $who.csr 2>/dev/null;"
      " openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key "
      "-CAcreateserial -days 2 -out $who.pem 2>/dev/null; done");
  EXPECT_EQ(std::system(script.c_str()), 0);
  return dir;
}

std::string Slurp(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  return text.ok() ? *text : "";
}

grpc::SslCredentialsOptions ClientCredentials(const std::string& certs,
                                              const std::string& who) {
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = Slurp(certs + "/ca.pem");
  if (!who.empty()) {
    options.pem_private_key = Slurp(certs + "/" + who + ".key");
    options.pem_cert_chain = Slurp(certs + "/" + who + ".pem");
  }
  return options;
}

TEST_F(ControlPlaneTest, MutualTlsChecksCertificatesAndAdminSubjects) {
  const std::string certs = MakeCertificates();
  auto broker = BrokerProcess::Start(
      {"--workers=0", "--tls_cert=" + certs + "/server.pem",
       "--tls_key=" + certs + "/server.key",
       "--tls_client_ca=" + certs + "/ca.pem", "--admin_subjects=CN=operator"});
  ASSERT_TRUE(broker.ok()) << broker.status();
  auto stub_as = [&](const std::string& who) {
    return v1::BrokerService::NewStub(grpc::CreateChannel(
        (*broker)->control_address(),
        grpc::SslCredentials(ClientCredentials(certs, who))));
  };
  v1::ListWorkersResponse response;
  v1::ScaleWorkersRequest scale;
  scale.set_count(0);
  v1::ScaleWorkersResponse scaled;

  // An admin may read and mutate; the call is audited with its subject.
  auto operator_stub = stub_as("operator");
  grpc::Status ok = operator_stub->ListWorkers(
      Context().get(), v1::ListWorkersRequest(), &response);
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_TRUE(
      operator_stub->ScaleWorkers(Context().get(), scale, &scaled).ok());
  EXPECT_TRUE(WaitFor(
      [&] {
        return (*broker)->process().Stderr().find(
                   "audit: caller=\"CN=operator\" method=ScaleWorkers "
                   "request={} result=OK") != std::string::npos;
      },
      absl::Seconds(5)))
      << (*broker)->process().Stderr();

  // Any verified client may read; only admins may mutate.
  auto viewer_stub = stub_as("viewer");
  EXPECT_TRUE(
      viewer_stub
          ->ListWorkers(Context().get(), v1::ListWorkersRequest(), &response)
          .ok());
  grpc::Status denied =
      viewer_stub->ScaleWorkers(Context().get(), scale, &scaled);
  EXPECT_EQ(denied.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(denied.error_message().find("--admin_subjects"), std::string::npos);
  EXPECT_NE((*broker)->process().Stderr().find(
                "audit: caller=\"CN=viewer\" method=ScaleWorkers"),
            std::string::npos);

  // No client certificate, or no TLS at all: refused at the handshake.
  EXPECT_FALSE(
      stub_as("")
          ->ListWorkers(Context().get(), v1::ListWorkersRequest(), &response)
          .ok());
  auto plaintext = v1::BrokerService::NewStub(grpc::CreateChannel(
      (*broker)->control_address(), grpc::InsecureChannelCredentials()));
  EXPECT_FALSE(
      plaintext
          ->ListWorkers(Context().get(), v1::ListWorkersRequest(), &response)
          .ok());
}

// Reflection proven end to end: buf curl knows nothing about our protos and
// learns everything from the server, like grpcurl.
TEST_F(ControlPlaneTest, ReflectionWithBufCurl) {
  ASSERT_NO_FATAL_FAILURE(StartBroker({"--workers=1"}));
  ASSERT_TRUE(broker_->WaitForWorkers(1, absl::Seconds(30)));
  const std::string url = "http://" + broker_->control_address();
  auto run = [](std::vector<std::string> args) {
    return BufCurlAs(0, std::move(args));
  };
  auto [list_code, list] = run({"--list-methods", url});
  EXPECT_EQ(list_code, 0) << list;
  EXPECT_NE(list.find("fdbroker.v1.BrokerService/ScaleWorkers"),
            std::string::npos)
      << list;
  EXPECT_NE(list.find("grpc.health.v1.Health/Check"), std::string::npos)
      << list;

  auto [workers_code, workers] =
      run({url + "/fdbroker.v1.BrokerService/ListWorkers"});
  EXPECT_EQ(workers_code, 0) << workers;
  EXPECT_NE(workers.find("WORKER_STATE_READY"), std::string::npos) << workers;

  auto [health_code, health] = run({url + "/grpc.health.v1.Health/Check"});
  EXPECT_EQ(health_code, 0) << health;
  EXPECT_NE(health.find("SERVING"), std::string::npos) << health;

  auto [bad_code, bad] = run({"-d", "{\"count\": -1}",
                              url + "/fdbroker.v1.BrokerService/ScaleWorkers"});
  EXPECT_NE(bad_code, 0);
  EXPECT_NE(bad.find("invalid_argument"), std::string::npos) << bad;
}

}  // namespace
}  // namespace fdbroker::testing
