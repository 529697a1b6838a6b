#ifndef FDBROKER_BROKER_EVENT_LOOP_H_
#define FDBROKER_BROKER_EVENT_LOOP_H_

#include <sys/epoll.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "broker/clock.h"
#include "wire/unique_fd.h"

namespace fdbroker {

class EventLoop;

// An fd registered with an EventLoop; unregisters when destroyed. Destroying
// it from inside any callback is safe: the callback is never called again.
class IoWatch {
 public:
  ~IoWatch();
  IoWatch(const IoWatch&) = delete;
  IoWatch& operator=(const IoWatch&) = delete;

  // Changes the epoll event mask (0 pauses the watch without removing it).
  void SetEvents(uint32_t events);
  uint32_t events() const;

 private:
  friend class EventLoop;
  struct Entry;
  IoWatch(EventLoop& loop, Entry* entry) : loop_(loop), entry_(entry) {}
  EventLoop& loop_;
  Entry* entry_;
};

// A timer owned by its holder (a member, typically): Arm() schedules its
// task, cancelling the one armed before; Cancel() and the destructor cancel
// it. So a timer never outlives what its task refers to, and nobody keeps a
// raw id to cancel by hand. Loop thread only. The task may destroy the Timer
// or re-arm it.
class Timer {
 public:
  explicit Timer(EventLoop& loop) : loop_(loop) {}
  ~Timer() { Cancel(); }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // Runs `task` once after `delay`, instead of whatever was armed.
  void Arm(absl::Duration delay, absl::AnyInvocable<void()> task);
  // Disarms it; a no-op when not armed.
  void Cancel();
  // Armed and not yet fired.
  bool armed() const { return id_ != 0; }

 private:
  EventLoop& loop_;
  uint64_t id_ = 0;
};

// The data plane's single-threaded reactor: epoll, timers and a cross-thread
// task queue. Every method except Post() and Stop() must be called on the
// loop thread (the thread running Run()); they assert it. Level-triggered:
// a callback that leaves data unread is called again on the next turn.
//
// Time comes from the loop's Clock: the real one, or a test's simulated one
// (then timers fire when the test advances that clock and runs RunOnce()).
class EventLoop {
 public:
  using IoCallback = absl::AnyInvocable<void(uint32_t events)>;
  using Task = absl::AnyInvocable<void()>;
  using TimerId = uint64_t;

  // With the system's clocks.
  static absl::StatusOr<std::unique_ptr<EventLoop>> Create();
  // With `clock` (which must outlive the loop), e.g. a simulated one.
  static absl::StatusOr<std::unique_ptr<EventLoop>> Create(Clock& clock);
  ~EventLoop();

  // Calls `callback` with the ready epoll events while the IoWatch lives. The
  // fd must outlive the watch.
  absl::StatusOr<std::unique_ptr<IoWatch>> Watch(int fd, uint32_t events,
                                                 IoCallback callback);

  // Runs `task` once after `delay`. Returns an id for Cancel(). A timer its
  // owner may need to cancel is better a Timer (above).
  TimerId RunAfter(absl::Duration delay, Task task);
  // Cancels a timer that has not fired; unknown or fired ids are ignored.
  void Cancel(TimerId id);
  // Runs `task` on the loop thread after the current batch of events, before
  // the loop waits again (for work that must not run inside a callback, e.g.
  // destroying the object whose callback is running).
  void RunSoon(Task task);

  // Thread-safe: runs `task` on the loop thread soon. Returns false (and
  // drops the task) once the loop is closed.
  bool Post(Task task) ABSL_LOCKS_EXCLUDED(post_mu_);
  // Refuses further Post()s and runs what was posted before. Call on the
  // loop's thread after Run() has returned for good.
  void Close() ABSL_LOCKS_EXCLUDED(post_mu_);

  // Runs until Stop(). Binds the loop to the calling thread.
  void Run();
  // One turn without waiting: ready fds, posted tasks, timers due by the
  // clock, RunSoon() tasks. For tests that drive the loop in simulated time.
  // Returns how many callbacks and tasks ran (0: the loop is idle).
  size_t RunOnce();
  // The deadline (clock().MonotonicNanos() scale) of the earliest timer, if
  // any; it may be one already cancelled.
  std::optional<int64_t> NextTimerNanos() const;
  // Thread-safe: makes Run() return after the current batch.
  void Stop();

  // Monotonic time at the start of the current batch (cheap; no clock read).
  int64_t NowNanos() const { return now_nanos_; }
  // The clock every timer and timestamp of the data plane reads (for a
  // fresh monotonic value, or wall time).
  Clock& clock() const { return clock_; }

  bool IsLoopThread() const;

 private:
  friend class IoWatch;
  struct TimerEntry {
    int64_t deadline;
    TimerId id;
    bool operator>(const TimerEntry& other) const {
      return deadline != other.deadline ? deadline > other.deadline
                                        : id > other.id;
    }
  };

  EventLoop(wire::UniqueFd epoll, wire::UniqueFd wakeup, Clock& clock);
  // One turn: waits up to `timeout_millis` (-1: forever) for events.
  // Returns how many callbacks and tasks ran.
  size_t Turn(int timeout_millis);
  void Unwatch(IoWatch::Entry* entry);
  void Modify(IoWatch::Entry* entry, uint32_t events);
  int NextTimeoutMillis() const;
  size_t RunExpiredTimers();
  size_t RunPosted() ABSL_LOCKS_EXCLUDED(post_mu_);
  void AssertOnLoop() const;

  std::unique_ptr<Clock> owned_clock_;  // Set when Create() chose the clock.
  Clock& clock_;
  wire::UniqueFd epoll_;
  wire::UniqueFd wakeup_;  // eventfd: Post() and Stop() wake epoll_wait.
  std::thread::id loop_thread_;
  bool running_ = false;
  std::atomic<bool> stop_requested_{false};
  int64_t now_nanos_ = 0;

  // Unwatched entries, freed after the batch that may still reference them.
  std::vector<IoWatch::Entry*> graveyard_;

  std::priority_queue<TimerEntry, std::vector<TimerEntry>,
                      std::greater<TimerEntry>>
      timers_;
  absl::flat_hash_map<TimerId, Task> timer_tasks_;
  TimerId next_timer_id_ = 1;
  std::vector<Task> soon_;
  std::vector<Task> soon_running_;  // The batch of soon_ being run.

  absl::Mutex post_mu_;
  std::vector<Task> posted_ ABSL_GUARDED_BY(post_mu_);
  bool closed_ ABSL_GUARDED_BY(post_mu_) = false;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_EVENT_LOOP_H_
