#ifndef FDBROKER_PROTO_WIRE_FD_PASSING_H_
#define FDBROKER_PROTO_WIRE_FD_PASSING_H_

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker::wire {

// Largest packet either side sends or accepts.
inline constexpr size_t kMaxPacketBytes = 64 * 1024;
// Release.unread_data limit (protocol.md §5): the bytes must fit in the
// Connection packet that carries them on, with its other fields.
inline constexpr size_t kMaxUnreadData = kMaxPacketBytes - 512;
// The kernel's SCM_MAX_FD: the most fds one sendmsg may carry.
inline constexpr size_t kMaxFdsPerPacket = 253;

enum class SendResult { kSent, kWouldBlock };
// kFdsTruncated: the packet arrived whole but the kernel could not install
// every fd attached to it (MSG_CTRUNC: the receiver is out of fds). Reported
// only to a receiver that asked for it (Truncation::kReport).
enum class ReceiveResult { kReceived, kWouldBlock, kPeerClosed, kFdsTruncated };
// What ReceivePacket does with truncated ancillary data (MSG_CTRUNC).
enum class Truncation {
  kError,   // An error, like any malformed packet.
  kReport,  // kFdsTruncated, the data and whatever fds did arrive kept.
};

// One SOCK_SEQPACKET packet and the fds that arrived with it. The fds are
// owned from the moment recvmsg returns, so an error path cannot leak them.
struct Packet {
  std::string data;
  std::vector<UniqueFd> fds;
  // Where ReceivePacket() lands a packet before copying its few bytes to
  // `data`: allocated once and never zero-filled (re-growing `data` to the
  // packet limit on every call would memset 64 KiB per message).
  std::unique_ptr<char[]> receive_buffer;
};

// Sends `data` as one packet with `fds` attached (SCM_RIGHTS). The caller
// keeps its fds: the kernel duplicates them into the receiver. Never raises
// SIGPIPE. Errors (peer gone, oversize) are statuses; EAGAIN is kWouldBlock.
absl::StatusOr<SendResult> SendPacket(SysCalls& sys, int socket,
                                      absl::Span<const char> data,
                                      absl::Span<const int> fds);

// Receives one packet into `packet` (its buffer is reused between calls, so a
// steady stream of packets does not allocate). Received fds are close-on-exec
// (MSG_CMSG_CLOEXEC). A truncated packet or unknown ancillary data is an
// error, and so is truncated ancillary data unless `truncation` is kReport;
// whatever fds did arrive are closed with `packet`.
absl::StatusOr<ReceiveResult> ReceivePacket(
    SysCalls& sys, int socket, Packet& packet,
    Truncation truncation = Truncation::kError);

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_FD_PASSING_H_
