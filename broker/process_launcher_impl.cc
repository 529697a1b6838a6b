#include "broker/process_launcher_impl.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"
#include "wire/command_line.h"

namespace fdbroker {
namespace {

// Direct syscalls: Debian 12's <sys/pidfd.h> lacks C++ linkage guards.
int PidfdOpen(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}
int PidfdSendSignal(int pidfd, int signal) {
  return static_cast<int>(
      ::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0));
}

}  // namespace

absl::StatusOr<ProcessLauncher::Process> PosixProcessLauncher::Spawn(
    const std::vector<std::string>& argv_strings,
    const std::vector<std::string>& env) {
  if (argv_strings.empty()) {
    return absl::FailedPreconditionError("no worker command");
  }
  if (resolved_program_.empty() || program_ != argv_strings[0]) {
    absl::StatusOr<std::string> program = wire::ResolveProgram(argv_strings[0]);
    if (!program.ok()) return program.status();
    program_ = argv_strings[0];
    resolved_program_ = *std::move(program);
  }
  std::vector<char*> argv;
  for (const std::string& arg : argv_strings) {
    argv.push_back(const_cast<char*>(arg.c_str()));
  }
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const std::string& entry : env) {
    envp.push_back(const_cast<char*>(entry.c_str()));
  }
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null",
                                   O_RDONLY, 0);
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
  const int rc = ::posix_spawn(&pid, resolved_program_.c_str(), &actions, &attr,
                               argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    return absl::ErrnoToStatus(rc, absl::StrCat("spawn ", resolved_program_));
  }
  wire::UniqueFd pidfd(PidfdOpen(pid));
  if (!pidfd) {
    // Cannot happen for our own unreaped child; stop it rather than lose it.
    const int err = errno;
    KillAndReap(pid);
    return absl::ErrnoToStatus(err, "pidfd_open");
  }
  return Process{pid, std::move(pidfd)};
}

absl::StatusOr<wire::UniqueFd> PosixProcessLauncher::WatchExisting(pid_t pid) {
  wire::UniqueFd pidfd(PidfdOpen(pid));
  if (!pidfd) {
    return absl::ErrnoToStatus(errno, absl::StrCat("pidfd_open(", pid, ")"));
  }
  return pidfd;
}

void PosixProcessLauncher::Signal(pid_t, const wire::UniqueFd& exit_fd,
                                  int signal) {
  PidfdSendSignal(exit_fd.get(), signal);
}

std::optional<int> PosixProcessLauncher::Reap(pid_t pid) {
  int status = 0;
  pid_t rc;
  do {
    rc = ::waitpid(pid, &status, WNOHANG);
  } while (rc < 0 && errno == EINTR);
  if (rc == 0) return std::nullopt;  // Still running.
  if (rc < 0) {
    spdlog::error("waitpid({}): {}", pid, strerror(errno));
    status = 0;
  }
  return status;
}

void PosixProcessLauncher::KillAndReap(pid_t pid) {
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

}  // namespace fdbroker
