#ifndef FDBROKER_BROKER_SUPERVISOR_H_
#define FDBROKER_BROKER_SUPERVISOR_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "broker/event_loop.h"
#include "broker/process_launcher.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// Starts worker processes and reports when they exit. Mechanism only: when
// to start or restart is the WorkerManager's business. Loop thread only.
//
// Children are started through a ProcessLauncher (PosixProcessLauncher by
// default: posix_spawn, own process group, default signals, stdin from
// /dev/null, only fds 0-2) with the broker's environment and FDBROKER_SOCKET
// set. Exits are observed through each child's exit fd (a pidfd) and reaped
// at once, so no zombie outlives its exit event.
class Supervisor {
 public:
  // Called with the pid and the raw wait status.
  using ExitCallback = absl::AnyInvocable<void(pid_t pid, int wait_status)>;
  struct Options {
    std::vector<std::string> argv;
    std::string socket_path;
  };

  // Real processes (a PosixProcessLauncher of its own).
  Supervisor(EventLoop& loop, Options options, ExitCallback on_exit);
  // Processes from `launcher`, which must outlive the supervisor.
  Supervisor(EventLoop& loop, Options options, ProcessLauncher& launcher,
             ExitCallback on_exit);
  ~Supervisor();

  absl::StatusOr<pid_t> Spawn();
  // Watches a process this broker did not start (a worker adopted after a
  // broker restart or upgrade). Its exit is reported with kUnknownStatus: a
  // non-child cannot be waited for.
  absl::Status Adopt(pid_t pid);
  static constexpr int kUnknownStatus = -1;
  // Sends `signal` to a running child and its process group (see
  // ProcessLauncher::Signal); unknown pids are ignored.
  void Signal(pid_t pid, int signal);
  void SignalAll(int signal);
  size_t running() const { return children_.size(); }
  // The command every later Spawn runs: argv and the variables set on top
  // of the broker's environment (RestartWorkers may change both).
  struct Command {
    std::vector<std::string> argv;
    std::map<std::string, std::string> env;
  };
  const Command& command() const { return command_; }
  void set_command(Command command) { command_ = std::move(command); }
  const std::vector<std::string>& argv() const { return command_.argv; }

 private:
  struct Child {
    wire::UniqueFd exit_fd;
    std::unique_ptr<IoWatch> watch;
    bool adopted = false;
  };
  absl::Status WatchChild(pid_t pid, wire::UniqueFd exit_fd, bool adopted);
  void OnExitFdReadable(pid_t pid);

  EventLoop& loop_;
  const Options options_;
  Command command_;
  std::unique_ptr<ProcessLauncher> owned_launcher_;  // The default one.
  ProcessLauncher& launcher_;
  ExitCallback on_exit_;
  std::map<pid_t, Child> children_;
};

// "exit code 3", "killed by signal 9 (SIGKILL)", or for kUnknownStatus
// "exited (not a child of this broker: status unknown)".
std::string DescribeWaitStatus(int wait_status);

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_SUPERVISOR_H_
