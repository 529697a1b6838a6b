#include "worker_impl.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "google/protobuf/io/coded_stream.h"
#include "handler_threads.h"
#include "spdlog/spdlog.h"
#include "stack_dump.h"
#include "wire/socket_address.h"

namespace fdbroker::worker {
namespace {

// At most this many broker messages per ProcessEvents(), so that a flood of
// connections cannot starve the application's own loop. The pollable fd
// stays readable while more are queued.
constexpr int kMaxMessagesPerTurn = 256;
// Closed reports wait up to this long for an Ack to travel with, so that a
// busy worker's closes cost the broker no wake-up of their own (they arrive
// together with the next Ack). The broker's load figures for this worker lag
// by at most this much. Workers with a capacity report at once (their room
// depends on it), and so does a draining worker (Goodbye waits for it).
constexpr std::chrono::milliseconds kClosedReportDelay(5);
constexpr size_t kMaxClosedPerReport = 256;
// Most accepts from a granted listener per ProcessEvents().
constexpr int kMaxAcceptsPerTurn = 64;

// Reconnect back-off: the first attempt this long after the loss, then
// doubling up to the cap. Short, because a restarted broker waits only
// about 2 s for its old workers before it starts new ones.
constexpr std::chrono::milliseconds kFirstRetryDelay(50);
constexpr std::chrono::milliseconds kMaxRetryDelay(1000);
// Failed attempts logged one by one; later ones are silent until the
// outcome (reconnected or gave up).
constexpr int kLoggedAttempts = 3;
// Room kept free in a re-registration Hello's packet.
constexpr size_t kHelloSlack = 1024;
// Durations beyond this count as forever (and cannot overflow MonoTime).
constexpr std::chrono::hours kForever(24 * 365 * 100);

std::string_view View(absl::string_view s) { return {s.data(), s.size()}; }

absl::Time DeadlineFromUnixNanos(int64_t nanos) {
  return nanos > 0 ? absl::FromUnixNanos(nanos) : absl::InfiniteFuture();
}

ReleaseReason ReasonFromProto(v1::ReleaseReason reason) {
  return reason == v1::RELEASE_REASON_DRAIN ? ReleaseReason::kDrain
                                            : ReleaseReason::kRebalance;
}

v1::ReleaseReason ReasonToProto(ReleaseReason reason) {
  return reason == ReleaseReason::kDrain ? v1::RELEASE_REASON_DRAIN
                                         : v1::RELEASE_REASON_REBALANCE;
}

std::chrono::nanoseconds ToChrono(absl::Duration duration) {
  if (duration <= absl::ZeroDuration()) return std::chrono::nanoseconds(0);
  if (duration >= absl::FromChrono(kForever)) return kForever;
  return absl::ToChronoNanoseconds(duration);
}

// The Reject reason for connections whose fds this process had no room
// for (the packet's ancillary data truncated, §4.3).
constexpr char kOutOfFdsReason[] =
    "out of file descriptors (the kernel truncated the passed fds)";

// The connection ids `message` offers; false if it offers none.
bool CollectOfferedIds(const v1::HandoffMessage& message,
                       std::vector<uint64_t>& ids) {
  switch (message.body_case()) {
    case v1::HandoffMessage::kConnection:
      ids.push_back(message.connection().connection_id());
      return true;
    case v1::HandoffMessage::kConnectionBatch:
      for (const v1::Connection& c : message.connection_batch().connections()) {
        ids.push_back(c.connection_id());
      }
      return true;
    default:
      return false;
  }
}

// What a Connection carries (§3): a stream socket that is not listening.
// Not whether it is still connected: a client may have gone already, which
// is no fault of the broker.
absl::Status CheckClientSocket(int fd) {
  int type = 0;
  int listening = 0;
  socklen_t size = sizeof(type);
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) != 0) {
    return absl::ErrnoToStatus(errno, "not a socket");  // A pipe, a file...
  }
  if (type != SOCK_STREAM) {
    return absl::InvalidArgumentError(
        absl::StrCat("a socket of type ", type, ", not SOCK_STREAM"));
  }
  size = sizeof(listening);
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) != 0 ||
      listening != 0) {
    return absl::InvalidArgumentError("a listening socket");
  }
  return absl::OkStatus();
}

int64_t Millis(std::chrono::nanoseconds duration) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(duration)
      .count();
}

}  // namespace

absl::StatusOr<std::unique_ptr<WorkerImpl>> WorkerImpl::Create(
    Options options, std::string socket_path, v1::HandoffMessage hello,
    Registration registration) {
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
  hello.clear_sequence();
  hello.mutable_hello()->clear_owned_connections();
  std::unique_ptr<WorkerImpl> worker(new WorkerImpl(
      std::move(options), std::move(socket_path), std::move(hello),
      std::move(registration), *std::move(epoll_fd), *std::move(timer),
      *std::move(wake)));
  {
    absl::MutexLock lock(&worker->mu_);
    worker->ArmTimerLocked();
  }
  return worker;
}

WorkerImpl::WorkerImpl(Options options, std::string socket_path,
                       v1::HandoffMessage hello, Registration registration,
                       wire::UniqueFd epoll_fd, TimerFd timer, WakeFd wake)
    : capacity_(options.capacity),
      max_connections_per_message_(options.max_connections_per_message),
      socket_path_(std::move(socket_path)),
      hello_(std::move(hello)),
      reconnect_timeout_(ToChrono(options.reconnect_timeout)),
      attempt_timeout_(ToChrono(options.connect_timeout)),
      sys_(options.syscalls != nullptr ? *options.syscalls
                                       : wire::SysCalls::Real()),
      on_connection_(std::move(options.on_connection)),
      on_drain_(std::move(options.on_drain)),
      on_release_request_(std::move(options.on_release_request)),
      supports_release_(static_cast<bool>(on_release_request_)),
      supports_listener_grant_(options.accept_granted_listener),
      epoll_fd_(std::move(epoll_fd)),
      timer_(std::move(timer)),
      wake_(std::move(wake)),
      worker_id_(registration.welcome.worker_id()),
      heartbeat_interval_(registration.welcome.heartbeat_interval_ms()),
      heartbeat_timeout_(registration.welcome.heartbeat_timeout_ms()),
      worker_timeout_(registration.welcome.worker_timeout_ms()),
      supervised_(registration.welcome.supervised()),
      channel_(std::move(registration.channel)),
      last_sent_(std::chrono::steady_clock::now()),
      last_heartbeat_(last_sent_),
      last_received_(last_sent_),
      listener_load_interval_(registration.welcome.listener_load_interval_ms()),
      retry_delay_(kFirstRetryDelay) {
  // Out of fds, a Connection is rejected, not the channel lost (§3.1).
  channel_->ReportTruncatedFds();
  if (registration.welcome.worker_timeout_ms() > 0) InstallStackDumpOnAbort();
}

WorkerImpl::~WorkerImpl() {
  absl::MutexLock lock(&mu_);
  if (channel_ != nullptr && !goodbye_sent_ && owned_.empty() &&
      accepted_.empty() && outbox_.empty()) {
    // Best effort: tells the broker this was an orderly exit.
    v1::HandoffMessage goodbye;
    goodbye.mutable_goodbye()->set_reason("worker shut down");
    (void)channel_->Send(goodbye);
  }
  // Undelivered connections (outbox_, ready_) close with their UniqueFds;
  // an attempt in progress (registering_) closes with its channel.
}

uint64_t WorkerImpl::worker_id() const {
  absl::MutexLock lock(&mu_);
  return worker_id_;
}

bool WorkerImpl::registered() const {
  absl::MutexLock lock(&mu_);
  return channel_ != nullptr;
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
  std::vector<std::pair<uint32_t, ReleaseReason>> release_requests;
  bool announce_drain = false;
  DrainCause cause = DrainCause::kLocal;
  absl::Time deadline = absl::InfiniteFuture();
  {
    absl::MutexLock lock(&mu_);
    epoll_event events[8];
    const int count = ::epoll_wait(epoll_fd_.get(), events, 8, 0);
    bool listener_readable = false;
    bool readable = false;
    bool answer_readable = false;
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
        case kRegisterTag:
          answer_readable = true;
          break;
        case kListenerTag:
          listener_readable = true;
          break;
      }
    }
    if (writable) FlushOutboxLocked();
    if (readable) ReceiveLocked();
    if (answer_readable) ReceiveRegistrationAnswerLocked();
    if (listener_readable) AcceptLocked();
    // Before the timer's work, which re-arms the timer from what is left.
    ReportClosedLocked(/*now=*/false);
    ReportLoadLocked(/*now=*/false);
    if (timer_fired) OnTimerLocked();
    SayGoodbyeIfDrainedLocked();
    ready.swap(ready_);
    release_requests.swap(release_requests_);
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
  for (const auto& [max_connections, reason] : release_requests) {
    on_release_request_(max_connections, reason);
  }
}

bool WorkerImpl::OfferLocked(v1::Connection& offered, wire::UniqueFd fd,
                             std::vector<ClientConnection>& taken,
                             std::vector<uint64_t>& rejected) {
  const uint64_t id = offered.connection_id();
  if (absl::Status socket = CheckClientSocket(fd.get()); !socket.ok()) {
    // §3 broken: the broker's protocol error. `fd` closes here, and the
    // rest of the packet with incoming_fds_; nothing of it is acked.
    LoseChannelLocked(
        absl::StrCat("connection ", id,
                     " carries no client stream socket: ", socket.message()));
    return false;
  }
  const bool duplicate =
      owned_.contains(id) ||
      std::any_of(taken.begin(), taken.end(),
                  [id](const ClientConnection& c) { return c.id == id; });
  if (duplicate) {
    LoseChannelLocked(
        absl::StrCat("connection ", id, " offered twice by the broker"));
    return false;
  }
  const bool full =
      capacity_ > 0 && owned_.size() + unsent_acks_ + taken.size() >= capacity_;
  if (draining_ || full) {
    // Our copy closes here; the broker still holds the socket.
    rejected.push_back(id);
    return true;
  }
  ClientConnection& connection = taken.emplace_back();
  connection.id = id;
  connection.fd = std::move(fd);
  connection.peer_address = std::move(*offered.mutable_peer_address());
  connection.local_address = std::move(*offered.mutable_local_address());
  connection.listener = std::move(*offered.mutable_listener());
  connection.accept_time =
      absl::FromUnixNanos(offered.accept_time_unix_nanos());
  connection.initial_data = std::move(*offered.mutable_initial_data());
  return true;
}

void WorkerImpl::ReceiveLocked() {
  std::vector<ClientConnection> taken;
  std::vector<uint64_t> rejected;
  std::vector<uint64_t> out_of_fds;
  for (int i = 0; i < kMaxMessagesPerTurn; ++i) {
    if (channel_ == nullptr || goodbye_sent_) break;
    absl::StatusOr<wire::ReceiveResult> received =
        channel_->Receive(incoming_, incoming_fds_);
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
    if (*received == wire::ReceiveResult::kFdsTruncated) {
      // Out of fds: the kernel could not give us the sockets (§4.3). The
      // broker still holds them; a Reject lets it place them elsewhere, and
      // the channel stays.
      if (!CollectOfferedIds(incoming_, out_of_fds)) {
        LoseChannelLocked(
            absl::StrCat("fds of a ", wire::BodyName(incoming_), " truncated"));
        break;
      }
      continue;
    }
    switch (incoming_.body_case()) {
      case v1::HandoffMessage::kConnection:
        OfferLocked(*incoming_.mutable_connection(),
                    std::move(incoming_fds_[0]), taken, rejected);
        break;
      case v1::HandoffMessage::kConnectionBatch: {
        auto& batch =
            *incoming_.mutable_connection_batch()->mutable_connections();
        if (static_cast<uint32_t>(batch.size()) >
            max_connections_per_message_) {
          LoseChannelLocked(absl::StrCat(
              "connection_batch of ", batch.size(), " connections exceeds our ",
              "max_connections_per_message ", max_connections_per_message_));
          break;
        }
        // The decoder checked: one fd per connection, in order.
        for (int k = 0; k < batch.size(); ++k) {
          if (!OfferLocked(batch[k], std::move(incoming_fds_[k]), taken,
                           rejected)) {
            break;
          }
        }
        break;
      }
      case v1::HandoffMessage::kDrain:
        spdlog::debug(
            "fdbroker worker: Drain from the broker{}",
            incoming_.drain().release_idle() ? " (release idle)" : "");
        if (!draining_) {
          release_on_drain_ =
              supports_release_ && incoming_.drain().release_idle();
        }
        BeginDrainLocked(
            DrainCause::kBrokerRequest,
            DeadlineFromUnixNanos(incoming_.drain().deadline_unix_nanos()));
        break;
      case v1::HandoffMessage::kReleaseRequest: {
        const v1::ReleaseRequest& request = incoming_.release_request();
        if (!supports_release_) {
          // A message in the wrong state (§5, §7.5), as a batch over our
          // max_connections_per_message: the broker misread our Hello.
          LoseChannelLocked(
              "ReleaseRequest from the broker, but our Hello did not set "
              "supports_release");
          break;
        }
        if (request.max_connections() == 0) {
          spdlog::warn(
              "fdbroker worker: ignoring a ReleaseRequest for 0 connections");
          break;
        }
        release_requests_.emplace_back(request.max_connections(),
                                       ReasonFromProto(request.reason()));
        break;
      }
      case v1::HandoffMessage::kListenerGrant:
        if (!supports_listener_grant_) {
          LoseChannelLocked(
              "ListenerGrant from the broker, but our Hello did not set "
              "supports_listener_grant");
          break;
        }
        TakeListenerLocked(std::move(incoming_fds_[0]),
                           incoming_.listener_grant().listener());
        break;
      case v1::HandoffMessage::kHeartbeat:
        break;
      case v1::HandoffMessage::kReconnect:
        reconnect_requested_ = true;
        break;
      default:
        LoseChannelLocked(absl::StrCat("unexpected ", wire::BodyName(incoming_),
                                       " message from the broker"));
        break;
    }
    incoming_fds_.clear();  // Closes the copies of rejected connections.
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
  if (!out_of_fds.empty()) {
    Outgoing reject;
    v1::Reject& body = *reject.message.mutable_reject();
    body.mutable_connection_ids()->Add(out_of_fds.begin(), out_of_fds.end());
    body.set_reason(kOutOfFdsReason);
    spdlog::warn(
        "fdbroker worker: out of file descriptors; rejected {} "
        "connection(s)",
        out_of_fds.size());
    SendLocked(std::move(reject));
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
    // Waiting Closed reports travel with the Ack: one wake-up of the broker.
    ReportClosedLocked(/*now=*/true);
    Outgoing ack;
    v1::Ack& body = *ack.message.mutable_ack();
    for (const ClientConnection& connection : taken) {
      body.add_connection_ids(connection.id);
    }
    ack.acked = std::move(taken);
    SendLocked(std::move(ack));
  }
  MaybeReconnectNowLocked();
}

void WorkerImpl::MaybeReconnectNowLocked() {
  if (!reconnect_requested_ || channel_ == nullptr) return;
  if (!closed_to_report_.empty() && outbox_.empty()) {
    ReportClosedLocked(/*now=*/true);
  }
  if (channel_ == nullptr || !outbox_.empty()) return;  // Flush comes back.
  reconnect_requested_ = false;
  LoseChannelLocked("the broker asked to re-register (upgrade)",
                    /*at_once=*/true);
}

void WorkerImpl::SendLocked(Outgoing outgoing) {
  // Without a channel the message is dropped, and any connections it was
  // to ack close undelivered with it.
  if (channel_ == nullptr) return;
  if (outbox_.empty()) {
    absl::StatusOr<wire::SendResult> sent = SendNowLocked(outgoing);
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

absl::StatusOr<wire::SendResult> WorkerImpl::SendNowLocked(Outgoing& outgoing) {
  return channel_->Send(outgoing.message, outgoing.released.has_value()
                                              ? outgoing.released->fd.get()
                                              : -1);
}

void WorkerImpl::FlushOutboxLocked() {
  while (channel_ != nullptr && !outbox_.empty()) {
    absl::StatusOr<wire::SendResult> sent = SendNowLocked(outbox_.front());
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
  MaybeReconnectNowLocked();
  if (channel_ == nullptr) return;
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
  if (outgoing.released.has_value()) {
    // The broker owns the connection now; our copy closes untouched.
    owned_.erase(outgoing.released->id);
    accepted_.erase(outgoing.released->id);
    releasing_.erase(outgoing.released->id);
    outgoing.released.reset();
    if (draining_) WakeLocked();  // Goodbye may be due.
  }
}

bool WorkerImpl::ClosedReportsAreUrgentLocked() const {
  return capacity_ > 0 || draining_ ||
         closed_to_report_.size() >= kMaxClosedPerReport;
}

void WorkerImpl::ReportClosedLocked(bool now) {
  if (closed_to_report_.empty() || channel_ == nullptr || goodbye_sent_) {
    return;
  }
  if (!now && !ClosedReportsAreUrgentLocked() &&
      std::chrono::steady_clock::now() < closed_report_at_) {
    return;  // The timer (ArmTimerLocked) or the next Ack brings it.
  }
  Outgoing closed;
  v1::Closed& body = *closed.message.mutable_closed();
  for (uint64_t id : closed_to_report_) {
    if (cut_to_report_.contains(id)) {
      body.add_cut_connection_ids(id);
    } else {
      body.add_connection_ids(id);
    }
  }
  closed_to_report_.clear();
  cut_to_report_.clear();
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
  if (now >= NextHeartbeatLocked()) {
    Outgoing heartbeat;
    v1::Heartbeat& body = *heartbeat.message.mutable_heartbeat();
    body.set_sent_unix_nanos(absl::ToUnixNanos(absl::Now()));
    // We run on the loop thread, which runs the application: it is alive
    // right now (app_silent_ms 0, the default).
    last_heartbeat_ = now;
    SendLocked(std::move(heartbeat));
  }
  ArmTimerLocked();
}

MonoTime WorkerImpl::NextHeartbeatLocked() const {
  // While the outbox is blocked we are not silent, just stalled: the flush
  // re-arms the heartbeat.
  if (heartbeat_interval_.count() == 0 || !outbox_.empty()) {
    return MonoTime::max();
  }
  // With the watchdog on, other traffic does not replace the Heartbeat.
  return std::min(last_sent_,
                  worker_timeout_.count() > 0 ? last_heartbeat_ : last_sent_) +
         heartbeat_interval_;
}

void WorkerImpl::ArmTimerLocked() {
  if (reconnecting_) {
    const MonoTime next = std::min(reconnect_deadline_, registering_ != nullptr
                                                            ? attempt_deadline_
                                                            : next_attempt_at_);
    absl::Status armed = timer_.ArmAt(next);
    if (!armed.ok()) {
      spdlog::error("fdbroker worker: reconnect timer: {}", armed.ToString());
    }
    return;
  }
  if (channel_ == nullptr) return;
  MonoTime next = NextHeartbeatLocked();
  if (heartbeat_timeout_.count() > 0) {
    next = std::min(next, last_received_ + heartbeat_timeout_);
  }
  if (!closed_to_report_.empty()) next = std::min(next, closed_report_at_);
  if (load_changed_) next = std::min(next, load_report_at_);
  absl::Status armed =
      next == MonoTime::max() ? timer_.Disarm() : timer_.ArmAt(next);
  if (!armed.ok()) {
    spdlog::error("fdbroker worker: heartbeat timer: {}", armed.ToString());
  }
}

void WorkerImpl::SayGoodbyeIfDrainedLocked() {
  if (!draining_ || channel_ == nullptr || goodbye_sent_ || !owned_.empty() ||
      !accepted_.empty() || load_changed_ || unsent_acks_ > 0 ||
      !closed_to_report_.empty()) {
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
  // The broker accepts what is left in the granted listener's queue.
  CloseListenerLocked();
  drain_cause_ = cause;
  drain_deadline_ = deadline;
  drain_to_announce_ = true;
}

void WorkerImpl::LoseChannelLocked(absl::string_view reason, bool at_once) {
  if (channel_ == nullptr) return;
  reconnect_requested_ = false;
  const bool reconnect = !draining_ && reconnect_timeout_.count() > 0;
  if (goodbye_sent_) {
    spdlog::debug("fdbroker worker: broker channel ended after Goodbye: {}",
                  View(reason));
  } else if (reconnect && at_once) {
    spdlog::info(
        "fdbroker worker: {}: re-registering with {} active "
        "connections",
        View(reason), owned_.size());
  } else if (reconnect) {
    spdlog::warn(
        "fdbroker worker: lost the broker channel (worker {}): {}; keeping {} "
        "active connections, reconnecting to {} for up to {} ms",
        worker_id_, View(reason), owned_.size(), socket_path_,
        Millis(reconnect_timeout_));
  } else {
    spdlog::warn(
        "fdbroker worker: lost the broker channel (worker {}): {}; keeping {} "
        "active connections, taking no new ones",
        worker_id_, View(reason), owned_.size());
  }
  CloseChannelLocked();
  // Releases that did not go out: the connections are still ours, give them
  // back to the application.
  for (Outgoing& outgoing : outbox_) {
    if (!outgoing.released.has_value()) continue;
    releasing_.erase(outgoing.released->id);
    ready_.push_back(*std::move(outgoing.released));
  }
  if (!releasing_.empty()) {
    spdlog::error("fdbroker worker: {} releases not found in the outbox",
                  releasing_.size());
    releasing_.clear();
  }
  outbox_.clear();  // Closes the fds of connections whose Ack was not sent.
  unsent_acks_ = 0;
  // Closes the old broker was not told about die with it: the ids are no
  // longer owned, so no re-registration lists them.
  closed_to_report_.clear();
  cut_to_report_.clear();
  unlisted_.clear();
  if (reconnect) {
    StartReconnectingLocked(at_once);
    return;
  }
  BeginDrainLocked(DrainCause::kBrokerLost, absl::InfiniteFuture());
}

void WorkerImpl::OnTimerLocked() {
  if (!reconnecting_) {
    CheckHeartbeatLocked();
    return;
  }
  const MonoTime now = std::chrono::steady_clock::now();
  if (now >= reconnect_deadline_) {
    GiveUpReconnectingLocked(absl::StrCat(
        "no broker took the worker back within ", Millis(reconnect_timeout_),
        " ms (", attempts_, " attempts)"));
    return;
  }
  if (registering_ != nullptr) {
    if (now >= attempt_deadline_) {
      FailAttemptLocked(
          absl::StrCat("no Welcome within ", Millis(attempt_timeout_), " ms"));
    } else {
      ArmTimerLocked();
    }
    return;
  }
  if (now >= next_attempt_at_) {
    TryRegisterLocked();
  } else {
    ArmTimerLocked();
  }
}

void WorkerImpl::StartReconnectingLocked(bool at_once) {
  reconnecting_ = true;
  attempts_ = 0;
  lost_at_ = std::chrono::steady_clock::now();
  reconnect_deadline_ = lost_at_ + reconnect_timeout_;
  next_attempt_at_ = at_once ? lost_at_ : lost_at_ + kFirstRetryDelay;
  retry_delay_ = std::min(2 * kFirstRetryDelay, kMaxRetryDelay);
  ArmTimerLocked();
}

void WorkerImpl::TryRegisterLocked() {
  ++attempts_;
  v1::HandoffMessage hello = hello_;
  hello.mutable_hello()->set_was_supervised(supervised_);
  ListOwnedLocked(*hello.mutable_hello());
  registering_owned_ = hello.hello().owned_connections_size();
  // The new broker must hold every listener of the group (protocol.md
  // §7.10): ours goes with the Hello, and we go on accepting meanwhile.
  registering_returned_listener_ = listener_.valid();
  hello.mutable_hello()->set_returns_listener(registering_returned_listener_);
  closed_to_report_.clear();
  cut_to_report_.clear();
  absl::StatusOr<std::unique_ptr<wire::MessageChannel>> channel =
      SendHello(socket_path_, hello, absl::Now(), sys_,
                registering_returned_listener_ ? listener_.get() : -1);
  if (absl::IsPermissionDenied(channel.status())) {
    // Another user's process holds the path: retrying cannot help.
    GiveUpReconnectingLocked(channel.status().message());
    return;
  }
  if (!channel.ok()) {
    FailAttemptLocked(channel.status().message());
    return;
  }
  absl::Status added =
      EpollAdd(epoll_fd_.get(), (*channel)->fd(), EPOLLIN, kRegisterTag);
  if (!added.ok()) {
    FailAttemptLocked(added.ToString());
    return;
  }
  registering_ = *std::move(channel);
  attempt_deadline_ = std::chrono::steady_clock::now() + attempt_timeout_;
  spdlog::debug(
      "fdbroker worker: re-registration attempt {}: Hello sent to {} with {} "
      "owned connections",
      attempts_, socket_path_, registering_owned_);
  ArmTimerLocked();
}

void WorkerImpl::ListOwnedLocked(v1::Hello& hello) {
  unlisted_.clear();
  struct Entry {
    v1::OwnedConnection listed;
    size_t full_size;     // Encoded in the Hello, with the peer address.
    size_t id_only_size;  // Without it.
    bool keep_peer = true;
    bool keep = true;
  };
  const auto encoded = [](const v1::OwnedConnection& c) {
    const size_t size = c.ByteSizeLong();
    // Field tag, length, body.
    return 1 + google::protobuf::io::CodedOutputStream::VarintSize64(size) +
           size;
  };
  std::vector<Entry> entries(owned_.size());
  size_t i = 0;
  for (const auto& [id, peer] : owned_) {
    entries[i].listed.set_connection_id(id);
    entries[i].id_only_size = encoded(entries[i].listed);
    entries[i].listed.set_peer_address(peer);
    entries[i].full_size = encoded(entries[i].listed);
    ++i;
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.listed.connection_id() < b.listed.connection_id();
  });
  // The Hello must fit in one packet. Lowest ids give way first: peer
  // addresses (informational) before the entries themselves. The highest id
  // always stays listed, which keeps the ids the new broker hands out (it
  // allocates above the adopted ones) clear of every id still owned here.
  constexpr size_t kLimit = wire::kMaxPacketBytes - kHelloSlack;
  size_t total = hello.ByteSizeLong();
  for (const Entry& entry : entries) total += entry.full_size;
  size_t stripped = 0;
  for (size_t k = 0; k < entries.size() && total > kLimit; ++k, ++stripped) {
    total -= entries[k].full_size - entries[k].id_only_size;
    entries[k].keep_peer = false;
  }
  for (size_t k = 0; k + 1 < entries.size() && total > kLimit; ++k) {
    total -= entries[k].id_only_size;
    entries[k].keep = false;
    unlisted_.insert(entries[k].listed.connection_id());
  }
  hello.mutable_owned_connections()->Reserve(
      static_cast<int>(entries.size() - unlisted_.size()));
  for (Entry& entry : entries) {
    if (!entry.keep) continue;
    if (!entry.keep_peer) entry.listed.clear_peer_address();
    *hello.add_owned_connections() = std::move(entry.listed);
  }
  if (attempts_ > 1) return;  // Said once per loss.
  if (!unlisted_.empty()) {
    spdlog::warn(
        "fdbroker worker: {} of {} owned connections do not fit in the Hello: "
        "the broker will not count them (their closes go unreported)",
        unlisted_.size(), entries.size());
  } else if (stripped > 0) {
    spdlog::warn(
        "fdbroker worker: the Hello lists {} of {} owned connections without "
        "their peer addresses, to fit in one packet",
        stripped, entries.size());
  }
}

void WorkerImpl::ReceiveRegistrationAnswerLocked() {
  if (registering_ == nullptr) return;
  v1::HandoffMessage reply;
  wire::UniqueFd stray_fd;  // Closed on return: nothing comes with an answer.
  absl::StatusOr<wire::ReceiveResult> received =
      registering_->Receive(reply, stray_fd);
  if (!received.ok()) {
    FailAttemptLocked(
        absl::StrCat("bad answer to Hello: ", received.status().message()));
    return;
  }
  if (*received == wire::ReceiveResult::kWouldBlock) return;
  if (*received == wire::ReceiveResult::kPeerClosed) {
    FailAttemptLocked("the broker closed the channel before Welcome");
    return;
  }
  if (reply.has_refusal()) {
    GiveUpReconnectingLocked(RefusalToStatus(reply.refusal()).message());
    return;
  }
  absl::StatusOr<v1::Welcome> welcome = WelcomeFrom(socket_path_, reply);
  if (!welcome.ok()) {
    // Another major version: retrying cannot help.
    if (absl::IsUnavailable(welcome.status())) {
      FailAttemptLocked(welcome.status().message());
    } else {
      GiveUpReconnectingLocked(welcome.status().message());
    }
    return;
  }
  RegisteredLocked(*welcome);
}

void WorkerImpl::RegisteredLocked(const v1::Welcome& welcome) {
  absl::Status modified =
      EpollModify(epoll_fd_.get(), registering_->fd(), EPOLLIN, kChannelTag);
  if (!modified.ok()) {
    FailAttemptLocked(modified.ToString());
    return;
  }
  const uint64_t old_id = worker_id_;
  channel_ = std::move(registering_);
  channel_->ReportTruncatedFds();  // As in the constructor.
  reconnecting_ = false;
  want_writable_ = false;
  worker_id_ = welcome.worker_id();
  supervised_ = welcome.supervised();
  heartbeat_interval_ =
      std::chrono::milliseconds(welcome.heartbeat_interval_ms());
  heartbeat_timeout_ =
      std::chrono::milliseconds(welcome.heartbeat_timeout_ms());
  listener_load_interval_ =
      std::chrono::milliseconds(welcome.listener_load_interval_ms());
  worker_timeout_ = std::chrono::milliseconds(welcome.worker_timeout_ms());
  if (worker_timeout_.count() > 0) InstallStackDumpOnAbort();
  last_sent_ = last_received_ = last_heartbeat_ =
      std::chrono::steady_clock::now();
  // This broker counts the connections we accepted ourselves from the
  // report only.
  if (accepted_total_ > 0) LoadChangedLocked();
  // Not kept: the broker holds a copy and accepts what is queued there.
  if (registering_returned_listener_ && !welcome.listener_kept()) {
    spdlog::info(
        "fdbroker worker: the broker did not keep our listener {}; closing it",
        listener_name_);
    CloseListenerLocked();
  }
  spdlog::info(
      "fdbroker worker: reconnected to the broker at {} as worker {} (was "
      "{}) with {} owned connections, {} ms after losing it (attempt {})",
      socket_path_, worker_id_, old_id, registering_owned_,
      Millis(last_received_ - lost_at_), attempts_);
  ArmTimerLocked();
  // Connections may have come right behind the Welcome.
  ReceiveLocked();
}

void WorkerImpl::FailAttemptLocked(absl::string_view reason) {
  if (registering_ != nullptr) {
    (void)EpollDelete(epoll_fd_.get(), registering_->fd());
    registering_.reset();
  }
  // The ids closed meanwhile were in that Hello only; the next one leaves
  // them out.
  closed_to_report_.clear();
  cut_to_report_.clear();
  unlisted_.clear();
  const MonoTime now = std::chrono::steady_clock::now();
  next_attempt_at_ = now + retry_delay_;
  if (attempts_ <= kLoggedAttempts) {
    spdlog::info(
        "fdbroker worker: reconnect attempt {} failed: {}; next in {} ms{}",
        attempts_, View(reason), retry_delay_.count(),
        attempts_ == kLoggedAttempts ? " (further attempts are not logged)"
                                     : "");
  } else {
    spdlog::debug("fdbroker worker: reconnect attempt {} failed: {}", attempts_,
                  View(reason));
  }
  retry_delay_ = std::min(2 * retry_delay_, kMaxRetryDelay);
  ArmTimerLocked();
}

void WorkerImpl::StopReconnectingLocked() {
  if (!reconnecting_) return;
  if (registering_ != nullptr) {
    (void)EpollDelete(epoll_fd_.get(), registering_->fd());
    registering_.reset();
  }
  reconnecting_ = false;
  closed_to_report_.clear();
  cut_to_report_.clear();
  unlisted_.clear();
  (void)timer_.Disarm();
  WakeLocked();
}

void WorkerImpl::GiveUpReconnectingLocked(absl::string_view reason) {
  spdlog::error(
      "fdbroker worker: gave up reconnecting to the broker at {}: {}; "
      "draining {} active connections",
      socket_path_, View(reason), owned_.size());
  StopReconnectingLocked();
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
  Closed(id, Closure::kFinished);
}

void WorkerImpl::ConnectionCut(uint64_t id) { Closed(id, Closure::kCut); }

void WorkerImpl::Closed(uint64_t id, Closure closure) {
  absl::MutexLock lock(&mu_);
  if (releasing_.contains(id)) {
    spdlog::warn(
        "fdbroker worker: ConnectionClosed({}) for a connection being "
        "released: ignored",
        id);
    return;
  }
  if ((id & wire::kWorkerAcceptedIdBit) != 0) {
    if (accepted_.erase(id) == 0) {
      spdlog::warn(
          "fdbroker worker: ConnectionClosed({}) for a connection that is "
          "not active",
          id);
      return;
    }
    LoadChangedLocked();
    return;
  }
  if (owned_.erase(id) == 0) {
    spdlog::warn(
        "fdbroker worker: ConnectionClosed({}) for a connection that is not "
        "active",
        id);
    return;
  }
  // Reported only to a broker that knows the id: the current one, or the
  // one whose answer to a Hello listing it is awaited. Without a channel
  // it is just forgotten.
  const bool known = unlisted_.erase(id) == 0;
  if (known && (channel_ != nullptr || registering_ != nullptr)) {
    closed_to_report_.push_back(id);
    if (closure == Closure::kCut) cut_to_report_.insert(id);
    if (!ClosedReportsAreUrgentLocked()) {
      // Sent with the next Ack, or by the timer: no wake-up needed.
      if (closed_to_report_.size() == 1) {
        closed_report_at_ =
            std::chrono::steady_clock::now() + kClosedReportDelay;
        ArmTimerLocked();
      }
      return;
    }
  }
  WakeLocked();
}

void WorkerImpl::StartDrain() {
  absl::MutexLock lock(&mu_);
  if (reconnecting_) {
    spdlog::info(
        "fdbroker worker: draining: stopped reconnecting to the broker at {}",
        socket_path_);
    StopReconnectingLocked();
  }
  BeginDrainLocked(DrainCause::kLocal, absl::InfiniteFuture());
  WakeLocked();
}

bool WorkerImpl::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

bool WorkerImpl::release_on_drain() const {
  absl::MutexLock lock(&mu_);
  return draining_ && release_on_drain_ && channel_ != nullptr &&
         !goodbye_sent_;
}

absl::Status WorkerImpl::Release(uint64_t id, wire::UniqueFd& fd,
                                 std::string unread_data,
                                 ReleaseReason reason) {
  absl::MutexLock lock(&mu_);
  if (!supports_release_) {
    return absl::FailedPreconditionError(
        "Release() needs Options::on_release_request (Hello.supports_release)");
  }
  if (!fd.valid()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Release(", id, ") without an fd"));
  }
  // Ours from a granted listener, or acked.
  auto& table = (id & wire::kWorkerAcceptedIdBit) != 0 ? accepted_ : owned_;
  const auto owned = table.find(id);
  if (owned == table.end() || releasing_.contains(id)) {
    return absl::NotFoundError(
        absl::StrCat("Release(", id, "): not an active connection"));
  }
  if (channel_ == nullptr || goodbye_sent_) {
    return absl::UnavailableError(absl::StrCat(
        "Release(", id, "): not registered with a broker (reconnecting)"));
  }
  if (unlisted_.contains(id)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Release(", id, "): the broker does not know this connection"));
  }
  if (unread_data.size() > wire::kMaxUnreadData) {
    // The broker would take it for a protocol error, and the connection
    // would be lost with the packet.
    return absl::InvalidArgumentError(absl::StrCat(
        "Release(", id, "): ", unread_data.size(),
        " unread bytes (the limit is ", wire::kMaxUnreadData, ")"));
  }
  Outgoing release;
  v1::Release& body = *release.message.mutable_release();
  body.set_connection_id(id);
  body.set_unread_data(unread_data);
  body.set_reason(ReasonToProto(reason));
  if (outbox_.empty()) {
    absl::StatusOr<wire::SendResult> sent =
        channel_->Send(release.message, fd.get());
    if (!sent.ok()) {
      const std::string reason_text =
          absl::StrCat("cannot send release: ", sent.status().message());
      LoseChannelLocked(reason_text);
      // Nothing went out: the connection stays the caller's.
      return absl::UnavailableError(reason_text);
    }
    if (*sent == wire::SendResult::kSent) {
      last_sent_ = std::chrono::steady_clock::now();
      table.erase(owned);
      fd.Reset();                   // The broker holds the socket now.
      if (draining_) WakeLocked();  // Goodbye may be due.
      return absl::OkStatus();
    }
  }
  // Queued behind a full socket buffer: the SDK owns the fd until it is
  // sent, or gives the connection back (ready_) if the channel dies first.
  ClientConnection& connection = release.released.emplace();
  connection.id = id;
  connection.fd = std::move(fd);
  connection.peer_address = owned->second;
  connection.accept_time = absl::Now();
  connection.initial_data = std::move(unread_data);
  releasing_.insert(id);
  outbox_.push_back(std::move(release));
  SetWritableInterestLocked(true);
  return absl::OkStatus();
}

bool WorkerImpl::finished() const {
  absl::MutexLock lock(&mu_);
  return draining_ && channel_ == nullptr && !reconnecting_ && owned_.empty() &&
         accepted_.empty();
}

size_t WorkerImpl::active_connections() const {
  absl::MutexLock lock(&mu_);
  return owned_.size() + accepted_.size();
}

void WorkerImpl::TakeListenerLocked(wire::UniqueFd listener, std::string name) {
  int listening = 0;
  socklen_t size = sizeof(listening);
  if (::getsockopt(listener.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening,
                   &size) != 0 ||
      listening == 0) {
    LoseChannelLocked("listener_grant carries no listening socket");
    return;
  }
  if (draining_) return;  // `listener` closes; the broker serves its queue.
  CloseListenerLocked();
  // O_NONBLOCK is shared with the broker's copy (one open file), which
  // has it already; set it anyway, accepts must never block the loop.
  ::fcntl(listener.get(), F_SETFL,
          ::fcntl(listener.get(), F_GETFL) | O_NONBLOCK);
  if (absl::Status added =
          EpollAdd(epoll_fd_.get(), listener.get(), EPOLLIN, kListenerTag);
      !added.ok()) {
    spdlog::error("fdbroker worker: granted listener: {}", added.ToString());
    return;  // The broker accepts from it: nothing is lost.
  }
  absl::StatusOr<wire::SocketAddress> bound =
      wire::SocketAddress::Of(listener.get());
  listener_local_address_ =
      bound.ok() && !bound->IsWildcard() ? bound->ToString() : std::string();
  listener_ = std::move(listener);
  listener_name_ = std::move(name);
  spdlog::info("fdbroker worker: accepting from the granted listener {}",
               listener_name_);
}

void WorkerImpl::CloseListenerLocked() {
  if (!listener_.valid()) return;
  (void)EpollDelete(epoll_fd_.get(), listener_.get());
  listener_.Reset();
}

void WorkerImpl::AcceptLocked() {
  const uint64_t before = accepted_total_;
  for (int i = 0; i < kMaxAcceptsPerTurn && listener_.valid(); ++i) {
    wire::SocketAddress peer;
    peer.length = sizeof(peer.storage);
    // Blocking, as a handed connection arrives (the application picks).
    const int fd = ::accept4(listener_.get(), peer.mutable_addr(), &peer.length,
                             SOCK_CLOEXEC);
    if (fd < 0) {
      const int error = errno;
      if (error == EAGAIN || error == EWOULDBLOCK) break;
      if (error == EINTR || error == ECONNABORTED || error == EPROTO ||
          error == EPERM) {
        continue;
      }
      // Out of fds (or memory): stop accepting; the broker serves the
      // queue from its copy of the listener, so nothing waits for us.
      spdlog::error(
          "fdbroker worker: accept on the granted listener: {}; leaving it "
          "to the broker",
          strerror(error));
      CloseListenerLocked();
      break;
    }
    ClientConnection& connection = ready_.emplace_back();
    connection.id = wire::kWorkerAcceptedIdBit | ++last_accepted_id_;
    connection.fd.Reset(fd);
    connection.peer_address = peer.ToString();
    if (!listener_local_address_.empty()) {
      connection.local_address = listener_local_address_;
    } else if (absl::StatusOr<wire::SocketAddress> local =
                   wire::SocketAddress::Of(fd);
               local.ok()) {
      connection.local_address = local->ToString();
    }
    connection.listener = listener_name_;
    connection.accept_time = absl::Now();
    accepted_.emplace(connection.id, connection.peer_address);
    ++accepted_total_;
  }
  if (accepted_total_ != before) LoadChangedLocked();
}

void WorkerImpl::LoadChangedLocked() {
  if (listener_load_interval_.count() == 0) return;  // Nobody asks.
  load_changed_ = true;
  if (draining_) {
    WakeLocked();  // Goodbye waits for the report.
    return;
  }
  if (load_report_at_ == MonoTime::max()) {
    load_report_at_ =
        std::chrono::steady_clock::now() + listener_load_interval_;
    ArmTimerLocked();
  }
}

void WorkerImpl::ReportLoadLocked(bool now) {
  if (!load_changed_ || channel_ == nullptr || goodbye_sent_) return;
  if (!now && !draining_ &&
      std::chrono::steady_clock::now() < load_report_at_) {
    return;
  }
  // Releases still queued are counted by the broker when they arrive.
  size_t releasing = 0;
  for (uint64_t id : releasing_) {
    releasing += (id & wire::kWorkerAcceptedIdBit) != 0;
  }
  Outgoing load;
  v1::ListenerLoad& body = *load.message.mutable_listener_load();
  body.set_accepted_total(accepted_total_);
  body.set_active(static_cast<uint32_t>(accepted_.size() - releasing));
  load_changed_ = false;
  load_report_at_ = MonoTime::max();
  SendLocked(std::move(load));
}

absl::Status WorkerImpl::ServeThreadPerConnection(ConnectionHandler handler) {
  {
    absl::MutexLock lock(&mu_);
    if (supports_release_) {
      return absl::FailedPreconditionError(
          "ServeThreadPerConnection() does not support releasing connections: "
          "leave Options::on_release_request unset");
    }
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
