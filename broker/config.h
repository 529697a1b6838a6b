#ifndef FDBROKER_BROKER_CONFIG_H_
#define FDBROKER_BROKER_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/connection_dispatcher.h"
#include "broker/control_server.h"
#include "broker/kernel_placement.h"
#include "broker/listener.h"
#include "broker/worker_manager.h"
#include "wire/socket_address.h"

namespace fdbroker {

// Everything the broker needs from its command line, validated. Each flag
// (declared with its default and help in config.cc) is read once, into the
// Options of the component it configures, which the daemon passes on as is.
struct BrokerConfig {
  std::vector<ListenSpec> listen;  // --listen
  // --proxy_header_timeout (proxy_protocol and the rest are per listener,
  // from its ListenSpec).
  Listener::Options listener;
  std::string socket_path;               // --socket
  std::vector<std::string> worker_argv;  // --worker_cmd
  std::string policy;                    // --policy
  // --placement=kernel (Listener::Options::reuseport follows it).
  bool kernel_placement = false;
  // With kernel_placement: the mode --policy asks of the kernel,
  // --kernel_rebalance_after.
  KernelPlacement::Options kernel;
  WorkerManager::Options manager;            // --workers, --max_workers,
                                             // --drain_timeout, heartbeats,
                                             // --worker_start_timeout,
                                             // --rebalance_after_scale
  ConnectionDispatcher::Options dispatcher;  // --max_pending, --pending_timeout
  // --control (empty address: no control plane), --tls_*,
  // --allow_insecure_control.
  ControlServer::Options control;
  // With mTLS, the client-certificate subjects allowed to mutate.
  std::vector<std::string> admin_subjects;
  // Prometheus endpoint (/metrics); empty disables it.
  std::string metrics_address;
  // Scheduler slice of the data-plane thread; zero keeps the default.
  absl::Duration loop_slice;
  std::string ready_file;
  // Take the sockets over from the broker running on socket_path.
  bool upgrade = false;
  // How long a broker that replaces another waits for re-registering
  // workers before starting its own.
  absl::Duration adopt_grace;
};

// A size in bytes: digits with an optional unit (case-insensitive): B;
// KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024); KB, MB, GB, TB (powers
// of 1000). Empty is 0. At most 1PiB. InvalidArgument otherwise.
absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text);

// Parses argv into the absl flags. Unlike absl::ParseCommandLine, a bad flag
// (unknown name, unparsable value, stray argument) prints one line and exits
// with code 2, as the operator contract requires. --help works as usual.
void ParseFlagsOrExit(int argc, char** argv);

// Validates the parsed flags. `self_dir` is the directory of the running
// binary (where the default worker lives).
absl::StatusOr<BrokerConfig> ConfigFromFlags(const std::string& self_dir);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_CONFIG_H_
