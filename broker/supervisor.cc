#include "broker/supervisor.h"

#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/wait.h>

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "broker/process_launcher_impl.h"
#include "wire/spawn.h"

namespace fdbroker {

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
    : loop_(loop),
      options_(std::move(options)),
      command_{options_.argv, {}},
      owned_launcher_(std::make_unique<PosixProcessLauncher>()),
      launcher_(*owned_launcher_),
      on_exit_(std::move(on_exit)) {}

Supervisor::Supervisor(EventLoop& loop, Options options,
                       ProcessLauncher& launcher, ExitCallback on_exit)
    : loop_(loop),
      options_(std::move(options)),
      command_{options_.argv, {}},
      launcher_(launcher),
      on_exit_(std::move(on_exit)) {}

Supervisor::~Supervisor() = default;

absl::StatusOr<pid_t> Supervisor::Spawn() {
  if (command_.argv.empty()) {
    return absl::FailedPreconditionError("no worker command");
  }
  std::vector<std::string> env = wire::WorkerEnvironment(options_.socket_path);
  for (const auto& [name, value] : command_.env) {
    // The command's variables replace the broker's of the same name.
    const std::string prefix = absl::StrCat(name, "=");
    env.erase(std::remove_if(env.begin(), env.end(),
                             [&](const std::string& entry) {
                               return absl::StartsWith(entry, prefix);
                             }),
              env.end());
    env.push_back(prefix + value);
  }
  absl::StatusOr<ProcessLauncher::Process> process =
      launcher_.Spawn(command_.argv, env);
  if (!process.ok()) return process.status();
  const pid_t pid = process->pid;
  if (absl::Status s = WatchChild(pid, std::move(process->exit_fd), false);
      !s.ok()) {
    launcher_.KillAndReap(pid);
    return s;
  }
  return pid;
}

absl::Status Supervisor::Adopt(pid_t pid) {
  if (children_.count(pid) != 0) return absl::OkStatus();
  absl::StatusOr<wire::UniqueFd> exit_fd = launcher_.WatchExisting(pid);
  if (!exit_fd.ok()) return exit_fd.status();
  return WatchChild(pid, *std::move(exit_fd), true);
}

absl::Status Supervisor::WatchChild(pid_t pid, wire::UniqueFd exit_fd,
                                    bool adopted) {
  Child& child = children_[pid];
  child.exit_fd = std::move(exit_fd);
  child.adopted = adopted;
  absl::StatusOr<std::unique_ptr<IoWatch>> watch =
      loop_.Watch(child.exit_fd.get(), EPOLLIN,
                  [this, pid](uint32_t) { OnExitFdReadable(pid); });
  if (!watch.ok()) {
    children_.erase(pid);
    return watch.status();
  }
  child.watch = *std::move(watch);
  return absl::OkStatus();
}

void Supervisor::OnExitFdReadable(pid_t pid) {
  auto it = children_.find(pid);
  if (it == children_.end()) return;
  if (it->second.adopted) {
    // A readable pidfd means the process has exited; only its parent (not
    // us) can collect the status.
    children_.erase(it);
    on_exit_(pid, kUnknownStatus);
    return;
  }
  const std::optional<int> status = launcher_.Reap(pid);
  if (!status.has_value()) return;  // Spurious wake-up: still running.
  children_.erase(pid);
  on_exit_(pid, *status);
}

void Supervisor::Signal(pid_t pid, int signal) {
  auto it = children_.find(pid);
  if (it == children_.end()) return;
  launcher_.Signal(pid, it->second.exit_fd, signal);
}

void Supervisor::SignalAll(int signal) {
  for (auto& [pid, child] : children_) {
    launcher_.Signal(pid, child.exit_fd, signal);
  }
}

}  // namespace fdbroker
