// TSan build only: makes absl::Mutex and absl::CondVar visible to
// ThreadSanitizer. CMakeLists.txt links this shared library first into every
// target when FDBROKER_SANITIZE=thread.
//
// Why: Debian's Abseil is not built with -fsanitize=thread, so absl::Mutex
// synchronises through atomics and futexes that TSan cannot see. Without
// this, every pair of accesses that our code makes under one absl::Mutex from
// two threads is reported as a data race, and so is every hand-off inside
// gRPC (libgrpc uses absl::Mutex and absl::CondVar too): hundreds of false
// reports that bury the real ones, and that no suppression can remove without
// also hiding the real races in the same functions.
//
// How: this library defines the out-of-line absl::Mutex / absl::CondVar entry
// points. Being linked ahead of libabsl_synchronization, its definitions are
// the ones that our code, libgrpc and libabsl itself call (ELF symbol
// interposition). Each wrapper calls the real function (dlsym RTLD_NEXT) and
// tells TSan about the happens-before edge it implies: __tsan_release before
// giving a mutex up, __tsan_acquire after getting it.
//
// The library itself is compiled without -fsanitize=thread, like the
// Abseil it wraps: its own bookkeeping is not checked, only its annotations
// count.
//
// Limits: only happens-before is modelled, not lock ownership, so TSan's
// lock-order (deadlock) detector does not see absl::Mutex, and reader locks
// order readers among themselves (which can hide, never invent, a race).
// absl::Notification::HasBeenNotified() is inline (an atomic load of a flag
// that the uninstrumented Notify() stores), so a Notification would still
// look unsynchronised; the code under test does not use it.

#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

#if !ABSL_OPTION_USE_INLINE_NAMESPACE
#error "expects Debian's Abseil, whose symbols live in an inline namespace"
#endif

namespace {

#define FDBROKER_STRINGIFY_(x) #x
#define FDBROKER_STRINGIFY(x) FDBROKER_STRINGIFY_(x)

// The real libabsl function `name`: the Itanium mangling of
// absl::<inline namespace>::<rest>, e.g. Real<F>("N", "5Mutex4LockEv").
// `qualifier` is "N" for a member function, "NK" for a const one.
template <typename Fn>
Fn Real(const char* qualifier, const char* rest) {
  const char* ns = FDBROKER_STRINGIFY(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string symbol = std::string("_Z") + qualifier + "4absl" +
                             std::to_string(std::strlen(ns)) + ns + rest;
  void* real = ::dlsym(RTLD_NEXT, symbol.c_str());
  if (real == nullptr) {
    std::fprintf(stderr, "tsan_absl_sync: %s not found: %s\n", symbol.c_str(),
                 ::dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(real);
}

void Acquire(const void* sync) { __tsan_acquire(const_cast<void*>(sync)); }
void Release(const void* sync) { __tsan_release(const_cast<void*>(sync)); }

// absl evaluates a waiter's Condition with the mutex held, inside the real
// Await/LockWhen (in the waiter or in the thread that unlocks), where no
// wrapper runs; the evaluating thread may then give the mutex up inside absl
// too (a waiter whose condition is false goes back to sleep). So this
// Condition acquires the mutex's sync object before evaluating and releases
// it after. It also carries the waiter's own writes (the Condition object,
// whatever the predicate reads from the waiter's frame) to the evaluating
// thread: the waiter releases it before handing it to absl, the evaluator
// acquires it first.
struct AcquiringCondition {
  AcquiringCondition(absl::Mutex* mu, const absl::Condition& cond)
      : mu(mu), cond(&cond), condition(&Eval, this) {
    Release(this);
  }

  static bool Eval(AcquiringCondition* self) {
    Acquire(self);
    Acquire(self->mu);
    const bool met = self->cond->Eval();
    Release(self->mu);
    return met;
  }

  absl::Mutex* mu;
  const absl::Condition* cond;
  absl::Condition condition;
};

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

// The mutex's address is its TSan sync object: whatever a thread did before
// it released the mutex happens before whatever a thread does after it next
// acquires it.

void Mutex::Lock() {
  static const auto real = Real<void (*)(Mutex*)>("N", "5Mutex4LockEv");
  real(this);
  Acquire(this);
}

void Mutex::ReaderLock() {
  static const auto real = Real<void (*)(Mutex*)>("N", "5Mutex10ReaderLockEv");
  real(this);
  Acquire(this);
}

bool Mutex::TryLock() {
  static const auto real = Real<bool (*)(Mutex*)>("N", "5Mutex7TryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}

bool Mutex::ReaderTryLock() {
  static const auto real =
      Real<bool (*)(Mutex*)>("N", "5Mutex13ReaderTryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}

void Mutex::Unlock() {
  static const auto real = Real<void (*)(Mutex*)>("N", "5Mutex6UnlockEv");
  Release(this);
  real(this);
}

void Mutex::ReaderUnlock() {
  static const auto real =
      Real<void (*)(Mutex*)>("N", "5Mutex12ReaderUnlockEv");
  Release(this);
  real(this);
}

// Lock*When acquire; Await* release the mutex while they wait and hold it
// again on return (also on timeout).
void Mutex::LockWhen(const Condition& cond) {
  static const auto real = Real<void (*)(Mutex*, const Condition&)>(
      "N", "5Mutex8LockWhenERKNS0_9ConditionE");
  const AcquiringCondition acquiring(this, cond);
  real(this, acquiring.condition);
  Acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static const auto real = Real<void (*)(Mutex*, const Condition&)>(
      "N", "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  const AcquiringCondition acquiring(this, cond);
  real(this, acquiring.condition);
  Acquire(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "N", "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  const AcquiringCondition acquiring(this, cond);
  const bool met = real(this, acquiring.condition, timeout);
  Acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "N", "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  const AcquiringCondition acquiring(this, cond);
  const bool met = real(this, acquiring.condition, timeout);
  Acquire(this);
  return met;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "N", "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  const AcquiringCondition acquiring(this, cond);
  const bool met = real(this, acquiring.condition, deadline);
  Acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "N", "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  const AcquiringCondition acquiring(this, cond);
  const bool met = real(this, acquiring.condition, deadline);
  Acquire(this);
  return met;
}

void Mutex::Await(const Condition& cond) {
  static const auto real = Real<void (*)(Mutex*, const Condition&)>(
      "N", "5Mutex5AwaitERKNS0_9ConditionE");
  Release(this);
  const AcquiringCondition acquiring(this, cond);
  real(this, acquiring.condition);
  Acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "N", "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Release(this);
  const AcquiringCondition acquiring(this, cond);
  const bool met = real(this, acquiring.condition, timeout);
  Acquire(this);
  return met;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "N", "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Release(this);
  const AcquiringCondition acquiring(this, cond);
  const bool met = real(this, acquiring.condition, deadline);
  Acquire(this);
  return met;
}

// libabsl's own Release() might call Unlock() without going through the
// PLT; this one certainly goes through the wrapper above.
void ReleasableMutexLock::Release() {
  if (mu_ == nullptr) {
    std::fprintf(stderr, "ReleasableMutexLock::Release called twice\n");
    std::abort();
  }
  mu_->Unlock();
  mu_ = nullptr;
}

// A waiter gives the mutex up while it waits and holds it again on return.
void CondVar::Wait(Mutex* mu) {
  static const auto real =
      Real<void (*)(CondVar*, Mutex*)>("N", "7CondVar4WaitEPNS0_5MutexE");
  Release(mu);
  real(this, mu);
  Acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  static const auto real = Real<bool (*)(CondVar*, Mutex*, Duration)>(
      "N", "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Release(mu);
  const bool timed_out = real(this, mu, timeout);
  Acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  static const auto real = Real<bool (*)(CondVar*, Mutex*, Time)>(
      "N", "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Release(mu);
  const bool timed_out = real(this, mu, deadline);
  Acquire(mu);
  return timed_out;
}

ABSL_NAMESPACE_END
}  // namespace absl
