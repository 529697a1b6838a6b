#include "broker/supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"
#include "wire/message_channel.h"

extern char** environ;

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

namespace {

// PATH lookup done before spawning, so that a missing program is a clear
// error at start-up rather than a child that exits 127.
absl::StatusOr<std::string> ResolveProgram(const std::string& program) {
  if (program.find('/') != std::string::npos) {
    if (::access(program.c_str(), X_OK) != 0) {
      return absl::ErrnoToStatus(errno, program);
    }
    return program;
  }
  const char* path = ::getenv("PATH");
  for (absl::string_view dir :
       absl::StrSplit(path ? path : "/usr/bin:/bin", ':')) {
    std::string candidate = absl::StrCat(dir.empty() ? "." : dir, "/", program);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return absl::NotFoundError(absl::StrCat(program, ": not found in PATH"));
}

}  // namespace

std::string DescribeWaitStatus(int status) {
  if (status == Supervisor::kUnknownStatus) {
    return "exited (not a child of this broker: status unknown)";
  }
  if (WIFEXITED(status)) return absl::StrCat("exit code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const char* name = sigabbrev_np(WTERMSIG(status));
    return absl::StrCat("killed by signal ", WTERMSIG(status), " (SIG",
                        name ? name : "?", ")");
  }
  return absl::StrCat("wait status ", status);
}

Supervisor::Supervisor(EventLoop& loop, Options options, ExitCallback on_exit)
    : loop_(loop), options_(std::move(options)), on_exit_(std::move(on_exit)) {}

Supervisor::~Supervisor() = default;

absl::StatusOr<pid_t> Supervisor::Spawn() {
  if (options_.argv.empty()) {
    return absl::FailedPreconditionError("no worker command");
  }
  if (resolved_program_.empty()) {
    absl::StatusOr<std::string> program = ResolveProgram(options_.argv[0]);
    if (!program.ok()) return program.status();
    resolved_program_ = *std::move(program);
  }
  std::vector<char*> argv;
  for (const std::string& arg : options_.argv) {
    argv.push_back(const_cast<char*>(arg.c_str()));
  }
  argv.push_back(nullptr);
  const std::string socket_env =
      absl::StrCat(wire::kSocketEnvVar, "=", options_.socket_path);
  const absl::string_view socket_prefix(socket_env.data(),
                                        sizeof(wire::kSocketEnvVar));
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, socket_prefix)) envp.push_back(*e);
  }
  envp.push_back(const_cast<char*>(socket_env.c_str()));
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
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return absl::ErrnoToStatus(err, "pidfd_open");
  }
  if (absl::Status s = WatchChild(pid, std::move(pidfd), false); !s.ok()) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return s;
  }
  return pid;
}

absl::Status Supervisor::Adopt(pid_t pid) {
  if (children_.count(pid) != 0) return absl::OkStatus();
  wire::UniqueFd pidfd(PidfdOpen(pid));
  if (!pidfd) {
    return absl::ErrnoToStatus(errno, absl::StrCat("pidfd_open(", pid, ")"));
  }
  return WatchChild(pid, std::move(pidfd), true);
}

absl::Status Supervisor::WatchChild(pid_t pid, wire::UniqueFd pidfd,
                                    bool adopted) {
  Child& child = children_[pid];
  child.pidfd = std::move(pidfd);
  child.adopted = adopted;
  absl::StatusOr<std::unique_ptr<IoWatch>> watch =
      loop_.Watch(child.pidfd.get(), EPOLLIN,
                  [this, pid](uint32_t) { OnPidfdReadable(pid); });
  if (!watch.ok()) {
    children_.erase(pid);
    return watch.status();
  }
  child.watch = *std::move(watch);
  return absl::OkStatus();
}

void Supervisor::OnPidfdReadable(pid_t pid) {
  auto it = children_.find(pid);
  if (it == children_.end()) return;
  if (it->second.adopted) {
    // A readable pidfd means the process has exited; only its parent (not
    // us) can collect the status.
    children_.erase(it);
    on_exit_(pid, kUnknownStatus);
    return;
  }
  int status = 0;
  pid_t rc;
  do {
    rc = ::waitpid(pid, &status, WNOHANG);
  } while (rc < 0 && errno == EINTR);
  if (rc == 0) return;  // Spurious wake-up: still running.
  if (rc < 0) {
    spdlog::error("waitpid({}): {}", pid, strerror(errno));
    status = 0;
  }
  children_.erase(pid);
  on_exit_(pid, status);
}

void Supervisor::Signal(pid_t pid, int signal) {
  auto it = children_.find(pid);
  if (it == children_.end()) return;
  // The pidfd names exactly our child, even if the pid were reused.
  PidfdSendSignal(it->second.pidfd.get(), signal);
}

void Supervisor::SignalAll(int signal) {
  for (auto& [pid, child] : children_) {
    PidfdSendSignal(child.pidfd.get(), signal);
  }
}

}  // namespace fdbroker
