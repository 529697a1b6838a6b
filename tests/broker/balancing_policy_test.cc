#include "broker/balancing_policy.h"

#include <map>
#include <memory>
#include <vector>

#include "gtest/gtest.h"

namespace fdbroker {
namespace {

class PolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (uint64_t id = 1; id <= 3; ++id) {
      auto worker = std::make_unique<Worker>();
      worker->id = id;
      candidates_.push_back(worker.get());
      workers_.push_back(std::move(worker));
    }
  }
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<Worker*> candidates_;
  SocketAddress peer_;
};

TEST_F(PolicyTest, FactoryKnowsTheSpecNames) {
  EXPECT_EQ((*CreateBalancingPolicy("least_conn"))->name(), "least_conn");
  EXPECT_EQ((*CreateBalancingPolicy("round_robin"))->name(), "round_robin");
  absl::StatusOr<std::unique_ptr<BalancingPolicy>> bad =
      CreateBalancingPolicy("random");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("least_conn"), absl::string_view::npos);
}

TEST_F(PolicyTest, LeastConnPicksTheLeastLoaded) {
  LeastConnectionsPolicy policy;
  workers_[0]->owned = {1, 2, 3};
  workers_[1]->unacked = 1;
  workers_[2]->owned = {4, 5};
  EXPECT_EQ(policy.Pick(candidates_, peer_), 1u);
  // Unacked connections count: they are on their way to the worker.
  workers_[1]->unacked = 4;
  EXPECT_EQ(policy.Pick(candidates_, peer_), 2u);
}

TEST_F(PolicyTest, LeastConnSpreadsEqualLoadEvenly) {
  LeastConnectionsPolicy policy;
  std::map<uint64_t, int> picks;
  // Connection-per-request traffic: each connection closes before the next.
  for (int i = 0; i < 300; ++i)
    ++picks[candidates_[policy.Pick(candidates_, peer_)]->id];
  EXPECT_EQ(picks[1], 100);
  EXPECT_EQ(picks[2], 100);
  EXPECT_EQ(picks[3], 100);
}

TEST_F(PolicyTest, LeastConnBalancesLongLivedConnections) {
  LeastConnectionsPolicy policy;
  for (uint64_t c = 0; c < 299; ++c) {
    Worker* w = candidates_[policy.Pick(candidates_, peer_)];
    w->owned.insert(c);
  }
  for (Worker* w : candidates_) {
    EXPECT_GE(w->active(), 99);
    EXPECT_LE(w->active(), 100);
  }
}

TEST_F(PolicyTest, RoundRobinCyclesAndSurvivesMembershipChanges) {
  RoundRobinPolicy policy;
  std::vector<uint64_t> order;
  for (int i = 0; i < 4; ++i) {
    order.push_back(candidates_[policy.Pick(candidates_, peer_)]->id);
  }
  EXPECT_EQ(order, (std::vector<uint64_t>{1, 2, 3, 1}));
  // Worker 2 leaves: the rotation continues with 3, then wraps to 1.
  std::vector<Worker*> fewer = {candidates_[0], candidates_[2]};
  EXPECT_EQ(fewer[policy.Pick(fewer, peer_)]->id, 3u);
  EXPECT_EQ(fewer[policy.Pick(fewer, peer_)]->id, 1u);
}

}  // namespace
}  // namespace fdbroker
