#include "tests/util/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "tests/util/test_util.h"

extern char** environ;

namespace fdbroker::testing {
namespace {

using wire::UniqueFd;

int PidfdOpen(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

int ExitCodeOf(int wait_status) {
  if (WIFEXITED(wait_status)) return WEXITSTATUS(wait_status);
  if (WIFSIGNALED(wait_status)) return 128 + WTERMSIG(wait_status);
  return -1;
}

// Everything the child needs, prepared before vfork(): the child may only
// make async-signal-safe calls and must not write the parent's memory.
struct ExecPlan {
  std::vector<std::string> argv_storage;
  std::vector<std::string> env_storage;
  std::vector<char*> argv;
  std::vector<char*> envp;
};

ExecPlan MakePlan(std::vector<std::string> argv,
                  const std::map<std::string, std::string>& env) {
  ExecPlan plan;
  plan.argv_storage = std::move(argv);
  for (char** var = environ; *var != nullptr; ++var) {
    const char* eq = std::strchr(*var, '=');
    std::string name(*var,
                     eq ? static_cast<size_t>(eq - *var) : std::strlen(*var));
    if (env.count(name) == 0) plan.env_storage.emplace_back(*var);
  }
  for (const auto& [name, value] : env) {
    plan.env_storage.push_back(absl::StrCat(name, "=", value));
  }
  for (std::string& arg : plan.argv_storage) plan.argv.push_back(arg.data());
  plan.argv.push_back(nullptr);
  for (std::string& var : plan.env_storage) plan.envp.push_back(var.data());
  plan.envp.push_back(nullptr);
  return plan;
}

// Runs in the child between vfork() and exec(): async-signal-safe calls
// only, writing nothing but its own stack.
// On failure writes the step and errno to `error_fd` and exits 127.
[[noreturn]] void ExecChild(const ExecPlan& plan, const char* working_dir,
                            int stdin_fd, int stdout_fd, int stderr_fd,
                            int error_fd, pid_t parent) {
  auto fail = [error_fd](int step) {
    int report[2] = {step, errno};
    ssize_t ignored = ::write(error_fd, report, sizeof(report));
    (void)ignored;
    ::_exit(127);
  };
  // Die with the test: a crashed test must not leave brokers running.
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) fail(0);
  if (::getppid() != parent) ::_exit(127);  // The parent died already.
  // Dispositions set to "ignore" and the signal mask survive exec; a test
  // framework may have changed both.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  if (::dup2(stdin_fd, 0) < 0 || ::dup2(stdout_fd, 1) < 0 ||
      ::dup2(stderr_fd, 2) < 0) {
    fail(1);
  }
  if (working_dir != nullptr && ::chdir(working_dir) != 0) fail(2);
  // No fd but 0, 1 and 2 survives exec, even one the test forgot to make
  // close-on-exec. CLOEXEC rather than close keeps error_fd usable until
  // exec succeeds.
  if (::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
    for (int fd = 3; fd < 65536; ++fd) {
      if (fd != error_fd) ::close(fd);
    }
  }
  if (std::strchr(plan.argv[0], '/') != nullptr) {
    ::execve(plan.argv[0], plan.argv.data(), plan.envp.data());
  } else {
    ::execvpe(plan.argv[0], plan.argv.data(), plan.envp.data());
  }
  fail(3);
  ::_exit(127);  // Not reached: fail() exits.
}

struct ChildSetup {
  const ExecPlan* plan;
  const char* working_dir;
  int stdin_fd, stdout_fd, stderr_fd, error_fd;
  pid_t parent;
};

// vfork, as posix_spawn does: neither a copy of this process's page tables
// nor copy-on-write faults in its other threads afterwards. Those threads
// may be the clients a test measures (an upgrade under load), which a real
// broker's start by an operator's shell would not slow. The child only
// makes system calls, in its own stack frames, until exec or _exit; every
// signal stays blocked until it has reset the dispositions, so no handler
// of ours runs in it on the shared memory. The child's pid, or -1 and
// errno. (Only `setup`, a pointer the child never returns to use, lives
// across the vfork.)
pid_t VforkChild(const ChildSetup* setup) {
  sigset_t all, previous;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &previous);
  const pid_t pid = ::vfork();
  if (pid == 0) {
    ExecChild(*setup->plan, setup->working_dir, setup->stdin_fd,
              setup->stdout_fd, setup->stderr_fd, setup->error_fd,
              setup->parent);
  }
  const int vfork_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  errno = vfork_errno;
  return pid;
}

constexpr const char* kChildSteps[] = {"prctl", "dup2", "chdir", "exec"};

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(
    std::vector<std::string> argv, Options options) {
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  std::unique_ptr<Subprocess> proc(new Subprocess());
  proc->dir_ = MakeTempDir();
  proc->stdout_path_ = proc->dir_ + "/stdout";
  proc->stderr_path_ = proc->dir_ + "/stderr";
  UniqueFd stdin_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  UniqueFd stdout_fd(::open(proc->stdout_path_.c_str(),
                            O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  UniqueFd stderr_fd(::open(proc->stderr_path_.c_str(),
                            O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!stdin_fd.valid() || !stdout_fd.valid() || !stderr_fd.valid()) {
    return absl::ErrnoToStatus(errno, "opening the child's stdio files");
  }
  int error_pipe[2];
  if (::pipe2(error_pipe, O_CLOEXEC) != 0) {
    return absl::ErrnoToStatus(errno, "pipe2");
  }
  UniqueFd error_read(error_pipe[0]);
  UniqueFd error_write(error_pipe[1]);

  const std::string program = argv[0];
  const ExecPlan plan = MakePlan(std::move(argv), options.env);
  const char* working_dir =
      options.working_dir.empty() ? nullptr : options.working_dir.c_str();
  const pid_t parent = ::getpid();

  const ChildSetup setup{&plan,           working_dir,     stdin_fd.get(),
                         stdout_fd.get(), stderr_fd.get(), error_write.get(),
                         parent};
  const pid_t pid = VforkChild(&setup);
  if (pid < 0) return absl::ErrnoToStatus(errno, "vfork");
  proc->pid_ = pid;
  // The child is ours and unreaped, so its pid cannot be recycled yet.
  proc->pidfd_.Reset(PidfdOpen(pid));
  error_write.Reset();

  // EOF: exec succeeded (the pipe closed on exec). Data: it failed.
  int report[2] = {0, 0};
  ssize_t n;
  do {
    n = ::read(error_read.get(), report, sizeof(report));
  } while (n < 0 && errno == EINTR);
  if (n > 0) {
    absl::StatusOr<int> code = proc->Wait(absl::Seconds(10));
    (void)code;
    const int step = report[0] >= 0 && report[0] < 4 ? report[0] : 3;
    return absl::ErrnoToStatus(
        report[1], absl::StrCat("starting ", program, ": ", kChildSteps[step]));
  }
  if (!proc->pidfd_.valid()) {
    return absl::ErrnoToStatus(errno, "pidfd_open");
  }
  return proc;
}

Subprocess::~Subprocess() {
  if (pid_ > 0 && !exit_code_.has_value()) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  for (const UniqueFd& pidfd : extra_pidfds_) {
    ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0);
  }
  if (!dir_.empty() && std::getenv("FDBROKER_KEEP_TEST_LOGS") == nullptr) {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
}

std::string Subprocess::Stdout() const {
  return ReadFile(stdout_path_).value_or("");
}

std::string Subprocess::Stderr() const {
  return ReadFile(stderr_path_).value_or("");
}

std::string Subprocess::Output() const {
  return absl::StrCat("--- pid ", pid_, " stdout (", stdout_path_, "):\n",
                      Stdout(), "--- stderr (", stderr_path_, "):\n", Stderr(),
                      "---\n");
}

absl::Status Subprocess::Signal(int signo) {
  if (exit_code_.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("process ", pid_, " has exited"));
  }
  // Unreaped, so the pid is still ours even if the process has exited.
  if (::kill(pid_, signo) != 0) return absl::ErrnoToStatus(errno, "kill");
  return absl::OkStatus();
}

void Subprocess::Reap(int wait_status) {
  exit_code_ = ExitCodeOf(wait_status);
  pidfd_.Reset();
}

absl::StatusOr<int> Subprocess::Wait(absl::Duration timeout) {
  if (exit_code_.has_value()) return *exit_code_;
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      Reap(status);
      return *exit_code_;
    }
    if (r < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "waitpid");
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(
          absl::StrCat("process ", pid_, " still running after ",
                       absl::FormatDuration(timeout)));
    }
    // The pidfd becomes readable when the process exits.
    pollfd pfd{pidfd_.get(), POLLIN, 0};
    ::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
  }
}

bool Subprocess::Running() {
  if (exit_code_.has_value()) return false;
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) == pid_) {
    Reap(status);
    return false;
  }
  return true;
}

void Subprocess::KillOnDestruction(pid_t pid) {
  UniqueFd pidfd(PidfdOpen(pid));
  if (pidfd.valid()) extra_pidfds_.push_back(std::move(pidfd));
}

}  // namespace fdbroker::testing
