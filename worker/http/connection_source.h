#ifndef FDBROKER_WORKER_HTTP_CONNECTION_SOURCE_H_
#define FDBROKER_WORKER_HTTP_CONNECTION_SOURCE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "fdbroker/worker.h"
#include "wire/unique_fd.h"

namespace fdbroker::http {

// Where the HTTP server's client connections come from: the broker (through
// the worker SDK) or its own SO_REUSEPORT listener (standalone). The server
// is the same code either way, which is what makes the benchmark's "direct"
// baseline fair.

// What a source tells the server.
class ConnectionSink {
 public:
  virtual ~ConnectionSink() = default;
  // A new client socket, owned by the server from now on. `source_id` is
  // what ConnectionSource::ConnectionClosed() takes back. `peer_address` is
  // the client's "ip:port" as the source knows it: the broker's
  // Connection.peer_address (the real client even behind a PROXY-protocol
  // balancer, which getpeername() would not tell), or what accept() said.
  virtual void OnNewConnection(wire::UniqueFd fd, uint64_t source_id,
                               std::string initial_data,
                               std::string peer_address) = 0;
  // Stop taking work: finish in-flight requests, close idle connections.
  // `deadline` is InfiniteFuture() if there is none.
  // If the source says ReleaseOnDrain(), idle connections are released
  // instead (and busy ones once idle).
  virtual void OnDrain(absl::Time deadline) = 0;
  // The broker asks for up to `max_connections` idle connections back
  // (ConnectionSource::Release()); fewer or none is fine.
  virtual void OnReleaseRequest(uint32_t max_connections,
                                worker::ReleaseReason reason) = 0;
};

// Loop thread only.
class ConnectionSource {
 public:
  virtual ~ConnectionSource() = default;

  // For the startup log line: "standalone on 127.0.0.1:8080", ...
  virtual std::string Describe() const = 0;
  // The fd to poll (level-triggered, readable); -1 once there is nothing to
  // poll (a standalone listener closes its socket in StopTaking(), and epoll
  // forgets a closed fd by itself).
  virtual int pollable_fd() const = 0;
  // pollable_fd() is readable: deliver what arrived. Returns how long the
  // server should stop polling the source (non-zero when accept() ran out of
  // fds, so that the loop does not spin).
  virtual absl::Duration OnReadable(ConnectionSink& sink) = 0;
  // Stop taking connections (SIGTERM). Connections the source already
  // accepted may still be delivered to `sink`.
  virtual void StopTaking(ConnectionSink& sink) = 0;
  // Whether another process may still hold a copy of the delivered socket
  // `source_id` (the broker keeps its copy of a handed connection until it
  // has read the worker's Ack). Then close() alone neither sends the FIN
  // nor removes the fd from epoll.
  virtual bool SharesSocket(uint64_t source_id) const = 0;
  // A delivered connection was closed by the server.
  virtual void ConnectionClosed(uint64_t source_id) = 0;
  // A delivered connection was cut by the server unfinished (its drain
  // deadline passed, or a second signal).
  virtual void ConnectionCut(uint64_t source_id) {
    ConnectionClosed(source_id);
  }
  // The source has nothing left to do once the server holds no connection
  // (standalone: stopped; broker: Goodbye said or broker gone).
  virtual bool Finished() const = 0;

  // Migration (broker mode only; the defaults are a source that cannot).
  // While the server drains: release idle connections rather than close
  // them (worker::Worker::release_on_drain()).
  virtual bool ReleaseOnDrain() const { return false; }
  // Hands an idle delivered connection back (worker::Worker::Release()):
  // OK takes `fd` and the server forgets the connection (no
  // ConnectionClosed); an error leaves `fd` and the connection with it.
  virtual absl::Status Release(uint64_t source_id, wire::UniqueFd& fd,
                               std::string unread_data,
                               worker::ReleaseReason reason) {
    return absl::UnimplementedError("this source cannot release connections");
  }
};

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_CONNECTION_SOURCE_H_
