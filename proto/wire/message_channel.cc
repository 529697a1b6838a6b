#include "wire/message_channel.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fdbroker::wire {

size_t RequiredFds(const v1::HandoffMessage& message) {
  switch (message.body_case()) {
    case v1::HandoffMessage::kConnection:
    case v1::HandoffMessage::kRelease:
    case v1::HandoffMessage::kListenerGrant:
      return 1;
    case v1::HandoffMessage::kHello:
      return message.hello().returns_listener() ? 1 : 0;
    case v1::HandoffMessage::kUpgradeHandover:
      return 2 +
             static_cast<size_t>(
                 message.upgrade_handover().more_listen_addresses_size()) +
             message.upgrade_handover().kernel_slots();
    case v1::HandoffMessage::kConnectionBatch:
      return static_cast<size_t>(message.connection_batch().connections_size());
    default:
      return 0;
  }
}

absl::string_view BodyName(const v1::HandoffMessage& message) {
  switch (message.body_case()) {
    case v1::HandoffMessage::kHello:
      return "hello";
    case v1::HandoffMessage::kWelcome:
      return "welcome";
    case v1::HandoffMessage::kRefusal:
      return "refusal";
    case v1::HandoffMessage::kConnection:
      return "connection";
    case v1::HandoffMessage::kAck:
      return "ack";
    case v1::HandoffMessage::kReject:
      return "reject";
    case v1::HandoffMessage::kClosed:
      return "closed";
    case v1::HandoffMessage::kRelease:
      return "release";
    case v1::HandoffMessage::kDrain:
      return "drain";
    case v1::HandoffMessage::kGoodbye:
      return "goodbye";
    case v1::HandoffMessage::kHeartbeat:
      return "heartbeat";
    case v1::HandoffMessage::kUpgradeRequest:
      return "upgrade_request";
    case v1::HandoffMessage::kUpgradeHandover:
      return "upgrade_handover";
    case v1::HandoffMessage::kConnectionBatch:
      return "connection_batch";
    case v1::HandoffMessage::kReleaseRequest:
      return "release_request";
    case v1::HandoffMessage::kUpgradeReady:
      return "upgrade_ready";
    case v1::HandoffMessage::kReconnect:
      return "reconnect";
    case v1::HandoffMessage::kListenerGrant:
      return "listener_grant";
    case v1::HandoffMessage::kListenerLoad:
      return "listener_load";
    case v1::HandoffMessage::kUpgradeAccepting:
      return "upgrade_accepting";
    case v1::HandoffMessage::BODY_NOT_SET:
      break;
  }
  return "none";
}

absl::Status MessageDecoder::Decode(Packet& packet, v1::HandoffMessage& message,
                                    UniqueFd& fd) {
  fd.Reset();
  std::vector<UniqueFd> fds;
  absl::Status status = Decode(packet, message, fds);
  if (status.ok() && fds.size() == 1) fd = std::move(fds.front());
  return status;
}

absl::Status MessageDecoder::Parse(const Packet& packet,
                                   v1::HandoffMessage& message) const {
  if (!message.ParseFromArray(packet.data.data(),
                              static_cast<int>(packet.data.size()))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "malformed message (", packet.data.size(), " bytes do not parse)"));
  }
  if (message.body_case() == v1::HandoffMessage::BODY_NOT_SET) {
    return absl::InvalidArgumentError(
        "message without a body (unknown or missing message type)");
  }
  if (message.sequence() != next_sequence_) {
    return absl::InvalidArgumentError(
        absl::StrCat("out-of-order ", BodyName(message), ": sequence ",
                     message.sequence(), ", expected ", next_sequence_));
  }
  if (message.body_case() == v1::HandoffMessage::kConnectionBatch &&
      message.connection_batch().connections_size() == 0) {
    return absl::InvalidArgumentError("connection_batch without connections");
  }
  return absl::OkStatus();
}

absl::Status MessageDecoder::Decode(Packet& packet, v1::HandoffMessage& message,
                                    std::vector<UniqueFd>& fds) {
  fds.clear();
  if (absl::Status parsed = Parse(packet, message); !parsed.ok()) {
    return parsed;
  }
  const size_t required = RequiredFds(message);
  if (packet.fds.size() != required) {
    return absl::InvalidArgumentError(
        absl::StrCat(BodyName(message), " #", message.sequence(), " carried ",
                     packet.fds.size(), " fds, expected ", required));
  }
  ++next_sequence_;
  fds = std::move(packet.fds);
  packet.fds.clear();
  return absl::OkStatus();
}

absl::Status MessageDecoder::DecodeTruncated(Packet& packet,
                                             v1::HandoffMessage& message) {
  if (absl::Status parsed = Parse(packet, message); !parsed.ok()) {
    return parsed;
  }
  const size_t required = RequiredFds(message);
  if (packet.fds.size() >= required) {
    return absl::InvalidArgumentError(
        absl::StrCat(BodyName(message), " #", message.sequence(), " carried ",
                     packet.fds.size(), " fds and more were truncated, ",
                     "expected ", required));
  }
  ++next_sequence_;
  packet.fds.clear();
  return absl::OkStatus();
}

MessageChannel::MessageChannel(UniqueFd socket, SysCalls& sys)
    : socket_(std::move(socket)), sys_(sys) {}

absl::StatusOr<SendResult> MessageChannel::Send(v1::HandoffMessage& message,
                                                int attached_fd) {
  if (attached_fd < 0) return SendWithFds(message, {});
  return SendWithFds(message, {&attached_fd, 1});
}

absl::StatusOr<SendResult> MessageChannel::SendWithFds(
    v1::HandoffMessage& message, absl::Span<const int> fds) {
  if (RequiredFds(message) != fds.size()) {
    return absl::InternalError(absl::StrCat("bug: ", BodyName(message),
                                            " sent with ", fds.size(), " fds"));
  }
  message.set_sequence(next_send_sequence_);
  if (!message.SerializeToString(&send_buffer_)) {
    return absl::InternalError("cannot serialize message");
  }
  absl::StatusOr<SendResult> result =
      SendPacket(sys_, socket_.get(), send_buffer_, fds);
  if (result.ok() && *result == SendResult::kSent) ++next_send_sequence_;
  return result;
}

absl::StatusOr<ReceiveResult> MessageChannel::Receive(
    v1::HandoffMessage& message, UniqueFd& attached_fd) {
  attached_fd.Reset();
  std::vector<UniqueFd> fds;
  absl::StatusOr<ReceiveResult> result = Receive(message, fds);
  if (result.ok() && fds.size() == 1) attached_fd = std::move(fds.front());
  return result;
}

absl::StatusOr<ReceiveResult> MessageChannel::Receive(
    v1::HandoffMessage& message, std::vector<UniqueFd>& fds) {
  fds.clear();
  absl::StatusOr<ReceiveResult> result =
      ReceivePacket(sys_, socket_.get(), receive_packet_, truncation_);
  if (!result.ok()) return result;
  absl::Status decoded;
  switch (*result) {
    case ReceiveResult::kReceived:
      decoded = decoder_.Decode(receive_packet_, message, fds);
      break;
    case ReceiveResult::kFdsTruncated:
      decoded = decoder_.DecodeTruncated(receive_packet_, message);
      break;
    case ReceiveResult::kWouldBlock:
    case ReceiveResult::kPeerClosed:
      return result;
  }
  receive_packet_.fds.clear();
  if (!decoded.ok()) return decoded;
  return result;
}

}  // namespace fdbroker::wire
