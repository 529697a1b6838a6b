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
#include "wire/spawn.h"

namespace fdbroker {
namespace {

// A direct syscall: Debian 12's <sys/pidfd.h> lacks C++ linkage guards.
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
  absl::StatusOr<wire::SpawnedProcess> spawned =
      wire::SpawnProcess(resolved_program_, argv_strings, env);
  if (!spawned.ok()) return spawned.status();
  return Process{spawned->pid, std::move(spawned->pidfd)};
}

absl::StatusOr<wire::UniqueFd> PosixProcessLauncher::WatchExisting(pid_t pid) {
  wire::UniqueFd pidfd(wire::PidfdOpen(pid));
  if (!pidfd) {
    return absl::ErrnoToStatus(errno, absl::StrCat("pidfd_open(", pid, ")"));
  }
  return pidfd;
}

void PosixProcessLauncher::Signal(pid_t pid, const wire::UniqueFd& exit_fd,
                                  int signal) {
  // The process itself, exactly: a pidfd cannot name a reused pid.
  if (PidfdSendSignal(exit_fd.get(), signal) != 0) return;
  // Then its process group (SpawnProcess makes each worker a group leader,
  // and adopted workers were started so by the previous broker; a group
  // outlives a broker's death): a wrapper such as `sh -c '...'` runs the
  // real worker as its child, which must drain or die with it. The pid was
  // still this process's a moment ago, so a group with that id is the one
  // it leads; a worker that left its group keeps only the direct signal.
  if (::getpgid(pid) == pid) ::kill(-pid, signal);
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
