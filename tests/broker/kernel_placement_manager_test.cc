// KernelPlacement inside the WorkerManager, on simulated time: grants,
// weights by group index, the reload bound, slots going back to the broker
// and to the next worker, bad ListenerLoad reports, and listeners returned
// by re-registering workers (Hello.returns_listener).
#include <netinet/in.h>
#include <sys/socket.h>

#include <vector>

#include "broker/kernel_placement.h"
#include "gtest/gtest.h"
#include "tests/broker/data_plane_fixture.h"

namespace fdbroker {
namespace {

class KernelPlacementManagerTest : public DataPlaneTest {
 protected:
  void SetUp() override {
    // The broker's --listen socket: group index 0.
    group_.Reset(
        ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    int one = 1;
    ::setsockopt(group_.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(
        ::bind(group_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
        0);
    ASSERT_EQ(::listen(group_.get(), 64), 0);
    manager_ = std::make_unique<WorkerManager>(
        loop(), registry_, *dispatcher_, *supervisor_, wire::SysCalls::Real(),
        WorkerManager::Options{},
        [this](const WorkerEvent& event) { events_.push_back(event); });
    ASSERT_TRUE(manager_
                    ->EnableKernelPlacement(
                        group_.get(), options_, wire::SysCalls::Real(),
                        [this](AcceptedConnection) { ++broker_accepted_; })
                    .ok());
    manager_->Start();
    time_.RunUntilIdle();
  }

  // Registers `pid` with supports_listener_grant (returning `returned`
  // with its Hello unless -1); its end of the channel and whether a
  // ListenerGrant (with its listening socket) followed the Welcome, and the
  // Welcome's listener_kept.
  WorkerEnd RegisterKernel(pid_t pid, uint32_t capacity, bool* granted,
                           bool supports_release = false, int returned = -1,
                           bool* kept = nullptr) {
    v1::Hello hello;
    hello.set_capacity(capacity);
    hello.set_supports_listener_grant(true);
    hello.set_supports_release(supports_release);
    hello.set_returns_listener(returned >= 0);
    std::vector<v1::HandoffMessage> answers;
    std::vector<wire::UniqueFd> fds;
    WorkerEnd end = SayHello(pid, std::move(hello), answers, &fds, returned);
    *granted = false;
    for (const v1::HandoffMessage& m : answers) {
      if (m.has_welcome()) {
        EXPECT_EQ(m.welcome().listener_load_interval_ms(), 50u);
        if (kept != nullptr) *kept = m.welcome().listener_kept();
      }
      if (m.has_listener_grant()) {
        // The grant is the only answer with an fd.
        EXPECT_EQ(fds.size(), 1u);
        int listening = 0;
        socklen_t len = sizeof(listening);
        EXPECT_EQ(::getsockopt(fds.empty() ? -1 : fds[0].get(), SOL_SOCKET,
                               SO_ACCEPTCONN, &listening, &len),
                  0);
        *granted = listening != 0;
      }
    }
    return end;
  }

  // Two equal workers whose loads stay 20 / 4 for 3 s: no rebalance.
  void ExpectUnevenLoadsLeft() {
    bool granted = false;
    WorkerEnd a = RegisterKernel(101, 0, &granted, /*supports_release=*/true);
    WorkerEnd b = RegisterKernel(102, 0, &granted, /*supports_release=*/true);
    ASSERT_TRUE(a.Send(Load(20, 20)).ok());
    ASSERT_TRUE(b.Send(Load(4, 4)).ok());
    time_.Advance(absl::Seconds(3));
    EXPECT_TRUE(ReleaseRequests(a).empty());
    EXPECT_EQ(manager_->stats().placement_rebalances, 0u);
  }

  v1::HandoffMessage Load(uint64_t accepted_total, uint32_t active) {
    v1::HandoffMessage m;
    m.mutable_listener_load()->set_accepted_total(accepted_total);
    m.mutable_listener_load()->set_active(active);
    return m;
  }

  const std::vector<uint64_t>& Weights() {
    return manager_->kernel_placement()->loaded_weights();
  }

  // The ReleaseRequests among what `worker` received since the last call.
  std::vector<v1::ReleaseRequest> ReleaseRequests(WorkerEnd& worker) {
    std::vector<v1::ReleaseRequest> requests;
    for (const v1::HandoffMessage& m : worker.Received()) {
      if (m.has_release_request()) requests.push_back(m.release_request());
    }
    return requests;
  }

  KernelPlacement::Options options_;
  wire::UniqueFd group_;
  int broker_accepted_ = 0;
};

// least_conn, p2c and round_robin (kWeighted, the fixture's mode): loads
// that stay uneven are evened out.
using KernelPlacementLeastLoadedTest = KernelPlacementManagerTest;

TEST_F(KernelPlacementManagerTest, GrantsASlotPerWorkerAndWeighsThem) {
  bool granted_a = false, granted_b = false;
  WorkerEnd a = RegisterKernel(101, 4, &granted_a);
  WorkerEnd b = RegisterKernel(102, 4, &granted_b);
  EXPECT_TRUE(granted_a);
  EXPECT_TRUE(granted_b);
  time_.Advance(absl::Milliseconds(200));
  // Index 0 (the broker's socket) weighs nothing: no hand-off workers.
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{0, 4, 4}));
  // A full worker weighs 0; the report also feeds the load figures.
  ASSERT_TRUE(a.Send(Load(7, 4)).ok());
  time_.Advance(absl::Milliseconds(200));
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{0, 0, 4}));
  EXPECT_EQ(registry_.Find(a.id)->active(), 4);
  EXPECT_EQ(manager_->stats().kernel_accepted, 7u);
  ASSERT_TRUE(a.Send(Load(9, 1)).ok());
  time_.Advance(absl::Milliseconds(200));
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{0, 4, 4}));
  EXPECT_EQ(manager_->stats().kernel_accepted, 9u);
}

TEST_F(KernelPlacementManagerTest, ReloadsAtMostEveryHundredMilliseconds) {
  bool granted = false;
  WorkerEnd a = RegisterKernel(101, 2, &granted);
  time_.Advance(absl::Milliseconds(200));
  ASSERT_EQ(Weights(), (std::vector<uint64_t>{0, 2}));
  const uint64_t loads = manager_->stats().placement_loads;
  // Full, room, full, room within 40 ms: at most one reload per 100 ms.
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(a.Send(Load(10 + i, i % 2 == 0 ? 2 : 0)).ok());
    time_.Advance(absl::Milliseconds(10));
  }
  EXPECT_LE(manager_->stats().placement_loads, loads + 1);
  time_.Advance(absl::Milliseconds(200));
  EXPECT_LE(manager_->stats().placement_loads, loads + 3);
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{0, 2}));  // The last report.
}

TEST_F(KernelPlacementManagerTest, AGoneWorkersSlotGoesToTheNextWorker) {
  bool granted = false;
  WorkerEnd a = RegisterKernel(101, 0, &granted);
  time_.Advance(absl::Milliseconds(200));
  ASSERT_EQ(Weights(), (std::vector<uint64_t>{0, 1}));
  a.channel.reset();  // The worker is gone (external: removed).
  time_.Advance(absl::Milliseconds(200));
  // Everything to the broker's own socket (queue, overload rules).
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{0, 0}));
  WorkerEnd b = RegisterKernel(102, 0, &granted);
  EXPECT_TRUE(granted);
  time_.Advance(absl::Milliseconds(200));
  EXPECT_EQ(manager_->kernel_placement()->slots(), 1u);  // Reused.
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{0, 1}));
}

TEST_F(KernelPlacementManagerTest, HandoffWorkersWeighOnTheBrokersSocket) {
  bool granted = false;
  WorkerEnd a = RegisterKernel(101, 0, &granted);
  WorkerEnd b = Register(102);  // No supports_listener_grant.
  time_.Advance(absl::Milliseconds(200));
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{1, 1}));
}

TEST_F(KernelPlacementManagerTest, BadListenerLoadIsAProtocolError) {
  bool granted = false;
  WorkerEnd a = RegisterKernel(101, 0, &granted);
  ASSERT_TRUE(a.Send(Load(5, 1)).ok());
  ASSERT_TRUE(a.Send(Load(4, 0)).ok());  // accepted_total went down.
  time_.RunUntilIdle();
  EXPECT_TRUE(a.BrokerClosed());
  WorkerEnd b = Register(102);  // Did not ask for grants.
  ASSERT_TRUE(b.Send(Load(1, 1)).ok());
  time_.RunUntilIdle();
  EXPECT_TRUE(b.BrokerClosed());
}

// A listener of the group returned with a re-registering Hello stays that
// worker's slot (no new grant); anything else is not kept.
TEST_F(KernelPlacementManagerTest,
       AReturnedListenerIsKeptOnlyIfItIsAGroupMember) {
  bool granted = false, kept = false;
  WorkerEnd a = RegisterKernel(101, 0, &granted);
  ASSERT_TRUE(granted);
  a.channel.reset();  // Gone; its slot is free for the next worker.
  time_.Advance(absl::Milliseconds(200));
  // A socket that is not a listener: closed, and a slot granted instead.
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  wire::UniqueFd not_listening(sv[0]), other_end(sv[1]);
  WorkerEnd b =
      RegisterKernel(102, 0, &granted, false, not_listening.get(), &kept);
  EXPECT_FALSE(kept);
  EXPECT_TRUE(granted);
  EXPECT_EQ(manager_->kernel_placement()->slots(), 1u);
  // A listener the broker holds (here: its own slot, as after an upgrade):
  // kept, no grant, no new slot.
  b.channel.reset();
  time_.Advance(absl::Milliseconds(200));
  wire::UniqueFd slot(::dup(manager_->kernel_placement()->slot_fds()[0]));
  WorkerEnd c = RegisterKernel(103, 0, &granted, false, slot.get(), &kept);
  EXPECT_TRUE(kept);
  EXPECT_FALSE(granted);
  EXPECT_EQ(manager_->kernel_placement()->slots(), 1u);
  time_.Advance(absl::Milliseconds(200));
  EXPECT_EQ(Weights(), (std::vector<uint64_t>{0, 1}));
}

TEST_F(KernelPlacementManagerTest, ReturnsListenerWithoutGrantsIsRefused) {
  v1::Hello hello;
  hello.set_returns_listener(true);
  std::vector<v1::HandoffMessage> answers;
  WorkerEnd a = SayHello(101, std::move(hello), answers, nullptr, group_.get());
  ASSERT_EQ(answers.size(), 1u);
  ASSERT_TRUE(answers[0].has_refusal());
  EXPECT_EQ(answers[0].refusal().reason(), v1::REFUSAL_REASON_BAD_HELLO);
  EXPECT_NE(answers[0].refusal().message().find("returns_listener"),
            std::string::npos);
}

TEST_F(KernelPlacementLeastLoadedTest, LoadsUnevenForASecondAreRebalanced) {
  bool granted = false;
  WorkerEnd a = RegisterKernel(101, 0, &granted, /*supports_release=*/true);
  WorkerEnd b = RegisterKernel(102, 0, &granted, /*supports_release=*/true);
  time_.Advance(absl::Milliseconds(200));
  ReleaseRequests(a);
  // The kernel's draw put 20 keep-alive clients on a, 4 on b: mean 12.
  ASSERT_TRUE(a.Send(Load(20, 20)).ok());
  ASSERT_TRUE(b.Send(Load(4, 4)).ok());
  time_.Advance(absl::Milliseconds(700));
  EXPECT_TRUE(ReleaseRequests(a).empty()) << "uneven for less than 1 s";
  time_.Advance(absl::Milliseconds(500));
  std::vector<v1::ReleaseRequest> requests = ReleaseRequests(a);
  ASSERT_EQ(requests.size(), 1u);
  EXPECT_EQ(requests[0].max_connections(), 8u);  // Down to the mean.
  EXPECT_EQ(requests[0].reason(), v1::RELEASE_REASON_REBALANCE);
  EXPECT_TRUE(ReleaseRequests(b).empty());
  EXPECT_EQ(manager_->stats().placement_rebalances, 1u);
  // Still uneven (a released nothing): asked again only once the loads
  // stayed uneven for another second, time for the first to take effect.
  time_.Advance(absl::Milliseconds(800));
  EXPECT_TRUE(ReleaseRequests(a).empty());
  time_.Advance(absl::Milliseconds(500));
  EXPECT_EQ(ReleaseRequests(a).size(), 1u);
  EXPECT_EQ(manager_->stats().placement_rebalances, 2u);
}

TEST_F(KernelPlacementLeastLoadedTest, EvenEnoughOrUnequalWeightsAreLeft) {
  bool granted = false;
  WorkerEnd a = RegisterKernel(101, 0, &granted, /*supports_release=*/true);
  WorkerEnd b = RegisterKernel(102, 0, &granted, /*supports_release=*/true);
  // 17 / 15: 17 is above ceil(mean) = 16 but within 10 % of the mean.
  ASSERT_TRUE(a.Send(Load(17, 17)).ok());
  ASSERT_TRUE(b.Send(Load(15, 15)).ok());
  time_.Advance(absl::Seconds(3));
  EXPECT_TRUE(ReleaseRequests(a).empty());
  EXPECT_EQ(manager_->stats().placement_rebalances, 0u);
  // Capacities 30 and 10 are meant to hold 3:1.
  WorkerEnd c = RegisterKernel(103, 30, &granted, /*supports_release=*/true);
  WorkerEnd d = RegisterKernel(104, 10, &granted, /*supports_release=*/true);
  ASSERT_TRUE(c.Send(Load(20, 20)).ok());
  ASSERT_TRUE(d.Send(Load(2, 2)).ok());
  time_.Advance(absl::Seconds(3));
  EXPECT_TRUE(ReleaseRequests(c).empty());
  EXPECT_EQ(manager_->stats().placement_rebalances, 0u);
}

// --kernel_rebalance_after=0.
class KernelPlacementNoRebalanceTest : public KernelPlacementManagerTest {
 protected:
  void SetUp() override {
    options_.uneven_for = absl::ZeroDuration();
    KernelPlacementManagerTest::SetUp();
  }
};

TEST_F(KernelPlacementNoRebalanceTest, UnevenLoadsAreLeftWhenTurnedOff) {
  ExpectUnevenLoadsLeft();
}

// ip_hash: a client stays on its worker, however uneven.
class KernelPlacementStickyTest : public KernelPlacementManagerTest {
 protected:
  void SetUp() override {
    options_.mode = KernelPlacement::Options::Mode::kSticky;
    KernelPlacementManagerTest::SetUp();
  }
};

TEST_F(KernelPlacementStickyTest, UnevenLoadsAreLeft) {
  ExpectUnevenLoadsLeft();
}

}  // namespace
}  // namespace fdbroker
