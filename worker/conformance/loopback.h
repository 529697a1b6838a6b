#ifndef FDBROKER_WORKER_CONFORMANCE_LOOPBACK_H_
#define FDBROKER_WORKER_CONFORMANCE_LOOPBACK_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "wire/unique_fd.h"

namespace fdbroker::conformance {

// One real client TCP connection over loopback: `client` is the kit's client
// end, `server` the accepted socket that the kit hands to the worker (the
// kit keeps this copy until the worker's Ack, as the broker does).
struct TcpPair {
  wire::UniqueFd client;
  wire::UniqueFd server;
  std::string peer_address;   // the client's "ip:port", as the server sees it
  std::string local_address;  // the listener's "ip:port"
};

// A listening socket on 127.0.0.1, port 0 (the kernel picks a free one).
class LoopbackListener {
 public:
  static absl::StatusOr<std::unique_ptr<LoopbackListener>> Create();
  absl::StatusOr<TcpPair> Connect();
  // A client connected and not accepted: a worker the listener is granted
  // to (ListenerGrant) accepts it itself.
  absl::StatusOr<wire::UniqueFd> ConnectClient();
  // The listening socket (the kit keeps it, as the broker keeps a granted
  // one).
  int fd() const { return fd_.get(); }

 private:
  explicit LoopbackListener(wire::UniqueFd fd) : fd_(std::move(fd)) {}
  wire::UniqueFd fd_;
};

// "ip:port" of a socket's own (local) or peer address.
std::string LocalAddress(int fd);
std::string PeerAddress(int fd);

// Reads what arrives on `fd` until `deadline`: at least one byte, then
// whatever else is already there. An empty string means EOF (the peer, every
// copy of it, closed or shut down); DeadlineExceeded means nothing arrived.
absl::StatusOr<std::string> ReadSome(int fd, absl::Time deadline);
// Same as ReadSome, but leaves the bytes in the socket (MSG_PEEK).
absl::StatusOr<std::string> PeekSome(int fd, absl::Time deadline);
// True if `fd` reads EOF (or a reset) before `deadline`, skipping any data.
bool ReadsEof(int fd, absl::Time deadline);
// True if nothing (no byte, no EOF) is readable on `fd` right now.
bool NothingReadable(int fd);
absl::Status WriteAll(int fd, const std::string& bytes);

}  // namespace fdbroker::conformance

#endif  // FDBROKER_WORKER_CONFORMANCE_LOOPBACK_H_
