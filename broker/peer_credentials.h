#ifndef FDBROKER_BROKER_PEER_CREDENTIALS_H_
#define FDBROKER_BROKER_PEER_CREDENTIALS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fdbroker {

// The uid owning the client end of a TCP connection to this host, looked up
// in the kernel's socket tables (`/proc/net/tcp`, `tcp6`) as identd does:
// the client socket is the one whose local address is `peer` and whose
// remote port is `server_port`. `peer` is as gRPC reports it
// ("ipv4:127.0.0.1:40000", "ipv6:[::1]:40000"). NotFound when no socket of
// this network namespace matches (a client on another host or in another
// container), InvalidArgument for a peer that is not an IP address.
// Reads files: not for the event loop's thread.
absl::StatusOr<uid_t> TcpPeerUid(absl::string_view peer, uint16_t server_port,
                                 const std::string& proc_net = "/proc/net");

// The rule for plaintext control-plane callers that may change the broker:
// root or the broker's own uid `self`, as for the hand-off socket. The
// error (PermissionDenied) names the caller and says what to use instead.
absl::Status CheckTrustedLocalCaller(absl::string_view peer,
                                     uint16_t server_port, uid_t self);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_PEER_CREDENTIALS_H_
