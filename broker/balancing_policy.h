#ifndef FDBROKER_BROKER_BALANCING_POLICY_H_
#define FDBROKER_BROKER_BALANCING_POLICY_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "broker/socket_address.h"
#include "broker/worker_registry.h"

namespace fdbroker {

// Chooses the worker for a new connection. Loop thread only.
class BalancingPolicy {
 public:
  virtual ~BalancingPolicy() = default;
  virtual absl::string_view name() const = 0;
  // Returns an index into `candidates`: non-empty, every entry able to take a
  // connection now, ordered by worker id.
  virtual size_t Pick(absl::Span<Worker* const> candidates,
                      const SocketAddress& peer) = 0;
};

// Fewest connections (owned + unacked, which Ack/Closed keep exact). Ties go
// to the worker after the previous pick, so equal workers take turns.
class LeastConnectionsPolicy final : public BalancingPolicy {
 public:
  absl::string_view name() const override { return "least_conn"; }
  size_t Pick(absl::Span<Worker* const> candidates,
              const SocketAddress& peer) override;

 private:
  uint64_t last_id_ = 0;
};

// Each worker in turn, by id; stable while workers come and go.
class RoundRobinPolicy final : public BalancingPolicy {
 public:
  absl::string_view name() const override { return "round_robin"; }
  size_t Pick(absl::Span<Worker* const> candidates,
              const SocketAddress& peer) override;

 private:
  uint64_t last_id_ = 0;
};

// "least_conn" or "round_robin"; anything else is InvalidArgument.
absl::StatusOr<std::unique_ptr<BalancingPolicy>> CreateBalancingPolicy(
    absl::string_view name);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_BALANCING_POLICY_H_
