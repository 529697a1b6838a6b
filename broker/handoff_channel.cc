#include "broker/handoff_channel.h"

#include <sys/epoll.h>
#include <sys/socket.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace fdbroker {
namespace {

// Most messages handled per wake-up, so that one chatty worker cannot starve
// the listener and the other channels.
constexpr int kMaxMessagesPerWake = 256;

}  // namespace

absl::StatusOr<std::unique_ptr<HandoffChannel>> HandoffChannel::Create(
    EventLoop& loop, wire::UniqueFd socket, const ucred& peer,
    wire::SysCalls& sys, Delegate& delegate) {
  return Create(loop, wire::MessageChannel(std::move(socket), sys), peer,
                delegate);
}

absl::StatusOr<std::unique_ptr<HandoffChannel>> HandoffChannel::Create(
    EventLoop& loop, wire::MessageChannel channel, const ucred& peer,
    Delegate& delegate) {
  std::unique_ptr<HandoffChannel> created(
      new HandoffChannel(loop, std::move(channel), peer, delegate));
  absl::Status status = created->Init();
  if (!status.ok()) return status;
  return created;
}

HandoffChannel::HandoffChannel(EventLoop& loop, wire::MessageChannel channel,
                               const ucred& peer, Delegate& delegate)
    : loop_(loop),
      channel_(std::move(channel)),
      peer_(peer),
      delegate_(&delegate),
      last_received_nanos_(loop.NowNanos()),
      last_sent_nanos_(loop.NowNanos()) {}

HandoffChannel::~HandoffChannel() = default;

absl::Status HandoffChannel::Init() {
  absl::StatusOr<std::unique_ptr<IoWatch>> watch = loop_.Watch(
      channel_.fd(), EPOLLIN, [this](uint32_t events) { OnEvents(events); });
  if (!watch.ok()) return watch.status();
  watch_ = *std::move(watch);
  return absl::OkStatus();
}

void HandoffChannel::Close(const absl::Status& reason) {
  if (closed_) return;
  closed_ = true;
  ::shutdown(channel_.fd(), SHUT_RD);
  // Collect what the worker sent before the shutdown, up to the first
  // invalid message (after which nothing it says can be trusted).
  for (;;) {
    v1::HandoffMessage message;
    wire::UniqueFd fd;
    absl::StatusOr<wire::ReceiveResult> result = channel_.Receive(message, fd);
    if (!result.ok() || *result != wire::ReceiveResult::kReceived) break;
    last_words_.emplace_back(std::move(message), std::move(fd));
  }
  watch_.reset();
  queue_.clear();
  // Deferred: the caller may be in the middle of using the delegate's state.
  std::weak_ptr<bool> alive = alive_;
  loop_.RunSoon([this, alive, reason] {
    if (alive.lock() == nullptr) return;
    for (auto& [message, fd] : last_words_) {
      delegate_->OnMessage(*this, message, std::move(fd));
      if (alive.lock() == nullptr) return;
    }
    last_words_.clear();
    delegate_->OnChannelClosed(*this, reason);
  });
}

absl::StatusOr<wire::SendResult> HandoffChannel::SendConnections(
    v1::HandoffMessage& message, absl::Span<const int> client_fds) {
  if (closed_) return absl::UnavailableError("channel closed");
  if (!queue_.empty()) return wire::SendResult::kWouldBlock;
  absl::StatusOr<wire::SendResult> result =
      channel_.SendWithFds(message, client_fds);
  if (result.ok()) {
    if (*result == wire::SendResult::kSent) {
      last_sent_nanos_ = loop_.NowNanos();
    } else {
      blocked_ = true;
      UpdateWatch();
    }
  }
  return result;
}

absl::Status HandoffChannel::SendWithFds(v1::HandoffMessage& message,
                                         absl::Span<const int> fds) {
  if (closed_) return absl::UnavailableError("channel closed");
  if (!queue_.empty()) return absl::UnavailableError("channel congested");
  absl::StatusOr<wire::SendResult> result = channel_.SendWithFds(message, fds);
  if (!result.ok()) return result.status();
  if (*result != wire::SendResult::kSent) {
    return absl::UnavailableError("channel full");
  }
  last_sent_nanos_ = loop_.NowNanos();
  return absl::OkStatus();
}

void HandoffChannel::SendControl(v1::HandoffMessage message) {
  if (closed_) return;
  if (queue_.size() >= kMaxQueuedControl) {
    // A peer that does not read cannot make the broker hold unbounded
    // memory (heartbeats alone would queue forever).
    Close(absl::ResourceExhaustedError(absl::StrCat(
        kMaxQueuedControl, " control messages queued and unread")));
    return;
  }
  queue_.push_back(std::move(message));
  FlushQueue();
}

void HandoffChannel::FlushQueue() {
  while (!queue_.empty() && !closed_) {
    absl::StatusOr<wire::SendResult> result = channel_.Send(queue_.front());
    if (!result.ok()) {
      Close(absl::UnavailableError(
          absl::StrCat("send failed: ", result.status().message())));
      return;
    }
    if (*result == wire::SendResult::kWouldBlock) break;
    last_sent_nanos_ = loop_.NowNanos();
    queue_.pop_front();
  }
  if (!closed_) UpdateWatch();
}

void HandoffChannel::UpdateWatch() {
  watch_->SetEvents(queue_.empty() && !blocked_ ? EPOLLIN
                                                : (EPOLLIN | EPOLLOUT));
}

void HandoffChannel::OnEvents(uint32_t events) {
  if (events & EPOLLOUT) {
    const bool was_congested = congested();
    blocked_ = false;
    FlushQueue();
    if (closed_) return;
    if (was_congested && !congested()) delegate_->OnWritable(*this);
  }
  if (closed_) return;
  if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) ReadMessages();
}

void HandoffChannel::ReadMessages() {
  for (int i = 0; i < kMaxMessagesPerWake && !closed_; ++i) {
    wire::UniqueFd fd;
    absl::StatusOr<wire::ReceiveResult> result =
        channel_.Receive(incoming_, fd);
    if (!result.ok()) {
      Close(result.status());
      return;
    }
    switch (*result) {
      case wire::ReceiveResult::kWouldBlock:
        return;
      case wire::ReceiveResult::kPeerClosed:
        Close(absl::UnavailableError("peer closed the channel"));
        return;
      case wire::ReceiveResult::kReceived:
        last_received_nanos_ = loop_.NowNanos();
        delegate_->OnMessage(*this, incoming_, std::move(fd));
        break;
    }
  }
}

}  // namespace fdbroker
