#ifndef FDBROKER_TESTS_UTIL_SUBPROCESS_H_
#define FDBROKER_TESTS_UTIL_SUBPROCESS_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "wire/unique_fd.h"

namespace fdbroker::testing {

// A child process for multi-process tests (in the style of gRPC's test
// SubProcess): started by Start(), SIGKILLed and reaped by the destructor if
// it still runs, so a failing test never leaves a broker or worker behind.
//
// The child's stdin is /dev/null; its stdout and stderr go to files in a
// private temp directory (never pipes, so a chatty child cannot block on a
// full pipe that nobody reads). It inherits no fd but 0, 1 and 2, and it is
// SIGKILLed if the thread that started it exits (PR_SET_PDEATHSIG), so start
// subprocesses from the test's main thread. The log directory is removed by
// the destructor unless FDBROKER_KEEP_TEST_LOGS is set in the environment.
//
// Not thread-safe: one test thread drives it.
class Subprocess {
 public:
  struct Options {
    // Variables added to the test's environment (replacing equal names).
    std::map<std::string, std::string> env;
    // The child's working directory; empty keeps the test's.
    std::string working_dir;
  };

  // Starts argv[0] (a path, or a name looked up in PATH) with `argv`.
  // Fails if the program cannot be executed.
  static absl::StatusOr<std::unique_ptr<Subprocess>> Start(
      std::vector<std::string> argv, Options options = {});

  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  pid_t pid() const { return pid_; }

  // What the child has written so far.
  std::string Stdout() const;
  std::string Stderr() const;
  // Both, labelled, for assertion messages: EXPECT_...() << proc->Output().
  std::string Output() const;
  const std::string& stdout_path() const { return stdout_path_; }
  const std::string& stderr_path() const { return stderr_path_; }

  // Sends `signo` to the child. FailedPrecondition once it has been reaped.
  absl::Status Signal(int signo);

  // Waits for the child to exit and reaps it. Returns its exit code, or
  // 128 + the signal number if a signal ended it (as a shell reports it);
  // DeadlineExceeded if it still runs after `timeout`. Once reaped, returns
  // the same result again immediately.
  absl::StatusOr<int> Wait(absl::Duration timeout);

  // False once the child has exited (reaping it if it has).
  bool Running();

  // Also SIGKILL `pid` in the destructor (e.g. workers a broker under test
  // spawned, which would outlive a SIGKILLed broker). The process is pinned
  // with a pidfd now, so a recycled pid is never hit.
  void KillOnDestruction(pid_t pid);

 private:
  Subprocess() = default;
  void Reap(int wait_status);

  pid_t pid_ = -1;
  wire::UniqueFd pidfd_;
  std::optional<int> exit_code_;
  std::string dir_;
  std::string stdout_path_;
  std::string stderr_path_;
  std::vector<wire::UniqueFd> extra_pidfds_;
};

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_UTIL_SUBPROCESS_H_
