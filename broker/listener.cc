#include "broker/listener.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <cstddef>
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

namespace {

// The name of a listening socket bound to `address`: its address in
// --listen syntax.
std::string NameOf(const wire::SocketAddress& address) {
  if (address.family() != AF_UNIX) return address.ToString();
  const auto* un = reinterpret_cast<const sockaddr_un*>(&address.storage);
  const size_t max = address.length > offsetof(sockaddr_un, sun_path)
                         ? address.length - offsetof(sockaddr_un, sun_path)
                         : 0;
  return absl::StrCat("unix:",
                      std::string(un->sun_path, strnlen(un->sun_path, max)));
}

// A listening Unix stream socket at `spec.unix_path`.
absl::StatusOr<wire::UniqueFd> BindUnix(const ListenSpec& spec, int backlog) {
  const std::string& path = spec.unix_path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  const auto* sa = reinterpret_cast<const sockaddr*>(&addr);
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--listen=", spec.name, ": ", path, " exists and is not a socket"));
    }
    // A live listener answers; the file of one that is gone is replaced.
    wire::UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(probe.get(), sa, sizeof(addr)) == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--listen=", spec.name, ": another process listens on ", path));
    }
    ::unlink(path.c_str());
  }
  wire::UniqueFd socket(
      ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!socket) return absl::ErrnoToStatus(errno, "socket");
  // With a mode, nobody may connect before it applies: bind owner-only.
  const mode_t old_umask = spec.unix_mode >= 0 ? ::umask(0177) : 0;
  const int bound = ::bind(socket.get(), sa, sizeof(addr));
  const int bind_errno = errno;
  if (spec.unix_mode >= 0) ::umask(old_umask);
  if (bound != 0) {
    return absl::ErrnoToStatus(bind_errno, absl::StrCat("bind ", path));
  }
  if (spec.unix_mode >= 0 &&
      ::chmod(path.c_str(), static_cast<mode_t>(spec.unix_mode)) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("chmod ", path));
  }
  if (::listen(socket.get(), backlog) != 0) {
    return absl::ErrnoToStatus(errno, "listen");
  }
  return socket;
}

absl::StatusOr<wire::UniqueFd> BindTcp(const wire::SocketAddress& address,
                                       int backlog, bool reuseport) {
  wire::UniqueFd socket(::socket(
      address.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!socket) return absl::ErrnoToStatus(errno, "socket");
  int one = 1;
  ::setsockopt(socket.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (reuseport && ::setsockopt(socket.get(), SOL_SOCKET, SO_REUSEPORT, &one,
                                sizeof(one)) != 0) {
    return absl::ErrnoToStatus(errno, "setsockopt SO_REUSEPORT");
  }
  if (address.family() == AF_INET6) {
    // "[::]:80" is IPv6 only, so that "0.0.0.0:80" can be a listener too.
    ::setsockopt(socket.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  }
  if (::bind(socket.get(), address.addr(), address.length) != 0) {
    return absl::ErrnoToStatus(errno,
                               absl::StrCat("bind ", address.ToString()));
  }
  if (::listen(socket.get(), backlog) != 0) {
    return absl::ErrnoToStatus(errno, "listen");
  }
  return socket;
}

}  // namespace

Listener::Listener(EventLoop& loop, const Options& options, wire::SysCalls& sys,
                   AcceptCallback on_accept)
    : loop_(loop),
      options_(options),
      sys_(sys),
      on_accept_(std::move(on_accept)) {}

absl::StatusOr<std::unique_ptr<Listener>> Listener::Create(
    EventLoop& loop, const wire::SocketAddress& address, const Options& options,
    wire::SysCalls& sys, AcceptCallback on_accept) {
  ListenSpec spec;
  spec.name = address.ToString();
  spec.address = address;
  spec.proxy_protocol = options.proxy_protocol;
  auto listener =
      std::make_unique<Listener>(loop, options, sys, std::move(on_accept));
  if (absl::Status s = listener->Bind(spec); !s.ok()) return s;
  return listener;
}

absl::StatusOr<std::unique_ptr<Listener>> Listener::Adopt(
    EventLoop& loop, wire::UniqueFd socket, const Options& options,
    wire::SysCalls& sys, AcceptCallback on_accept) {
  auto listener =
      std::make_unique<Listener>(loop, options, sys, std::move(on_accept));
  if (absl::Status s =
          listener->AdoptSocket(std::move(socket), options.proxy_protocol);
      !s.ok()) {
    return s;
  }
  return listener;
}

Listener::~Listener() = default;

absl::Status Listener::Bind(const ListenSpec& spec) {
  absl::StatusOr<wire::UniqueFd> socket =
      spec.is_unix()
          ? BindUnix(spec, options_.backlog)
          : BindTcp(spec.address, options_.backlog, options_.reuseport);
  if (!socket.ok()) return socket.status();
  return Add(*std::move(socket), spec.proxy_protocol);
}

absl::Status Listener::AdoptSocket(wire::UniqueFd socket, bool proxy_protocol) {
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
  return Add(std::move(socket), proxy_protocol);
}

absl::Status Listener::Add(wire::UniqueFd fd, bool proxy_protocol) {
  auto socket = std::make_unique<Socket>();
  socket->address.length = sizeof(socket->address.storage);
  if (::getsockname(fd.get(), socket->address.mutable_addr(),
                    &socket->address.length) != 0) {
    return absl::ErrnoToStatus(errno, "getsockname");
  }
  const int family = socket->address.family();
  if (family != AF_INET && family != AF_INET6 && family != AF_UNIX) {
    return absl::InvalidArgumentError(
        "a listening socket that is neither TCP (IPv4, IPv6) nor Unix");
  }
  socket->is_unix = family == AF_UNIX;
  socket->name = NameOf(socket->address);
  socket->fd = std::move(fd);
  Socket* s = socket.get();
  absl::StatusOr<std::unique_ptr<IoWatch>> watch = loop_.Watch(
      s->fd.get(), EPOLLIN, [this, s](uint32_t) { OnReadable(*s); });
  if (!watch.ok()) return watch.status();
  s->watch = *std::move(watch);
  if (proxy_protocol) {
    s->proxy = std::make_unique<ProxyProtocolReader>(
        loop_, options_.proxy_header_timeout,
        [this](AcceptedConnection conn) { on_accept_(std::move(conn)); },
        [this, s](absl::string_view why) {
          ++stats_.rejected_proxy_protocol;
          spdlog::debug("closed a connection on {}: {}", s->name,
                        std::string(why));
        });
  }
  sockets_.push_back(std::move(socket));
  UpdateWatches();
  return absl::OkStatus();
}

std::string Listener::Describe() const {
  std::string out;
  for (const auto& socket : sockets_) {
    absl::StrAppend(&out, out.empty() ? "" : ", ", socket->name,
                    socket->proxy != nullptr ? " (PROXY protocol)" : "");
  }
  return out;
}

const std::string* Listener::NameOfConnection(int fd) const {
  wire::SocketAddress local;
  local.length = sizeof(local.storage);
  if (::getsockname(fd, local.mutable_addr(), &local.length) != 0) {
    return nullptr;
  }
  const std::string name = NameOf(local);
  for (const auto& socket : sockets_) {
    if (socket->name == name) return &socket->name;
  }
  for (const auto& socket : sockets_) {
    if (!socket->is_unix && socket->address.IsWildcard() &&
        socket->address.family() == local.family() &&
        socket->address.port() == local.port()) {
      return &socket->name;
    }
  }
  return nullptr;
}

size_t Listener::reading_headers() const {
  size_t reading = 0;
  for (const auto& socket : sockets_) {
    if (socket->proxy != nullptr) reading += socket->proxy->reading();
  }
  return reading;
}

void Listener::Pause() {
  accepting_ = false;
  UpdateWatches();
}

void Listener::Resume() {
  if (closed_) return;
  accepting_ = true;
  UpdateWatches();
}

void Listener::Hold(bool held) {
  held_ = held;
  UpdateWatches();
}

void Listener::Close() {
  accepting_ = false;
  closed_ = true;
  resume_timer_.Cancel();
  // The PROXY readers stay: their connections go on, or time out.
  for (auto& socket : sockets_) {
    socket->watch.reset();
    socket->fd.Reset();
  }
}

void Listener::SetWatched(size_t i, bool watched) {
  sockets_[i]->watched = watched;
  UpdateWatches();
}

void Listener::UpdateWatches() {
  const uint32_t events =
      accepting_ && !held_ && !resume_timer_.armed() ? uint32_t{EPOLLIN} : 0u;
  for (auto& socket : sockets_) {
    if (socket->watch != nullptr) {
      socket->watch->SetEvents(socket->watched ? events : 0u);
    }
  }
}

void Listener::OnReadable(Socket& socket) {
  const bool wildcard = socket.address.IsWildcard();
  for (int i = 0; i < options_.max_accepts_per_wake; ++i) {
    AcceptedConnection conn;
    wire::SocketAddress peer;
    peer.length = sizeof(peer.storage);
    // The client socket stays in blocking mode: the broker never does I/O on
    // it (but a PROXY header, with MSG_DONTWAIT), and the worker that
    // receives it chooses its own mode.
    int fd = sys_.Accept4(socket.fd.get(), peer.mutable_addr(), &peer.length,
                          SOCK_CLOEXEC);
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
        resume_timer_.Arm(options_.exhaustion_pause,
                          [this] { UpdateWatches(); });
        UpdateWatches();
        return;
      }
      spdlog::error("accept on {}: {}", socket.name, strerror(err));
      return;
    }
    conn.fd.Reset(fd);
    // A Unix-socket client has no IP addresses: both stay empty.
    if (!socket.is_unix) {
      conn.peer = peer;
      if (wildcard) {
        conn.local.length = sizeof(conn.local.storage);
        ::getsockname(fd, conn.local.mutable_addr(), &conn.local.length);
      } else {
        conn.local = socket.address;
      }
    }
    conn.listener = &socket.name;
    // The one clock call per connection (the monotonic time is the turn's).
    conn.accept_unix_nanos = loop_.clock().UnixNanos();
    conn.accept_mono_nanos = loop_.NowNanos();
    ++stats_.accepted;
    ++socket.accepted;
    if (socket.proxy != nullptr) {
      socket.proxy->Start(std::move(conn));
      continue;
    }
    on_accept_(std::move(conn));
    // The callback may pause us (e.g. shutdown).
    if (!accepting_ || held_) return;
  }
}

}  // namespace fdbroker
