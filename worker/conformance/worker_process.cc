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

extern char** environ;

namespace fdbroker::conformance {
namespace {

int PidfdOpen(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

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
  std::vector<char*> args;
  for (const std::string& arg : argv) {
    args.push_back(const_cast<char*>(arg.c_str()));
  }
  args.push_back(nullptr);
  const std::string socket_env = absl::StrCat("FDBROKER_SOCKET=", socket_path);
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "FDBROKER_SOCKET=", 16) != 0) envp.push_back(*e);
  }
  envp.push_back(const_cast<char*>(socket_env.c_str()));
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null",
                                   O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t empty, all;
  sigemptyset(&empty);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &empty);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK |
                                      POSIX_SPAWN_SETSIGDEF |
                                      POSIX_SPAWN_SETPGROUP);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, program->c_str(), &actions, &attr,
                               args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return absl::ErrnoToStatus(rc, absl::StrCat("spawn ", *program));
  wire::UniqueFd pidfd(PidfdOpen(pid));
  if (!pidfd) {
    const int err = errno;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return absl::ErrnoToStatus(err, "pidfd_open");
  }
  return std::unique_ptr<WorkerProcess>(
      new WorkerProcess(pid, std::move(pidfd), log_path));
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
