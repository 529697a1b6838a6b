#ifndef FDBROKER_WORKER_HTTP_WORKER_FLAGS_H_
#define FDBROKER_WORKER_HTTP_WORKER_FLAGS_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "wire/socket_address.h"

namespace fdbroker::http {

// The validated command line of fdbroker-http-worker.
struct WorkerConfig {
  // --listen: standalone on this address; unset: register with a broker.
  std::optional<wire::HostPort> listen;
  // --socket, else $FDBROKER_SOCKET (broker mode only).
  std::string socket_path;
  // --capacity: most connections at once, 0 = unlimited (broker mode).
  uint32_t capacity = 0;
  // --reconnect_timeout: after losing the broker, how long to try to
  // re-register before draining; zero: drain at once (broker mode).
  absl::Duration reconnect_timeout = absl::Seconds(30);
  // Not --no_release: give idle connections back when the broker asks
  // (broker mode).
  bool release = true;
  // Not --no_listener_grant: accept from a listener the broker grants
  // (--placement=kernel).
  bool listener_grant = true;
  // --ready_file: written once serving (see WriteReadyFile).
  std::string ready_file;
  // --help was given.
  bool help = false;
};

// Parses and validates argv. Any problem (unknown flag, bad value, missing
// mode) is an InvalidArgument whose message is one line for the user; the
// caller exits with code 2. Unlike absl::ParseCommandLine, this never exits.
absl::StatusOr<WorkerConfig> ParseWorkerFlags(int argc, char** argv);

// The --help text.
std::string WorkerUsage();

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_WORKER_FLAGS_H_
