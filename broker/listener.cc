#include "broker/listener.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace fdbroker {

absl::StatusOr<std::unique_ptr<Listener>> Listener::Create(
    EventLoop& loop, const wire::SocketAddress& address, const Options& options,
    wire::SysCalls& sys, AcceptCallback on_accept) {
  wire::UniqueFd socket(::socket(
      address.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!socket) return absl::ErrnoToStatus(errno, "socket");
  int one = 1;
  ::setsockopt(socket.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(socket.get(), address.addr(), address.length) != 0) {
    return absl::ErrnoToStatus(errno,
                               absl::StrCat("bind ", address.ToString()));
  }
  if (::listen(socket.get(), options.backlog) != 0) {
    return absl::ErrnoToStatus(errno, "listen");
  }
  return Adopt(loop, std::move(socket), options, sys, std::move(on_accept));
}

absl::StatusOr<std::unique_ptr<Listener>> Listener::Adopt(
    EventLoop& loop, wire::UniqueFd socket, const Options& options,
    wire::SysCalls& sys, AcceptCallback on_accept) {
  int listening = 0;
  socklen_t len = sizeof(listening);
  if (::getsockopt(socket.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) !=
          0 ||
      !listening) {
    return absl::InvalidArgumentError(
        absl::StrCat("fd ", socket.get(), " is not a listening socket"));
  }
  // An inherited socket may lack these; the broker relies on both.
  const int flags = ::fcntl(socket.get(), F_GETFL);
  ::fcntl(socket.get(), F_SETFL, flags | O_NONBLOCK);
  ::fcntl(socket.get(), F_SETFD, FD_CLOEXEC);
  absl::StatusOr<wire::SocketAddress> bound =
      wire::SocketAddress::Of(socket.get());
  if (!bound.ok()) return bound.status();
  if (bound->family() != AF_INET && bound->family() != AF_INET6) {
    return absl::InvalidArgumentError(
        "the inherited listening socket is not TCP over IPv4 or IPv6");
  }
  std::unique_ptr<Listener> listener(new Listener(
      loop, std::move(socket), *bound, options, sys, std::move(on_accept)));
  absl::Status status = listener->Init();
  if (!status.ok()) return status;
  return listener;
}

Listener::Listener(EventLoop& loop, wire::UniqueFd socket,
                   wire::SocketAddress address, const Options& options,
                   wire::SysCalls& sys, AcceptCallback on_accept)
    : loop_(loop),
      socket_(std::move(socket)),
      address_(address),
      options_(options),
      sys_(sys),
      on_accept_(std::move(on_accept)) {}

Listener::~Listener() = default;

absl::Status Listener::Init() {
  absl::StatusOr<std::unique_ptr<IoWatch>> watch =
      loop_.Watch(socket_.get(), EPOLLIN, [this](uint32_t) { OnReadable(); });
  if (!watch.ok()) return watch.status();
  watch_ = *std::move(watch);
  return absl::OkStatus();
}

void Listener::Pause() {
  accepting_ = false;
  if (watch_ != nullptr) UpdateWatch();
}

void Listener::Resume() {
  if (!socket_.valid()) return;
  accepting_ = true;
  UpdateWatch();
}

void Listener::Close() {
  accepting_ = false;
  resume_timer_.Cancel();
  watch_.reset();
  socket_.Reset();
}

void Listener::UpdateWatch() {
  watch_->SetEvents(accepting_ && !resume_timer_.armed() ? uint32_t{EPOLLIN}
                                                         : 0u);
}

void Listener::OnReadable() {
  const bool wildcard = address_.IsWildcard();
  for (int i = 0; i < options_.max_accepts_per_wake; ++i) {
    AcceptedConnection conn;
    conn.peer.length = sizeof(conn.peer.storage);
    // The client socket stays in blocking mode: the broker never does I/O on
    // it, and the worker that receives it chooses its own mode.
    int fd = sys_.Accept4(socket_.get(), conn.peer.mutable_addr(),
                          &conn.peer.length, SOCK_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      if (err == EINTR || err == ECONNABORTED || err == EPROTO ||
          err == EPERM) {
        continue;  // This connection is gone; others may be waiting.
      }
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        ++stats_.exhaustion_pauses;
        spdlog::warn("accept: {}; pausing accepts for {}", strerror(err),
                     absl::FormatDuration(options_.exhaustion_pause));
        resume_timer_.Arm(options_.exhaustion_pause, [this] { UpdateWatch(); });
        UpdateWatch();
        return;
      }
      spdlog::error("accept: {}", strerror(err));
      return;
    }
    conn.fd.Reset(fd);
    if (wildcard) {
      conn.local.length = sizeof(conn.local.storage);
      ::getsockname(fd, conn.local.mutable_addr(), &conn.local.length);
    } else {
      conn.local = address_;
    }
    // The one clock call per connection (the monotonic time is the turn's).
    conn.accept_unix_nanos = loop_.clock().UnixNanos();
    conn.accept_mono_nanos = loop_.NowNanos();
    ++stats_.accepted;
    on_accept_(std::move(conn));
    // The callback may pause us (e.g. shutdown).
    if (!accepting_) return;
  }
}

}  // namespace fdbroker
