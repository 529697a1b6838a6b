#include "broker/kernel_placement.h"

#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
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
// Linux 5.8+.
#ifndef SO_DETACH_REUSEPORT_BPF
#define SO_DETACH_REUSEPORT_BPF 68
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

// The TCP listeners of this network namespace bound to exactly `address`:
// the members of its SO_REUSEPORT group. Asked of sock_diag with the state
// filter, so the kernel walks only its listening sockets: the answer is
// immediate and small however many connections the host has (reading
// /proc/net/tcp would parse every one of them on the loop thread).
absl::StatusOr<int> CountListeners(const wire::SocketAddress& address) {
  wire::UniqueFd diag(
      ::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
  if (!diag.valid()) return absl::ErrnoToStatus(errno, "sock_diag socket");
  struct {
    nlmsghdr header;
    inet_diag_req_v2 request;
  } query{};
  query.header.nlmsg_len = sizeof(query);
  query.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  query.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  query.request.sdiag_family = static_cast<uint8_t>(address.family());
  query.request.sdiag_protocol = IPPROTO_TCP;
  query.request.idiag_states = 1U << TCP_LISTEN;
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(diag.get(), &query, sizeof(query), 0,
               reinterpret_cast<const sockaddr*>(&kernel),
               sizeof(kernel)) < 0) {
    return absl::ErrnoToStatus(errno, "sock_diag request");
  }
  const void* bound;
  size_t bound_size;
  uint16_t port;
  if (address.family() == AF_INET) {
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&address.storage);
    bound = &sin->sin_addr;
    bound_size = sizeof(sin->sin_addr);
    port = sin->sin_port;
  } else {
    const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&address.storage);
    bound = &sin6->sin6_addr;
    bound_size = sizeof(sin6->sin6_addr);
    port = sin6->sin6_port;
  }
  int count = 0;
  alignas(nlmsghdr) char buffer[16384];
  for (;;) {
    const ssize_t n = ::recv(diag.get(), buffer, sizeof(buffer), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::ErrnoToStatus(errno, "sock_diag answer");
    if (n == 0) return absl::UnavailableError("sock_diag: no answer");
    const size_t length = static_cast<size_t>(n);
    size_t next = 0;
    for (size_t at = 0; at + sizeof(nlmsghdr) <= length; at = next) {
      const auto* h = reinterpret_cast<const nlmsghdr*>(buffer + at);
      if (h->nlmsg_len < sizeof(nlmsghdr) || h->nlmsg_len > length - at) {
        return absl::InternalError("sock_diag: a truncated answer");
      }
      next = at + NLMSG_ALIGN(h->nlmsg_len);
      if (h->nlmsg_type == NLMSG_DONE) return count;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* error = static_cast<const nlmsgerr*>(NLMSG_DATA(h));
        return absl::ErrnoToStatus(-error->error, "sock_diag");
      }
      const auto* socket = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
      count += socket->id.idiag_sport == port &&
               std::memcmp(socket->id.idiag_src, bound, bound_size) == 0;
    }
  }
}

ino_t InodeOf(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
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
    Listener::AcceptCallback accepted, Inherited* inherited) {
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
  if (inherited != nullptr) {
    // The same sockets in the same order: the same group indexes, and the
    // program attached to the group fits them as it is.
    for (wire::UniqueFd& slot : inherited->slots) {
      if (absl::Status s =
              placement->slots_.AdoptSocket(std::move(slot), false);
          !s.ok()) {
        return s;
      }
      placement->slot_worker_.push_back(0);
      placement->slot_index_.push_back(
          inherited->layout_unknown
              ? -1
              : static_cast<int>(placement->slot_worker_.size()));
    }
    placement->group_size_ = 1 + placement->slots();
    placement->layout_known_ = !inherited->layout_unknown;
    placement->inherited_in_use_ = inherited->slots_in_use;
    placement->keep_inherited_until_nanos_ =
        loop.NowNanos() + absl::ToInt64Nanoseconds(inherited->keep_program_for);
    spdlog::info(
        "kernel placement: took over {} worker listener(s) in slot order ({} "
        "in use; group indexes {})",
        placement->slots(), inherited->slots_in_use,
        placement->layout_known_ ? "known" : "unknown");
    placement->Tick();
    return placement;
  }
  // Members besides ours: a crashed broker's workers still accept from
  // their slots, at indexes nobody knows any more.
  absl::StatusOr<int> members = CountListeners(placement->address_);
  if (!members.ok()) {
    spdlog::warn("kernel placement: {}; assuming no other group member",
                 members.status().ToString());
  } else if (*members > 1) {
    placement->ForgetLayout(
        absl::StrCat(*members - 1,
                     " listener(s) of a previous broker's workers are in "
                     "the group"));
  }
  // Everything to index 0 until workers register.
  if (placement->layout_known_) {
    if (absl::Status s = placement->LoadProgram({1}, {}); !s.ok()) return s;
  }
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

int KernelPlacement::AcquireSlot(Reuse reuse) {
  for (size_t s = 0; reuse == Reuse::kFreeSlot && s < slot_worker_.size();
       ++s) {
    if (slot_worker_[s] == 0) return static_cast<int>(s);
  }
  if (frozen_) return -1;  // The upgrade's new broker would not hold it.
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
  // listen() appends it to the group, at index group_size_.
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
  slot_index_.push_back(layout_known_ ? static_cast<int>(group_size_) : -1);
  ++group_size_;
  return static_cast<int>(slot_worker_.size() - 1);
}

bool KernelPlacement::OnListenerReturned(Worker& worker,
                                         wire::UniqueFd listener) {
  if (closed_ || worker.kernel_slot >= 0) return false;
  int listening = 0;
  socklen_t size = sizeof(listening);
  absl::StatusOr<wire::SocketAddress> bound =
      wire::SocketAddress::Of(listener.get(), /*peer=*/false);
  if (::getsockopt(listener.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening,
                   &size) != 0 ||
      !listening || !bound.ok() || bound->ToString() != address_.ToString()) {
    spdlog::warn(
        "worker {}: the listener it returned is not one on {}; closed (it "
        "takes hand-offs until granted one)",
        worker.id, address_.ToString());
    return false;
  }
  const ino_t inode = InodeOf(listener.get());
  for (size_t s = 0; s < slot_worker_.size(); ++s) {
    if (InodeOf(slots_.fd(s)) != inode) continue;
    if (slot_worker_[s] != 0) return false;  // Another worker's: cannot be.
    // One of ours (an upgrade's): our copy stays, the worker keeps its own.
    slot_worker_[s] = worker.id;
    worker.kernel_slot = static_cast<int>(s);
    if (inherited_in_use_ > 0) --inherited_in_use_;
    spdlog::info("worker {}: back on its listener (group index {})", worker.id,
                 slot_index_[s]);
    Update();
    return true;
  }
  // A crashed broker's slot: keep it, so that it never leaves the group.
  if (layout_known_) {
    ForgetLayout(absl::StrCat("worker ", worker.id,
                              " returned a listener this broker did not know"));
  }
  if (absl::Status s = slots_.AdoptSocket(std::move(listener), false);
      !s.ok()) {
    spdlog::error("kernel placement: {}", s.ToString());
    return false;
  }
  slot_worker_.push_back(worker.id);
  slot_index_.push_back(-1);
  worker.kernel_slot = static_cast<int>(slot_worker_.size() - 1);
  spdlog::info("worker {}: adopted the listener it returned (slot {})",
               worker.id, worker.kernel_slot);
  Update();
  return true;
}

void KernelPlacement::ForgetLayout(absl::string_view why) {
  layout_known_ = false;
  inherited_in_use_ = 0;
  reload_timer_.Cancel();
  if (::setsockopt(group_fd_, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, nullptr,
                   0) != 0 &&
      errno != ENOENT) {
    spdlog::error("kernel placement: setsockopt SO_DETACH_REUSEPORT_BPF: {}",
                  strerror(errno));
  }
  spdlog::warn(
      "kernel placement: {}: their group indexes are unknown, so the kernel "
      "places by its hash (no weights) until this broker exits",
      std::string(why));
}

bool KernelPlacement::KeepInheritedProgram() {
  if (inherited_in_use_ > 0 &&
      loop_.NowNanos() >= keep_inherited_until_nanos_) {
    spdlog::info(
        "kernel placement: {} moving worker(s) did not come back in time; "
        "the placement follows those that did",
        inherited_in_use_);
    inherited_in_use_ = 0;
  }
  return inherited_in_use_ > 0;
}

std::vector<int> KernelPlacement::slot_fds() const {
  std::vector<int> fds;
  for (size_t s = 0; s < slots_.size(); ++s) fds.push_back(slots_.fd(s));
  return fds;
}

uint32_t KernelPlacement::slots_in_use() const {
  uint32_t in_use = 0;
  for (uint64_t id : slot_worker_) in_use += id != 0 && id != kRetired;
  return in_use;
}

void KernelPlacement::RegainLayout() {
  if (layout_known_ || closed_ || frozen_) return;
  absl::StatusOr<int> members = CountListeners(address_);
  const size_t held = 1 + slots_.size();  // Our --listen socket, the slots.
  if (!members.ok() || static_cast<size_t>(*members) != held) return;
  // Every member of the group is ours, so none leaves it unless we close
  // it, and a socket that listens now joins at index `held`. The present
  // members keep their unknown indexes, weigh 0 for good and are watched
  // by the broker; a fresh socket takes the hand-off role and each worker
  // a fresh slot (a new grant: it closes its copy of the old one, which
  // the broker still holds and serves).
  std::vector<uint64_t> movers;
  for (uint64_t& id : slot_worker_) {
    if (id != 0 && id != kRetired) movers.push_back(id);
    id = kRetired;
  }
  std::fill(slot_index_.begin(), slot_index_.end(), -1);
  layout_known_ = true;
  group_size_ = held;
  const int handoff = AcquireSlot(Reuse::kFreshSocket);
  if (handoff < 0) {
    ForgetLayout("cannot add the hand-off socket");
    return;
  }
  slot_worker_[static_cast<size_t>(handoff)] = kRetired;
  handoff_index_ = static_cast<size_t>(slot_index_[handoff]);
  for (uint64_t id : movers) {
    Worker* worker = registry_.Find(id);
    if (worker == nullptr) continue;
    worker->kernel_slot = -1;
    OnRegistered(*worker);
  }
  loaded_.clear();
  spdlog::info(
      "kernel placement: holds all {} member(s) of the group: hand-off "
      "socket at index {}, {} worker(s) moved to fresh listeners; weights "
      "apply again",
      held, handoff_index_, movers.size());
  Update();
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
               address_.ToString(), slot_index_[static_cast<size_t>(slot)]);
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
  // The broker accepts from every slot no ready worker accepts from.
  for (size_t s = 0; s < slot_worker_.size(); ++s) {
    const Worker* worker =
        slot_worker_[s] == 0 ? nullptr : registry_.Find(slot_worker_[s]);
    slots_.SetWatched(s, worker == nullptr || !worker->Reachable());
  }
  if (!layout_known_ || KeepInheritedProgram()) return;
  wanted_.assign(group_size_, 0);
  wanted_members_.clear();
  for (size_t i = 0; i < candidates_.size(); ++i) {
    const Worker& worker = *candidates_[i];
    const int index = worker.kernel_slot >= 0
                          ? slot_index_[static_cast<size_t>(worker.kernel_slot)]
                          : static_cast<int>(handoff_index_);
    if (index < 0) continue;
    wanted_[static_cast<size_t>(index)] += candidate_weights_[i];
    if (options_.mode == Options::Mode::kSticky) {
      wanted_members_.push_back(
          {worker.id, candidate_weights_[i], static_cast<uint32_t>(index)});
    }
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
  RegainLayout();
  Update();
  CheckEvenness(loop_.NowNanos());
  tick_timer_.Arm(options_.reload_interval, [this] { Tick(); });
}

void KernelPlacement::CheckEvenness(int64_t now) {
  if (options_.mode != Options::Mode::kWeighted || !rebalance_ || closed_ ||
      options_.uneven_for == absl::ZeroDuration()) {
    return;
  }
  // The workers a rebalance weighs: ready, with a channel. Unequal weights
  // are meant to be uneven: leave them.
  candidates_.clear();
  for (const auto& [id, worker] : registry_.workers()) {
    if (worker->Reachable()) candidates_.push_back(worker.get());
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
