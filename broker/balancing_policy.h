#ifndef FDBROKER_BROKER_BALANCING_POLICY_H_
#define FDBROKER_BROKER_BALANCING_POLICY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "broker/worker_registry.h"
#include "wire/socket_address.h"

namespace fdbroker {

// Chooses the worker for a new connection. Loop thread only.
//
// Weights. Every policy weighs a worker by the capacity it declares
// (Worker::capacity): weight = capacity. A worker without a limit
// (capacity 0) weighs as much as the largest capacity declared among the
// candidates, or 1 when none declares one, so a pool of unlimited workers
// (the default) is a pool of equals and the policies reduce to their
// unweighted forms.
class BalancingPolicy {
 public:
  virtual ~BalancingPolicy() = default;
  virtual absl::string_view name() const = 0;
  // Returns an index into `candidates`: non-empty, every entry able to take a
  // connection now, ordered by worker id.
  virtual size_t Pick(absl::Span<Worker* const> candidates,
                      const wire::SocketAddress& peer) = 0;
};

// The weight of each candidate under the rule above, in candidate order.
void CandidateWeights(absl::Span<Worker* const> candidates,
                      std::vector<uint64_t>& weights);

// Weighted rendezvous hashing: the score of worker `worker_id` with weight
// `weight` for `key` (a hashed client address, a hash bucket), -weight /
// ln(u) with u = hash(key, worker_id) in (0, 1). The highest score wins, so
// each worker wins a share of the keys in proportion to its weight, and a
// worker that joins or leaves moves only the keys it wins or won. Fixed
// (not salted per process): a restarted broker keeps the mapping.
double RendezvousScore(uint64_t key, uint64_t worker_id, uint64_t weight);

// Fewest connections (owned + unacked, which Ack/Closed keep exact) per unit
// of weight. Ties go to the worker after the previous pick, so equal workers
// take turns; with no connection held anywhere (all loads 0) that rotation
// ignores weights: weights shape only the load that accumulates.
class LeastConnectionsPolicy final : public BalancingPolicy {
 public:
  absl::string_view name() const override { return "least_conn"; }
  size_t Pick(absl::Span<Worker* const> candidates,
              const wire::SocketAddress& peer) override;

 private:
  uint64_t last_id_ = 0;
  std::vector<uint64_t> weights_;
};

// Smooth weighted round robin (nginx): each pick adds every candidate's
// weight to its credit and takes the candidate with the most credit, which
// then pays the total weight back. Weights 5:1:1 give a a b a c a a, not
// a burst of five. Ties go to the worker after the previous pick, so equal
// weights are the plain rotation by id. When the candidates (or their
// weights) differ from the previous pick's, the credits restart at zero: a
// worker that left takes no stale credit along, and the rotation still
// continues after the previous pick.
class RoundRobinPolicy final : public BalancingPolicy {
 public:
  absl::string_view name() const override { return "round_robin"; }
  size_t Pick(absl::Span<Worker* const> candidates,
              const wire::SocketAddress& peer) override;

 private:
  struct Slot {
    uint64_t id;
    uint64_t weight;
    int64_t credit;
  };
  uint64_t last_id_ = 0;
  // One per candidate of the previous pick, in the same order.
  std::vector<Slot> slots_;
  std::vector<uint64_t> weights_;
};

// Power of two choices: two distinct candidates at random, the one with
// fewer connections per unit of weight wins; on a tie, each wins with a
// chance proportional to its weight. With one candidate, that one. Close to
// least_conn's spread with a random, not a fixed, order among near-equals.
class PowerOfTwoChoicesPolicy final : public BalancingPolicy {
 public:
  // `seed` fixes the random sequence (tests); CreateBalancingPolicy seeds
  // from std::random_device.
  explicit PowerOfTwoChoicesPolicy(uint64_t seed) : rng_(seed) {}
  absl::string_view name() const override { return "p2c"; }
  size_t Pick(absl::Span<Worker* const> candidates,
              const wire::SocketAddress& peer) override;

 private:
  std::mt19937_64 rng_;
  std::vector<uint64_t> weights_;
};

// Sticky by client IP (the port is ignored; an IPv4-mapped IPv6 address is
// its IPv4 address): weighted rendezvous hashing, i.e. the candidate with
// the highest -weight / ln(u), u = hash(ip, worker id) mapped into (0, 1).
// The hash is fixed (not salted per process), so a restarted broker keeps
// the mapping. Adding a worker moves only the clients it now wins (about
// 1/N of them); removing one moves only its own clients. Candidates are the
// workers able to take a connection now: while a client's worker is full,
// draining or congested, its connections go to the client's second choice
// and come back once it has room.
class IpHashPolicy final : public BalancingPolicy {
 public:
  absl::string_view name() const override { return "ip_hash"; }
  size_t Pick(absl::Span<Worker* const> candidates,
              const wire::SocketAddress& peer) override;

 private:
  std::vector<uint64_t> weights_;
};

// "least_conn", "round_robin", "p2c" or "ip_hash"; anything else is
// InvalidArgument.
absl::StatusOr<std::unique_ptr<BalancingPolicy>> CreateBalancingPolicy(
    absl::string_view name);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_BALANCING_POLICY_H_
