#ifndef FDBROKER_PROTO_WIRE_MESSAGE_CHANNEL_H_
#define FDBROKER_PROTO_WIRE_MESSAGE_CHANNEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/fd_passing.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker::wire {

// The protocol version this code speaks (see handoff.proto).
inline constexpr uint32_t kProtocolMajor = 1;
inline constexpr uint32_t kProtocolMinor = 4;

// The environment variable through which a supervised worker learns the
// broker's hand-off socket (set by the broker for every worker it starts).
inline constexpr char kSocketEnvVar[] = "FDBROKER_SOCKET";

// How many fds a message must arrive with: 1 for Connection and Release, 2
// for UpgradeHandover, one per connection for ConnectionBatch, 0 for the rest.
size_t RequiredFds(const v1::HandoffMessage& message);

// The body's name ("hello", "ack", ...) for logs; "none" when unset.
absl::string_view BodyName(const v1::HandoffMessage& message);

// Checks one received packet against the protocol rules: a parseable
// HandoffMessage with exactly one body, the next sequence number, and exactly
// RequiredFds() fds. Any violation is an InvalidArgument status naming it;
// the channel must then be closed (the packet's fds close with it).
class MessageDecoder {
 public:
  // On success `message` holds the message and `fd` its fd (if any; for
  // UpgradeHandover and ConnectionBatch use the vector form).
  absl::Status Decode(Packet& packet, v1::HandoffMessage& message,
                      UniqueFd& fd);
  // On success `fds` holds exactly RequiredFds(message) fds.
  absl::Status Decode(Packet& packet, v1::HandoffMessage& message,
                      std::vector<UniqueFd>& fds);
  uint64_t next_sequence() const { return next_sequence_; }

 private:
  uint64_t next_sequence_ = 1;
};

// A connected SOCK_SEQPACKET socket speaking HandoffMessage: assigns sequence
// numbers on send and validates them on receive. Not thread-safe: one owner
// (an event loop, or a caller holding a lock) drives it.
class MessageChannel {
 public:
  explicit MessageChannel(UniqueFd socket, SysCalls& sys = SysCalls::Real());

  int fd() const { return socket_.get(); }

  // Sends `message` with `attached_fd` (-1 for none; the caller keeps its
  // fd). Sets message.sequence. On kWouldBlock nothing was sent and the
  // sequence number is not consumed, so the same message can be retried.
  absl::StatusOr<SendResult> Send(v1::HandoffMessage& message,
                                  int attached_fd = -1);
  // Same, with any number of fds (UpgradeHandover carries two).
  absl::StatusOr<SendResult> SendWithFds(v1::HandoffMessage& message,
                                         absl::Span<const int> fds);

  // Receives and validates one message (see MessageDecoder).
  absl::StatusOr<ReceiveResult> Receive(v1::HandoffMessage& message,
                                        UniqueFd& attached_fd);
  absl::StatusOr<ReceiveResult> Receive(v1::HandoffMessage& message,
                                        std::vector<UniqueFd>& fds);

 private:
  UniqueFd socket_;
  SysCalls& sys_;
  uint64_t next_send_sequence_ = 1;
  std::string send_buffer_;
  Packet receive_packet_;
  MessageDecoder decoder_;
};

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_MESSAGE_CHANNEL_H_
