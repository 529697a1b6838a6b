#ifndef FDBROKER_BROKER_WORKER_REGISTRATION_H_
#define FDBROKER_BROKER_WORKER_REGISTRATION_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/connection_dispatcher.h"
#include "broker/event_loop.h"
#include "broker/handoff_channel.h"
#include "broker/supervisor.h"
#include "broker/worker_lifecycle.h"
#include "broker/worker_registry.h"
#include "wire/sys_calls.h"

namespace fdbroker {

// The way in: channels of peers that have not said Hello yet, and the
// Hello's answer (Welcome, or a Refusal saying why: version, credentials,
// --max_workers, shutting down, claims on connections others own). A peer
// whose first message is an UpgradeRequest is a new broker, not a worker:
// its channel goes to the upgrade handler. Loop thread only.
class WorkerRegistration {
 public:
  struct Options {
    int max_workers = 64;
    absl::Duration heartbeat_interval = absl::Seconds(1);
    // Also how long a peer may take to say Hello.
    absl::Duration heartbeat_timeout = absl::Seconds(10);
    absl::Duration worker_timeout = absl::ZeroDuration();  // Welcome says it
  };
  using UpgradeCallback = std::function<void(
      std::unique_ptr<HandoffChannel> channel, const v1::UpgradeRequest&)>;
  // The channel id of an upgrade peer (no registry entry has it).
  static constexpr uint64_t kUpgradePeerId = ~uint64_t{0};

  // Channels are created with `delegate` (the WorkerManager), which passes
  // the messages and closes of unregistered ones back here.
  WorkerRegistration(EventLoop& loop, WorkerRegistry& registry,
                     ConnectionDispatcher& dispatcher, Supervisor& supervisor,
                     wire::SysCalls& sys, WorkerLifecycle& lifecycle,
                     WorkerStats& stats, HandoffChannel::Delegate& delegate,
                     const Options& options);

  void set_upgrade_handler(UpgradeCallback callback) {
    on_upgrade_ = std::move(callback);
  }
  // Welcome.listener_load_interval_ms for workers that support listener
  // grants (0: this broker grants none).
  void set_listener_load_interval_ms(uint32_t ms) {
    listener_load_interval_ms_ = ms;
  }
  // Takes the listener a re-registering worker returned (Hello.
  // returns_listener), before its Welcome: true if the worker goes on
  // accepting from it (Welcome.listener_kept). Unset: every returned
  // listener is closed (this broker grants none).
  using ListenerReturnCallback =
      std::function<bool(Worker& worker, wire::UniqueFd listener)>;
  void set_listener_return_handler(ListenerReturnCallback callback) {
    on_listener_return_ = std::move(callback);
  }
  // From now on every Hello is refused (SHUTTING_DOWN).
  void StopAccepting() { accepting_ = false; }

  // A peer connected to the hand-off socket; `allowed` says whether its
  // uid may register (if not, its Hello is answered with a Refusal).
  void OnNewPeer(wire::UniqueFd socket, const ucred& peer, bool allowed);
  // The first message of an unregistered channel. Returns the worker it
  // registered (now ready, its channel moved into the record), or null.
  // `fd`: the listener a Hello with returns_listener carries.
  Worker* OnMessage(HandoffChannel& channel, const v1::HandoffMessage& message,
                    wire::UniqueFd fd);
  void OnChannelClosed(HandoffChannel& channel, const absl::Status& reason);
  // Closes the channels that said nothing for heartbeat_timeout.
  void ExpireSilentPeers(int64_t now_nanos);

 private:
  // Checks the Hello; returns the worker it registered, or null (refused).
  Worker* OnHello(HandoffChannel& channel, const v1::Hello& hello,
                  wire::UniqueFd returned_listener);
  // Records what the Hello declared, moves the channel into `worker`,
  // answers Welcome and makes it ready.
  void Admit(HandoffChannel& channel, Worker& worker, const v1::Hello& hello,
             wire::UniqueFd returned_listener);
  // The Hello's owned_connections: none held by the broker or owned by a
  // worker other than `self`, none twice.
  absl::Status CheckClaims(const v1::Hello& hello, const Worker* self) const;
  void Refuse(HandoffChannel& channel, v1::RefusalReason reason,
              absl::string_view message);
  // Whether process `pid` may take `worker`'s registration back on a new
  // channel (its own was lost).
  static bool MayRejoin(const Worker& worker, pid_t pid);
  // The supervised worker that is `pid` or one of its near ancestors.
  Worker* FindSupervisedAncestor(pid_t pid);

  EventLoop& loop_;
  WorkerRegistry& registry_;
  ConnectionDispatcher& dispatcher_;
  Supervisor& supervisor_;
  wire::SysCalls& sys_;
  WorkerLifecycle& lifecycle_;
  WorkerStats& stats_;
  HandoffChannel::Delegate& delegate_;
  const Options options_;
  bool accepting_ = true;
  uint32_t listener_load_interval_ms_ = 0;
  UpgradeCallback on_upgrade_;
  ListenerReturnCallback on_listener_return_;
  // Channels that have not said Hello yet.
  absl::flat_hash_map<HandoffChannel*, std::unique_ptr<HandoffChannel>>
      unregistered_;
  // Unregistered channels whose peer's uid is not allowed.
  absl::flat_hash_set<HandoffChannel*> disallowed_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_WORKER_REGISTRATION_H_
