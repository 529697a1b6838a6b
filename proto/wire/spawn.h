#ifndef FDBROKER_PROTO_WIRE_SPAWN_H_
#define FDBROKER_PROTO_WIRE_SPAWN_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "wire/unique_fd.h"

namespace fdbroker::wire {

// How a worker is started: by the broker's supervisor and, the same way, by
// the conformance kit.

// This process's environment with kSocketEnvVar set to `socket_path`
// (replacing an inherited value).
std::vector<std::string> WorkerEnvironment(const std::string& socket_path);

struct SpawnedProcess {
  pid_t pid = 0;
  UniqueFd pidfd;  // Readable once the process has exited.
};

// posix_spawn of `program` (already resolved, see ResolveProgram) with
// `argv` and `env`: its own process group, default signal mask and
// dispositions, stdin /dev/null, every fd above 2 closed; stdout and stderr
// appended to `log_path` unless it is empty (then inherited). If no pidfd
// can be had, the child is killed and reaped rather than lost.
absl::StatusOr<SpawnedProcess> SpawnProcess(
    const std::string& program, const std::vector<std::string>& argv,
    const std::vector<std::string>& env, const std::string& log_path = "");

// pidfd_open(2), as a direct syscall: Debian 12's <sys/pidfd.h> lacks C++
// linkage guards. -1 and errno on failure.
int PidfdOpen(pid_t pid);

}  // namespace fdbroker::wire

#endif  // FDBROKER_PROTO_WIRE_SPAWN_H_
