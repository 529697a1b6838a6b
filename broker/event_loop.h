#ifndef FDBROKER_BROKER_EVENT_LOOP_H_
#define FDBROKER_BROKER_EVENT_LOOP_H_

#include <sys/epoll.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <queue>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
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

// The data plane's single-threaded reactor: epoll, timers and a cross-thread
// task queue. Every method except Post() and Stop() must be called on the
// loop thread (the thread running Run()); they assert it. Level-triggered:
// a callback that leaves data unread is called again on the next turn.
class EventLoop {
 public:
  using IoCallback = absl::AnyInvocable<void(uint32_t events)>;
  using Task = absl::AnyInvocable<void()>;
  using TimerId = uint64_t;

  static absl::StatusOr<std::unique_ptr<EventLoop>> Create();
  ~EventLoop();

  // Calls `callback` with the ready epoll events while the IoWatch lives. The
  // fd must outlive the watch.
  absl::StatusOr<std::unique_ptr<IoWatch>> Watch(int fd, uint32_t events,
                                                 IoCallback callback);

  // Runs `task` once after `delay`. Returns an id for Cancel().
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
  // Thread-safe: makes Run() return after the current batch.
  void Stop();

  // Monotonic time at the start of the current batch (cheap; no syscall).
  int64_t NowNanos() const { return now_nanos_; }
  // Reads the clock now (when a callback needs a fresh value).
  static int64_t MonotonicNanos();

  bool IsLoopThread() const;

 private:
  friend class IoWatch;
  struct Timer {
    int64_t deadline;
    TimerId id;
    bool operator>(const Timer& other) const {
      return deadline != other.deadline ? deadline > other.deadline
                                        : id > other.id;
    }
  };

  EventLoop(wire::UniqueFd epoll, wire::UniqueFd wakeup);
  void Unwatch(IoWatch::Entry* entry);
  void Modify(IoWatch::Entry* entry, uint32_t events);
  int NextTimeoutMillis() const;
  void RunExpiredTimers();
  void RunPosted() ABSL_LOCKS_EXCLUDED(post_mu_);
  void AssertOnLoop() const;

  wire::UniqueFd epoll_;
  wire::UniqueFd wakeup_;  // eventfd: Post() and Stop() wake epoll_wait.
  std::thread::id loop_thread_;
  bool running_ = false;
  std::atomic<bool> stop_requested_{false};
  int64_t now_nanos_ = 0;

  // Unwatched entries, freed after the batch that may still reference them.
  std::vector<IoWatch::Entry*> graveyard_;

  std::priority_queue<Timer, std::vector<Timer>, std::greater<Timer>> timers_;
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
