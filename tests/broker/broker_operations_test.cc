// DataPlaneOperations (what the control plane may ask of the data plane) on
// the real parts, in simulated time with fake processes.
#include "broker/broker_operations.h"

#include <signal.h>
#include <sys/socket.h>

#include <memory>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/broker/data_plane_fixture.h"

namespace fdbroker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

google::protobuf::Duration ProtoDuration(int64_t seconds, int32_t nanos = 0) {
  google::protobuf::Duration d;
  d.set_seconds(seconds);
  d.set_nanos(nanos);
  return d;
}

class BrokerOperationsTest : public DataPlaneTest {
 protected:
  void StartOperations(int workers) {
    WorkerManager::Options options;
    options.target_workers = workers;
    options.max_workers = 4;
    options.drain_timeout = absl::Seconds(30);
    // Longer than any test here holds a connection unacked on purpose.
    options.ack_timeout = absl::Seconds(30);
    StartManager(options);
    listener_ = *Listener::Create(
        loop(), *wire::SocketAddress::Parse("127.0.0.1:0"), Listener::Options{},
        wire::SysCalls::Real(),
        [this](AcceptedConnection c) { dispatcher_->Dispatch(std::move(c)); });
    operations_ = std::make_unique<DataPlaneOperations>(
        loop(), *listener_, registry_, *dispatcher_, *manager_,
        [this](const WorkerEvent& event) { events_.push_back(event); });
    operations_->Start([this](bool serving) { health_.push_back(serving); });
  }

  ~BrokerOperationsTest() override { operations_.reset(); }

  v1::DrainWorkerResponse DrainWorker(const v1::DrainWorkerRequest& request,
                                      absl::Status* status) {
    v1::DrainWorkerResponse out;
    bool answered = false;
    operations_->DrainWorker(
        request, [&](absl::StatusOr<v1::DrainWorkerResponse> result) {
          answered = true;
          *status = result.status();
          if (result.ok()) out = *result;
        });
    EXPECT_TRUE(answered);
    return out;
  }

  std::unique_ptr<Listener> listener_;
  std::unique_ptr<DataPlaneOperations> operations_;
  std::vector<bool> health_;
};

TEST(DurationFieldTest, ValidatesAndNamesTheField) {
  EXPECT_EQ(*DurationField({}, false, absl::Seconds(7), "timeout"),
            absl::Seconds(7));
  EXPECT_EQ(*DurationField(ProtoDuration(0), true, absl::Seconds(7), "timeout"),
            absl::Seconds(7));
  EXPECT_EQ(*DurationField(ProtoDuration(1, 500000000), true, absl::Seconds(7),
                           "timeout"),
            absl::Milliseconds(1500));
  absl::StatusOr<absl::Duration> negative =
      DurationField(ProtoDuration(-1), true, absl::Seconds(7), "drain_timeout");
  EXPECT_TRUE(absl::IsInvalidArgument(negative.status()));
  EXPECT_THAT(negative.status().message(),
              HasSubstr("drain_timeout must not be negative"));
  absl::StatusOr<absl::Duration> long_one =
      DurationField(ProtoDuration(86401), true, absl::Seconds(7), "timeout");
  EXPECT_TRUE(absl::IsInvalidArgument(long_one.status()));
  EXPECT_THAT(long_one.status().message(),
              HasSubstr("timeout must be at most"));
  absl::StatusOr<absl::Duration> mixed =
      DurationField(ProtoDuration(1, -5), true, absl::Seconds(7), "timeout");
  EXPECT_TRUE(absl::IsInvalidArgument(mixed.status()));
  EXPECT_THAT(mixed.status().message(),
              HasSubstr("timeout is not a valid duration"));
}

TEST_F(BrokerOperationsTest, ScaleWorkersValidatesAndReportsTheChange) {
  StartOperations(1);
  v1::ScaleWorkersRequest request;
  request.set_count(5);
  absl::StatusOr<v1::ScaleWorkersResponse> too_many =
      operations_->ScaleWorkers(request);
  EXPECT_TRUE(absl::IsInvalidArgument(too_many.status()));
  EXPECT_THAT(too_many.status().message(),
              HasSubstr("count must be in 0..4 (--max_workers), got 5"));
  request.set_count(-1);
  EXPECT_TRUE(
      absl::IsInvalidArgument(operations_->ScaleWorkers(request).status()));
  request.set_count(2);
  *request.mutable_drain_timeout() = ProtoDuration(-3);
  absl::StatusOr<v1::ScaleWorkersResponse> bad_timeout =
      operations_->ScaleWorkers(request);
  EXPECT_TRUE(absl::IsInvalidArgument(bad_timeout.status()));
  EXPECT_THAT(bad_timeout.status().message(), HasSubstr("drain_timeout"));
  EXPECT_EQ(launcher_.spawned.size(), 1u) << "invalid requests change nothing";

  request.set_count(3);
  request.clear_drain_timeout();
  absl::StatusOr<v1::ScaleWorkersResponse> up =
      operations_->ScaleWorkers(request);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(up->previous_count(), 1);
  EXPECT_EQ(up->count(), 3);
  ASSERT_EQ(up->started_size(), 2);
  EXPECT_EQ(up->started(0).state(), v1::WORKER_STATE_STARTING);
  EXPECT_EQ(up->started(0).pid(), launcher_.spawned[1].pid);
  EXPECT_EQ(launcher_.spawned.size(), 3u);

  // Down to 1: the two unregistered workers go first.
  WorkerEnd first = Register(launcher_.spawned[0].pid);
  request.set_count(1);
  *request.mutable_drain_timeout() = ProtoDuration(7);
  absl::StatusOr<v1::ScaleWorkersResponse> down =
      operations_->ScaleWorkers(request);
  ASSERT_TRUE(down.ok()) << down.status();
  ASSERT_EQ(down->draining_size(), 2);
  EXPECT_NE(down->draining(0).id(), first.id);
  EXPECT_NE(down->draining(1).id(), first.id);
  EXPECT_EQ(down->draining(0).state(), v1::WORKER_STATE_DRAINING);
  // Unregistered workers are stopped with SIGTERM.
  EXPECT_THAT(launcher_.SignalsTo(launcher_.spawned[1].pid),
              ElementsAre(SIGTERM));
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_SCALE_REQUESTED).size(), 2u);
}

TEST_F(BrokerOperationsTest, DrainWorkerValidatesItsRequest) {
  StartOperations(1);
  WorkerEnd worker = Register(LastSpawnedPid());
  absl::Status status;
  v1::DrainWorkerRequest request;
  DrainWorker(request, &status);
  EXPECT_TRUE(absl::IsInvalidArgument(status));
  EXPECT_THAT(status.message(), HasSubstr("worker_id is required"));

  request.set_worker_id(999);
  DrainWorker(request, &status);
  EXPECT_TRUE(absl::IsNotFound(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("no worker with id 999"));

  request.set_worker_id(worker.id);
  *request.mutable_timeout() = ProtoDuration(90000);
  DrainWorker(request, &status);
  EXPECT_TRUE(absl::IsInvalidArgument(status));
  EXPECT_THAT(status.message(), HasSubstr("timeout must be at most 24h"));

  *request.mutable_timeout() = ProtoDuration(4);
  v1::DrainWorkerResponse response = DrainWorker(request, &status);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(response.worker().id(), worker.id);
  EXPECT_EQ(response.worker().state(), v1::WORKER_STATE_DRAINING);
  std::vector<v1::HandoffMessage> got = worker.Received();
  ASSERT_FALSE(got.empty());
  ASSERT_TRUE(got.back().has_drain());
  EXPECT_EQ(got.back().drain().deadline_unix_nanos(),
            absl::ToUnixNanos(time_.clock().Now() + absl::Seconds(4)));

  DrainWorker(request, &status);
  EXPECT_TRUE(absl::IsFailedPrecondition(status));
  EXPECT_THAT(status.message(), HasSubstr("already draining"));
}

TEST_F(BrokerOperationsTest, DrainAndResumeTheBroker) {
  StartOperations(2);
  WorkerEnd a = Register(launcher_.spawned[0].pid);
  WorkerEnd b = Register(launcher_.spawned[1].pid);
  time_.Advance(absl::Seconds(1));
  EXPECT_THAT(health_, ElementsAre(false, true));

  v1::DrainRequest drain;
  *drain.mutable_timeout() = ProtoDuration(5);
  absl::StatusOr<v1::DrainResponse> drained = operations_->Drain(drain);
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_FALSE(drained->accepting());
  EXPECT_EQ(drained->draining_size(), 2);
  EXPECT_FALSE(listener_->accepting());
  EXPECT_TRUE(manager_->pool_suspended());
  EXPECT_THAT(health_, ElementsAre(false, true, false));
  const std::vector<WorkerEvent> requested =
      EventsOf(v1::EVENT_TYPE_DRAIN_REQUESTED);
  ASSERT_EQ(requested.size(), 1u);
  EXPECT_EQ(requested[0].detail, "workers drain within 5s");
  EXPECT_EQ(requested[0].time, time_.clock().Now());

  // The workers say goodbye and exit; none is restarted while drained.
  for (WorkerEnd* w : {&a, &b}) {
    v1::HandoffMessage goodbye;
    goodbye.mutable_goodbye()->set_reason("drained");
    ASSERT_TRUE(w->Send(std::move(goodbye)).ok());
    launcher_.Exit(w->pid, FakeProcessLauncher::ExitedWith(0));
  }
  time_.Advance(absl::Seconds(10));
  EXPECT_EQ(registry_.size(), 0u);
  EXPECT_EQ(launcher_.spawned.size(), 2u);
  EXPECT_EQ(manager_->stats().crashes, 0u);

  absl::StatusOr<v1::ResumeResponse> resumed =
      operations_->Resume(v1::ResumeRequest());
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_TRUE(resumed->accepting());
  EXPECT_EQ(resumed->started_size(), 2) << "the pool is restored";
  EXPECT_TRUE(listener_->accepting());
  EXPECT_EQ(launcher_.spawned.size(), 4u);
  EXPECT_EQ(EventsOf(v1::EVENT_TYPE_RESUME_REQUESTED).size(), 1u);
}

TEST_F(BrokerOperationsTest, HealthFollowsTheRestartLoop) {
  StartOperations(1);
  // An external worker keeps the broker able to serve.
  WorkerEnd external = Register(/*pid=*/4242);
  time_.Advance(absl::Seconds(1));
  EXPECT_THAT(health_, ElementsAre(false, true));
  // The supervised one keeps failing to start: NOT_SERVING at the third.
  for (int i = 0; i < 3; ++i) {
    launcher_.Exit(LastSpawnedPid(), FakeProcessLauncher::ExitedWith(1));
    time_.Advance(absl::Seconds(1));
    EXPECT_EQ(health_.back(), i < 2) << i;
  }
  EXPECT_TRUE(manager_->in_restart_loop());
  EXPECT_THAT(health_, ElementsAre(false, true, false));
}

TEST_F(BrokerOperationsTest, GetLoadReportsCountsAndTenSecondRates) {
  StartOperations(1);
  WorkerEnd worker = Register(LastSpawnedPid());
  time_.Advance(absl::Milliseconds(1500));
  std::vector<wire::UniqueFd> clients;
  for (int i = 0; i < 20; ++i) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    clients.emplace_back(sv[1]);
    AcceptedConnection conn;
    conn.fd.Reset(sv[0]);
    conn.accept_mono_nanos = loop().NowNanos();
    dispatcher_->Dispatch(std::move(conn));
  }
  // The worker acks 15 of the 20 it was sent.
  std::vector<v1::HandoffMessage> sent;
  for (v1::HandoffMessage& m : worker.Received()) {
    if (m.has_connection()) sent.push_back(std::move(m));
  }
  ASSERT_EQ(sent.size(), 20u);
  v1::HandoffMessage ack;
  for (int i = 0; i < 15; ++i) {
    ASSERT_TRUE(sent[i].has_connection());
    ack.mutable_ack()->add_connection_ids(sent[i].connection().connection_id());
  }
  ASSERT_TRUE(worker.Send(std::move(ack)).ok());
  time_.Advance(absl::Milliseconds(8500));  // 10s after the first sample.

  v1::GetLoadResponse load = operations_->GetLoad();
  EXPECT_EQ(load.accepted_total(), 20u);
  EXPECT_EQ(load.handed_off_total(), 15u);
  EXPECT_EQ(load.active_connections(), 15);
  EXPECT_EQ(load.unacked_connections(), 5);
  EXPECT_TRUE(load.accepting());
  EXPECT_DOUBLE_EQ(load.accepted_per_second(), 2.0);
  EXPECT_DOUBLE_EQ(load.handed_off_per_second(), 1.5);
  ASSERT_EQ(load.workers_size(), 1);
  EXPECT_EQ(load.workers(0).worker_id(), worker.id);
  EXPECT_EQ(load.workers(0).active_connections(), 15);
  // Sampled since it was spawned (before the first sample, at start).
  EXPECT_DOUBLE_EQ(load.workers(0).handed_per_second(), 1.5);

  // Ten quiet seconds later the rates are zero again.
  time_.Advance(absl::Seconds(10));
  load = operations_->GetLoad();
  EXPECT_DOUBLE_EQ(load.accepted_per_second(), 0.0);
  EXPECT_EQ(load.accepted_total(), 20u);
}

TEST_F(BrokerOperationsTest, RebalanceNeedsTwoReadyWorkers) {
  StartOperations(1);
  WorkerEnd worker = Register(LastSpawnedPid());
  absl::StatusOr<v1::RebalanceResponse> result =
      operations_->Rebalance(v1::RebalanceRequest());
  EXPECT_TRUE(absl::IsFailedPrecondition(result.status()));
  EXPECT_THAT(result.status().message(),
              HasSubstr("at least 2 ready workers; 1 ready now"));
}

}  // namespace
}  // namespace fdbroker
