#include "broker/event_loop.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "spdlog/spdlog.h"

namespace fdbroker {

struct IoWatch::Entry {
  int fd;
  uint32_t events;
  bool live;
  EventLoop::IoCallback callback;
};

IoWatch::~IoWatch() { loop_.Unwatch(entry_); }

void IoWatch::SetEvents(uint32_t events) { loop_.Modify(entry_, events); }

uint32_t IoWatch::events() const { return entry_->events; }

void Timer::Arm(absl::Duration delay, absl::AnyInvocable<void()> task) {
  Cancel();
  id_ = loop_.RunAfter(delay, [this, task = std::move(task)]() mutable {
    id_ = 0;  // Fired: before the task, which may re-arm or destroy us.
    task();
  });
}

void Timer::Cancel() {
  if (id_ == 0) return;
  loop_.Cancel(id_);
  id_ = 0;
}

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create() {
  auto clock = std::make_unique<RealClock>();
  Clock& ref = *clock;
  absl::StatusOr<std::unique_ptr<EventLoop>> loop = Create(ref);
  if (loop.ok()) (*loop)->owned_clock_ = std::move(clock);
  return loop;
}

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create(Clock& clock) {
  wire::UniqueFd epoll(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll) return absl::ErrnoToStatus(errno, "epoll_create1");
  wire::UniqueFd wakeup(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wakeup) return absl::ErrnoToStatus(errno, "eventfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;  // nullptr marks the wake-up fd.
  if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, wakeup.get(), &ev) != 0) {
    return absl::ErrnoToStatus(errno, "epoll_ctl(eventfd)");
  }
  return std::unique_ptr<EventLoop>(
      new EventLoop(std::move(epoll), std::move(wakeup), clock));
}

EventLoop::EventLoop(wire::UniqueFd epoll, wire::UniqueFd wakeup, Clock& clock)
    : clock_(clock),
      epoll_(std::move(epoll)),
      wakeup_(std::move(wakeup)),
      now_nanos_(clock.MonotonicNanos()) {}

EventLoop::~EventLoop() {
  for (IoWatch::Entry* entry : graveyard_) delete entry;
}

bool EventLoop::IsLoopThread() const {
  // Before Run() the constructing thread sets everything up.
  return !running_ || std::this_thread::get_id() == loop_thread_;
}

void EventLoop::AssertOnLoop() const {
  if (!IsLoopThread()) {
    spdlog::critical("event loop method called off the loop thread");
    std::abort();
  }
}

absl::StatusOr<std::unique_ptr<IoWatch>> EventLoop::Watch(int fd,
                                                          uint32_t events,
                                                          IoCallback callback) {
  AssertOnLoop();
  auto* entry = new IoWatch::Entry{fd, events, true, std::move(callback)};
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = entry;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    int err = errno;
    delete entry;
    return absl::ErrnoToStatus(err, "epoll_ctl(ADD)");
  }
  return std::unique_ptr<IoWatch>(new IoWatch(*this, entry));
}

void EventLoop::Modify(IoWatch::Entry* entry, uint32_t events) {
  AssertOnLoop();
  if (entry->events == events) return;
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = entry;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, entry->fd, &ev) != 0) {
    // Only a programming error (closed fd) gets here.
    spdlog::critical("epoll_ctl(MOD) on fd {}: {}", entry->fd, errno);
    std::abort();
  }
  entry->events = events;
}

void EventLoop::Unwatch(IoWatch::Entry* entry) {
  AssertOnLoop();
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, entry->fd, nullptr);
  entry->live = false;
  // The current batch may still hold a pointer to the entry; free it after.
  graveyard_.push_back(entry);
}

EventLoop::TimerId EventLoop::RunAfter(absl::Duration delay, Task task) {
  AssertOnLoop();
  const TimerId id = next_timer_id_++;
  int64_t deadline = clock_.MonotonicNanos() + absl::ToInt64Nanoseconds(delay);
  timers_.push(TimerEntry{deadline, id});
  timer_tasks_.emplace(id, std::move(task));
  return id;
}

void EventLoop::Cancel(TimerId id) {
  AssertOnLoop();
  // The heap entry stays and is skipped when it surfaces.
  timer_tasks_.erase(id);
}

void EventLoop::RunSoon(Task task) {
  AssertOnLoop();
  soon_.push_back(std::move(task));
}

bool EventLoop::Post(Task task) {
  {
    absl::MutexLock lock(&post_mu_);
    if (closed_) return false;
    posted_.push_back(std::move(task));
  }
  uint64_t one = 1;
  // EAGAIN means the counter is already non-zero: the loop will wake anyway.
  (void)::write(wakeup_.get(), &one, sizeof(one));
  return true;
}

void EventLoop::Close() {
  {
    absl::MutexLock lock(&post_mu_);
    closed_ = true;
  }
  RunPosted();
}

void EventLoop::Stop() {
  stop_requested_.store(true);
  uint64_t one = 1;
  (void)::write(wakeup_.get(), &one, sizeof(one));
}

int EventLoop::NextTimeoutMillis() const {
  if (!soon_.empty()) return 0;
  if (timers_.empty()) return -1;
  int64_t wait = timers_.top().deadline - clock_.MonotonicNanos();
  if (wait <= 0) return 0;
  // Round up so that a timer never fires early.
  return static_cast<int>((wait + 999999) / 1000000);
}

size_t EventLoop::RunExpiredTimers() {
  const int64_t now = clock_.MonotonicNanos();
  size_t ran = 0;
  while (!timers_.empty() && timers_.top().deadline <= now) {
    TimerId id = timers_.top().id;
    timers_.pop();
    auto it = timer_tasks_.find(id);
    if (it == timer_tasks_.end()) continue;  // Cancelled.
    Task task = std::move(it->second);
    timer_tasks_.erase(it);
    task();
    ++ran;
  }
  return ran;
}

size_t EventLoop::RunPosted() {
  std::vector<Task> tasks;
  {
    absl::MutexLock lock(&post_mu_);
    tasks.swap(posted_);
  }
  for (Task& task : tasks) task();
  return tasks.size();
}

std::optional<int64_t> EventLoop::NextTimerNanos() const {
  if (timers_.empty()) return std::nullopt;
  return timers_.top().deadline;
}

void EventLoop::Run() {
  loop_thread_ = std::this_thread::get_id();
  running_ = true;
  while (!stop_requested_.load()) Turn(NextTimeoutMillis());
  running_ = false;
  stop_requested_.store(false);  // Run() may be called again.
  RunPosted();
}

size_t EventLoop::RunOnce() {
  AssertOnLoop();
  return Turn(0);
}

size_t EventLoop::Turn(int timeout_millis) {
  constexpr int kMaxEvents = 128;
  epoll_event events[kMaxEvents];
  int n = ::epoll_wait(epoll_.get(), events, kMaxEvents, timeout_millis);
  if (n < 0) {
    if (errno == EINTR) return 0;
    spdlog::critical("epoll_wait: errno {}", errno);
    std::abort();
  }
  now_nanos_ = clock_.MonotonicNanos();
  size_t ran = 0;
  bool woken = false;
  for (int i = 0; i < n; ++i) {
    auto* entry = static_cast<IoWatch::Entry*>(events[i].data.ptr);
    if (entry == nullptr) {
      woken = true;
      continue;
    }
    // An earlier callback of this batch may have unwatched this entry.
    if (entry->live) {
      entry->callback(events[i].events);
      ++ran;
    }
  }
  if (woken) {
    uint64_t count;
    (void)::read(wakeup_.get(), &count, sizeof(count));
    ran += RunPosted();
  }
  ran += RunExpiredTimers();
  while (!soon_.empty()) {
    // Both vectors keep their capacity: no allocation per turn.
    soon_running_.swap(soon_);
    for (Task& task : soon_running_) task();
    ran += soon_running_.size();
    soon_running_.clear();
  }
  for (IoWatch::Entry* entry : graveyard_) delete entry;
  graveyard_.clear();
  return ran;
}

}  // namespace fdbroker
