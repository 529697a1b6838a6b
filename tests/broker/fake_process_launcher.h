#ifndef FDBROKER_TESTS_BROKER_FAKE_PROCESS_LAUNCHER_H_
#define FDBROKER_TESTS_BROKER_FAKE_PROCESS_LAUNCHER_H_

#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "broker/process_launcher.h"
#include "gtest/gtest.h"

namespace fdbroker {

// Processes that exist only in the test: Spawn() records argv and env and
// hands out a pid and an eventfd as the exit fd; Exit() makes the process
// exit with a chosen wait status (the Supervisor notices on the next loop
// turn). SIGKILL ends a fake process as it would a real one.
class FakeProcessLauncher final : public ProcessLauncher {
 public:
  struct Spawned {
    pid_t pid;
    std::vector<std::string> argv;
    std::vector<std::string> env;
  };

  static int ExitedWith(int code) { return (code & 0xff) << 8; }
  static int KilledBy(int signal) { return signal & 0x7f; }

  absl::StatusOr<Process> Spawn(const std::vector<std::string>& argv,
                                const std::vector<std::string>& env) override {
    if (!next_spawn_error.ok()) return std::exchange(next_spawn_error, {});
    const pid_t pid = next_pid_++;
    spawned.push_back(Spawned{pid, argv, env});
    absl::StatusOr<wire::UniqueFd> exit_fd = WatchExisting(pid);
    if (!exit_fd.ok()) return exit_fd.status();
    return Process{pid, *std::move(exit_fd)};
  }

  absl::StatusOr<wire::UniqueFd> WatchExisting(pid_t pid) override {
    wire::UniqueFd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!fd) return absl::ErrnoToStatus(errno, "eventfd");
    absl::StatusOr<wire::UniqueFd> dup = fd.Dup();
    if (!dup.ok()) return dup.status();
    processes_[pid].exit_fd = std::move(fd);
    return dup;
  }

  void Signal(pid_t pid, const wire::UniqueFd&, int signal) override {
    signals.emplace_back(pid, signal);
    if (signal == SIGKILL && sigkill_kills && Running(pid)) {
      Exit(pid, KilledBy(SIGKILL));
    }
  }

  std::optional<int> Reap(pid_t pid) override {
    auto it = processes_.find(pid);
    if (it == processes_.end() || !it->second.status.has_value()) {
      return std::nullopt;
    }
    const int status = *it->second.status;
    processes_.erase(it);
    return status;
  }

  void KillAndReap(pid_t pid) override { processes_.erase(pid); }

  // The process exits now with `wait_status` (ExitedWith(), KilledBy()).
  void Exit(pid_t pid, int wait_status) {
    auto it = processes_.find(pid);
    ASSERT_NE(it, processes_.end()) << "no fake process " << pid;
    if (it->second.status.has_value()) return;  // Already gone.
    it->second.status = wait_status;
    const uint64_t one = 1;
    ASSERT_EQ(::write(it->second.exit_fd.get(), &one, sizeof(one)),
              static_cast<ssize_t>(sizeof(one)));
  }
  bool Running(pid_t pid) const {
    auto it = processes_.find(pid);
    return it != processes_.end() && !it->second.status.has_value();
  }
  // Signals sent to `pid`, in order.
  std::vector<int> SignalsTo(pid_t pid) const {
    std::vector<int> out;
    for (const auto& [p, s] : signals) {
      if (p == pid) out.push_back(s);
    }
    return out;
  }

  std::vector<Spawned> spawned;
  std::vector<std::pair<pid_t, int>> signals;
  // Makes the next Spawn() fail with this status.
  absl::Status next_spawn_error;
  // SIGKILL ends a fake process (as it would a real one) unless cleared.
  bool sigkill_kills = true;

 private:
  struct Fake {
    wire::UniqueFd exit_fd;
    std::optional<int> status;
  };
  std::map<pid_t, Fake> processes_;
  pid_t next_pid_ = 5000000;  // Above PID_MAX_LIMIT (2^22): never real.
};

}  // namespace fdbroker

#endif  // FDBROKER_TESTS_BROKER_FAKE_PROCESS_LAUNCHER_H_
