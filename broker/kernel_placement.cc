#include "broker/kernel_placement.h"

#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "broker/balancing_policy.h"
#include "spdlog/spdlog.h"

namespace fdbroker {
namespace {

// The reuseport program attach option (Linux 4.5+), if the libc headers
// predate it.
#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif

sock_filter Statement(uint16_t code, uint32_t k) {
  return sock_filter{code, 0, 0, k};
}

// murmur3's 32-bit finalizer; AppendFmix32 is the same in classic BPF.
uint32_t Fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bU;
  h ^= h >> 13;
  h *= 0xc2b2ae35U;
  h ^= h >> 16;
  return h;
}

// A = fmix32(A); clobbers X.
void AppendFmix32(std::vector<sock_filter>& program) {
  const auto xor_shift = [&program](uint32_t bits) {
    program.push_back(Statement(BPF_MISC | BPF_TAX, 0));
    program.push_back(Statement(BPF_ALU | BPF_RSH | BPF_K, bits));
    program.push_back(Statement(BPF_ALU | BPF_XOR | BPF_X, 0));
  };
  xor_shift(16);
  program.push_back(Statement(BPF_ALU | BPF_MUL | BPF_K, 0x85ebca6bU));
  xor_shift(13);
  program.push_back(Statement(BPF_ALU | BPF_MUL | BPF_K, 0xc2b2ae35U));
  xor_shift(16);
}

// A = the 32-bit word at `offset` of the IP header (network byte order).
sock_filter LoadNetworkWord(uint32_t offset) {
  return Statement(BPF_LD | BPF_W | BPF_ABS,
                   static_cast<uint32_t>(SKF_NET_OFF) + offset);
}

// A run of buckets with one owner: hashes from `start` on.
struct HashRange {
  uint32_t start;
  uint32_t group_index;
};

// A binary search over ranges [lo, hi) of A (the hash): returns the group
// index of the range that holds A. cBPF conditional jumps reach at most 255
// instructions ahead, so a longer left side is jumped over with BPF_JA.
void AppendLookup(absl::Span<const HashRange> ranges, size_t lo, size_t hi,
                  std::vector<sock_filter>& program) {
  if (hi - lo == 1) {
    program.push_back(Statement(BPF_RET | BPF_K, ranges[lo].group_index));
    return;
  }
  const size_t mid = lo + (hi - lo) / 2;
  std::vector<sock_filter> left;
  AppendLookup(ranges, lo, mid, left);
  if (left.size() <= 255) {
    program.push_back(sock_filter{BPF_JMP | BPF_JGE | BPF_K,
                                  static_cast<uint8_t>(left.size()), 0,
                                  ranges[mid].start});
  } else {
    program.push_back(
        sock_filter{BPF_JMP | BPF_JGE | BPF_K, 0, 1, ranges[mid].start});
    program.push_back(
        Statement(BPF_JMP | BPF_JA, static_cast<uint32_t>(left.size())));
  }
  program.insert(program.end(), left.begin(), left.end());
  AppendLookup(ranges, mid, hi, program);
}

Listener::Options SlotOptions(const KernelPlacement::Options& options) {
  Listener::Options slot;
  slot.backlog = options.backlog;
  return slot;
}

}  // namespace

std::vector<sock_filter> BuildPlacementProgram(
    absl::Span<const uint64_t> weights) {
  unsigned __int128 total = 0;
  size_t last = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    total += weights[i];
    if (weights[i] != 0) last = i;
  }
  if (total == 0) return {Statement(BPF_RET | BPF_K, 0)};
  // A = random; for each index with weight but the last: if A < its upper
  // bound, return it (jge skips the return). The last takes the rest.
  std::vector<sock_filter> program = {
      Statement(BPF_LD | BPF_W | BPF_ABS,
                static_cast<uint32_t>(SKF_AD_OFF + SKF_AD_RANDOM))};
  unsigned __int128 cumulative = 0;
  for (size_t i = 0; i < last; ++i) {
    if (weights[i] == 0) continue;
    cumulative += weights[i];
    const auto bound = static_cast<uint32_t>((cumulative << 32) / total);
    program.push_back(sock_filter{BPF_JMP | BPF_JGE | BPF_K, 1, 0, bound});
    program.push_back(Statement(BPF_RET | BPF_K, static_cast<uint32_t>(i)));
  }
  program.push_back(Statement(BPF_RET | BPF_K, static_cast<uint32_t>(last)));
  return program;
}

uint32_t StickyHash(const wire::SocketAddress& peer) {
  uint32_t words[4] = {};
  int count = 0;
  if (peer.family() == AF_INET) {
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&peer.storage);
    words[count++] = ntohl(sin->sin_addr.s_addr);
  } else if (peer.family() == AF_INET6) {
    const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&peer.storage);
    for (int i = 0; i < 4; ++i) {
      uint32_t word;
      std::memcpy(&word, sin6->sin6_addr.s6_addr + 4 * i, sizeof(word));
      words[count++] = ntohl(word);
    }
    if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
      words[0] = words[3];
      count = 1;
    }
  }
  uint32_t h = 0;
  for (int i = 0; i < count; ++i) h = Fmix32(h ^ words[i]);
  return h;
}

std::vector<uint32_t> StickyBucketOwners(
    absl::Span<const StickyMember> members) {
  std::vector<uint32_t> owners(size_t{1} << kStickyBucketBits, 0);
  for (size_t bucket = 0; bucket < owners.size(); ++bucket) {
    double best = 0;  // Scores of a positive weight are above 0.
    for (const StickyMember& member : members) {
      if (member.weight == 0) continue;
      const double score =
          RendezvousScore(bucket, member.worker_id, member.weight);
      if (score > best) {
        best = score;
        owners[bucket] = member.group_index;
      }
    }
  }
  return owners;
}

std::vector<sock_filter> BuildStickyPlacementProgram(
    absl::Span<const StickyMember> members) {
  const std::vector<uint32_t> owners = StickyBucketOwners(members);
  std::vector<HashRange> ranges;
  for (size_t bucket = 0; bucket < owners.size(); ++bucket) {
    if (ranges.empty() || ranges.back().group_index != owners[bucket]) {
      ranges.push_back(
          {static_cast<uint32_t>(bucket << (32 - kStickyBucketBits)),
           owners[bucket]});
    }
  }
  if (ranges.size() == 1) {
    return {Statement(BPF_RET | BPF_K, ranges[0].group_index)};
  }
  // IPv6 (version nibble 6): h = fmix32(h ^ word) over the source address,
  // bytes 8..23 of the header; else IPv4: fmix32 of bytes 12..15.
  std::vector<sock_filter> v6;
  for (uint32_t word = 0; word < 4; ++word) {
    if (word > 0) v6.push_back(Statement(BPF_MISC | BPF_TAX, 0));
    v6.push_back(LoadNetworkWord(8 + 4 * word));
    if (word > 0) v6.push_back(Statement(BPF_ALU | BPF_XOR | BPF_X, 0));
    AppendFmix32(v6);
  }
  std::vector<sock_filter> v4 = {LoadNetworkWord(12)};
  AppendFmix32(v4);
  std::vector<sock_filter> program = {
      Statement(BPF_LD | BPF_B | BPF_ABS, static_cast<uint32_t>(SKF_NET_OFF)),
      Statement(BPF_ALU | BPF_RSH | BPF_K, 4),
      sock_filter{BPF_JMP | BPF_JEQ | BPF_K, 0,
                  static_cast<uint8_t>(v6.size() + 1), 6}};
  program.insert(program.end(), v6.begin(), v6.end());
  program.push_back(
      Statement(BPF_JMP | BPF_JA, static_cast<uint32_t>(v4.size())));
  program.insert(program.end(), v4.begin(), v4.end());
  AppendLookup(ranges, 0, ranges.size(), program);
  return program;
}

absl::StatusOr<std::unique_ptr<KernelPlacement>> KernelPlacement::Create(
    EventLoop& loop, WorkerRegistry& registry, int group_fd, WorkerStats& stats,
    const Options& options, wire::SysCalls& sys,
    Listener::AcceptCallback accepted) {
  std::unique_ptr<KernelPlacement> placement(new KernelPlacement(
      loop, registry, group_fd, stats, options, sys, std::move(accepted)));
  int reuseport = 0;
  socklen_t size = sizeof(reuseport);
  if (::getsockopt(group_fd, SOL_SOCKET, SO_REUSEPORT, &reuseport, &size) !=
          0 ||
      !reuseport) {
    return absl::FailedPreconditionError(
        "--placement=kernel: the listening socket lacks SO_REUSEPORT (an "
        "inherited socket must be bound with it)");
  }
  placement->address_.length = sizeof(placement->address_.storage);
  if (::getsockname(group_fd, placement->address_.mutable_addr(),
                    &placement->address_.length) != 0) {
    return absl::ErrnoToStatus(errno, "getsockname");
  }
  // Everything to index 0 until workers register.
  if (absl::Status s = placement->LoadProgram({1}, {}); !s.ok()) return s;
  placement->Tick();
  return placement;
}

KernelPlacement::KernelPlacement(EventLoop& loop, WorkerRegistry& registry,
                                 int group_fd, WorkerStats& stats,
                                 const Options& options, wire::SysCalls& sys,
                                 Listener::AcceptCallback accepted)
    : loop_(loop),
      registry_(registry),
      group_fd_(group_fd),
      stats_(stats),
      options_(options),
      slots_(loop, SlotOptions(options), sys, std::move(accepted)) {}

int KernelPlacement::AcquireSlot() {
  for (size_t s = 0; s < slot_worker_.size(); ++s) {
    if (slot_worker_[s] == 0) return static_cast<int>(s);
  }
  wire::UniqueFd socket(::socket(
      address_.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!socket) {
    spdlog::error("kernel placement: socket: {}", strerror(errno));
    return -1;
  }
  int one = 1;
  ::setsockopt(socket.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  ::setsockopt(socket.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  if (address_.family() == AF_INET6) {
    ::setsockopt(socket.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  }
  // listen() appends it to the group: group index = slot + 1.
  if (::bind(socket.get(), address_.addr(), address_.length) != 0 ||
      ::listen(socket.get(), options_.backlog) != 0) {
    spdlog::error("kernel placement: cannot add a listener on {}: {}",
                  address_.ToString(), strerror(errno));
    return -1;
  }
  if (absl::Status s = slots_.AdoptSocket(std::move(socket), false); !s.ok()) {
    spdlog::error("kernel placement: {}", s.ToString());
    return -1;
  }
  slot_worker_.push_back(0);
  return static_cast<int>(slot_worker_.size() - 1);
}

void KernelPlacement::OnRegistered(Worker& worker) {
  if (!worker.supports_listener_grant || worker.kernel_slot >= 0 || closed_ ||
      worker.channel == nullptr) {
    return;
  }
  const int slot = AcquireSlot();
  if (slot < 0) return;  // It takes hand-offs instead.
  v1::HandoffMessage grant;
  grant.mutable_listener_grant()->set_listener(address_.ToString());
  const int fd = slots_.fd(static_cast<size_t>(slot));
  if (absl::Status s = worker.channel->SendWithFds(grant, {&fd, 1}); !s.ok()) {
    spdlog::warn("worker {}: cannot grant a listener ({}); it takes hand-offs",
                 worker.id, s.ToString());
    return;
  }
  slot_worker_[static_cast<size_t>(slot)] = worker.id;
  worker.kernel_slot = slot;
  spdlog::info("worker {}: granted listener {} (group index {})", worker.id,
               address_.ToString(), slot + 1);
  Update();
}

absl::Status KernelPlacement::OnListenerLoad(Worker& worker,
                                             const v1::ListenerLoad& load) {
  if (!worker.supports_listener_grant) {
    return absl::InvalidArgumentError(
        "listener_load from a worker whose hello did not set "
        "supports_listener_grant");
  }
  if (load.accepted_total() < worker.kernel_accepted_total) {
    return absl::InvalidArgumentError(absl::StrCat(
        "listener_load: accepted_total went down from ",
        worker.kernel_accepted_total, " to ", load.accepted_total()));
  }
  stats_.kernel_accepted +=
      load.accepted_total() - worker.kernel_accepted_total;
  worker.kernel_accepted_total = load.accepted_total();
  worker.kernel_active = load.active();
  Update();
  return absl::OkStatus();
}

void KernelPlacement::OnWorkerGone(Worker& worker) {
  if (worker.kernel_slot < 0) return;
  slot_worker_[static_cast<size_t>(worker.kernel_slot)] = 0;
  worker.kernel_slot = -1;
  Update();
}

void KernelPlacement::Update() {
  if (closed_) return;
  // The policy's weights over every worker that may take connections now.
  candidates_.clear();
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->Available()) candidates_.push_back(worker.get());
  }
  CandidateWeights(candidates_, candidate_weights_);
  wanted_.assign(slot_worker_.size() + 1, 0);
  wanted_members_.clear();
  for (size_t i = 0; i < candidates_.size(); ++i) {
    const Worker& worker = *candidates_[i];
    const size_t index = worker.kernel_slot >= 0
                             ? static_cast<size_t>(worker.kernel_slot) + 1
                             : 0;
    wanted_[index] += candidate_weights_[i];
    if (options_.mode == Options::Mode::kSticky) {
      wanted_members_.push_back(
          {worker.id, candidate_weights_[i], static_cast<uint32_t>(index)});
    }
  }
  // The broker accepts from every slot no ready worker accepts from.
  for (size_t s = 0; s < slot_worker_.size(); ++s) {
    const Worker* worker =
        slot_worker_[s] == 0 ? nullptr : registry_.Find(slot_worker_[s]);
    const bool worker_accepts =
        worker != nullptr && worker->state == WorkerState::kReady &&
        worker->channel != nullptr && !worker->channel->closed();
    slots_.SetWatched(s, !worker_accepts);
  }
  if (wanted_ == loaded_ && wanted_members_ == loaded_members_) {
    reload_timer_.Cancel();
    return;
  }
  const int64_t due =
      last_load_nanos_ + absl::ToInt64Nanoseconds(options_.reload_interval);
  const int64_t now = loop_.NowNanos();
  if (now >= due) {
    if (absl::Status s = LoadProgram(wanted_, wanted_members_); !s.ok()) {
      spdlog::error("kernel placement: {}", s.ToString());
    }
    return;
  }
  if (!reload_timer_.armed()) {
    reload_timer_.Arm(absl::Nanoseconds(due - now), [this] { Update(); });
  }
}

absl::Status KernelPlacement::LoadProgram(
    const std::vector<uint64_t>& weights,
    const std::vector<StickyMember>& members) {
  std::vector<sock_filter> program = options_.mode == Options::Mode::kSticky
                                         ? BuildStickyPlacementProgram(members)
                                         : BuildPlacementProgram(weights);
  sock_fprog fprog{static_cast<unsigned short>(program.size()), program.data()};
  last_load_nanos_ = loop_.NowNanos();
  if (::setsockopt(group_fd_, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog,
                   sizeof(fprog)) != 0) {
    return absl::ErrnoToStatus(errno, "setsockopt SO_ATTACH_REUSEPORT_CBPF");
  }
  ++stats_.placement_loads;
  loaded_ = weights;
  loaded_members_ = members;
  spdlog::debug("kernel placement: weights by group index [{}]",
                absl::StrJoin(weights, " "));
  return absl::OkStatus();
}

void KernelPlacement::Tick() {
  // Worker states change in many places (drain, lifecycle); a periodic
  // look catches every change within one reload interval.
  Update();
  CheckEvenness(loop_.NowNanos());
  tick_timer_.Arm(options_.reload_interval, [this] { Tick(); });
}

void KernelPlacement::CheckEvenness(int64_t now) {
  if (options_.mode != Options::Mode::kLeastLoaded || !rebalance_ || closed_) {
    return;
  }
  // The workers a rebalance weighs: ready, with a channel. Unequal weights
  // are meant to be uneven: leave them.
  candidates_.clear();
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->state == WorkerState::kReady && worker->channel != nullptr &&
        !worker->channel->closed()) {
      candidates_.push_back(worker.get());
    }
  }
  CandidateWeights(candidates_, candidate_weights_);
  const auto n = static_cast<int64_t>(candidates_.size());
  int64_t total = 0;
  int64_t highest = 0;
  bool equal = true;
  for (size_t i = 0; i < candidates_.size(); ++i) {
    total += candidates_[i]->load();
    highest = std::max(highest, candidates_[i]->load());
    equal = equal && candidate_weights_[i] == candidate_weights_[0];
  }
  const double mean =
      n == 0 ? 0 : static_cast<double>(total) / static_cast<double>(n);
  const bool uneven =
      n >= 2 && equal && highest > (total + n - 1) / n &&
      static_cast<double>(highest) > mean * (1 + options_.uneven_share);
  if (!uneven) {
    uneven_since_nanos_ = 0;
    return;
  }
  if (uneven_since_nanos_ == 0) uneven_since_nanos_ = now;
  if (now - uneven_since_nanos_ <
          absl::ToInt64Nanoseconds(options_.uneven_for) ||
      (last_rebalance_nanos_ != 0 &&
       now - last_rebalance_nanos_ <
           absl::ToInt64Nanoseconds(options_.rebalance_interval))) {
    return;
  }
  last_rebalance_nanos_ = now;
  uneven_since_nanos_ = 0;
  ++stats_.placement_rebalances;
  rebalance_();
}

void KernelPlacement::Close() {
  closed_ = true;
  reload_timer_.Cancel();
  tick_timer_.Cancel();
  slots_.Close();
}

}  // namespace fdbroker
