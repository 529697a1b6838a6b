#include "broker/listener.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "broker/proxy_protocol.h"
#include "spdlog/spdlog.h"

namespace fdbroker {

absl::StatusOr<ListenSpec> ListenSpec::Parse(absl::string_view text) {
  std::vector<absl::string_view> parts = absl::StrSplit(text, ',');
  ListenSpec spec;
  spec.name = std::string(parts[0]);
  if (absl::ConsumePrefix(&parts[0], "unix:")) {
    if (parts[0].empty() || parts[0][0] != '/') {
      return absl::InvalidArgumentError(
          absl::StrCat("\"", text, "\": unix: needs an absolute path"));
    }
    // sun_path holds 108 bytes with the NUL.
    if (parts[0].size() >= sizeof(sockaddr_un::sun_path)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "\"", text, "\": path longer than 107 bytes (a Unix socket limit)"));
    }
    spec.unix_path = std::string(parts[0]);
  } else {
    absl::StatusOr<wire::SocketAddress> address =
        wire::SocketAddress::Parse(parts[0]);
    if (!address.ok()) return address.status();
    spec.address = *address;
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    absl::string_view option = parts[i];
    if (option == "proxy_protocol") {
      spec.proxy_protocol = true;
    } else if (absl::ConsumePrefix(&option, "mode=") && spec.is_unix()) {
      int mode = 0;
      bool ok = !option.empty() && option.size() <= 4;
      for (char c : option) {
        ok = ok && c >= '0' && c <= '7';
        mode = mode * 8 + (c - '0');
      }
      if (!ok) {
        return absl::InvalidArgumentError(absl::StrCat(
            "\"", text, "\": mode= takes octal permissions such as 0660"));
      }
      spec.unix_mode = mode;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("\"", text, "\": unknown option \"", parts[i],
                       "\" (options: proxy_protocol",
                       spec.is_unix() ? ", mode=0660" : "", ")"));
    }
  }
  return spec;
}

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

Listener::~Listener() {
  if (resume_timer_ != 0) loop_.Cancel(resume_timer_);
}

size_t Listener::reading_headers() const {
  return proxy_ != nullptr ? proxy_->reading() : 0;
}

absl::Status Listener::Init() {
  if (options_.proxy_protocol) {
    proxy_ = std::make_unique<ProxyProtocolReader>(
        loop_, options_.proxy_header_timeout,
        [this](AcceptedConnection conn) { on_accept_(std::move(conn)); },
        [this](absl::string_view why) {
          ++stats_.rejected_proxy_protocol;
          spdlog::debug("closed a connection on {}: {}", address_.ToString(),
                        std::string(why));
        });
  }
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
  if (resume_timer_ != 0) loop_.Cancel(resume_timer_);
  resume_timer_ = 0;
  watch_.reset();
  socket_.Reset();
}

void Listener::UpdateWatch() {
  watch_->SetEvents(accepting_ && resume_timer_ == 0 ? uint32_t{EPOLLIN} : 0u);
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
        resume_timer_ = loop_.RunAfter(options_.exhaustion_pause, [this] {
          resume_timer_ = 0;
          UpdateWatch();
        });
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
    if (proxy_ != nullptr) {
      proxy_->Start(std::move(conn));
      continue;
    }
    on_accept_(std::move(conn));
    // The callback may pause us (e.g. shutdown).
    if (!accepting_) return;
  }
}

}  // namespace fdbroker
