#include "broker/handoff_server.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "fdbroker/v1/handoff.pb.h"
#include "spdlog/spdlog.h"
#include "wire/message_channel.h"

namespace fdbroker {
namespace {

absl::StatusOr<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("socket path must be 1..", sizeof(addr.sun_path) - 1,
                     " bytes long: \"", path, "\""));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// Removes `path` if it is a socket nobody listens on (left by a crashed
// broker); true if it did. Any other file, or a live socket, is an error.
absl::StatusOr<bool> RemoveStaleSocket(const std::string& path,
                                       const sockaddr_un& addr) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return false;
    return absl::ErrnoToStatus(errno, absl::StrCat("stat ", path));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, " exists and is not a socket"));
  }
  wire::UniqueFd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!probe) return absl::ErrnoToStatus(errno, "socket");
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr),
                sizeof(addr)) == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("another broker is listening on ", path,
                     " (stop it, or choose another --socket)"));
  }
  if (errno != ECONNREFUSED) {
    return absl::ErrnoToStatus(errno, absl::StrCat("probe ", path));
  }
  if (::unlink(path.c_str()) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("unlink stale ", path));
  }
  spdlog::info("removed stale hand-off socket {}", path);
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<HandoffServer>> HandoffServer::Create(
    EventLoop& loop, const std::string& path, const Options& options,
    wire::SysCalls& sys, NewPeerCallback on_peer) {
  absl::StatusOr<sockaddr_un> addr = UnixAddress(path);
  if (!addr.ok()) return addr.status();
  absl::StatusOr<bool> stale = RemoveStaleSocket(path, *addr);
  if (!stale.ok()) return stale.status();
  wire::UniqueFd socket(
      ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!socket) return absl::ErrnoToStatus(errno, "socket(AF_UNIX)");
  // The file is created 0600 from the start: no window in which another
  // user could connect.
  const mode_t old_mask = ::umask(0177);
  const int rc = ::bind(socket.get(), reinterpret_cast<const sockaddr*>(&*addr),
                        sizeof(*addr));
  const int bind_errno = errno;
  ::umask(old_mask);
  if (rc != 0) {
    return absl::ErrnoToStatus(bind_errno, absl::StrCat("bind ", path));
  }
  if (::listen(socket.get(), 256) != 0) {
    int err = errno;
    ::unlink(path.c_str());
    return absl::ErrnoToStatus(err, "listen(AF_UNIX)");
  }
  std::unique_ptr<HandoffServer> server(new HandoffServer(
      loop, path, std::move(socket), options, sys, std::move(on_peer)));
  server->replaced_stale_socket_ = *stale;
  if (absl::Status s = server->Init(); !s.ok()) return s;
  return server;
}

absl::StatusOr<std::unique_ptr<HandoffServer>> HandoffServer::Adopt(
    EventLoop& loop, const std::string& path, wire::UniqueFd socket,
    const Options& options, wire::SysCalls& sys, NewPeerCallback on_peer) {
  int type = 0;
  socklen_t len = sizeof(type);
  if (::getsockopt(socket.get(), SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
      type != SOCK_SEQPACKET) {
    return absl::InvalidArgumentError(
        "the handed-over hand-off socket is not SOCK_SEQPACKET");
  }
  const int flags = ::fcntl(socket.get(), F_GETFL);
  ::fcntl(socket.get(), F_SETFL, flags | O_NONBLOCK);
  std::unique_ptr<HandoffServer> server(new HandoffServer(
      loop, path, std::move(socket), options, sys, std::move(on_peer)));
  if (absl::Status s = server->Init(); !s.ok()) return s;
  return server;
}

void HandoffServer::Release() {
  released_ = true;
  resume_timer_.Cancel();
  watch_.reset();
  socket_.Reset();
}

HandoffServer::HandoffServer(EventLoop& loop, std::string path,
                             wire::UniqueFd socket, const Options& options,
                             wire::SysCalls& sys, NewPeerCallback on_peer)
    : loop_(loop),
      path_(std::move(path)),
      socket_(std::move(socket)),
      options_(options),
      sys_(sys),
      on_peer_(std::move(on_peer)) {}

HandoffServer::~HandoffServer() {
  resume_timer_.Cancel();
  watch_.reset();
  if (!released_) ::unlink(path_.c_str());
}

absl::Status HandoffServer::Init() {
  absl::StatusOr<std::unique_ptr<IoWatch>> watch =
      loop_.Watch(socket_.get(), EPOLLIN, [this](uint32_t) { OnReadable(); });
  if (!watch.ok()) return watch.status();
  watch_ = *std::move(watch);
  return absl::OkStatus();
}

bool HandoffServer::Allowed(uid_t uid) const {
  if (options_.allowed_uids.empty()) return uid == ::getuid();
  return std::find(options_.allowed_uids.begin(), options_.allowed_uids.end(),
                   uid) != options_.allowed_uids.end();
}

void HandoffServer::OnReadable() {
  for (int i = 0; i < 64; ++i) {
    int fd = sys_.Accept4(socket_.get(), nullptr, nullptr,
                          SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      if (err == EINTR || err == ECONNABORTED) continue;
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        spdlog::warn("hand-off accept: {}; pausing", strerror(err));
        watch_->SetEvents(0);
        resume_timer_.Arm(options_.exhaustion_pause,
                          [this] { watch_->SetEvents(EPOLLIN); });
        return;
      }
      spdlog::error("hand-off accept: {}", strerror(err));
      return;
    }
    wire::UniqueFd peer_socket(fd);
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      spdlog::warn("SO_PEERCRED: {}; dropping peer", strerror(errno));
      continue;
    }
    const bool allowed = Allowed(cred.uid);
    // A refused peer still gets a channel: the refusal is sent in answer to
    // its Hello, and the channel's orderly close reads what the peer sent
    // first. Closing a socket with unread data would reset the connection
    // and the peer would never see why it was refused.
    on_peer_(std::move(peer_socket), cred, allowed);
  }
}

}  // namespace fdbroker
