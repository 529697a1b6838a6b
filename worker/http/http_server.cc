#include "http_server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <utility>

#include "spdlog/spdlog.h"

namespace fdbroker::http {
namespace {

// epoll data of the non-connection fds; connection keys start above.
constexpr uint64_t kSourceKey = 1;
constexpr uint64_t kSignalKey = 2;
constexpr uint64_t kFirstConnectionKey = 16;

constexpr int kMaxEvents = 256;
constexpr size_t kReadBufferSize = 64 * 1024;
// Full-buffer reads per readiness event before other connections get a turn.
constexpr int kReadsPerEvent = 8;
// How long a half-closed connection may keep sending before it is closed.
constexpr auto kLingerTime = std::chrono::seconds(2);
// During a drain, how long after its hand-over a connection that has not
// sent its first request yet may take to send it (docs/protocol.md §7.7: a
// client that just connected usually has). Any other idle connection is
// closed at once.
constexpr auto kFirstRequestGrace = std::chrono::seconds(2);
// After a forced shutdown, how long the source gets to report the closes.
constexpr auto kForcedExitGrace = std::chrono::seconds(1);
// How long before the broker's drain deadline the server cuts what it still
// holds (reported as cut: the broker counts those connections lost).
constexpr absl::Duration kCutBeforeDeadline = absl::Milliseconds(100);

}  // namespace

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Create(
    std::unique_ptr<ConnectionSource> source) {
  wire::UniqueFd epoll_fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_fd) return absl::ErrnoToStatus(errno, "epoll_create1");
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  if (::pthread_sigmask(SIG_BLOCK, &signals, nullptr) != 0) {
    return absl::InternalError("pthread_sigmask failed");
  }
  wire::UniqueFd signal_fd(
      ::signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!signal_fd) return absl::ErrnoToStatus(errno, "signalfd");
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = kSignalKey;
  if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, signal_fd.get(), &event) !=
      0) {
    return absl::ErrnoToStatus(errno, "epoll_ctl(signalfd)");
  }
  event.data.u64 = kSourceKey;
  if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, source->pollable_fd(),
                  &event) != 0) {
    return absl::ErrnoToStatus(errno, "epoll_ctl(source)");
  }
  return std::unique_ptr<HttpServer>(new HttpServer(
      std::move(source), std::move(epoll_fd), std::move(signal_fd)));
}

HttpServer::HttpServer(std::unique_ptr<ConnectionSource> source,
                       wire::UniqueFd epoll_fd, wire::UniqueFd signal_fd)
    : responses_(::getpid()),
      source_(std::move(source)),
      epoll_fd_(std::move(epoll_fd)),
      signal_fd_(std::move(signal_fd)),
      next_key_(kFirstConnectionKey),
      read_buffer_(new char[kReadBufferSize]) {
  RefreshClock();
}

HttpServer::~HttpServer() {
  // Connections close with their slots; nobody is told any more.
  slots_.clear();
}

absl::Status HttpServer::Run() {
  epoll_event events[kMaxEvents];
  for (;;) {
    if (draining_ && slots_.empty() && source_->Finished()) break;
    if (forced_exit_at_.has_value() && now_ >= *forced_exit_at_) {
      spdlog::warn("exiting before the broker acknowledged the shutdown");
      break;
    }
    const int count =
        ::epoll_wait(epoll_fd_.get(), events, kMaxEvents, NextTimeoutMillis());
    if (count < 0 && errno != EINTR) {
      return absl::ErrnoToStatus(errno, "epoll_wait");
    }
    RefreshClock();
    for (int i = 0; i < count; ++i)
      Dispatch(events[i].data.u64, events[i].events);
    RunTimers();
    RunDeferredReads();
    RunPendingServices();
  }
  spdlog::info("drained, exiting");
  return absl::OkStatus();
}

void HttpServer::RefreshClock() {
  now_ = std::chrono::steady_clock::now();
  const std::time_t second = std::time(nullptr);
  if (second != date_second_) {
    date_second_ = second;
    responses_.SetDate(second);
  }
}

int HttpServer::NextTimeoutMillis() const {
  if (!deferred_reads_.empty() || !to_service_.empty()) return 0;
  MonoTime next = MonoTime::max();
  if (!timers_.empty()) next = timers_.top().at;
  for (const auto& at :
       {source_paused_until_, drain_deadline_, forced_exit_at_}) {
    if (at.has_value()) next = std::min(next, *at);
  }
  if (next == MonoTime::max()) return -1;
  if (next <= now_) return 0;
  // Round up: waking a little late is fine, spinning until then is not.
  const auto millis =
      std::chrono::ceil<std::chrono::milliseconds>(next - now_).count();
  return static_cast<int>(std::min<int64_t>(millis, INT_MAX));
}

HttpServer::Slot* HttpServer::Find(uint64_t key) {
  auto it = slots_.find(key);
  return it == slots_.end() ? nullptr : it->second.get();
}

void HttpServer::Dispatch(uint64_t key, uint32_t events) {
  if (key == kSourceKey) {
    OnSourceReadable();
    return;
  }
  if (key == kSignalKey) {
    OnSignal();
    return;
  }
  Slot* slot = Find(key);
  // A connection closed earlier in this batch of events.
  if (slot == nullptr) return;
  // An error or hang-up may come without EPOLLOUT: let the next send fail.
  if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) != 0 && slot->write_blocked) {
    OnWritable(*slot);
    slot = Find(key);
    if (slot == nullptr) return;
  }
  if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) {
    OnReadable(*slot);
  }
}

void HttpServer::OnSourceReadable() {
  if (source_->pollable_fd() < 0) return;  // Closed by StopTaking().
  const absl::Duration pause = source_->OnReadable(*this);
  if (pause > absl::ZeroDuration() && source_->pollable_fd() >= 0) {
    // Out of fds: stop polling the listener for a while instead of spinning
    // on a readable socket that cannot be accepted from.
    epoll_event event{};
    event.data.u64 = kSourceKey;
    if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, source_->pollable_fd(),
                    &event) == 0) {
      source_paused_until_ =
          now_ + std::chrono::nanoseconds(absl::ToInt64Nanoseconds(pause));
    }
  }
}

void HttpServer::OnSignal() {
  signalfd_siginfo info;
  while (::read(signal_fd_.get(), &info, sizeof(info)) == sizeof(info)) {
    const char* name = info.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM";
    if (!draining_) {
      spdlog::info("{}: draining {} connections", name, slots_.size());
      BeginDrain(absl::InfiniteFuture(), StopSource::kYes);
    } else if (!forced_exit_at_.has_value()) {
      spdlog::warn("second {}: closing {} connections now", name,
                   slots_.size());
      CloseAll();
    }
  }
}

void HttpServer::OnNewConnection(wire::UniqueFd fd, uint64_t source_id,
                                 std::string initial_data,
                                 std::string peer_address) {
  const int one = 1;
  // Responses go out in one write per batch; do not let Nagle hold them.
  // (Fails harmlessly on a non-TCP socket.)
  (void)::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  auto owned = std::make_unique<Slot>(responses_);
  Slot& slot = *owned;
  slot.key = next_key_++;
  slot.fd = std::move(fd);
  slot.source_id = source_id;
  slot.delivered_at = now_;
  slot.http.SetClientAddress(peer_address);
  if (!Watch(slot)) {
    owned.reset();
    source_->ConnectionClosed(source_id);
    return;
  }
  slots_.emplace(slot.key, std::move(owned));
  // (In a release drain it is released once idle, like the others.)
  if (draining_ && !release_drain_) slot.http.StartDrain();
  // Bytes a previous owner read come before anything on the socket; the
  // socket's own readiness arrives as an event (EPOLL_CTL_ADD reports it).
  if (!initial_data.empty()) slot.http.OnData(initial_data);
  Service(slot);
}

bool HttpServer::Watch(const Slot& slot) {
  epoll_event event{};
  event.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  event.data.u64 = slot.key;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, slot.fd.get(), &event) != 0) {
    spdlog::error("epoll_ctl(ADD) of a client socket: {}",
                  std::strerror(errno));
    return false;
  }
  return true;
}

void HttpServer::OnDrain(absl::Time deadline) {
  // The source already stopped taking connections.
  if (!draining_ && source_->ReleaseOnDrain()) {
    spdlog::info("draining by releasing {} connections to other workers",
                 slots_.size());
    release_drain_ = true;
  }
  BeginDrain(deadline, StopSource::kNo);
}

void HttpServer::OnReleaseRequest(uint32_t max_connections,
                                  worker::ReleaseReason reason) {
  std::vector<uint64_t> keys;
  for (const auto& [key, slot] : slots_) {
    if (keys.size() >= max_connections) break;
    if (Releasable(*slot)) keys.push_back(key);
  }
  uint32_t released = 0;
  for (uint64_t key : keys) {
    Slot* slot = Find(key);
    if (slot == nullptr) continue;
    const ReleaseResult result = TryRelease(*slot, reason);
    if (result == ReleaseResult::kReleased) ++released;
    // The source refused (the broker is gone): the rest would fail too.
    if (result == ReleaseResult::kKept) break;
  }
  spdlog::info("released {} idle connections ({} asked for up to {}), {} left",
               released, std::string(worker::ReleaseReasonName(reason)),
               max_connections, slots_.size());
}

bool HttpServer::Releasable(const Slot& slot) const {
  return !slot.lingering && !slot.write_blocked && slot.http.releasable();
}

HttpServer::ReleaseResult HttpServer::TryRelease(Slot& slot,
                                                 worker::ReleaseReason reason) {
  // epoll forgets an fd only when every copy of its file is closed, and the
  // broker's copy keeps it open: take it out first.
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, slot.fd.get(), nullptr) !=
      0) {
    spdlog::error("epoll_ctl(DEL) of a client socket: {}",
                  std::strerror(errno));
    return ReleaseResult::kKept;
  }
  absl::Status released =
      source_->Release(slot.source_id, slot.fd, std::string(), reason);
  if (released.ok()) {
    slots_.erase(slot.key);  // The source has the fd; nothing to report.
    return ReleaseResult::kReleased;
  }
  spdlog::warn("cannot release connection {}: {}", slot.source_id,
               released.ToString());
  // Still ours. Adding it back reports its current readiness: no input edge
  // is lost.
  if (!Watch(slot)) {
    Close(slot);
    return ReleaseResult::kClosed;
  }
  return ReleaseResult::kKept;
}

void HttpServer::StopReleasing() {
  if (!release_drain_) return;
  release_drain_ = false;
  spdlog::warn("cannot release connections any more: closing {} instead",
               slots_.size());
  for (const auto& [key, slot] : slots_) {
    if (slot->lingering) continue;
    slot->http.StartDrain();
    to_service_.push_back(key);
  }
}

void HttpServer::RunPendingServices() {
  if (to_service_.empty()) return;
  std::vector<uint64_t> keys;
  keys.swap(to_service_);
  for (uint64_t key : keys) {
    if (Slot* slot = Find(key)) Service(*slot);
  }
}

void HttpServer::BeginDrain(absl::Time deadline, StopSource stop_source) {
  if (deadline != absl::InfiniteFuture()) {
    // Cut a little before the broker's deadline, so that the Closed saying
    // so reaches it before it ends this process and counts them itself.
    const absl::Duration left = std::max(
        deadline - absl::Now() - kCutBeforeDeadline, absl::ZeroDuration());
    const MonoTime at =
        now_ + std::chrono::nanoseconds(absl::ToInt64Nanoseconds(left));
    drain_deadline_ =
        drain_deadline_.has_value() ? std::min(*drain_deadline_, at) : at;
  }
  if (draining_) return;
  draining_ = true;
  // Stop the source before closing idle connections: a client that sees its
  // connection closed must not be able to open a new one here. What the
  // source still delivers arrives draining.
  if (stop_source == StopSource::kYes) source_->StopTaking(*this);
  std::vector<uint64_t> keys;
  keys.reserve(slots_.size());
  for (const auto& [key, slot] : slots_) keys.push_back(key);
  for (uint64_t key : keys) {
    Slot* slot = Find(key);
    if (slot == nullptr || slot->lingering) continue;
    if (!release_drain_) slot->http.StartDrain();
    Service(*slot);
  }
}

void HttpServer::CloseAll() {
  std::vector<uint64_t> keys;
  keys.reserve(slots_.size());
  for (const auto& [key, slot] : slots_) keys.push_back(key);
  for (uint64_t key : keys) {
    // A lingering connection has had its last response already.
    if (Slot* slot = Find(key)) {
      Close(*slot, slot->lingering ? Closure::kFinished : Closure::kCut);
    }
  }
  draining_ = true;
  forced_exit_at_ = now_ + kForcedExitGrace;
}

void HttpServer::OnReadable(Slot& slot) {
  if (slot.lingering) {
    DiscardInput(slot);
    return;
  }
  if (!slot.http.wants_input()) {
    slot.read_deferred = true;
    return;
  }
  slot.read_deferred = false;
  for (int reads = 0;; ++reads) {
    if (reads == kReadsPerEvent) {
      // Fairness: continue after the other ready connections.
      slot.read_deferred = true;
      break;
    }
    const ssize_t n = ::recv(slot.fd.get(), read_buffer_.get(), kReadBufferSize,
                             MSG_DONTWAIT);
    if (n > 0) {
      slot.http.OnData(
          absl::string_view(read_buffer_.get(), static_cast<size_t>(n)));
      // A short read drained the socket (new data brings a new edge).
      if (static_cast<size_t>(n) < kReadBufferSize) break;
      if (!slot.http.wants_input()) {
        slot.read_deferred = true;
        break;
      }
      continue;
    }
    if (n == 0) {
      slot.http.OnPeerClosed();
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    Close(slot);  // ECONNRESET and friends: nothing left to answer.
    return;
  }
  Service(slot);
}

void HttpServer::DiscardInput(Slot& slot) {
  for (;;) {
    const ssize_t n = ::recv(slot.fd.get(), read_buffer_.get(), kReadBufferSize,
                             MSG_DONTWAIT);
    if (n > 0) continue;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    Close(slot);  // EOF or error: the client is done.
    return;
  }
}

void HttpServer::OnWritable(Slot& slot) {
  slot.write_blocked = false;
  Service(slot);
}

bool HttpServer::Flush(Slot& slot) {
  while (slot.http.has_pending_output()) {
    const absl::string_view out = slot.http.pending_output();
    const ssize_t n = ::send(slot.fd.get(), out.data(), out.size(),
                             MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      slot.http.ConsumeOutput(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      slot.write_blocked = true;  // EPOLLOUT (edge) resumes.
      return true;
    }
    Close(slot);  // EPIPE, ECONNRESET: the client is gone.
    return false;
  }
  return true;
}

void HttpServer::Service(Slot& slot) {
  for (;;) {
    if (slot.write_blocked) return;
    if (!Flush(slot)) return;
    if (slot.write_blocked) return;
    if (!slot.http.input_blocked()) break;
    slot.http.Resume();  // Produces more output: write it too.
  }
  if (slot.http.ShouldClose()) {
    CloseGracefully(slot);
    return;
  }
  if (slot.http.sleeping()) {
    if (slot.timer != TimerKind::kSleep) {
      ScheduleTimer(slot, TimerKind::kSleep,
                    now_ + std::chrono::milliseconds(slot.http.sleep_millis()));
    }
    return;
  }
  if (release_drain_ && Releasable(slot)) {
    const ReleaseResult result =
        TryRelease(slot, worker::ReleaseReason::kDrain);
    if (result != ReleaseResult::kKept) return;  // `slot` is gone.
    StopReleasing();  // Serviced again, draining, at the end of the turn.
    return;
  }
  if (draining_ && slot.http.idle() && slot.http.requests() == 0 &&
      slot.timer == TimerKind::kNone) {
    ScheduleTimer(slot, TimerKind::kFirstRequestGrace,
                  std::max(now_, slot.delivered_at + kFirstRequestGrace));
  }
  if (slot.read_deferred && slot.http.wants_input() && !slot.read_queued) {
    // Input may be left in the socket and no new edge will come for it:
    // read at the end of this loop turn.
    slot.read_queued = true;
    deferred_reads_.push_back(slot.key);
  }
}

void HttpServer::CloseGracefully(Slot& slot) {
  if (!slot.http.needs_linger()) {
    Close(slot);
    return;
  }
  // The client may still be sending: closing now with unread input would
  // send an RST that can destroy the response in flight. Half-close, read
  // and discard until it closes too (or the linger time ends).
  ::shutdown(slot.fd.get(), SHUT_WR);
  slot.lingering = true;
  ScheduleTimer(slot, TimerKind::kLinger, now_ + kLingerTime);
  DiscardInput(slot);
}

void HttpServer::Close(Slot& slot, Closure closure) {
  const uint64_t key = slot.key;
  const uint64_t source_id = slot.source_id;
  if (source_->SharesSocket(source_id)) {
    // The broker may still hold a copy for a moment: epoll forgets an fd
    // only when every copy is closed, and the client would see our FIN only
    // then (and the broker would pay for the teardown). Say it now.
    (void)::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, slot.fd.get(), nullptr);
    if (!slot.lingering) (void)::shutdown(slot.fd.get(), SHUT_RDWR);
  }
  slots_.erase(key);  // Closes the fd.
  if (closure == Closure::kCut) {
    source_->ConnectionCut(source_id);
  } else {
    source_->ConnectionClosed(source_id);
  }
}

void HttpServer::ScheduleTimer(Slot& slot, TimerKind kind, MonoTime at) {
  slot.timer = kind;
  slot.timer_generation = next_timer_generation_++;
  timers_.push(TimerEntry{at, slot.key, slot.timer_generation});
}

void HttpServer::RunTimers() {
  while (!timers_.empty() && timers_.top().at <= now_) {
    const TimerEntry entry = timers_.top();
    timers_.pop();
    Slot* slot = Find(entry.key);
    if (slot == nullptr || slot->timer_generation != entry.generation) {
      continue;  // Stale: the connection is gone or re-armed.
    }
    const TimerKind kind = slot->timer;
    slot->timer = TimerKind::kNone;
    switch (kind) {
      case TimerKind::kSleep:
        slot->http.OnSleepDone();
        Service(*slot);
        break;
      case TimerKind::kLinger:
        Close(*slot);
        break;
      case TimerKind::kFirstRequestGrace:
        if (slot->http.idle() && slot->http.requests() == 0) Close(*slot);
        break;
      case TimerKind::kNone:
        break;
    }
  }
  if (source_paused_until_.has_value() && now_ >= *source_paused_until_) {
    source_paused_until_.reset();
    if (source_->pollable_fd() >= 0) {
      epoll_event event{};
      event.events = EPOLLIN;
      event.data.u64 = kSourceKey;
      (void)::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, source_->pollable_fd(),
                        &event);
    }
  }
  if (drain_deadline_.has_value() && now_ >= *drain_deadline_ &&
      !forced_exit_at_.has_value()) {
    spdlog::warn("drain deadline reached: closing {} connections",
                 slots_.size());
    CloseAll();
  }
}

void HttpServer::RunDeferredReads() {
  if (deferred_reads_.empty()) return;
  std::vector<uint64_t> keys;
  keys.swap(deferred_reads_);
  for (uint64_t key : keys) {
    Slot* slot = Find(key);
    if (slot == nullptr) continue;
    slot->read_queued = false;
    if (slot->read_deferred) OnReadable(*slot);
  }
}

}  // namespace fdbroker::http
