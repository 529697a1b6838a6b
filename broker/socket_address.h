#ifndef FDBROKER_BROKER_SOCKET_ADDRESS_H_
#define FDBROKER_BROKER_SOCKET_ADDRESS_H_

#include <netinet/in.h>
#include <sys/socket.h>

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fdbroker {

// An IPv4 or IPv6 socket address.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  // Parses "host:port" / "[v6]:port" with a numeric host ("" or "*" means
  // 0.0.0.0). Port 0 asks the kernel for a free port.
  static absl::StatusOr<SocketAddress> Parse(absl::string_view text);

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

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_SOCKET_ADDRESS_H_
