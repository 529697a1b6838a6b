// ControlService on its own: a real in-process gRPC server (127.0.0.1, port
// 0) and a real EventLoop on its own thread, in front of a fake
// BrokerOperations. Validating a request is BrokerOperations' job (the
// interface says so; DataPlaneOperations' checks are in
// broker_operations_test.cc); this is the RPC edge: each RPC reaches its
// operation on the loop thread with the request as sent, the operation's
// answer or error (code and message) reaches the client unchanged,
// DrainWorker may answer later, mutating RPCs are authorized, every finished
// RPC is observed, a closed loop answers UNAVAILABLE, and WatchEvents
// streams the hub's events.
#include "broker/control_service.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "broker/broker_operations.h"
#include "broker/event_hub.h"
#include "broker/event_loop.h"
#include "fdbroker/v1/broker.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fdbroker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

// Records each request and answers with what the test set. Every call must
// come on the loop thread (checked).
class FakeOperations final : public BrokerOperations {
 public:
  explicit FakeOperations(EventLoop& loop) : loop_(loop) {}

  v1::ListWorkersResponse ListWorkers() override {
    absl::MutexLock lock(&mu_);
    Called("ListWorkers");
    return list_workers;
  }
  v1::GetLoadResponse GetLoad() override {
    absl::MutexLock lock(&mu_);
    Called("GetLoad");
    return get_load;
  }
  absl::StatusOr<v1::ScaleWorkersResponse> ScaleWorkers(
      const v1::ScaleWorkersRequest& request) override {
    absl::MutexLock lock(&mu_);
    Called("ScaleWorkers");
    scale_request = request;
    return scale_result;
  }
  void DrainWorker(const v1::DrainWorkerRequest& request,
                   DrainWorkerDone done) override {
    absl::MutexLock lock(&mu_);
    Called("DrainWorker");
    drain_worker_request = request;
    if (answer_drain_worker_later) {
      drain_worker_done = std::move(done);
      return;
    }
    done(drain_worker_result);
  }
  absl::StatusOr<v1::DrainResponse> Drain(
      const v1::DrainRequest& request) override {
    absl::MutexLock lock(&mu_);
    Called("Drain");
    drain_request = request;
    return drain_result;
  }
  absl::StatusOr<v1::ResumeResponse> Resume(const v1::ResumeRequest&) override {
    absl::MutexLock lock(&mu_);
    Called("Resume");
    return resume_result;
  }
  absl::StatusOr<v1::RebalanceResponse> Rebalance(
      const v1::RebalanceRequest&) override {
    absl::MutexLock lock(&mu_);
    Called("Rebalance");
    return rebalance_result;
  }
  absl::StatusOr<v1::RestartWorkersResponse> RestartWorkers(
      const v1::RestartWorkersRequest& request) override {
    absl::MutexLock lock(&mu_);
    Called("RestartWorkers");
    restart_request = request;
    return restart_result;
  }

  std::vector<std::string> calls() {
    absl::MutexLock lock(&mu_);
    return calls_;
  }
  bool off_loop_call() {
    absl::MutexLock lock(&mu_);
    return off_loop_call_;
  }

  // Set before an RPC, read after it (under mu_ while it runs).
  absl::Mutex mu_;
  v1::ListWorkersResponse list_workers;
  v1::GetLoadResponse get_load;
  absl::StatusOr<v1::ScaleWorkersResponse> scale_result;
  absl::StatusOr<v1::RestartWorkersResponse> restart_result;
  std::optional<v1::RestartWorkersRequest> restart_request;
  std::optional<v1::ScaleWorkersRequest> scale_request;
  absl::StatusOr<v1::DrainWorkerResponse> drain_worker_result;
  std::optional<v1::DrainWorkerRequest> drain_worker_request;
  bool answer_drain_worker_later = false;
  DrainWorkerDone drain_worker_done;
  absl::StatusOr<v1::DrainResponse> drain_result;
  std::optional<v1::DrainRequest> drain_request;
  absl::StatusOr<v1::ResumeResponse> resume_result;
  absl::StatusOr<v1::RebalanceResponse> rebalance_result;

 private:
  void Called(const char* method) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    calls_.push_back(method);
    if (!loop_.IsLoopThread()) off_loop_call_ = true;
  }

  EventLoop& loop_;
  std::vector<std::string> calls_ ABSL_GUARDED_BY(mu_);
  bool off_loop_call_ ABSL_GUARDED_BY(mu_) = false;
};

v1::Worker MakeWorker(uint64_t id) {
  v1::Worker worker;
  worker.set_id(id);
  worker.set_pid(static_cast<int32_t>(1000 + id));
  worker.set_active_connections(3);
  return worker;
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::seconds(10));
  return context;
}

class ControlServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { Start({}); }

  void Start(ControlService::Authorization authorization) {
    absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Create();
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = *std::move(loop);
    operations_ = std::make_unique<FakeOperations>(*loop_);
    service_ = std::make_unique<ControlService>(
        *loop_, *operations_, hub_,
        [this](absl::string_view method, grpc::StatusCode code) {
          absl::MutexLock lock(&observed_mu_);
          observed_.emplace_back(std::string(method), code);
        },
        std::move(authorization));
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    loop_thread_ = std::thread([this] { loop_->Run(); });
    stub_ = v1::BrokerService::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }

  // The loop stops and refuses further work (the broker shutting down).
  void StopLoop() {
    if (!loop_thread_.joinable()) return;
    loop_->Stop();
    loop_thread_.join();
    loop_->Close();
  }

  // The server goes before the service it calls.
  void Stop() {
    hub_.Close();  // Ends open streams, so that Shutdown() returns.
    if (server_ != nullptr) {
      server_->Shutdown(std::chrono::system_clock::now() +
                        std::chrono::seconds(5));
      server_.reset();
    }
    StopLoop();
  }

  void TearDown() override { Stop(); }

  std::vector<std::pair<std::string, grpc::StatusCode>> observed() {
    absl::MutexLock lock(&observed_mu_);
    return observed_;
  }

  // Runs `task` on the loop thread and waits for it.
  void OnLoop(absl::AnyInvocable<void()> task) {
    std::promise<void> done;
    ASSERT_TRUE(loop_->Post([&task, &done] {
      task();
      done.set_value();
    }));
    done.get_future().wait();
  }

  EventHub hub_;
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<FakeOperations> operations_;
  std::unique_ptr<ControlService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::thread loop_thread_;
  std::unique_ptr<v1::BrokerService::Stub> stub_;
  absl::Mutex observed_mu_;
  std::vector<std::pair<std::string, grpc::StatusCode>> observed_
      ABSL_GUARDED_BY(observed_mu_);
};

TEST(ToGrpcStatusTest, KeepsTheCodeAndTheMessage) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  const absl::Status errors[] = {
      absl::InvalidArgumentError("count: must be at least 0"),
      absl::NotFoundError("no worker 9"),
      absl::FailedPreconditionError("needs two ready workers"),
      absl::PermissionDeniedError("not an admin"),
      absl::UnavailableError("shutting down"),
      absl::ResourceExhaustedError("too many"),
  };
  for (const absl::Status& error : errors) {
    grpc::Status converted = ToGrpcStatus(error);
    EXPECT_EQ(static_cast<int>(converted.error_code()),
              static_cast<int>(error.code()));
    EXPECT_EQ(converted.error_message(), error.message());
  }
}

TEST_F(ControlServiceTest, ReadOnlyRpcsReturnWhatTheOperationsSay) {
  {
    absl::MutexLock lock(&operations_->mu_);
    *operations_->list_workers.add_workers() = MakeWorker(1);
    *operations_->list_workers.add_workers() = MakeWorker(2);
    operations_->get_load.set_active_connections(17);
    operations_->get_load.set_accepting(true);
    operations_->get_load.add_workers()->set_worker_id(2);
  }
  v1::ListWorkersResponse workers;
  grpc::Status status =
      stub_->ListWorkers(Context().get(), v1::ListWorkersRequest(), &workers);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(workers.workers_size(), 2);
  EXPECT_EQ(workers.workers(0).id(), 1u);
  EXPECT_EQ(workers.workers(1).pid(), 1002);
  v1::GetLoadResponse load;
  status = stub_->GetLoad(Context().get(), v1::GetLoadRequest(), &load);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(load.active_connections(), 17);
  EXPECT_TRUE(load.accepting());
  ASSERT_EQ(load.workers_size(), 1);
  EXPECT_EQ(load.workers(0).worker_id(), 2u);
  EXPECT_THAT(operations_->calls(), ElementsAre("ListWorkers", "GetLoad"));
  EXPECT_FALSE(operations_->off_loop_call());
  EXPECT_THAT(observed(), ElementsAre(Pair("ListWorkers", grpc::StatusCode::OK),
                                      Pair("GetLoad", grpc::StatusCode::OK)));
}

TEST_F(ControlServiceTest, MutationsPassTheRequestAndReturnTheResponse) {
  {
    absl::MutexLock lock(&operations_->mu_);
    v1::ScaleWorkersResponse scaled;
    scaled.set_previous_count(2);
    scaled.set_count(3);
    *scaled.add_started() = MakeWorker(5);
    operations_->scale_result = scaled;
    v1::DrainResponse drained;
    drained.set_pending_connections(4);
    *drained.add_draining() = MakeWorker(1);
    operations_->drain_result = drained;
    v1::ResumeResponse resumed;
    resumed.set_accepting(true);
    operations_->resume_result = resumed;
    v1::RebalanceResponse rebalanced;
    rebalanced.set_mean_connections(2.5);
    rebalanced.add_asked()->set_requested_connections(2);
    operations_->rebalance_result = rebalanced;
    operations_->drain_worker_result = v1::DrainWorkerResponse();
  }
  v1::ScaleWorkersRequest scale;
  scale.set_count(3);
  scale.mutable_drain_timeout()->set_seconds(7);
  v1::ScaleWorkersResponse scaled;
  grpc::Status status = stub_->ScaleWorkers(Context().get(), scale, &scaled);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(scaled.previous_count(), 2);
  EXPECT_EQ(scaled.count(), 3);
  ASSERT_EQ(scaled.started_size(), 1);
  EXPECT_EQ(scaled.started(0).id(), 5u);

  v1::DrainWorkerRequest drain_worker;
  drain_worker.set_worker_id(4);
  drain_worker.set_replace(true);
  drain_worker.mutable_timeout()->set_seconds(3);
  v1::DrainWorkerResponse drain_worker_response;
  status =
      stub_->DrainWorker(Context().get(), drain_worker, &drain_worker_response);
  ASSERT_TRUE(status.ok()) << status.error_message();

  v1::DrainRequest drain;
  drain.mutable_timeout()->set_seconds(30);
  v1::DrainResponse drained;
  status = stub_->Drain(Context().get(), drain, &drained);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(drained.pending_connections(), 4);
  ASSERT_EQ(drained.draining_size(), 1);

  v1::ResumeResponse resumed;
  status = stub_->Resume(Context().get(), v1::ResumeRequest(), &resumed);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(resumed.accepting());

  v1::RebalanceResponse rebalanced;
  status =
      stub_->Rebalance(Context().get(), v1::RebalanceRequest(), &rebalanced);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_DOUBLE_EQ(rebalanced.mean_connections(), 2.5);
  ASSERT_EQ(rebalanced.asked_size(), 1);
  EXPECT_EQ(rebalanced.asked(0).requested_connections(), 2u);

  absl::MutexLock lock(&operations_->mu_);
  ASSERT_TRUE(operations_->scale_request.has_value());
  EXPECT_EQ(operations_->scale_request->count(), 3);
  EXPECT_EQ(operations_->scale_request->drain_timeout().seconds(), 7);
  ASSERT_TRUE(operations_->drain_worker_request.has_value());
  EXPECT_EQ(operations_->drain_worker_request->worker_id(), 4u);
  EXPECT_TRUE(operations_->drain_worker_request->replace());
  EXPECT_EQ(operations_->drain_worker_request->timeout().seconds(), 3);
  ASSERT_TRUE(operations_->drain_request.has_value());
  EXPECT_EQ(operations_->drain_request->timeout().seconds(), 30);
}

// The operations validate; their error reaches the operator as it is, and
// a failed mutation returns no partial response.
TEST_F(ControlServiceTest, ValidationErrorsReachTheClientUnchanged) {
  {
    absl::MutexLock lock(&operations_->mu_);
    operations_->scale_result =
        absl::InvalidArgumentError("count: -1 is negative (at least 0)");
    operations_->drain_worker_result =
        absl::NotFoundError("no worker with id 99");
    operations_->drain_result = absl::InvalidArgumentError(
        "timeout: negative durations are not allowed");
    operations_->resume_result =
        absl::FailedPreconditionError("the broker is shutting down");
    operations_->rebalance_result = absl::FailedPreconditionError(
        "rebalancing needs at least two ready workers");
  }
  v1::ScaleWorkersRequest scale;
  scale.set_count(-1);
  v1::ScaleWorkersResponse scaled;
  scaled.set_count(42);  // Left alone on an error.
  grpc::Status status = stub_->ScaleWorkers(Context().get(), scale, &scaled);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "count: -1 is negative (at least 0)");

  v1::DrainWorkerRequest drain_worker;
  drain_worker.set_worker_id(99);
  v1::DrainWorkerResponse drain_worker_response;
  status =
      stub_->DrainWorker(Context().get(), drain_worker, &drain_worker_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(status.error_message(), "no worker with id 99");

  v1::DrainRequest drain;
  drain.mutable_timeout()->set_seconds(-5);
  v1::DrainResponse drained;
  status = stub_->Drain(Context().get(), drain, &drained);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("timeout"));

  v1::ResumeResponse resumed;
  status = stub_->Resume(Context().get(), v1::ResumeRequest(), &resumed);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(status.error_message(), "the broker is shutting down");

  v1::RebalanceResponse rebalanced;
  status =
      stub_->Rebalance(Context().get(), v1::RebalanceRequest(), &rebalanced);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("two ready workers"));

  EXPECT_THAT(
      observed(),
      ElementsAre(Pair("ScaleWorkers", grpc::StatusCode::INVALID_ARGUMENT),
                  Pair("DrainWorker", grpc::StatusCode::NOT_FOUND),
                  Pair("Drain", grpc::StatusCode::INVALID_ARGUMENT),
                  Pair("Resume", grpc::StatusCode::FAILED_PRECONDITION),
                  Pair("Rebalance", grpc::StatusCode::FAILED_PRECONDITION)));
  EXPECT_FALSE(operations_->off_loop_call());
}

// A rolling restart answers DrainWorker once the replacement registered:
// the RPC stays open until the operation calls its completion.
TEST_F(ControlServiceTest, DrainWorkerAnswersWhenTheOperationCompletes) {
  {
    absl::MutexLock lock(&operations_->mu_);
    operations_->answer_drain_worker_later = true;
  }
  v1::DrainWorkerRequest request;
  request.set_worker_id(3);
  request.set_replace(true);
  v1::DrainWorkerResponse response;
  auto call = std::async(std::launch::async, [&] {
    return stub_->DrainWorker(Context().get(), request, &response);
  });
  // The operation has the completion, and the RPC is still open.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  for (;;) {
    {
      absl::MutexLock lock(&operations_->mu_);
      if (operations_->drain_worker_done != nullptr) break;
    }
    ASSERT_LT(absl::Now(), deadline) << "DrainWorker never reached the loop";
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(call.wait_for(std::chrono::milliseconds(100)),
            std::future_status::timeout);
  EXPECT_TRUE(observed().empty());
  OnLoop([this] {
    absl::MutexLock lock(&operations_->mu_);
    v1::DrainWorkerResponse answer;
    *answer.mutable_worker() = MakeWorker(3);
    operations_->drain_worker_done(answer);
  });
  grpc::Status status = call.get();
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.worker().id(), 3u);
  EXPECT_THAT(observed(),
              ElementsAre(Pair("DrainWorker", grpc::StatusCode::OK)));
}

TEST_F(ControlServiceTest, AClosedLoopAnswersUnavailable) {
  StopLoop();
  v1::ListWorkersResponse workers;
  grpc::Status status =
      stub_->ListWorkers(Context().get(), v1::ListWorkersRequest(), &workers);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(status.error_message(), HasSubstr("shutting down"));
  v1::ScaleWorkersRequest scale;
  scale.set_count(1);
  v1::ScaleWorkersResponse scaled;
  status = stub_->ScaleWorkers(Context().get(), scale, &scaled);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(operations_->calls().empty());
}

// With --admin_subjects, only a caller whose certificate subject is listed
// may mutate; without mTLS no caller has one, so every mutation is denied
// (before it reaches the loop) and the read-only RPCs still answer.
TEST_F(ControlServiceTest, MutationsNeedAnAdminSubject) {
  Stop();
  ControlService::Authorization admins;
  admins.require_admin_subject = true;
  admins.admin_subjects = {"CN=ops"};
  Start(std::move(admins));
  {
    absl::MutexLock lock(&operations_->mu_);
    operations_->scale_result = v1::ScaleWorkersResponse();
    operations_->rebalance_result = v1::RebalanceResponse();
  }
  v1::ScaleWorkersRequest scale;
  scale.set_count(1);
  v1::ScaleWorkersResponse scaled;
  grpc::Status status = stub_->ScaleWorkers(Context().get(), scale, &scaled);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(status.error_message(), HasSubstr("may not call ScaleWorkers"));
  EXPECT_THAT(status.error_message(), HasSubstr("--admin_subjects"));
  v1::RebalanceResponse rebalanced;
  status =
      stub_->Rebalance(Context().get(), v1::RebalanceRequest(), &rebalanced);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  v1::DrainWorkerRequest drain_worker;
  drain_worker.set_worker_id(1);
  v1::DrainWorkerResponse drain_worker_response;
  status =
      stub_->DrainWorker(Context().get(), drain_worker, &drain_worker_response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  v1::RestartWorkersResponse restarted;
  status = stub_->RestartWorkers(Context().get(), v1::RestartWorkersRequest(),
                                 &restarted);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(status.error_message(), HasSubstr("may not call RestartWorkers"));
  v1::GetLoadResponse load;
  status = stub_->GetLoad(Context().get(), v1::GetLoadRequest(), &load);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_THAT(operations_->calls(), ElementsAre("GetLoad"));
}

TEST_F(ControlServiceTest, WatchEventsStreamsEveryPublishedEvent) {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::WatchEventsResponse>> reader =
      stub_->WatchEvents(&context, v1::WatchEventsRequest());
  reader->WaitForInitialMetadata();  // Subscribed from here on.
  EXPECT_EQ(hub_.subscribers(), 1u);
  WorkerEvent exited;
  exited.type = v1::EVENT_TYPE_WORKER_EXITED;
  exited.worker_id = 4;
  exited.pid = 4321;
  exited.exit_status = "exit code 3";
  exited.detail = "restarting in 800ms";
  exited.reason = "max_rss";
  WorkerEvent started;
  started.type = v1::EVENT_TYPE_WORKER_STARTED;
  started.worker_id = 5;
  OnLoop([&] {
    hub_.Publish(exited);
    hub_.Publish(started);
  });
  v1::WatchEventsResponse event;
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.type(), v1::EVENT_TYPE_WORKER_EXITED);
  EXPECT_EQ(event.worker_id(), 4u);
  EXPECT_EQ(event.pid(), 4321);
  EXPECT_EQ(event.exit_status(), "exit code 3");
  EXPECT_EQ(event.detail(), "restarting in 800ms");
  EXPECT_EQ(event.reason(), "max_rss");
  EXPECT_GT(event.time().seconds(), 0);
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.type(), v1::EVENT_TYPE_WORKER_STARTED);
  EXPECT_EQ(event.worker_id(), 5u);
  // The broker shutting down ends the stream cleanly.
  hub_.Close();
  EXPECT_FALSE(reader->Read(&event));
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_THAT(observed(),
              ElementsAre(Pair("WatchEvents", grpc::StatusCode::OK)));
}

TEST_F(ControlServiceTest, AClientThatLeavesUnsubscribes) {
  {
    grpc::ClientContext context;
    auto reader = stub_->WatchEvents(&context, v1::WatchEventsRequest());
    reader->WaitForInitialMetadata();
    EXPECT_EQ(hub_.subscribers(), 1u);
    context.TryCancel();
    v1::WatchEventsResponse event;
    EXPECT_FALSE(reader->Read(&event));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (hub_.subscribers() != 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(hub_.subscribers(), 0u);
}

TEST_F(ControlServiceTest, WatchEventsAfterShutdownIsUnavailable) {
  hub_.Close();
  grpc::ClientContext context;
  auto reader = stub_->WatchEvents(&context, v1::WatchEventsRequest());
  v1::WatchEventsResponse event;
  EXPECT_FALSE(reader->Read(&event));
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(status.error_message(), HasSubstr("shutting down"));
}

}  // namespace
}  // namespace fdbroker
