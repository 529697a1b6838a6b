#include "broker/balancing_policy.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace fdbroker {
namespace {

constexpr uint64_t kSeed = 20261126;

wire::SocketAddress Ipv4(uint32_t ip, int port) {
  wire::SocketAddress address;
  auto* sin = reinterpret_cast<sockaddr_in*>(&address.storage);
  sin->sin_family = AF_INET;
  sin->sin_addr.s_addr = htonl(ip);
  sin->sin_port = htons(static_cast<uint16_t>(port));
  address.length = sizeof(sockaddr_in);
  return address;
}

// 10,000 distinct client IPs.
std::vector<wire::SocketAddress> ManyClients() {
  std::vector<wire::SocketAddress> clients;
  for (uint32_t i = 0; i < 10000; ++i) {
    clients.push_back(Ipv4(0x0a000000u + i * 7919u, 40000));
  }
  return clients;
}

class PolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int i = 0; i < 3; ++i) AddWorker();
  }
  Worker* AddWorker(uint32_t capacity = 0) {
    auto worker = std::make_unique<Worker>();
    worker->id = workers_.size() + 1;
    worker->capacity = capacity;
    candidates_.push_back(worker.get());
    workers_.push_back(std::move(worker));
    return workers_.back().get();
  }
  void SetCapacities(std::vector<uint32_t> capacities) {
    for (size_t i = 0; i < capacities.size(); ++i) {
      workers_[i]->capacity = capacities[i];
    }
  }
  // Picks `count` times; with `hold`, each picked connection stays open
  // (counted as unacked), as long-lived connections do. Returns picks by id.
  std::map<uint64_t, int> PickMany(BalancingPolicy& policy, int count,
                                   bool hold) {
    std::map<uint64_t, int> picks;
    for (int i = 0; i < count; ++i) {
      Worker* w = candidates_[policy.Pick(candidates_, peer_)];
      ++picks[w->id];
      if (hold) ++w->unacked;
    }
    return picks;
  }
  // Worker id each client lands on.
  std::vector<uint64_t> Assign(
      BalancingPolicy& policy, const std::vector<Worker*>& candidates,
      const std::vector<wire::SocketAddress>& clients) {
    std::vector<uint64_t> ids;
    for (const wire::SocketAddress& client : clients) {
      ids.push_back(candidates[policy.Pick(candidates, client)]->id);
    }
    return ids;
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<Worker*> candidates_;
  wire::SocketAddress peer_;
};

TEST_F(PolicyTest, FactoryKnowsTheSpecNames) {
  for (const char* name : {"least_conn", "round_robin", "p2c", "ip_hash"}) {
    absl::StatusOr<std::unique_ptr<BalancingPolicy>> policy =
        CreateBalancingPolicy(name);
    ASSERT_TRUE(policy.ok()) << name << ": " << policy.status();
    EXPECT_EQ((*policy)->name(), name);
  }
  absl::StatusOr<std::unique_ptr<BalancingPolicy>> bad =
      CreateBalancingPolicy("random");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* name : {"least_conn", "round_robin", "p2c", "ip_hash"}) {
    EXPECT_NE(bad.status().message().find(name), absl::string_view::npos)
        << bad.status();
  }
}

TEST_F(PolicyTest, WeightIsCapacityAndUnlimitedCountsAsTheLargest) {
  std::vector<uint64_t> weights;
  CandidateWeights(candidates_, weights);
  EXPECT_EQ(weights, (std::vector<uint64_t>{1, 1, 1}));
  SetCapacities({0, 100, 300});
  CandidateWeights(candidates_, weights);
  EXPECT_EQ(weights, (std::vector<uint64_t>{300, 100, 300}));
}

TEST_F(PolicyTest, LeastConnPicksTheLeastLoaded) {
  LeastConnectionsPolicy policy;
  workers_[0]->owned = {{1, 0}, {2, 0}, {3, 0}};
  workers_[1]->unacked = 1;
  workers_[2]->owned = {{4, 0}, {5, 0}};
  EXPECT_EQ(policy.Pick(candidates_, peer_), 1u);
  // Unacked connections count: they are on their way to the worker.
  workers_[1]->unacked = 4;
  EXPECT_EQ(policy.Pick(candidates_, peer_), 2u);
}

TEST_F(PolicyTest, LeastConnSpreadsEqualLoadEvenly) {
  LeastConnectionsPolicy policy;
  // Connection-per-request traffic: each connection closes before the next.
  std::map<uint64_t, int> picks = PickMany(policy, 300, /*hold=*/false);
  EXPECT_EQ(picks[1], 100);
  EXPECT_EQ(picks[2], 100);
  EXPECT_EQ(picks[3], 100);
}

TEST_F(PolicyTest, LeastConnBalancesLongLivedConnections) {
  LeastConnectionsPolicy policy;
  for (uint64_t c = 0; c < 299; ++c) {
    Worker* w = candidates_[policy.Pick(candidates_, peer_)];
    w->owned.emplace(c, 0);
  }
  for (Worker* w : candidates_) {
    EXPECT_GE(w->active(), 99);
    EXPECT_LE(w->active(), 100);
  }
}

TEST_F(PolicyTest, LeastConnLoadFollowsWeights) {
  LeastConnectionsPolicy policy;
  SetCapacities({10000, 20000, 30000});
  std::map<uint64_t, int> picks = PickMany(policy, 6000, /*hold=*/true);
  // Load per unit of weight stays within one connection of equal.
  EXPECT_NEAR(picks[1], 1000, 1);
  EXPECT_NEAR(picks[2], 2000, 2);
  EXPECT_NEAR(picks[3], 3000, 3);
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
  // It comes back and takes its turn after 1.
  EXPECT_EQ(candidates_[policy.Pick(candidates_, peer_)]->id, 2u);
}

TEST_F(PolicyTest, RoundRobinIsExactAndSmoothWithWeights) {
  RoundRobinPolicy policy;
  SetCapacities({50, 10, 10});
  std::string order;
  for (int i = 0; i < 14; ++i) {
    order += static_cast<char>('a' + policy.Pick(candidates_, peer_));
  }
  // nginx's smooth order, twice: never a burst of five.
  EXPECT_EQ(order, "aabacaaaabacaa");

  SetCapacities({1000, 2000, 3000});
  std::map<uint64_t, int> picks = PickMany(policy, 6000, /*hold=*/false);
  EXPECT_EQ(picks[1], 1000);
  EXPECT_EQ(picks[2], 2000);
  EXPECT_EQ(picks[3], 3000);
}

TEST_F(PolicyTest, EqualWorkersShareEvenlyUnderEveryLoadBlindPolicy) {
  // 10,000 connection-per-request picks (no load builds up): each worker
  // gets its third within 3 % (p2c then decides by coin only).
  RoundRobinPolicy round_robin;
  LeastConnectionsPolicy least_conn;
  PowerOfTwoChoicesPolicy p2c(kSeed);
  for (BalancingPolicy* policy :
       std::vector<BalancingPolicy*>{&round_robin, &least_conn, &p2c}) {
    std::map<uint64_t, int> picks = PickMany(*policy, 10000, /*hold=*/false);
    for (uint64_t id = 1; id <= 3; ++id) {
      EXPECT_NEAR(picks[id], 3333, 100) << policy->name() << " worker " << id;
    }
  }
}

TEST_F(PolicyTest, PowerOfTwoChoicesTakesTheLessLoadedOfTwo) {
  PowerOfTwoChoicesPolicy policy(kSeed);
  std::vector<Worker*> one = {candidates_[1]};
  EXPECT_EQ(policy.Pick(one, peer_), 0u);
  // Of two candidates, both are always drawn: the less loaded one wins.
  std::vector<Worker*> two = {candidates_[0], candidates_[1]};
  workers_[0]->unacked = 5;
  workers_[1]->unacked = 4;
  for (int i = 0; i < 100; ++i) EXPECT_EQ(policy.Pick(two, peer_), 1u);
  // Per unit of weight: 5 of 20 is less than 4 of 10.
  SetCapacities({20, 10});
  for (int i = 0; i < 100; ++i) EXPECT_EQ(policy.Pick(two, peer_), 0u);
  // Of three, the most loaded can never win: the other of its pair is less
  // loaded.
  SetCapacities({0, 0, 0});
  workers_[2]->unacked = 9;
  for (int i = 0; i < 1000; ++i) EXPECT_NE(policy.Pick(candidates_, peer_), 2u);
}

TEST_F(PolicyTest, PowerOfTwoChoicesIsEvenAndFollowsWeightsUnderLoad) {
  {
    PowerOfTwoChoicesPolicy policy(kSeed);
    std::map<uint64_t, int> picks = PickMany(policy, 9000, /*hold=*/true);
    for (uint64_t id = 1; id <= 3; ++id) EXPECT_NEAR(picks[id], 3000, 30);
  }
  for (auto& worker : workers_) worker->unacked = 0;
  SetCapacities({10000, 20000, 30000});
  PowerOfTwoChoicesPolicy policy(kSeed);
  std::map<uint64_t, int> picks = PickMany(policy, 6000, /*hold=*/true);
  EXPECT_NEAR(picks[1], 1000, 60);
  EXPECT_NEAR(picks[2], 2000, 60);
  EXPECT_NEAR(picks[3], 3000, 60);
}

TEST_F(PolicyTest, PowerOfTwoChoicesIsDeterministicForASeed) {
  PowerOfTwoChoicesPolicy first(kSeed);
  PowerOfTwoChoicesPolicy second(kSeed);
  PowerOfTwoChoicesPolicy other(kSeed + 1);
  std::vector<size_t> a, b, c;
  for (int i = 0; i < 64; ++i) {
    a.push_back(first.Pick(candidates_, peer_));
    b.push_back(second.Pick(candidates_, peer_));
    c.push_back(other.Pick(candidates_, peer_));
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

TEST_F(PolicyTest, IpHashIsStickyByAddressNotPort) {
  IpHashPolicy policy;
  const std::vector<wire::SocketAddress> clients = ManyClients();
  for (size_t c = 0; c < 100; ++c) {
    const uint32_t ip =
        ntohl(reinterpret_cast<const sockaddr_in*>(&clients[c].storage)
                  ->sin_addr.s_addr);
    const size_t first = policy.Pick(candidates_, clients[c]);
    for (int port = 1; port < 65536; port += 4099) {
      ASSERT_EQ(policy.Pick(candidates_, Ipv4(ip, port)), first);
    }
  }
  // An IPv4-mapped IPv6 peer (a dual-stack listener) is the same client.
  absl::StatusOr<wire::SocketAddress> v4 =
      wire::SocketAddress::Parse("192.0.2.7:1000");
  absl::StatusOr<wire::SocketAddress> mapped =
      wire::SocketAddress::Parse("[::ffff:192.0.2.7]:2000");
  ASSERT_TRUE(v4.ok() && mapped.ok());
  EXPECT_EQ(policy.Pick(candidates_, *v4), policy.Pick(candidates_, *mapped));
}

TEST_F(PolicyTest, IpHashSpreadsClientsByWeight) {
  IpHashPolicy policy;
  const std::vector<wire::SocketAddress> clients = ManyClients();
  std::map<uint64_t, int> share;
  for (uint64_t id : Assign(policy, candidates_, clients)) ++share[id];
  for (uint64_t id = 1; id <= 3; ++id) EXPECT_NEAR(share[id], 3333, 200);

  SetCapacities({100, 200, 300});
  share.clear();
  for (uint64_t id : Assign(policy, candidates_, clients)) ++share[id];
  EXPECT_NEAR(share[1], 1667, 200);
  EXPECT_NEAR(share[2], 3333, 200);
  EXPECT_NEAR(share[3], 5000, 200);
}

TEST_F(PolicyTest, IpHashMovesOnlyTheClientsAWorkerWinsOrLoses) {
  IpHashPolicy policy;
  const std::vector<wire::SocketAddress> clients = ManyClients();
  const std::vector<uint64_t> before = Assign(policy, candidates_, clients);

  // A fourth worker joins: it takes about a quarter, from every other
  // worker alike, and no client moves between the old three.
  AddWorker();
  const std::vector<uint64_t> grown = Assign(policy, candidates_, clients);
  int moved = 0;
  for (size_t c = 0; c < clients.size(); ++c) {
    if (grown[c] == before[c]) continue;
    ++moved;
    EXPECT_EQ(grown[c], 4u) << "client " << c << " moved between old workers";
  }
  EXPECT_GT(moved, 1500);
  EXPECT_LT(moved, 3500);

  // Worker 2 leaves (or is full): only its clients move, to their second
  // choice, spread over the rest.
  std::vector<Worker*> without2 = {candidates_[0], candidates_[2],
                                   candidates_[3]};
  const std::vector<uint64_t> shrunk = Assign(policy, without2, clients);
  std::map<uint64_t, int> destinations;
  for (size_t c = 0; c < clients.size(); ++c) {
    if (grown[c] == 2) {
      ++destinations[shrunk[c]];
    } else {
      EXPECT_EQ(shrunk[c], grown[c]) << "client " << c;
    }
  }
  EXPECT_EQ(destinations.count(2), 0u);
  for (uint64_t id : {1, 3, 4}) EXPECT_GT(destinations[id], 400) << id;
}

}  // namespace
}  // namespace fdbroker
