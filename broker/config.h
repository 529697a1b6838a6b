#ifndef FDBROKER_BROKER_CONFIG_H_
#define FDBROKER_BROKER_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "wire/socket_address.h"

namespace fdbroker {

// Everything the broker needs from its command line, validated.
struct BrokerConfig {
  wire::SocketAddress listen;
  std::string socket_path;
  int workers = 0;
  std::vector<std::string> worker_argv;
  int max_workers = 64;
  std::string policy;
  absl::Duration drain_timeout;
  // Rebalance once after a scale-up's new workers are ready.
  bool rebalance_after_scale = false;
  absl::Duration heartbeat_interval;
  absl::Duration heartbeat_timeout;
  absl::Duration worker_start_timeout;
  size_t max_pending = 0;
  absl::Duration pending_timeout;
  // Scheduler slice of the data-plane thread; zero keeps the default.
  absl::Duration loop_slice;
  std::string ready_file;
  // Take the sockets over from the broker running on socket_path.
  bool upgrade = false;
  // How long a broker that replaces another waits for re-registering
  // workers before starting its own.
  absl::Duration adopt_grace;
  // Prometheus endpoint (/metrics); empty disables it.
  std::string metrics_address;
  // Control plane; empty address disables it.
  std::string control_address;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  bool allow_insecure_control = false;
  // With mTLS, the client-certificate subjects allowed to mutate.
  std::vector<std::string> admin_subjects;
};

// Parses argv into the absl flags. Unlike absl::ParseCommandLine, a bad flag
// (unknown name, unparsable value, stray argument) prints one line and exits
// with code 2, as the operator contract requires. --help works as usual.
void ParseFlagsOrExit(int argc, char** argv);

// Validates the parsed flags. `self_dir` is the directory of the running
// binary (where the default worker lives).
absl::StatusOr<BrokerConfig> ConfigFromFlags(const std::string& self_dir);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_CONFIG_H_
