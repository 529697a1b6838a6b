#ifndef FDBROKER_BROKER_UPGRADE_H_
#define FDBROKER_BROKER_UPGRADE_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "broker/event_loop.h"
#include "broker/handoff_channel.h"
#include "wire/message_channel.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// What `fdbroker --upgrade` receives from the running broker.
struct UpgradeSockets {
  // The listening sockets for clients, in the running broker's order (one
  // from a broker that predates several listeners).
  std::vector<wire::UniqueFd> listeners;
  wire::UniqueFd handoff;  // Listening hand-off Unix socket.
  // This broker's connection ids start here (0: an older running broker).
  uint64_t first_connection_id = 0;
  // --placement=kernel: the workers' listeners, in slot order
  // (UpgradeHandover.kernel_slots), and what the running broker knew of
  // them.
  std::vector<wire::UniqueFd> kernel_slots;
  bool kernel_layout_unknown = false;
  uint32_t kernel_slots_in_use = 0;
  // Still open: ReportUpgradeReady() goes over it.
  std::unique_ptr<wire::MessageChannel> channel;
};

// The first protocol minor whose new brokers send UpgradeReady; the running
// broker commits at once to an older one.
inline constexpr uint32_t kTwoPhaseUpgradeMinor = 3;
// The first minor whose workers understand Reconnect.
inline constexpr uint32_t kReconnectMinor = 3;
// The first minor whose new brokers take, after UpgradeReady, the
// connections the running broker could not place (UpgradeInbox).
inline constexpr uint32_t kUpgradeInboxMinor = 4;
// After UpgradeReady the running broker moves half of its workers and keeps
// accepting with the others until the new broker has one of them
// (UpgradeAccepting), at most this long.
inline constexpr absl::Duration kUpgradeFirstGroupTimeout = absl::Seconds(1);
// How long the running broker waits for UpgradeReady before it takes its
// ports back and carries on. The new broker's start-up is bounded well
// below it (it retries its control and metrics ports for 10 s).
inline constexpr absl::Duration kUpgradeReadyTimeout = absl::Seconds(60);

// The new broker's side of a planned upgrade, first phase: connects to the
// running broker's hand-off socket, sends UpgradeRequest and waits (up to
// `timeout`) for UpgradeHandover with its sockets. The running broker
// keeps serving (it frees only its control and metrics ports) until
// ReportUpgradeReady(). While the running broker is busy with another
// upgrade (REFUSAL_REASON_UPGRADE_IN_PROGRESS) it asks again until `timeout`.
absl::StatusOr<UpgradeSockets> RequestUpgrade(const std::string& socket_path,
                                              absl::Duration timeout);

// Second phase: this broker is fully up; the running broker hands over its
// work and exits, and its workers re-register here. Aborted if the running
// broker gave up on the upgrade meanwhile (then this broker must exit); OK
// if it is gone (it crashed: nobody else serves, so this broker does).
absl::Status ReportUpgradeReady(wire::MessageChannel& channel);

// The running broker's side after it sent UpgradeHandover: waits for the
// new broker's UpgradeReady (then `on_ready`), or aborts (then `on_abort`
// with the reason) when the new broker goes away, says anything else, or
// is not ready within `timeout`; an abort tells the new broker with a
// Refusal when the channel still works. Each callback runs at most once and
// neither after Commit(). Loop thread only.
class PendingUpgrade : public HandoffChannel::Delegate {
 public:
  // `peer_minor`: the new broker's protocol minor (its UpgradeRequest's).
  PendingUpgrade(EventLoop& loop, std::unique_ptr<HandoffChannel> channel,
                 uint32_t peer_minor, absl::Duration timeout,
                 absl::AnyInvocable<void()> on_ready,
                 absl::AnyInvocable<void(const absl::Status&)> on_abort);

  // Commits without waiting (a new broker that does not send UpgradeReady).
  void Commit();
  // Gives up now (e.g. this broker shuts down): on_abort runs.
  void Abort(const absl::Status& reason);
  bool committed() const { return state_ == State::kCommitted; }
  pid_t peer_pid() const { return channel_->peer().pid; }
  // After the commit: `on_accepting` runs once, when the new broker says it
  // accepts (UpgradeAccepting) or its channel closes.
  void set_on_accepting(absl::AnyInvocable<void()> on_accepting) {
    on_accepting_ = std::move(on_accepting);
  }
  // After the commit: tells the new broker that this one stopped accepting
  // (UpgradeAccepting), if it understands it.
  void SendAccepting();
  // After the commit: the channel on which connections this broker cannot
  // place go to the new broker (Connection messages), or null if the new
  // broker does not take them or has gone.
  HandoffChannel* inbox() {
    return state_ == State::kCommitted && peer_minor_ >= kUpgradeInboxMinor &&
                   !channel_->closed()
               ? channel_.get()
               : nullptr;
  }

  // HandoffChannel::Delegate.
  void OnMessage(HandoffChannel& channel, v1::HandoffMessage& message,
                 wire::UniqueFd fd) override;
  void OnChannelClosed(HandoffChannel& channel,
                       const absl::Status& reason) override;
  void OnWritable(HandoffChannel&) override {}

 private:
  enum class State { kWaiting, kCommitted, kAborted };

  std::unique_ptr<HandoffChannel> channel_;
  const uint32_t peer_minor_;
  absl::AnyInvocable<void()> on_ready_;
  absl::AnyInvocable<void(const absl::Status&)> on_abort_;
  absl::AnyInvocable<void()> on_accepting_;
  Timer timer_;
  State state_ = State::kWaiting;

  void NewBrokerAccepts();
};

// The new broker's side after UpgradeReady (protocol 1.4): the running
// broker passes on, as Connection messages over the same channel, the
// connections it accepted and could not place before its workers moved
// (rejected by a full worker, or still reading a PROXY header at the
// commit); each goes to `sink` as if this broker had accepted it. The
// channel also says who accepts clients (UpgradeAccepting, both ways):
// `on_accepting` runs when the running broker has stopped. Ends when the
// running broker closes the channel (it exits); anything but a Connection or
// UpgradeAccepting ends it too. Loop thread only.
class UpgradeInbox : public HandoffChannel::Delegate {
 public:
  using Sink = absl::AnyInvocable<void(const v1::Connection&, wire::UniqueFd)>;
  static absl::StatusOr<std::unique_ptr<UpgradeInbox>> Create(
      EventLoop& loop, wire::MessageChannel channel, Sink sink,
      absl::AnyInvocable<void()> on_accepting,
      absl::AnyInvocable<void()> on_closed);

  // This broker accepts from now on, with `workers` registered: the
  // running broker may stop.
  void ReportAccepting(uint32_t workers);

  // HandoffChannel::Delegate.
  void OnMessage(HandoffChannel& channel, v1::HandoffMessage& message,
                 wire::UniqueFd fd) override;
  void OnChannelClosed(HandoffChannel& channel,
                       const absl::Status& reason) override;
  void OnWritable(HandoffChannel&) override {}

 private:
  UpgradeInbox(Sink sink, absl::AnyInvocable<void()> on_accepting,
               absl::AnyInvocable<void()> on_closed)
      : sink_(std::move(sink)),
        on_accepting_(std::move(on_accepting)),
        on_closed_(std::move(on_closed)) {}

  std::unique_ptr<HandoffChannel> channel_;
  Sink sink_;
  absl::AnyInvocable<void()> on_accepting_;
  absl::AnyInvocable<void()> on_closed_;
  uint64_t received_ = 0;
};

// The systemd socket-activation listeners (LISTEN_PID/LISTEN_FDS: fds 3,
// 4, ...), if the environment passes them to this process; the variables
// are removed so that workers do not inherit them. Empty when not
// socket-activated.
absl::StatusOr<std::vector<wire::UniqueFd>> TakeActivatedListeners();

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_UPGRADE_H_
