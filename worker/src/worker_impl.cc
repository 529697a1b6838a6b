#include "worker_impl.h"

#include <poll.h>
#include <sys/epoll.h>

#include <algorithm>
#include <cerrno>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "handler_threads.h"
#include "spdlog/spdlog.h"

namespace fdbroker::worker {
namespace {

// At most this many broker messages per ProcessEvents(), so that a flood of
// connections cannot starve the application's own loop. The pollable fd
// stays readable while more are queued.
constexpr int kMaxMessagesPerTurn = 256;

std::string_view View(absl::string_view s) { return {s.data(), s.size()}; }

absl::Time DeadlineFromUnixNanos(int64_t nanos) {
  return nanos > 0 ? absl::FromUnixNanos(nanos) : absl::InfiniteFuture();
}

}  // namespace

absl::StatusOr<std::unique_ptr<WorkerImpl>> WorkerImpl::Create(
    Options options, Registration registration) {
  absl::StatusOr<wire::UniqueFd> epoll_fd = CreateEpoll();
  if (!epoll_fd.ok()) return epoll_fd.status();
  absl::StatusOr<TimerFd> timer = TimerFd::Create();
  if (!timer.ok()) return timer.status();
  absl::StatusOr<WakeFd> wake = WakeFd::Create();
  if (!wake.ok()) return wake.status();
  for (auto [fd, tag] :
       {std::pair{registration.channel->fd(), kChannelTag},
        std::pair{timer->fd(), kTimerTag}, std::pair{wake->fd(), kWakeTag}}) {
    absl::Status added = EpollAdd(epoll_fd->get(), fd, EPOLLIN, tag);
    if (!added.ok()) return added;
  }
  std::unique_ptr<WorkerImpl> worker(new WorkerImpl(
      std::move(options), std::move(registration), *std::move(epoll_fd),
      *std::move(timer), *std::move(wake)));
  {
    absl::MutexLock lock(&worker->mu_);
    worker->ArmTimerLocked();
  }
  return worker;
}

WorkerImpl::WorkerImpl(Options options, Registration registration,
                       wire::UniqueFd epoll_fd, TimerFd timer, WakeFd wake)
    : capacity_(options.capacity),
      worker_id_(registration.welcome.worker_id()),
      heartbeat_interval_(registration.welcome.heartbeat_interval_ms()),
      heartbeat_timeout_(registration.welcome.heartbeat_timeout_ms()),
      on_connection_(std::move(options.on_connection)),
      on_drain_(std::move(options.on_drain)),
      epoll_fd_(std::move(epoll_fd)),
      timer_(std::move(timer)),
      wake_(std::move(wake)),
      channel_(std::move(registration.channel)),
      last_sent_(std::chrono::steady_clock::now()),
      last_received_(last_sent_) {}

WorkerImpl::~WorkerImpl() {
  absl::MutexLock lock(&mu_);
  if (channel_ != nullptr && !goodbye_sent_ && owned_.empty() &&
      outbox_.empty()) {
    // Best effort: tells the broker this was an orderly exit.
    v1::HandoffMessage goodbye;
    goodbye.mutable_goodbye()->set_reason("worker shut down");
    (void)channel_->Send(goodbye);
  }
  // Undelivered connections (outbox_, ready_) close with their UniqueFds.
}

void WorkerImpl::ProcessEvents() {
  ProcessEventsWith([this](ClientConnection connection) {
    if (on_connection_) {
      on_connection_(std::move(connection));
      return;
    }
    spdlog::error(
        "fdbroker worker: no on_connection callback, closing connection {}",
        connection.id);
    const uint64_t id = connection.id;
    connection.fd.Reset();
    ConnectionClosed(id);
  });
}

void WorkerImpl::ProcessEventsWith(
    absl::FunctionRef<void(ClientConnection)> deliver) {
  std::vector<ClientConnection> ready;
  bool announce_drain = false;
  DrainCause cause = DrainCause::kLocal;
  absl::Time deadline = absl::InfiniteFuture();
  {
    absl::MutexLock lock(&mu_);
    epoll_event events[3];
    const int count = ::epoll_wait(epoll_fd_.get(), events, 3, 0);
    bool readable = false;
    bool writable = false;
    bool timer_fired = false;
    for (int i = 0; i < count; ++i) {
      switch (events[i].data.u64) {
        case kChannelTag:
          readable = (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0;
          writable = (events[i].events & EPOLLOUT) != 0;
          break;
        case kTimerTag:
          timer_fired = timer_.Consume();
          break;
        case kWakeTag:
          wake_.Consume();
          wake_signalled_ = false;
          break;
      }
    }
    if (writable) FlushOutboxLocked();
    if (readable) ReceiveLocked();
    if (timer_fired) CheckHeartbeatLocked();
    ReportClosedLocked();
    SayGoodbyeIfDrainedLocked();
    ready.swap(ready_);
    if (drain_to_announce_) {
      drain_to_announce_ = false;
      announce_drain = true;
      cause = drain_cause_;
      deadline = drain_deadline_;
    }
  }
  // Connections first, so that the application's drain pass sees them all.
  for (ClientConnection& connection : ready) deliver(std::move(connection));
  if (announce_drain && on_drain_) on_drain_(cause, deadline);
}

void WorkerImpl::ReceiveLocked() {
  std::vector<ClientConnection> taken;
  std::vector<uint64_t> rejected;
  wire::UniqueFd fd;
  for (int i = 0; i < kMaxMessagesPerTurn; ++i) {
    if (channel_ == nullptr || goodbye_sent_) break;
    absl::StatusOr<wire::ReceiveResult> received =
        channel_->Receive(incoming_, fd);
    if (!received.ok()) {
      LoseChannelLocked(received.status().message());
      break;
    }
    if (*received == wire::ReceiveResult::kWouldBlock) break;
    if (*received == wire::ReceiveResult::kPeerClosed) {
      LoseChannelLocked("the broker closed the channel");
      break;
    }
    last_received_ = std::chrono::steady_clock::now();
    switch (incoming_.body_case()) {
      case v1::HandoffMessage::kConnection: {
        v1::Connection& offered = *incoming_.mutable_connection();
        const uint64_t id = offered.connection_id();
        const bool duplicate =
            owned_.contains(id) ||
            std::any_of(taken.begin(), taken.end(),
                        [id](const ClientConnection& c) { return c.id == id; });
        if (duplicate) {
          LoseChannelLocked(
              absl::StrCat("connection ", id, " offered twice by the broker"));
          break;
        }
        const bool full =
            capacity_ > 0 &&
            owned_.size() + unsent_acks_ + taken.size() >= capacity_;
        if (draining_ || full) {
          // Our copy closes here; the broker still holds the socket.
          fd.Reset();
          rejected.push_back(id);
          break;
        }
        ClientConnection& connection = taken.emplace_back();
        connection.id = id;
        connection.fd = std::move(fd);
        connection.peer_address = std::move(*offered.mutable_peer_address());
        connection.local_address = std::move(*offered.mutable_local_address());
        connection.accept_time =
            absl::FromUnixNanos(offered.accept_time_unix_nanos());
        connection.initial_data = std::move(*offered.mutable_initial_data());
        break;
      }
      case v1::HandoffMessage::kDrain:
        spdlog::debug("fdbroker worker: Drain from the broker");
        BeginDrainLocked(
            DrainCause::kBrokerRequest,
            DeadlineFromUnixNanos(incoming_.drain().deadline_unix_nanos()));
        break;
      case v1::HandoffMessage::kHeartbeat:
        break;
      default:
        LoseChannelLocked(absl::StrCat("unexpected ", wire::BodyName(incoming_),
                                       " message from the broker"));
        break;
    }
  }
  // Without a channel nothing can be acked: `taken` closes undelivered and
  // the broker re-places those connections.
  if (channel_ == nullptr) return;
  if (draining_) {
    // A Drain in the same batch also returns the connections before it.
    for (const ClientConnection& connection : taken) {
      rejected.push_back(connection.id);
    }
    taken.clear();
  }
  if (!rejected.empty()) {
    Outgoing reject;
    v1::Reject& body = *reject.message.mutable_reject();
    body.mutable_connection_ids()->Add(rejected.begin(), rejected.end());
    body.set_reason(draining_ ? "worker is draining"
                              : absl::StrCat("worker is at capacity (",
                                             capacity_, " connections)"));
    SendLocked(std::move(reject));
  }
  if (!taken.empty()) {
    Outgoing ack;
    v1::Ack& body = *ack.message.mutable_ack();
    for (const ClientConnection& connection : taken) {
      body.add_connection_ids(connection.id);
    }
    ack.acked = std::move(taken);
    SendLocked(std::move(ack));
  }
}

void WorkerImpl::SendLocked(Outgoing outgoing) {
  // Without a channel the message is dropped, and any connections it was
  // to ack close undelivered with it.
  if (channel_ == nullptr) return;
  if (outbox_.empty()) {
    absl::StatusOr<wire::SendResult> sent = channel_->Send(outgoing.message);
    if (!sent.ok()) {
      LoseChannelLocked(absl::StrCat("cannot send ",
                                     wire::BodyName(outgoing.message), ": ",
                                     sent.status().message()));
      return;
    }
    if (*sent == wire::SendResult::kSent) {
      OnSentLocked(outgoing);
      return;
    }
  }
  unsent_acks_ += outgoing.acked.size();
  outbox_.push_back(std::move(outgoing));
  SetWritableInterestLocked(true);
}

void WorkerImpl::FlushOutboxLocked() {
  while (channel_ != nullptr && !outbox_.empty()) {
    absl::StatusOr<wire::SendResult> sent =
        channel_->Send(outbox_.front().message);
    if (!sent.ok()) {
      LoseChannelLocked(absl::StrCat("cannot send ",
                                     wire::BodyName(outbox_.front().message),
                                     ": ", sent.status().message()));
      return;
    }
    if (*sent == wire::SendResult::kWouldBlock) return;
    Outgoing outgoing = std::move(outbox_.front());
    outbox_.pop_front();
    unsent_acks_ -= outgoing.acked.size();
    OnSentLocked(outgoing);
  }
  if (channel_ == nullptr) return;
  SetWritableInterestLocked(false);
  if (goodbye_sent_) {
    CloseChannelLocked();
    return;
  }
  // Heartbeats were held back while the outbox was blocked.
  ArmTimerLocked();
}

void WorkerImpl::OnSentLocked(Outgoing& outgoing) {
  last_sent_ = std::chrono::steady_clock::now();
  for (ClientConnection& connection : outgoing.acked) {
    owned_.emplace(connection.id, connection.peer_address);
    ready_.push_back(std::move(connection));
  }
  outgoing.acked.clear();
}

void WorkerImpl::ReportClosedLocked() {
  if (closed_to_report_.empty() || channel_ == nullptr || goodbye_sent_) {
    return;
  }
  Outgoing closed;
  closed.message.mutable_closed()->mutable_connection_ids()->Add(
      closed_to_report_.begin(), closed_to_report_.end());
  closed_to_report_.clear();
  SendLocked(std::move(closed));
}

void WorkerImpl::CheckHeartbeatLocked() {
  if (channel_ == nullptr || goodbye_sent_) return;
  const MonoTime now = std::chrono::steady_clock::now();
  if (heartbeat_timeout_.count() > 0 &&
      now - last_received_ >= heartbeat_timeout_) {
    LoseChannelLocked(absl::StrCat(
        "nothing heard from the broker for ",
        std::chrono::duration_cast<std::chrono::milliseconds>(now -
                                                              last_received_)
            .count(),
        " ms (heartbeat timeout ", heartbeat_timeout_.count(), " ms)"));
    return;
  }
  if (heartbeat_interval_.count() > 0 && outbox_.empty() &&
      now - last_sent_ >= heartbeat_interval_) {
    Outgoing heartbeat;
    heartbeat.message.mutable_heartbeat()->set_sent_unix_nanos(
        absl::ToUnixNanos(absl::Now()));
    SendLocked(std::move(heartbeat));
  }
  ArmTimerLocked();
}

void WorkerImpl::ArmTimerLocked() {
  if (channel_ == nullptr) return;
  MonoTime next = MonoTime::max();
  // While the outbox is blocked we are not silent, just stalled: the flush
  // re-arms the heartbeat.
  if (heartbeat_interval_.count() > 0 && outbox_.empty()) {
    next = std::min(next, last_sent_ + heartbeat_interval_);
  }
  if (heartbeat_timeout_.count() > 0) {
    next = std::min(next, last_received_ + heartbeat_timeout_);
  }
  absl::Status armed =
      next == MonoTime::max() ? timer_.Disarm() : timer_.ArmAt(next);
  if (!armed.ok()) {
    spdlog::error("fdbroker worker: heartbeat timer: {}", armed.ToString());
  }
}

void WorkerImpl::SayGoodbyeIfDrainedLocked() {
  if (!draining_ || channel_ == nullptr || goodbye_sent_ || !owned_.empty() ||
      unsent_acks_ > 0 || !closed_to_report_.empty()) {
    return;
  }
  goodbye_sent_ = true;
  Outgoing goodbye;
  goodbye.message.mutable_goodbye()->set_reason(
      absl::StrCat("drained (", DrainCauseName(drain_cause_), ")"));
  SendLocked(std::move(goodbye));
  // Once Goodbye is out the channel is closed; if it is still queued,
  // FlushOutboxLocked() closes it.
  if (channel_ != nullptr && outbox_.empty()) CloseChannelLocked();
}

void WorkerImpl::BeginDrainLocked(DrainCause cause, absl::Time deadline) {
  if (draining_) {
    // A later broker Drain may bring the deadline closer; announce once.
    drain_deadline_ = std::min(drain_deadline_, deadline);
    return;
  }
  draining_ = true;
  drain_cause_ = cause;
  drain_deadline_ = deadline;
  drain_to_announce_ = true;
}

void WorkerImpl::LoseChannelLocked(absl::string_view reason) {
  if (channel_ == nullptr) return;
  if (goodbye_sent_) {
    spdlog::debug("fdbroker worker: broker channel ended after Goodbye: {}",
                  View(reason));
  } else {
    spdlog::warn(
        "fdbroker worker: lost the broker channel: {}; keeping {} active "
        "connections, taking no new ones",
        View(reason), owned_.size());
  }
  CloseChannelLocked();
  outbox_.clear();  // Closes the fds of connections whose Ack was not sent.
  unsent_acks_ = 0;
  closed_to_report_.clear();
  BeginDrainLocked(DrainCause::kBrokerLost, absl::InfiniteFuture());
}

void WorkerImpl::CloseChannelLocked() {
  if (channel_ == nullptr) return;
  absl::Status removed = EpollDelete(epoll_fd_.get(), channel_->fd());
  if (!removed.ok()) {
    spdlog::error("fdbroker worker: {}", removed.ToString());
  }
  channel_.reset();
  want_writable_ = false;
  (void)timer_.Disarm();
  // The application may be waiting for finished(): make it look.
  WakeLocked();
}

void WorkerImpl::SetWritableInterestLocked(bool want) {
  if (channel_ == nullptr || want == want_writable_) return;
  absl::Status modified =
      EpollModify(epoll_fd_.get(), channel_->fd(),
                  want ? (EPOLLIN | EPOLLOUT) : EPOLLIN, kChannelTag);
  if (!modified.ok()) {
    spdlog::error("fdbroker worker: {}", modified.ToString());
    return;
  }
  want_writable_ = want;
}

void WorkerImpl::WakeLocked() {
  if (wake_signalled_) return;
  wake_signalled_ = true;
  wake_.Signal();
}

void WorkerImpl::ConnectionClosed(uint64_t id) {
  absl::MutexLock lock(&mu_);
  if (owned_.erase(id) == 0) {
    spdlog::warn(
        "fdbroker worker: ConnectionClosed({}) for a connection that is not "
        "active",
        id);
    return;
  }
  if (channel_ != nullptr) closed_to_report_.push_back(id);
  WakeLocked();
}

void WorkerImpl::StartDrain() {
  absl::MutexLock lock(&mu_);
  BeginDrainLocked(DrainCause::kLocal, absl::InfiniteFuture());
  WakeLocked();
}

bool WorkerImpl::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

bool WorkerImpl::finished() const {
  absl::MutexLock lock(&mu_);
  return draining_ && channel_ == nullptr && owned_.empty();
}

size_t WorkerImpl::active_connections() const {
  absl::MutexLock lock(&mu_);
  return owned_.size();
}

absl::Status WorkerImpl::ServeThreadPerConnection(ConnectionHandler handler) {
  {
    absl::MutexLock lock(&mu_);
    if (serving_threads_) {
      return absl::FailedPreconditionError(
          "ServeThreadPerConnection() is already running");
    }
    serving_threads_ = true;
  }
  HandlerThreads threads(*this, std::move(handler));
  for (;;) {
    ProcessEventsWith([&threads](ClientConnection connection) {
      threads.Start(std::move(connection));
    });
    threads.JoinFinished();
    if (finished()) break;
    pollfd readable{epoll_fd_.get(), POLLIN, 0};
    if (::poll(&readable, 1, -1) < 0 && errno != EINTR) {
      const int error = errno;
      threads.JoinAll();
      return absl::ErrnoToStatus(error, "poll");
    }
  }
  threads.JoinAll();
  absl::MutexLock lock(&mu_);
  serving_threads_ = false;
  return absl::OkStatus();
}

}  // namespace fdbroker::worker
