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
#include "absl/strings/str_format.h"
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

// The directory the hand-off socket lives in decides who can replace it
// (rename, unlink, bind first): it must be the broker's own or root's, and
// writable by nobody else, unless it is sticky like /tmp (others may create
// entries there but not touch ours; one they made first is refused by
// RemoveStaleSocket). Symlinks are followed: what counts is the directory
// they lead to. A missing last component is created 0700 (an emptyDir
// volume is 0777, so a deployment points --socket one level below it).
absl::Status CheckSocketDirectory(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "."
                          : slash == 0               ? "/"
                                                     : path.substr(0, slash);
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno != ENOENT || ::mkdir(dir.c_str(), 0700) != 0 ||
        ::stat(dir.c_str(), &st) != 0) {
      return absl::ErrnoToStatus(
          errno, absl::StrCat("the directory of --socket, ", dir));
    }
    spdlog::info("created the hand-off socket's directory {} (0700)", dir);
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the directory of --socket, ", dir, ", is not one"));
  }
  const uid_t self = ::geteuid();
  if (st.st_uid != self && st.st_uid != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the directory of --socket, ", dir, ", belongs to uid ",
                     st.st_uid, ", not to the broker's uid ", self,
                     " or root: its owner could replace the socket"));
  }
  const bool others_write = (st.st_mode & (S_IWGRP | S_IWOTH)) != 0;
  if (others_write && (st.st_mode & S_ISVTX) == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the directory of --socket, %s, is writable by %s (mode %04o) and "
        "not sticky: another user could replace the socket (use a directory "
        "only uid %d can write)",
        dir, (st.st_mode & S_IWOTH) != 0 ? "others" : "its group",
        st.st_mode & 07777, self));
  }
  return absl::OkStatus();
}

// Removes `path` if it is a socket nobody listens on (left by a crashed
// broker); true if it did. Any other file, a live socket, or one another
// uid created (in a sticky directory such as /tmp) is an error.
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
  if (st.st_uid != ::geteuid()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, " is a socket of uid ", st.st_uid,
                     ", not of the broker's uid ", ::geteuid(),
                     ": another user created it (remove it, or choose another "
                     "--socket)"));
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
  if (absl::Status dir = CheckSocketDirectory(path); !dir.ok()) return dir;
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
