#include "broker/balancing_policy.h"

#include <netinet/in.h>

#include <algorithm>
#include <cmath>
#include <cstring>

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

// load_a / weight_a < load_b / weight_b, exactly (weights are >= 1; 128 bits
// so that no capacity overflows the products).
bool LessLoaded(int64_t load_a, uint64_t weight_a, int64_t load_b,
                uint64_t weight_b) {
  using U128 = unsigned __int128;
  return static_cast<U128>(std::max<int64_t>(load_a, 0)) * weight_b <
         static_cast<U128>(std::max<int64_t>(load_b, 0)) * weight_a;
}

// splitmix64's finalizer: a fixed, well-mixing 64-bit hash.
uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Hash of the peer's IP, not its port. An IPv4-mapped IPv6 address hashes as
// its IPv4 address, so a dual-stack listener keeps a client on one worker.
uint64_t HashIp(const wire::SocketAddress& peer) {
  uint64_t high = 0;
  uint64_t low = 0;
  if (peer.family() == AF_INET) {
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&peer.storage);
    low = 0xffff00000000ULL | ntohl(sin->sin_addr.s_addr);
  } else if (peer.family() == AF_INET6) {
    const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&peer.storage);
    unsigned char bytes[16];
    std::memcpy(bytes, &sin6->sin6_addr, sizeof(bytes));
    for (int i = 0; i < 8; ++i) high = (high << 8) | bytes[i];
    for (int i = 8; i < 16; ++i) low = (low << 8) | bytes[i];
  }
  return Mix(Mix(high) ^ low);
}

}  // namespace

void CandidateWeights(absl::Span<Worker* const> candidates,
                      std::vector<uint64_t>& weights) {
  uint64_t largest = 0;
  for (const Worker* worker : candidates) {
    largest = std::max<uint64_t>(largest, worker->capacity);
  }
  const uint64_t unlimited = largest == 0 ? 1 : largest;
  weights.clear();
  for (const Worker* worker : candidates) {
    weights.push_back(worker->capacity == 0 ? unlimited : worker->capacity);
  }
}

size_t LeastConnectionsPolicy::Pick(absl::Span<Worker* const> candidates,
                                    const wire::SocketAddress&) {
  CandidateWeights(candidates, weights_);
  const size_t n = candidates.size();
  const size_t start = RotationStart(candidates, last_id_);
  size_t best = start;
  for (size_t k = 1; k < n; ++k) {
    const size_t i = (start + k) % n;
    if (LessLoaded(candidates[i]->load(), weights_[i], candidates[best]->load(),
                   weights_[best])) {
      best = i;
    }
  }
  last_id_ = candidates[best]->id;
  return best;
}

size_t RoundRobinPolicy::Pick(absl::Span<Worker* const> candidates,
                              const wire::SocketAddress&) {
  CandidateWeights(candidates, weights_);
  const size_t n = candidates.size();
  bool same = slots_.size() == n;
  for (size_t i = 0; same && i < n; ++i) {
    same = slots_[i].id == candidates[i]->id && slots_[i].weight == weights_[i];
  }
  if (!same) {
    slots_.clear();
    for (size_t i = 0; i < n; ++i) {
      slots_.push_back({candidates[i]->id, weights_[i], 0});
    }
  }
  // Credits sum to zero after every pick, so each stays within the total
  // weight of its round: no overflow whatever the capacities.
  int64_t total = 0;
  for (Slot& slot : slots_) {
    slot.credit += static_cast<int64_t>(slot.weight);
    total += static_cast<int64_t>(slot.weight);
  }
  const size_t start = RotationStart(candidates, last_id_);
  size_t best = start;
  for (size_t k = 1; k < n; ++k) {
    const size_t i = (start + k) % n;
    if (slots_[i].credit > slots_[best].credit) best = i;
  }
  slots_[best].credit -= total;
  last_id_ = candidates[best]->id;
  return best;
}

size_t PowerOfTwoChoicesPolicy::Pick(absl::Span<Worker* const> candidates,
                                     const wire::SocketAddress&) {
  const size_t n = candidates.size();
  if (n == 1) return 0;
  CandidateWeights(candidates, weights_);
  // The modulo bias is below n / 2^64: negligible for n <= max_workers.
  const size_t a = static_cast<size_t>(rng_() % n);
  size_t b = static_cast<size_t>(rng_() % (n - 1));
  if (b >= a) ++b;  // Distinct from `a`, uniform over the others.
  const int64_t load_a = candidates[a]->load();
  const int64_t load_b = candidates[b]->load();
  if (LessLoaded(load_a, weights_[a], load_b, weights_[b])) return a;
  if (LessLoaded(load_b, weights_[b], load_a, weights_[a])) return b;
  return rng_() % (weights_[a] + weights_[b]) < weights_[a] ? a : b;
}

double RendezvousScore(uint64_t key, uint64_t worker_id, uint64_t weight) {
  const uint64_t bits = Mix(key ^ Mix(worker_id));
  // The top 53 bits, centred in their step: u is in (0, 1), never 0 or 1,
  // so ln(u) is finite and negative and the score positive.
  const double u = (static_cast<double>(bits >> 11) + 0.5) * 0x1p-53;
  return -static_cast<double>(weight) / std::log(u);
}

size_t IpHashPolicy::Pick(absl::Span<Worker* const> candidates,
                          const wire::SocketAddress& peer) {
  CandidateWeights(candidates, weights_);
  const uint64_t ip = HashIp(peer);
  size_t best = 0;
  double best_score = -1;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const double score = RendezvousScore(ip, candidates[i]->id, weights_[i]);
    if (score > best_score) {
      best = i;
      best_score = score;
    }
  }
  return best;
}

absl::StatusOr<std::unique_ptr<BalancingPolicy>> CreateBalancingPolicy(
    absl::string_view name) {
  if (name == "least_conn") return std::make_unique<LeastConnectionsPolicy>();
  if (name == "round_robin") return std::make_unique<RoundRobinPolicy>();
  if (name == "p2c") {
    std::random_device device;
    const uint64_t seed = (static_cast<uint64_t>(device()) << 32) | device();
    return std::make_unique<PowerOfTwoChoicesPolicy>(seed);
  }
  if (name == "ip_hash") return std::make_unique<IpHashPolicy>();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown balancing policy \"", name,
                   "\" (expected least_conn, round_robin, p2c or ip_hash)"));
}

}  // namespace fdbroker
