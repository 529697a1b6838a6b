#ifndef FDBROKER_BROKER_PROCESS_LAUNCHER_H_
#define FDBROKER_BROKER_PROCESS_LAUNCHER_H_

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// How the Supervisor starts, signals and reaps processes: the seam that lets
// its tests (and the WorkerManager's) run "workers" that exit with a chosen
// status at a chosen moment. The real one is PosixProcessLauncher
// (broker/process_launcher_impl.h). Loop thread only.
class ProcessLauncher {
 public:
  struct Process {
    pid_t pid = 0;
    // Readable once the process has exited (its pidfd, for a real one). The
    // Supervisor watches it on the loop.
    wire::UniqueFd exit_fd;
  };

  virtual ~ProcessLauncher() = default;

  // Starts argv[0] (looked up in PATH unless it contains '/') with `argv`
  // and exactly the environment `env` ("NAME=value" entries).
  virtual absl::StatusOr<Process> Spawn(
      const std::vector<std::string>& argv,
      const std::vector<std::string>& env) = 0;
  // An exit fd for a running process this broker did not start (an adopted
  // worker); its status cannot be reaped.
  virtual absl::StatusOr<wire::UniqueFd> WatchExisting(pid_t pid) = 0;
  // Sends `signal` to the process behind `exit_fd` (which names exactly that
  // process, even if its pid were reused), then to the process group it
  // leads, so that the children of a wrapper command get it too.
  virtual void Signal(pid_t pid, const wire::UniqueFd& exit_fd, int signal) = 0;
  // Collects the wait status of child `pid` once its exit fd is readable;
  // nullopt if it is still running (a spurious wake-up).
  virtual std::optional<int> Reap(pid_t pid) = 0;
  // Ends and reaps a child at once (one that could not be watched).
  virtual void KillAndReap(pid_t pid) = 0;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_PROCESS_LAUNCHER_H_
