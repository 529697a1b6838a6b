#ifndef FDBROKER_WORKER_CONFORMANCE_WORKER_PROCESS_H_
#define FDBROKER_WORKER_CONFORMANCE_WORKER_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "wire/unique_fd.h"

namespace fdbroker::conformance {

// The worker under test, started the way the broker's Supervisor starts a
// supervised worker (broker/supervisor.cc): posix_spawn, its own process
// group, default signal mask and dispositions, stdin from /dev/null, no fd
// above 2, and FDBROKER_SOCKET set to the kit's hand-off socket. Its stdout
// and stderr go to `log_path`, shown when a case fails.
//
// The destructor SIGKILLs the process (through a pidfd, so a recycled pid is
// never hit) and its process group, then reaps it: no case leaves a worker
// behind.
class WorkerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<WorkerProcess>> Start(
      const std::vector<std::string>& argv, const std::string& socket_path,
      const std::string& log_path);
  ~WorkerProcess();
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;

  pid_t pid() const { return pid_; }

  // Waits until `deadline` for the process to exit and reaps it. Returns
  // the exit code, or 128 + the signal number (as a shell reports it);
  // DeadlineExceeded while it runs.
  absl::StatusOr<int> Wait(absl::Time deadline);
  bool Running();
  void Signal(int signo);
  // The last `max_lines` lines the worker wrote.
  std::string LogTail(size_t max_lines) const;

 private:
  WorkerProcess(pid_t pid, wire::UniqueFd pidfd, std::string log_path)
      : pid_(pid), pidfd_(std::move(pidfd)), log_path_(std::move(log_path)) {}

  pid_t pid_;
  wire::UniqueFd pidfd_;
  std::string log_path_;
  std::optional<int> exit_code_;
};

// "exit code 3" or "killed by signal 9 (SIGKILL)" for a Wait() result.
std::string DescribeExit(int code);

}  // namespace fdbroker::conformance

#endif  // FDBROKER_WORKER_CONFORMANCE_WORKER_PROCESS_H_
