#ifndef FDBROKER_PROTO_WIRE_SOCKET_ADDRESS_H_
#define FDBROKER_PROTO_WIRE_SOCKET_ADDRESS_H_

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fdbroker::wire {

// "HOST:PORT" split: the one parser of the address syntax every binary and
// test accepts. An IPv6 host is written in brackets ("[::1]:80"; `host` is
// then "::1"); the host may be empty ("":80"); the port is 0..65535 in
// decimal. The host is not resolved or checked.
struct HostPort {
  std::string host;
  uint16_t port = 0;

  static absl::StatusOr<HostPort> Parse(absl::string_view text);
  // "host:port", brackets around an IPv6 host.
  std::string ToString() const;
};

// An IPv4 or IPv6 socket address.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  // Parses HOST:PORT (HostPort's syntax) with a numeric host, or localhost
  // (127.0.0.1); "" or "*" means 0.0.0.0. Port 0 asks the kernel for a free
  // port.
  static absl::StatusOr<SocketAddress> Parse(absl::string_view text);
  // The address a socket is bound to (getsockname) or connected to
  // (getpeername: `peer`).
  static absl::StatusOr<SocketAddress> Of(int fd, bool peer = false);

  const sockaddr* addr() const {
    return reinterpret_cast<const sockaddr*>(&storage);
  }
  sockaddr* mutable_addr() { return reinterpret_cast<sockaddr*>(&storage); }
  int family() const { return storage.ss_family; }
  int port() const;
  bool IsWildcard() const;

  // "ip:port" or "[v6]:port". Writes into `out` (reusing its capacity, so the
  // data path does not allocate).
  void Format(std::string& out) const;
  std::string ToString() const;
};

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_SOCKET_ADDRESS_H_
