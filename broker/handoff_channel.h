#ifndef FDBROKER_BROKER_HANDOFF_CHANNEL_H_
#define FDBROKER_BROKER_HANDOFF_CHANNEL_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "broker/event_loop.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/message_channel.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// The broker's end of one worker's SOCK_SEQPACKET channel. Loop thread only.
//
// Connection (and ConnectionBatch) messages are sent directly and never queued:
// if the worker's socket buffer is full the send reports kWouldBlock and the
// caller places the connection elsewhere (a worker that stops reading is
// bypassed, not waited on). Control messages (Welcome, Drain, Heartbeat, ...)
// are queued when the socket is full and flushed in order when it drains; while
// any are queued, Connection sends report kWouldBlock so order is preserved.
class HandoffChannel {
 public:
  // Control messages queued while the socket is full, at most; one more
  // closes the channel (the peer does not read).
  static constexpr size_t kMaxQueuedControl = 1024;
  class Delegate {
   public:
    virtual ~Delegate() = default;
    // A valid message arrived; `fd` is set for Connection/Release bodies.
    virtual void OnMessage(HandoffChannel& channel, v1::HandoffMessage& message,
                           wire::UniqueFd fd) = 0;
    // The channel is unusable (peer closed, protocol violation, I/O error).
    // Called once, never re-entrantly: from the loop after the turn in which
    // the channel closed (so a delegate that is sending on the channel never
    // sees its own state change under it). The channel has stopped watching
    // its socket; the delegate may destroy it inside this callback.
    virtual void OnChannelClosed(HandoffChannel& channel,
                                 const absl::Status& reason) = 0;
    // A channel that reported kWouldBlock for a Connection can take more.
    virtual void OnWritable(HandoffChannel& channel) = 0;
  };

  static absl::StatusOr<std::unique_ptr<HandoffChannel>> Create(
      EventLoop& loop, wire::UniqueFd socket, const ucred& peer,
      wire::SysCalls& sys, Delegate& delegate);
  // The same over a channel already in use (its sequence numbers go on);
  // its socket must be non-blocking.
  static absl::StatusOr<std::unique_ptr<HandoffChannel>> Create(
      EventLoop& loop, wire::MessageChannel channel, const ucred& peer,
      Delegate& delegate);
  ~HandoffChannel();

  // Sends a Connection or ConnectionBatch body with its client fds (the
  // broker keeps its copies).
  absl::StatusOr<wire::SendResult> SendConnections(
      v1::HandoffMessage& message, absl::Span<const int> client_fds);
  // Sends a message that carries fds (UpgradeHandover) right now; a full
  // socket is an error here (it is only used on a fresh channel).
  absl::Status SendWithFds(v1::HandoffMessage& message,
                           absl::Span<const int> fds);
  // Sends or queues a control message; a send error closes the channel
  // (reported through the delegate, possibly later in the same turn).
  void SendControl(v1::HandoffMessage message);

  // Closes the channel with `reason` (reported to the delegate). Messages
  // the worker sent before the close are still delivered first: an Ack
  // already queued means the worker owns that connection, and re-placing it
  // would give it two owners. shutdown(SHUT_RD) makes every later send of
  // the worker fail (EPIPE), so the worker knows exactly which of its
  // messages arrived.
  void Close(const absl::Status& reason);

  // Hands the channel's callbacks to another owner (the upgrade hand-over
  // takes the channel from the worker registry).
  void set_delegate(Delegate& delegate) { delegate_ = &delegate; }

  bool closed() const { return closed_; }
  bool congested() const { return blocked_ || !queue_.empty(); }
  const ucred& peer() const { return peer_; }
  int64_t last_received_nanos() const { return last_received_nanos_; }
  int64_t last_sent_nanos() const { return last_sent_nanos_; }

  // Set by the owner once the peer is registered (0 before Welcome).
  uint64_t worker_id = 0;

 private:
  HandoffChannel(EventLoop& loop, wire::MessageChannel channel,
                 const ucred& peer, Delegate& delegate);
  absl::Status Init();
  void OnEvents(uint32_t events);
  void ReadMessages();
  void FlushQueue();
  void UpdateWatch();

  EventLoop& loop_;
  wire::MessageChannel channel_;
  const ucred peer_;
  Delegate* delegate_;  // Never null.
  std::unique_ptr<IoWatch> watch_;
  std::deque<v1::HandoffMessage> queue_;
  v1::HandoffMessage incoming_;  // Reused: parsing does not allocate anew.
  // Read during Close(), delivered before OnChannelClosed.
  std::vector<std::pair<v1::HandoffMessage, wire::UniqueFd>> last_words_;
  bool closed_ = false;
  bool blocked_ = false;  // A Connection send hit a full socket buffer.
  // Lets a deferred OnChannelClosed notice that the channel was destroyed.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  int64_t last_received_nanos_;
  int64_t last_sent_nanos_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_HANDOFF_CHANNEL_H_
