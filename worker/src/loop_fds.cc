#include "loop_fds.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

namespace fdbroker::worker {
namespace {

absl::Status EpollControl(int epoll_fd, int op, int fd, uint32_t events,
                          uint64_t data) {
  epoll_event event{};
  event.events = events;
  event.data.u64 = data;
  if (::epoll_ctl(epoll_fd, op, fd, &event) != 0) {
    return absl::ErrnoToStatus(errno, "epoll_ctl");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<wire::UniqueFd> CreateEpoll() {
  wire::UniqueFd fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!fd) return absl::ErrnoToStatus(errno, "epoll_create1");
  return fd;
}

absl::Status EpollAdd(int epoll_fd, int fd, uint32_t events, uint64_t data) {
  return EpollControl(epoll_fd, EPOLL_CTL_ADD, fd, events, data);
}

absl::Status EpollModify(int epoll_fd, int fd, uint32_t events, uint64_t data) {
  return EpollControl(epoll_fd, EPOLL_CTL_MOD, fd, events, data);
}

absl::Status EpollDelete(int epoll_fd, int fd) {
  return EpollControl(epoll_fd, EPOLL_CTL_DEL, fd, 0, 0);
}

absl::StatusOr<TimerFd> TimerFd::Create() {
  wire::UniqueFd fd(
      ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!fd) return absl::ErrnoToStatus(errno, "timerfd_create");
  return TimerFd(std::move(fd));
}

absl::Status TimerFd::ArmAt(MonoTime when) {
  const auto since_epoch = std::chrono::duration_cast<std::chrono::nanoseconds>(
                               when.time_since_epoch())
                               .count();
  itimerspec spec{};
  // A zero it_value would disarm: fire "at once" as 1 ns instead.
  const int64_t ns = since_epoch > 0 ? since_epoch : 1;
  spec.it_value.tv_sec = ns / 1000000000;
  spec.it_value.tv_nsec = ns % 1000000000;
  if (::timerfd_settime(fd_.get(), TFD_TIMER_ABSTIME, &spec, nullptr) != 0) {
    return absl::ErrnoToStatus(errno, "timerfd_settime");
  }
  return absl::OkStatus();
}

absl::Status TimerFd::Disarm() {
  itimerspec spec{};
  if (::timerfd_settime(fd_.get(), 0, &spec, nullptr) != 0) {
    return absl::ErrnoToStatus(errno, "timerfd_settime");
  }
  return absl::OkStatus();
}

bool TimerFd::Consume() {
  uint64_t expirations;
  return ::read(fd_.get(), &expirations, sizeof(expirations)) ==
         sizeof(expirations);
}

absl::StatusOr<WakeFd> WakeFd::Create() {
  wire::UniqueFd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd) return absl::ErrnoToStatus(errno, "eventfd");
  return WakeFd(std::move(fd));
}

void WakeFd::Signal() {
  const uint64_t one = 1;
  // Only fails (EAGAIN) when the counter is saturated: already readable.
  (void)!::write(fd_.get(), &one, sizeof(one));
}

void WakeFd::Consume() {
  uint64_t count;
  (void)!::read(fd_.get(), &count, sizeof(count));
}

}  // namespace fdbroker::worker
