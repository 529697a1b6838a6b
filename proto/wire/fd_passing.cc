#include "wire/fd_passing.h"

#include <sys/socket.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fdbroker::wire {
namespace {

// Ancillary buffer big enough for kMaxFdsPerPacket fds, correctly aligned.
union ControlBuffer {
  char buf[CMSG_SPACE(sizeof(int) * kMaxFdsPerPacket)];
  cmsghdr align;
};

}  // namespace

absl::StatusOr<SendResult> SendPacket(SysCalls& sys, int socket,
                                      absl::Span<const char> data,
                                      absl::Span<const int> fds) {
  if (data.size() > kMaxPacketBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("packet of ", data.size(), " bytes exceeds the limit of ",
                     kMaxPacketBytes));
  }
  if (fds.size() > kMaxFdsPerPacket) {
    return absl::InvalidArgumentError(absl::StrCat(
        fds.size(), " fds exceed the limit of ", kMaxFdsPerPacket));
  }
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  ControlBuffer control;
  if (!fds.empty()) {
    const size_t fd_bytes = sizeof(int) * fds.size();
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(fd_bytes);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fd_bytes);
    std::memcpy(CMSG_DATA(cmsg), fds.data(), fd_bytes);
  }
  for (;;) {
    ssize_t n = sys.SendMsg(socket, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      // SOCK_SEQPACKET sends a packet whole or not at all.
      return SendResult::kSent;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return SendResult::kWouldBlock;
    return absl::ErrnoToStatus(errno, "sendmsg");
  }
}

absl::StatusOr<ReceiveResult> ReceivePacket(SysCalls& sys, int socket,
                                            Packet& packet,
                                            Truncation truncation) {
  packet.fds.clear();
  packet.data.clear();
  // One spare byte so that an oversized packet shows up as MSG_TRUNC.
  constexpr size_t kBufferBytes = kMaxPacketBytes + 1;
  if (packet.receive_buffer == nullptr) {
    packet.receive_buffer.reset(new char[kBufferBytes]);
  }
  iovec iov{packet.receive_buffer.get(), kBufferBytes};
  ControlBuffer control;
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof(control.buf);
  ssize_t n;
  for (;;) {
    n = sys.RecvMsg(socket, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n >= 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return ReceiveResult::kWouldBlock;
    }
    return absl::ErrnoToStatus(errno, "recvmsg");
  }
  // Take ownership of every fd before any check can return early.
  bool unexpected_control = false;
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr;
       cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
      const size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
        packet.fds.emplace_back(fd);
      }
    } else {
      unexpected_control = true;
    }
  }
  if (n == 0 && packet.fds.empty() && !unexpected_control) {
    // SOCK_SEQPACKET reports an orderly shutdown as a zero-length read; a
    // zero-length packet is never sent by this protocol.
    return ReceiveResult::kPeerClosed;
  }
  packet.data.assign(packet.receive_buffer.get(), static_cast<size_t>(n));
  // The buffer has one spare byte: a packet that fills it is oversized too.
  if ((msg.msg_flags & MSG_TRUNC) || static_cast<size_t>(n) > kMaxPacketBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "packet larger than the limit of ", kMaxPacketBytes, " bytes"));
  }
  if (unexpected_control) {
    return absl::InvalidArgumentError("unexpected ancillary data type");
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    // The sender cannot attach more than the control buffer holds (the
    // kernel's SCM_MAX_FD), so this is the receiver out of fds.
    if (truncation == Truncation::kReport) return ReceiveResult::kFdsTruncated;
    return absl::InvalidArgumentError(
        absl::StrCat("ancillary data truncated (more than ", kMaxFdsPerPacket,
                     " fds or out of fds)"));
  }
  return ReceiveResult::kReceived;
}

}  // namespace fdbroker::wire
