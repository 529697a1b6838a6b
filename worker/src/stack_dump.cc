#include "stack_dump.h"

#include <execinfo.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace fdbroker::worker {
namespace {

constexpr int kMaxFrames = 128;

// Async-signal-safe decimal of `value` into `out` (at least 21 bytes); the
// length written.
size_t FormatDecimal(long value, char* out) {
  char digits[21];
  size_t n = 0;
  unsigned long v = value < 0 ? 0 : static_cast<unsigned long>(value);
  do {
    digits[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0);
  for (size_t i = 0; i < n; ++i) out[i] = digits[n - 1 - i];
  return n;
}

void WriteAll(const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(STDERR_FILENO, data, size);
    if (n <= 0) return;
    data += n;
    size -= static_cast<size_t>(n);
  }
}

void OnAbort(int signal) {
  // Only write(2) and backtrace_symbols_fd (no malloc) here; backtrace() was
  // called once at install time so that it does not load libgcc now. errno
  // is kept for the interrupted code (and for TSan's check), although the
  // re-raise below ends the process.
  const int saved_errno = errno;
  char line[128];
  constexpr char kHead[] = "fdbroker worker: SIGABRT: stack of pid ";
  size_t n = 0;
  std::memcpy(line, kHead, sizeof(kHead) - 1);
  n += sizeof(kHead) - 1;
  n += FormatDecimal(::getpid(), line + n);
  constexpr char kThread[] = " thread ";
  std::memcpy(line + n, kThread, sizeof(kThread) - 1);
  n += sizeof(kThread) - 1;
  n += FormatDecimal(::syscall(SYS_gettid), line + n);
  line[n++] = '\n';
  WriteAll(line, n);
  void* frames[kMaxFrames];
  const int count = ::backtrace(frames, kMaxFrames);
  ::backtrace_symbols_fd(frames, count, STDERR_FILENO);
  constexpr char kTail[] = "fdbroker worker: end of stack dump\n";
  WriteAll(kTail, sizeof(kTail) - 1);
  ::signal(signal, SIG_DFL);
  errno = saved_errno;
  ::raise(signal);
}

std::atomic<bool> installed{false};

}  // namespace

void InstallStackDumpOnAbort() {
  if (installed.exchange(true)) return;
  struct sigaction current {};
  if (::sigaction(SIGABRT, nullptr, &current) != 0 ||
      current.sa_handler != SIG_DFL) {
    return;
  }
  void* warm[1];
  (void)::backtrace(warm, 1);
  struct sigaction action {};
  action.sa_handler = OnAbort;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESETHAND;
  ::sigaction(SIGABRT, &action, nullptr);
}

}  // namespace fdbroker::worker
