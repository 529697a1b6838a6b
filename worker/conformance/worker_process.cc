#include "worker_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "wire/command_line.h"
#include "wire/spawn.h"
namespace fdbroker::conformance {
namespace {

int ShellStatus(int wait_status) {
  if (WIFEXITED(wait_status)) return WEXITSTATUS(wait_status);
  if (WIFSIGNALED(wait_status)) return 128 + WTERMSIG(wait_status);
  return 255;
}

}  // namespace

std::string DescribeExit(int code) {
  if (code <= 128) return absl::StrCat("exit code ", code);
  const char* name = sigabbrev_np(code - 128);
  return absl::StrCat("killed by signal ", code - 128, " (SIG",
                      name ? name : "?", ")");
}

absl::StatusOr<std::unique_ptr<WorkerProcess>> WorkerProcess::Start(
    const std::vector<std::string>& argv, const std::string& socket_path,
    const std::string& log_path) {
  if (argv.empty()) return absl::InvalidArgumentError("empty worker command");
  absl::StatusOr<std::string> program = wire::ResolveProgram(argv[0]);
  if (!program.ok()) return program.status();
  absl::StatusOr<wire::SpawnedProcess> spawned = wire::SpawnProcess(
      *program, argv, wire::WorkerEnvironment(socket_path), log_path);
  if (!spawned.ok()) return spawned.status();
  return std::unique_ptr<WorkerProcess>(
      new WorkerProcess(spawned->pid, std::move(spawned->pidfd), log_path));
}

WorkerProcess::~WorkerProcess() {
  // The group first (helpers the worker started), while the leader's pid is
  // still ours: an unreaped child cannot be recycled.
  ::kill(-pid_, SIGKILL);
  if (!exit_code_.has_value()) {
    ::syscall(SYS_pidfd_send_signal, pidfd_.get(), SIGKILL, nullptr, 0);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
}

absl::StatusOr<int> WorkerProcess::Wait(absl::Time deadline) {
  while (!exit_code_.has_value()) {
    int status = 0;
    const pid_t rc = ::waitpid(pid_, &status, WNOHANG);
    if (rc == pid_) {
      exit_code_ = ShellStatus(status);
      break;
    }
    if (rc < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "waitpid");
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError("the worker is still running");
    }
    pollfd p{pidfd_.get(), POLLIN, 0};
    ::poll(&p, 1,
           static_cast<int>(absl::ToInt64Milliseconds(
               absl::Ceil(left, absl::Milliseconds(1)))));
  }
  return *exit_code_;
}

bool WorkerProcess::Running() { return !Wait(absl::Now()).ok(); }

void WorkerProcess::Signal(int signo) {
  if (!exit_code_.has_value()) {
    ::syscall(SYS_pidfd_send_signal, pidfd_.get(), signo, nullptr, 0);
  }
}

std::string WorkerProcess::LogTail(size_t max_lines) const {
  std::ifstream in(log_path_);
  std::stringstream text;
  text << in.rdbuf();
  std::vector<std::string> lines =
      absl::StrSplit(text.str(), '\n', absl::SkipEmpty());
  if (lines.size() > max_lines) {
    lines.erase(lines.begin(), lines.end() - max_lines);
  }
  return absl::StrJoin(lines, "\n");
}

}  // namespace fdbroker::conformance
