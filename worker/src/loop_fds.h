#ifndef FDBROKER_WORKER_SRC_LOOP_FDS_H_
#define FDBROKER_WORKER_SRC_LOOP_FDS_H_

#include <chrono>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "wire/unique_fd.h"

// Owners of the Linux fds the SDK's pollable fd is made of: an epoll set, a
// timerfd for heartbeats and an eventfd that other threads use to wake the
// loop. All are close-on-exec and non-blocking.
namespace fdbroker::worker {

using MonoTime = std::chrono::steady_clock::time_point;

absl::StatusOr<wire::UniqueFd> CreateEpoll();
// epoll_ctl(ADD/MOD/DEL) with `data` as the event's u64.
absl::Status EpollAdd(int epoll_fd, int fd, uint32_t events, uint64_t data);
absl::Status EpollModify(int epoll_fd, int fd, uint32_t events, uint64_t data);
absl::Status EpollDelete(int epoll_fd, int fd);

// A one-shot CLOCK_MONOTONIC timer (steady_clock is CLOCK_MONOTONIC on
// Linux). Readable once the armed time has passed, until Consume().
class TimerFd {
 public:
  static absl::StatusOr<TimerFd> Create();

  int fd() const { return fd_.get(); }
  // Fires at `when` (at once if it has passed); replaces any earlier arming.
  absl::Status ArmAt(MonoTime when);
  absl::Status Disarm();
  // Clears the readable state. True if the timer had fired.
  bool Consume();

 private:
  explicit TimerFd(wire::UniqueFd fd) : fd_(std::move(fd)) {}
  wire::UniqueFd fd_;
};

// An eventfd used as a level-triggered "something to do" flag.
class WakeFd {
 public:
  static absl::StatusOr<WakeFd> Create();

  int fd() const { return fd_.get(); }
  // Makes fd() readable. Safe from any thread.
  void Signal();
  // Makes fd() unreadable again.
  void Consume();

 private:
  explicit WakeFd(wire::UniqueFd fd) : fd_(std::move(fd)) {}
  wire::UniqueFd fd_;
};

}  // namespace fdbroker::worker

#endif  // FDBROKER_WORKER_SRC_LOOP_FDS_H_
