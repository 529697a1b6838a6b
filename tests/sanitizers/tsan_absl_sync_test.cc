// TSan build only: checks that the TSan set-up neither misses what it must
// find nor reports what it must not. tsan_absl_sync.cc makes absl::Mutex
// visible to TSan and tests/tsan.supp silences the uninstrumented
// libraries; both are easy to get wrong in the direction that hides races.

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace fdbroker {
namespace {

constexpr int kThreads = 4;
constexpr int kIncrements = 2000;

// Accesses under an absl::Mutex, through every entry point the shim wraps:
// no report (under halt_on_error a report would end this test with exit 66).
TEST(TsanAbslSyncTest, AbslMutexOrdersTheAccessesItGuards) {
  absl::Mutex mu;
  absl::CondVar cv;
  int counter = 0;  // Plain int: only the mutex orders the accesses.
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIncrements; ++i) {
        switch ((t + i) % 4) {
          case 0: {
            absl::MutexLock lock(&mu);
            ++counter;
            break;
          }
          case 1:
            if (mu.TryLock()) {
              ++counter;
              mu.Unlock();
            } else {
              absl::MutexLock lock(&mu);
              ++counter;
            }
            break;
          case 2: {
            absl::ReleasableMutexLock lock(&mu);
            ++counter;
            lock.Release();
            break;
          }
          default: {
            absl::MutexLock lock(&mu);
            ++counter;
            cv.SignalAll();
            break;
          }
        }
      }
    });
  }
  {
    // Conditions are evaluated inside absl, by whichever thread holds the
    // mutex: the plain int must still look ordered there.
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](int* n) { return *n >= kIncrements; }, &counter));
    while (counter < kThreads * kIncrements / 2) {
      cv.WaitWithTimeout(&mu, absl::Milliseconds(10));
    }
  }
  const bool all_done = mu.LockWhenWithTimeout(
      absl::Condition(
          +[](int* n) { return *n == kThreads * kIncrements; }, &counter),
      absl::Seconds(60));
  mu.Unlock();
  for (std::thread& thread : threads) thread.join();
  EXPECT_TRUE(all_done);
  EXPECT_EQ(counter, kThreads * kIncrements);
}

// The same counter without the mutex is a data race that TSan must report:
// neither the shim nor tests/tsan.supp may hide a race in our own code.
void IncrementWithoutLock() {
  absl::Mutex unrelated;  // Locked around nothing shared: orders nothing.
  int counter = 0;
  std::thread other([&] {
    absl::MutexLock lock(&unrelated);
    ++counter;
  });
  ++counter;
  other.join();
  std::exit(counter == 2 ? 0 : 1);
}

// Appends `extra` to the environment variable `name` for as long as it lives.
class ScopedOptions {
 public:
  ScopedOptions(const char* name, const std::string& extra) : name_(name) {
    const char* old = std::getenv(name);
    had_old_ = old != nullptr;
    if (had_old_) old_ = old;
    ::setenv(name, (old_ + ":" + extra).c_str(), 1);
  }
  ~ScopedOptions() {
    if (had_old_) {
      ::setenv(name_, old_.c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  bool had_old_ = false;
  std::string old_;
};

TEST(TsanAbslSyncTest, UnguardedAccessIsStillReported) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // The child re-executes this binary: its report goes to stderr (not to
  // tests/run.sh's log directory, where it would fail the run) and is fatal
  // (exit code 66). The TSan runtime reads the common flags (log_path) from
  // UBSAN_OPTIONS after TSAN_OPTIONS, so both are set.
  const ScopedOptions tsan("TSAN_OPTIONS",
                           "log_path=stderr:halt_on_error=1:exitcode=66");
  const ScopedOptions ubsan("UBSAN_OPTIONS", "log_path=stderr");
  EXPECT_EXIT(IncrementWithoutLock(), ::testing::ExitedWithCode(66),
              "ThreadSanitizer: data race");
}

}  // namespace
}  // namespace fdbroker
