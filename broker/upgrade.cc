#include "broker/upgrade.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "fdbroker/v1/handoff.pb.h"
#include "spdlog/spdlog.h"
#include "wire/message_channel.h"

namespace fdbroker {

namespace {

// One attempt; Aborted when the running broker is busy with another
// upgrade (worth asking again).
absl::StatusOr<UpgradeSockets> RequestUpgradeOnce(
    const std::string& socket_path, absl::Time deadline) {
  wire::UniqueFd socket(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!socket) return absl::ErrnoToStatus(errno, "socket");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError("--socket path too long");
  }
  std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());
  if (::connect(socket.get(), reinterpret_cast<sockaddr*>(&addr),
                sizeof(addr)) != 0) {
    return absl::ErrnoToStatus(
        errno, absl::StrCat("--upgrade: no running broker on ", socket_path));
  }
  wire::MessageChannel channel(std::move(socket));
  v1::HandoffMessage request;
  request.mutable_upgrade_request()->mutable_version()->set_major(
      wire::kProtocolMajor);
  request.mutable_upgrade_request()->mutable_version()->set_minor(
      wire::kProtocolMinor);
  request.mutable_upgrade_request()->set_pid(::getpid());
  absl::StatusOr<wire::SendResult> sent = channel.Send(request);
  if (!sent.ok()) return sent.status();

  for (;;) {
    v1::HandoffMessage reply;
    std::vector<wire::UniqueFd> fds;
    absl::StatusOr<wire::ReceiveResult> received = channel.Receive(reply, fds);
    if (!received.ok()) return received.status();
    if (*received == wire::ReceiveResult::kPeerClosed) {
      return absl::UnavailableError(
          "--upgrade: the running broker closed the channel");
    }
    if (*received == wire::ReceiveResult::kReceived) {
      if (reply.has_refusal() &&
          reply.refusal().reason() == v1::REFUSAL_REASON_UPGRADE_IN_PROGRESS) {
        return absl::AbortedError(
            absl::StrCat("--upgrade refused: ", reply.refusal().message()));
      }
      if (reply.has_refusal()) {
        return absl::FailedPreconditionError(
            absl::StrCat("--upgrade refused: ", reply.refusal().message()));
      }
      if (reply.has_upgrade_handover()) {
        // [0] the first listener, [1] the hand-off socket, then the
        // further listeners, then the kernel placement slots (the channel
        // checked the count).
        const v1::UpgradeHandover& handover = reply.upgrade_handover();
        const size_t slots_from =
            2 + static_cast<size_t>(handover.more_listen_addresses_size());
        UpgradeSockets sockets;
        sockets.handoff = std::move(fds[1]);
        sockets.listeners.push_back(std::move(fds[0]));
        for (size_t i = 2; i < fds.size(); ++i) {
          (i < slots_from ? sockets.listeners : sockets.kernel_slots)
              .push_back(std::move(fds[i]));
        }
        sockets.first_connection_id = handover.first_connection_id();
        sockets.kernel_layout_unknown = handover.kernel_layout_unknown();
        sockets.kernel_slots_in_use = handover.kernel_slots_in_use();
        sockets.channel =
            std::make_unique<wire::MessageChannel>(std::move(channel));
        return sockets;
      }
      continue;  // Heartbeats and the like: keep waiting.
    }
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left <= 0) {
      return absl::DeadlineExceededError(
          "--upgrade: the running broker did not hand over in time");
    }
    pollfd p{channel.fd(), POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(left));
  }
}

}  // namespace

absl::StatusOr<UpgradeSockets> RequestUpgrade(const std::string& socket_path,
                                              absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    absl::StatusOr<UpgradeSockets> sockets =
        RequestUpgradeOnce(socket_path, deadline);
    if (!absl::IsAborted(sockets.status()) || absl::Now() >= deadline) {
      return sockets;
    }
    // Another upgrade (or the undoing of a failed one) first.
    absl::SleepFor(absl::Milliseconds(100));
  }
}

absl::Status ReportUpgradeReady(wire::MessageChannel& channel) {
  // A Refusal already sent means the running broker gave up and serves on.
  for (;;) {
    v1::HandoffMessage reply;
    std::vector<wire::UniqueFd> fds;
    absl::StatusOr<wire::ReceiveResult> received = channel.Receive(reply, fds);
    if (!received.ok() || *received == wire::ReceiveResult::kPeerClosed) {
      return absl::OkStatus();  // Gone: this broker is the one that serves.
    }
    if (*received != wire::ReceiveResult::kReceived) break;
    if (reply.has_refusal()) {
      return absl::AbortedError(
          absl::StrCat("the running broker gave up on the upgrade: ",
                       reply.refusal().message()));
    }
  }
  v1::HandoffMessage ready;
  ready.mutable_upgrade_ready()->set_pid(::getpid());
  // A send error means the running broker is gone: nothing to tell.
  (void)channel.Send(ready);
  return absl::OkStatus();
}

PendingUpgrade::PendingUpgrade(
    EventLoop& loop, std::unique_ptr<HandoffChannel> channel,
    uint32_t peer_minor, absl::Duration timeout,
    absl::AnyInvocable<void()> on_ready,
    absl::AnyInvocable<void(const absl::Status&)> on_abort)
    : channel_(std::move(channel)),
      peer_minor_(peer_minor),
      on_ready_(std::move(on_ready)),
      on_abort_(std::move(on_abort)),
      timer_(loop) {
  channel_->set_delegate(*this);
  timer_.Arm(timeout, [this, timeout] {
    Abort(absl::DeadlineExceededError(absl::StrCat(
        "the new broker was not up within ", absl::FormatDuration(timeout))));
  });
}

void PendingUpgrade::Commit() {
  if (state_ != State::kWaiting) return;
  state_ = State::kCommitted;
  timer_.Cancel();
}

void PendingUpgrade::SendAccepting() {
  if (inbox() == nullptr) return;
  v1::HandoffMessage accepting;
  accepting.mutable_upgrade_accepting();
  channel_->SendControl(std::move(accepting));
}

void PendingUpgrade::NewBrokerAccepts() {
  if (on_accepting_ == nullptr) return;
  // Cleared first: it may send, and so re-enter through a channel close.
  absl::AnyInvocable<void()> callback = std::move(on_accepting_);
  on_accepting_ = nullptr;
  callback();
}

void PendingUpgrade::OnMessage(HandoffChannel&, v1::HandoffMessage& message,
                               wire::UniqueFd) {
  if (state_ == State::kCommitted && message.has_upgrade_accepting()) {
    spdlog::info("upgrade: the new broker accepts ({} worker(s) there)",
                 message.upgrade_accepting().workers());
    NewBrokerAccepts();
    return;
  }
  if (state_ != State::kWaiting) return;
  if (message.has_upgrade_ready()) {
    Commit();
    on_ready_();
    return;
  }
  if (message.has_heartbeat()) return;
  Abort(absl::InvalidArgumentError(absl::StrCat("the new broker sent ",
                                                wire::BodyName(message),
                                                " instead of upgrade_ready")));
}

void PendingUpgrade::OnChannelClosed(HandoffChannel&,
                                     const absl::Status& reason) {
  if (state_ == State::kCommitted) return NewBrokerAccepts();
  if (state_ != State::kWaiting) return;
  Abort(absl::UnavailableError(absl::StrCat(
      "the new broker went away before it was up (", reason.ToString(), ")")));
}

void PendingUpgrade::Abort(const absl::Status& reason) {
  if (state_ != State::kWaiting) return;
  state_ = State::kAborted;
  timer_.Cancel();
  if (!channel_->closed()) {
    v1::HandoffMessage refusal;
    refusal.mutable_refusal()->set_reason(v1::REFUSAL_REASON_SHUTTING_DOWN);
    refusal.mutable_refusal()->set_message(std::string(reason.message()));
    channel_->SendControl(std::move(refusal));
    channel_->Close(reason);
  }
  on_abort_(reason);
}

absl::StatusOr<std::unique_ptr<UpgradeInbox>> UpgradeInbox::Create(
    EventLoop& loop, wire::MessageChannel channel, Sink sink,
    absl::AnyInvocable<void()> on_accepting,
    absl::AnyInvocable<void()> on_closed) {
  const int flags = ::fcntl(channel.fd(), F_GETFL);
  if (flags < 0 || ::fcntl(channel.fd(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return absl::ErrnoToStatus(errno, "upgrade channel: O_NONBLOCK");
  }
  ucred peer{};
  socklen_t length = sizeof(peer);
  (void)::getsockopt(channel.fd(), SOL_SOCKET, SO_PEERCRED, &peer, &length);
  std::unique_ptr<UpgradeInbox> inbox(new UpgradeInbox(
      std::move(sink), std::move(on_accepting), std::move(on_closed)));
  absl::StatusOr<std::unique_ptr<HandoffChannel>> handoff =
      HandoffChannel::Create(loop, std::move(channel), peer, *inbox);
  if (!handoff.ok()) return handoff.status();
  inbox->channel_ = *std::move(handoff);
  return inbox;
}

void UpgradeInbox::ReportAccepting(uint32_t workers) {
  if (channel_->closed()) return;
  v1::HandoffMessage accepting;
  accepting.mutable_upgrade_accepting()->set_workers(workers);
  channel_->SendControl(std::move(accepting));
}

void UpgradeInbox::OnMessage(HandoffChannel& channel,
                             v1::HandoffMessage& message, wire::UniqueFd fd) {
  if (message.has_upgrade_accepting()) {
    on_accepting_();
    return;
  }
  if (!message.has_connection()) {
    channel.Close(absl::InvalidArgumentError(
        absl::StrCat("the previous broker sent ", wire::BodyName(message),
                     " after the upgrade")));
    return;
  }
  ++received_;
  sink_(message.connection(), std::move(fd));
}

void UpgradeInbox::OnChannelClosed(HandoffChannel&,
                                   const absl::Status& reason) {
  if (received_ > 0 || !reason.ok()) {
    spdlog::info(
        "upgrade: the previous broker passed on {} connection(s) it could "
        "not place ({})",
        received_, reason.ok() ? "done" : reason.ToString());
  }
  on_closed_();
}

absl::StatusOr<std::vector<wire::UniqueFd>> TakeActivatedListeners() {
  std::vector<wire::UniqueFd> fds;
  const char* pid_text = std::getenv("LISTEN_PID");
  const char* fds_text = std::getenv("LISTEN_FDS");
  if (pid_text == nullptr || fds_text == nullptr) return fds;
  int pid = 0, count = 0;
  const bool for_us = absl::SimpleAtoi(pid_text, &pid) && pid == ::getpid();
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  if (!for_us) return fds;
  // 253: the most fds an upgrade can hand over in one packet.
  if (!absl::SimpleAtoi(fds_text, &count) || count < 1 || count > 252) {
    return absl::InvalidArgumentError(
        absl::StrCat("LISTEN_FDS=", fds_text, ": expected 1 to 252"));
  }
  constexpr int kFirstActivatedFd = 3;  // SD_LISTEN_FDS_START.
  for (int i = 0; i < count; ++i) fds.emplace_back(kFirstActivatedFd + i);
  return fds;
}

}  // namespace fdbroker
