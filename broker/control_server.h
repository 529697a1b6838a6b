#ifndef FDBROKER_BROKER_CONTROL_SERVER_H_
#define FDBROKER_BROKER_CONTROL_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/control_service.h"

namespace fdbroker {

// The gRPC server on --control: BrokerService, server reflection and
// grpc.health.v1.Health. Runs on gRPC's own threads.
class ControlServer {
 public:
  struct Options {
    std::string address;  // HOST:PORT; port 0 picks one.
    std::string tls_cert_file;
    std::string tls_key_file;
    std::string tls_client_ca_file;  // Set: mTLS (client certs required).
    // Plaintext on a non-loopback address must be asked for explicitly.
    bool allow_insecure = false;
  };

  // Per client connection; gRPC queues the rest on the client side.
  static constexpr int kMaxConcurrentStreams = 100;
  static constexpr size_t kMemoryQuotaBytes = size_t{64} << 20;

  // Binds and starts. Errors: bad TLS files, insecure non-loopback address
  // without allow_insecure, address in use.
  static absl::StatusOr<std::unique_ptr<ControlServer>> Start(
      const Options& options, ControlService& service);
  ~ControlServer();

  // "host:port" actually bound.
  const std::string& address() const { return address_; }
  uint16_t port() const { return port_; }
  bool tls() const { return tls_; }

  // Thread-safe. Sets the health of "" and "fdbroker.v1.BrokerService";
  // once Shutdown() has begun it does nothing, and never waits for it (the
  // loop thread calls it).
  void SetServing(bool serving) ABSL_LOCKS_EXCLUDED(health_mu_);

  // Stops taking RPCs and waits (briefly) for running ones. Thread-safe
  // and idempotent; must not run on the event loop's thread (handlers may
  // be waiting for the loop).
  void Shutdown() ABSL_LOCKS_EXCLUDED(shutdown_mu_, health_mu_);

 private:
  ControlServer() = default;
  std::unique_ptr<grpc::Server> server_;
  // Held for the whole shutdown: a second caller returns once it is done.
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
  // Held only briefly: SetServing never waits for the shutdown itself.
  absl::Mutex health_mu_ ABSL_ACQUIRED_AFTER(shutdown_mu_);
  bool stopping_ ABSL_GUARDED_BY(health_mu_) = false;
  std::string address_;
  uint16_t port_ = 0;
  bool tls_ = false;
};

// True for 127.0.0.0/8, ::1 and "localhost".
bool IsLoopbackAddress(const std::string& host_port);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_CONTROL_SERVER_H_
