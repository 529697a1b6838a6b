#ifndef FDBROKER_BROKER_KERNEL_PLACEMENT_H_
#define FDBROKER_BROKER_KERNEL_PLACEMENT_H_

#include <linux/filter.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "broker/connection_dispatcher.h"
#include "broker/event_loop.h"
#include "broker/listener.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_registry.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/socket_address.h"
#include "wire/sys_calls.h"

namespace fdbroker {

// The classic BPF program of a reuseport group that picks group index i with
// probability weights[i] / sum(weights): it draws a random 32-bit number
// (SKF_AD_RANDOM) and returns the index whose share of [0, 2^32) holds it.
// All weights 0 (or none): index 0. Pure, for tests.
std::vector<sock_filter> BuildPlacementProgram(
    absl::Span<const uint64_t> weights);

// --policy=ip_hash: one worker's part of the group.
struct StickyMember {
  uint64_t worker_id = 0;  // Its rendezvous key: a client follows the id.
  uint64_t weight = 0;     // 0: it wins no client.
  uint32_t group_index = 0;

  bool operator==(const StickyMember& other) const {
    return worker_id == other.worker_id && weight == other.weight &&
           group_index == other.group_index;
  }
  bool operator!=(const StickyMember& other) const { return !(*this == other); }
};

// The sticky program hashes the SYN's source address to 32 bits and looks
// the top kStickyBucketBits of the hash up in a table of buckets.
inline constexpr int kStickyBucketBits = 10;

// The hash the sticky program computes in the kernel: murmur3's fmix32 of
// the IPv4 source address, or chained over the four words of an IPv6 one
// (h = fmix32(h ^ word), from h = 0). An IPv4-mapped IPv6 address hashes as
// its IPv4 address (the SYN on the wire is IPv4). The port is ignored.
uint32_t StickyHash(const wire::SocketAddress& peer);

// The group index of each of the 2^kStickyBucketBits buckets: the member
// with the highest RendezvousScore(bucket, worker_id, weight). A member
// whose weight changes or that leaves moves only the buckets it won or
// wins; no weight anywhere: index 0. Pure.
std::vector<uint32_t> StickyBucketOwners(
    absl::Span<const StickyMember> members);

// The classic BPF program that returns, for each connection, the owner of
// the bucket of StickyHash(source address): the same client address gets
// the same group index while `members` do not change. It reads the IP
// header through SKF_NET_OFF (the reuseport program sees the SYN with the
// data pointer past the TCP header) and tells IPv4 from IPv6 by the
// version nibble. At most about 2 instructions a run of buckets (a binary
// search), well within BPF_MAXINSNS. Pure, for tests.
std::vector<sock_filter> BuildStickyPlacementProgram(
    absl::Span<const StickyMember> members);

// --placement=kernel: each worker that supports it (Hello.
// supports_listener_grant) accepts its connections itself from a listening
// socket of its own, and the kernel picks the socket per connection by the
// broker's weights. Loop thread only.
//
// The group. The broker's --listen socket (bound with SO_REUSEPORT) is index
// 0 of the SO_REUSEPORT group; every worker listener ("slot") the broker
// binds after it on the same address joins at the end, so slot s is group
// index s + 1 (the kernel numbers a group's sockets in the order they
// listen). The broker keeps a copy of every slot until it exits, so no
// socket ever leaves the group and the indexes never shift (closing one
// would move the last socket into its place). A slot whose worker is gone
// is granted to the next worker that registers.
//
// Placement. Group index 0 weighs as much as the workers that take
// hand-offs (those without a slot): the broker accepts there and hands off
// as in --placement=handoff. A slot weighs its worker's policy weight
// (CandidateWeights) while the worker is ready and has room, else 0. The
// program is reloaded when the weights change, at most once per
// `reload_interval`; with no weight anywhere every connection goes to the
// broker's socket (its pending queue and overload rules apply). With
// Mode::kSticky (--policy=ip_hash) the program is BuildStickyPlacementProgram
// over the same workers and weights: the weights do not follow load, so a
// client address keeps its worker until that worker's weight or the
// membership changes, and then only that worker's clients move. With
// Mode::kWeighted, loads that stay uneven (a random draw spreads a burst
// of keep-alive connections binomially) are evened out by a rebalance.
//
// Nothing lost. A slot whose worker is not ready (draining, channel lost,
// exited, not registered yet) is watched by the broker, which accepts what
// the kernel queued there and hands it to another worker by the usual path.
// Connections a worker accepted are its own (exactly like acked ones); it
// reports their figures in ListenerLoad, so the load figures include them.
//
// Upgrade. The running broker passes its slots in slot order
// (UpgradeHandover.kernel_slots) and the new broker keeps that order, so the
// group indexes stay valid: both hold copies while the upgrade runs, and no
// socket leaves the group. A moving worker returns its slot with its Hello
// (returns_listener); the slot with the same inode becomes its slot here and
// it keeps accepting (Welcome.listener_kept). The new broker keeps the
// group's program until the moving workers are back on their slots.
//
// Unknown layout. A broker that starts on an address whose group already
// has members (its predecessor crashed; the workers kept their slots, and
// the kernel compacted the indexes when the old broker's sockets closed)
// cannot know any index. It detaches the group's program, so the kernel
// hashes each connection over all members, each of which somebody accepts
// from, and keeps every listener the workers return as their slot: from
// then on no member leaves the group while a worker drains or dies, and
// the broker accepts what is queued there. Weights do not apply in this
// state. Once the broker holds every member (/proc/net/tcp counts no other:
// all workers are back), RegainLayout() appends fresh sockets, whose
// indexes it knows: one for the hand-off role and one per worker, granted
// anew; the old members stay, held and watched, with weight 0.
class KernelPlacement {
 public:
  struct Options {
    int backlog = 4096;
    absl::Duration reload_interval = absl::Milliseconds(100);
    // Welcome.listener_load_interval_ms.
    absl::Duration load_interval = absl::Milliseconds(50);
    // What --policy asks of the kernel (ConfigFromFlags sets it).
    enum class Mode {
      // least_conn, p2c, round_robin: random in proportion to the weights,
      // and a rebalance when the loads stay uneven, since no weight can
      // even out a burst of long connections that arrive faster than a
      // reload (the hand-off policies would have spread them evenly).
      kWeighted,
      // ip_hash: BuildStickyPlacementProgram, by client address; never
      // rebalanced (a client stays on its worker).
      kSticky,
    };
    Mode mode = Mode::kWeighted;
    // kWeighted, among ready workers of equal weight: a load above both
    // ceil(mean) and mean * (1 + uneven_share) throughout `uneven_for` asks
    // for a rebalance (excess over ceil(mean) released and placed again by
    // the policy), at most once per `rebalance_interval`; after one, the
    // loads must stay uneven for another `uneven_for` (the first takes
    // effect within a few reports). A zero `uneven_for` turns it off
    // (--kernel_rebalance_after=0).
    double uneven_share = 0.1;
    absl::Duration uneven_for = absl::Seconds(1);
    absl::Duration rebalance_interval = absl::Seconds(1);
  };
  // What an upgrade brings along (UpgradeHandover.kernel_*).
  struct Inherited {
    std::vector<wire::UniqueFd> slots;  // In slot order.
    bool layout_unknown = false;
    // The group's program stays until this many workers are back on their
    // slots, or `keep_program_for` has passed.
    uint32_t slots_in_use = 0;
    absl::Duration keep_program_for;
  };

  // `group` is the broker's listening socket (index 0, SO_REUSEPORT), whose
  // address every slot binds; `accepted` takes what the broker accepts from
  // slots (the dispatcher). `inherited`: the slots of the broker this one
  // upgrades (null: none; then the group is checked for members of a
  // crashed broker's workers).
  static absl::StatusOr<std::unique_ptr<KernelPlacement>> Create(
      EventLoop& loop, WorkerRegistry& registry, int group_fd,
      WorkerStats& stats, const Options& options, wire::SysCalls& sys,
      Listener::AcceptCallback accepted, Inherited* inherited = nullptr);

  // What a Welcome says to a worker that supports listener grants.
  uint32_t load_interval_ms() const {
    return static_cast<uint32_t>(
        absl::ToInt64Milliseconds(options_.load_interval));
  }
  // Before Welcome: the listener a re-registering worker returned. True if
  // it stays the worker's slot (Welcome.listener_kept); false if it is not
  // a listener on the group's address (it is closed).
  bool OnListenerReturned(Worker& worker, wire::UniqueFd listener);
  // After Welcome: grants `worker` a slot if its Hello asked for one.
  void OnRegistered(Worker& worker);
  // A worker's ListenerLoad; an error is a protocol violation.
  absl::Status OnListenerLoad(Worker& worker, const v1::ListenerLoad& load);
  // `worker` will accept nothing more (channel lost, exited): its slot goes
  // back to the broker, which accepts what is queued there.
  void OnWorkerGone(Worker& worker);
  // Re-derives the weights (and which slots the broker watches) from the
  // registry; the program follows within reload_interval.
  void Update();
  // What asks the workers above the mean load to release their excess
  // (Mode::kWeighted); unset, loads are never corrected.
  void set_rebalance(absl::AnyInvocable<void()> rebalance) {
    rebalance_ = std::move(rebalance);
  }
  // Stops accepting from the slots (shutdown): clients queued there are
  // refused when the broker exits, as on its own socket.
  void Close();
  // An upgrade's new broker accepts from no slot until a worker has
  // registered with it (as its --listen sockets: UpgradeAccepting).
  void Hold(bool held) { slots_.Hold(held); }
  // While an upgrade hand-over is pending: no new socket joins the group
  // (the new broker holds copies of the present ones only). Free slots may
  // still be granted.
  void set_frozen(bool frozen) { frozen_ = frozen; }

  // For UpgradeHandover: the slots' fds in slot order, how many have a
  // worker, and whether slot s is group index s + 1 (not after a crash,
  // even once RegainLayout() ran: the new broker then regains it itself).
  std::vector<int> slot_fds() const;
  uint32_t slots_in_use() const;
  bool standard_layout() const { return layout_known_ && handoff_index_ == 0; }

  size_t slots() const { return slot_worker_.size(); }
  // The weights of the loaded program, by group index.
  const std::vector<uint64_t>& loaded_weights() const { return loaded_; }

 private:
  KernelPlacement(EventLoop& loop, WorkerRegistry& registry, int group_fd,
                  WorkerStats& stats, const Options& options,
                  wire::SysCalls& sys, Listener::AcceptCallback accepted);
  enum class Reuse { kFreeSlot, kFreshSocket };
  // A free slot (its worker gone; with kFreeSlot), or a new one; -1 with the
  // error logged.
  int AcquireSlot(Reuse reuse = Reuse::kFreeSlot);
  // Unknown layout, and this broker holds every member: see the class
  // comment.
  void RegainLayout();
  // The weights (BuildPlacementProgram) or, when sticky, the members.
  absl::Status LoadProgram(const std::vector<uint64_t>& weights,
                           const std::vector<StickyMember>& members);
  // Unknown layout from now on: the program goes, the kernel hashes.
  void ForgetLayout(absl::string_view why);
  // Whether the inherited program still has to stay (see Inherited).
  bool KeepInheritedProgram();
  void Tick();
  // Mode::kWeighted: rebalances once the loads stayed uneven long enough.
  void CheckEvenness(int64_t now);

  EventLoop& loop_;
  WorkerRegistry& registry_;
  const int group_fd_;  // The broker's --listen socket; not owned.
  WorkerStats& stats_;
  const Options options_;
  wire::SocketAddress address_;
  // The slots' sockets, in slot order; watched while no worker accepts.
  Listener slots_;
  // Slot -> worker id (0: free; kRetired: never granted again).
  static constexpr uint64_t kRetired = ~uint64_t{0};
  std::vector<uint64_t> slot_worker_;
  // Slot -> its group index (-1: unknown; never weighted).
  std::vector<int> slot_index_;
  // Members of the group whose index is known (the next socket's index),
  // and the index of the socket that takes the hand-off role.
  size_t group_size_ = 1;
  size_t handoff_index_ = 0;
  std::vector<uint64_t> loaded_;
  std::vector<uint64_t> wanted_;
  // Sticky only, in worker id order.
  std::vector<StickyMember> loaded_members_;
  std::vector<StickyMember> wanted_members_;
  bool closed_ = false;
  bool frozen_ = false;
  // False: no program is attached (see "Unknown layout").
  bool layout_known_ = true;
  // After an upgrade (see Inherited): 0 once the program may change.
  uint32_t inherited_in_use_ = 0;
  int64_t keep_inherited_until_nanos_ = 0;
  int64_t last_load_nanos_ = 0;
  absl::AnyInvocable<void()> rebalance_;
  // Since when the loads are uneven (0: even at the last check).
  int64_t uneven_since_nanos_ = 0;
  int64_t last_rebalance_nanos_ = 0;
  Timer reload_timer_{loop_};
  Timer tick_timer_{loop_};
  // Reused by Update().
  std::vector<Worker*> candidates_;
  std::vector<uint64_t> candidate_weights_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_KERNEL_PLACEMENT_H_
