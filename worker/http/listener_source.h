#ifndef FDBROKER_WORKER_HTTP_LISTENER_SOURCE_H_
#define FDBROKER_WORKER_HTTP_LISTENER_SOURCE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "connection_source.h"
#include "wire/socket_address.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker::http {

// Standalone mode: the worker's own listening socket with SO_REUSEPORT, so
// several worker processes can share a port and the kernel spreads the
// connections (the benchmark's no-broker baseline).
class ListenerSource final : public ConnectionSource {
 public:
  static absl::StatusOr<std::unique_ptr<ListenerSource>> Create(
      const wire::HostPort& address,
      wire::SysCalls& sys = wire::SysCalls::Real());

  // The address actually bound, "127.0.0.1:41234" (port 0 resolved).
  const std::string& bound_address() const { return bound_address_; }

  std::string Describe() const override;
  int pollable_fd() const override { return listen_fd_.get(); }
  absl::Duration OnReadable(ConnectionSink& sink) override;
  // Accepts what is already queued, then closes the socket.
  void StopTaking(ConnectionSink& sink) override;
  void ConnectionClosed(uint64_t source_id) override {}
  bool SharesSocket(uint64_t) const override { return false; }
  bool Finished() const override { return !listen_fd_.valid(); }

 private:
  ListenerSource(wire::UniqueFd listen_fd, std::string bound_address,
                 wire::SysCalls& sys);
  // Accepts up to `limit` connections; returns the pause (see
  // ConnectionSource::OnReadable).
  absl::Duration AcceptSome(ConnectionSink& sink, int limit);

  wire::UniqueFd listen_fd_;
  std::string bound_address_;
  wire::SysCalls& sys_;
  uint64_t next_id_ = 1;
};

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_LISTENER_SOURCE_H_
