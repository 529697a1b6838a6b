#include "listener_source.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace fdbroker::http {
namespace {

// Accepts per readiness event, so that a connection storm cannot starve the
// connections already being served (the socket stays readable).
constexpr int kAcceptsPerEvent = 64;
// How long accepting pauses when the process or system is out of fds.
constexpr absl::Duration kAcceptBackOff = absl::Milliseconds(100);
constexpr int kListenBacklog = 4096;

}  // namespace

absl::StatusOr<std::unique_ptr<ListenerSource>> ListenerSource::Create(
    const wire::HostPort& address, wire::SysCalls& sys) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = absl::StrCat(address.port);
  const int resolved =
      ::getaddrinfo(address.host.empty() ? nullptr : address.host.c_str(),
                    port.c_str(), &hints, &found);
  if (resolved != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot resolve '", address.host, "': ", ::gai_strerror(resolved)));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> results(found,
                                                               ::freeaddrinfo);
  const std::string where = address.ToString();
  wire::UniqueFd fd(::socket(found->ai_family,
                             SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                             found->ai_protocol));
  if (!fd) return absl::ErrnoToStatus(errno, "socket");
  const int one = 1;
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) !=
          0 ||
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) !=
          0) {
    return absl::ErrnoToStatus(errno, "setsockopt(SO_REUSEADDR/SO_REUSEPORT)");
  }
  if (::bind(fd.get(), found->ai_addr, found->ai_addrlen) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("bind ", where));
  }
  if (::listen(fd.get(), kListenBacklog) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("listen ", where));
  }
  absl::StatusOr<wire::SocketAddress> bound = wire::SocketAddress::Of(fd.get());
  if (!bound.ok()) return bound.status();
  return std::unique_ptr<ListenerSource>(
      new ListenerSource(std::move(fd), bound->ToString(), sys));
}

ListenerSource::ListenerSource(wire::UniqueFd listen_fd,
                               std::string bound_address, wire::SysCalls& sys)
    : listen_fd_(std::move(listen_fd)),
      bound_address_(std::move(bound_address)),
      sys_(sys) {}

std::string ListenerSource::Describe() const {
  return absl::StrCat("standalone on ", bound_address_, " (SO_REUSEPORT)");
}

absl::Duration ListenerSource::OnReadable(ConnectionSink& sink) {
  return AcceptSome(sink, kAcceptsPerEvent);
}

absl::Duration ListenerSource::AcceptSome(ConnectionSink& sink, int limit) {
  for (int i = 0; i < limit && listen_fd_.valid(); ++i) {
    wire::SocketAddress peer;
    peer.length = sizeof(peer.storage);
    wire::UniqueFd client(sys_.Accept4(listen_fd_.get(), peer.mutable_addr(),
                                       &peer.length,
                                       SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (client) {
      sink.OnNewConnection(std::move(client), next_id_++, std::string(),
                           peer.ToString());
      continue;
    }
    switch (errno) {
      case EAGAIN:
        return absl::ZeroDuration();
      case EINTR:
      case ECONNABORTED:
      case EPROTO:
        continue;  // That client is gone; try the next.
      case EMFILE:
      case ENFILE:
      case ENOBUFS:
      case ENOMEM:
        spdlog::warn("accept: {}; pausing accepts for {} ms",
                     std::strerror(errno),
                     absl::ToInt64Milliseconds(kAcceptBackOff));
        return kAcceptBackOff;
      default:
        spdlog::error("accept: {}", std::strerror(errno));
        return kAcceptBackOff;
    }
  }
  return absl::ZeroDuration();
}

void ListenerSource::StopTaking(ConnectionSink& sink) {
  if (!listen_fd_.valid()) return;
  // Closing a SO_REUSEPORT socket resets the connections in its own accept
  // queue: take them first.
  (void)AcceptSome(sink, 1 << 20);
  listen_fd_.Reset();
}

}  // namespace fdbroker::http
