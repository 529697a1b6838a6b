#include "broker/balancing_policy.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fdbroker {
namespace {

// Index of the first candidate whose id is above `last_id` (wrapping to 0):
// where a rotation continues after the previous pick.
size_t RotationStart(absl::Span<Worker* const> candidates, uint64_t last_id) {
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (candidates[i]->id > last_id) return i;
  }
  return 0;
}

}  // namespace

size_t LeastConnectionsPolicy::Pick(absl::Span<Worker* const> candidates,
                                    const SocketAddress&) {
  const size_t n = candidates.size();
  const size_t start = RotationStart(candidates, last_id_);
  size_t best = start;
  for (size_t k = 1; k < n; ++k) {
    const size_t i = (start + k) % n;
    if (candidates[i]->load() < candidates[best]->load()) best = i;
  }
  last_id_ = candidates[best]->id;
  return best;
}

size_t RoundRobinPolicy::Pick(absl::Span<Worker* const> candidates,
                              const SocketAddress&) {
  const size_t pick = RotationStart(candidates, last_id_);
  last_id_ = candidates[pick]->id;
  return pick;
}

absl::StatusOr<std::unique_ptr<BalancingPolicy>> CreateBalancingPolicy(
    absl::string_view name) {
  if (name == "least_conn") return std::make_unique<LeastConnectionsPolicy>();
  if (name == "round_robin") return std::make_unique<RoundRobinPolicy>();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown balancing policy \"", name,
                   "\" (expected least_conn or round_robin)"));
}

}  // namespace fdbroker
