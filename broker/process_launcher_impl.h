#ifndef FDBROKER_BROKER_PROCESS_LAUNCHER_IMPL_H_
#define FDBROKER_BROKER_PROCESS_LAUNCHER_IMPL_H_

#include <optional>
#include <string>
#include <vector>

#include "broker/process_launcher.h"

namespace fdbroker {

// Real processes: posix_spawn into their own process group (a Ctrl-C at the
// broker's terminal reaches only the broker, which then drains them), default
// signal dispositions and mask, stdin from /dev/null, every fd above 2 closed
// (nothing leaks even if some fd lacked CLOEXEC). A pidfd per process:
// signals name exactly it, and it is readable once the process exited.
class PosixProcessLauncher final : public ProcessLauncher {
 public:
  absl::StatusOr<Process> Spawn(const std::vector<std::string>& argv,
                                const std::vector<std::string>& env) override;
  absl::StatusOr<wire::UniqueFd> WatchExisting(pid_t pid) override;
  void Signal(pid_t pid, const wire::UniqueFd& exit_fd, int signal) override;
  std::optional<int> Reap(pid_t pid) override;
  void KillAndReap(pid_t pid) override;

 private:
  // argv[0] and its PATH lookup, done once so that a missing program is a
  // clear error at the first spawn rather than a child that exits 127.
  std::string program_;
  std::string resolved_program_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_PROCESS_LAUNCHER_IMPL_H_
