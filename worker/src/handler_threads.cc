#include "handler_threads.h"

#include <fcntl.h>

#include <cstring>
#include <memory>
#include <utility>

#include "spdlog/spdlog.h"

namespace fdbroker::worker {

struct HandlerThreads::Task {
  HandlerThreads* threads;
  uint64_t key;
  ClientConnection connection;
};

HandlerThreads::HandlerThreads(Worker& worker,
                               Worker::ConnectionHandler handler)
    : worker_(worker), handler_(std::move(handler)) {}

HandlerThreads::~HandlerThreads() { JoinAll(); }

void HandlerThreads::Start(ClientConnection connection) {
  // Thread-per-connection code reads and writes blocking.
  const int flags = ::fcntl(connection.fd.get(), F_GETFL);
  if (flags >= 0 && (flags & O_NONBLOCK) != 0) {
    (void)::fcntl(connection.fd.get(), F_SETFL, flags & ~O_NONBLOCK);
  }
  const uint64_t id = connection.id;
  const uint64_t key = next_key_++;
  auto task = std::make_unique<Task>(Task{this, key, std::move(connection)});
  pthread_t thread;
  const int error = ::pthread_create(&thread, nullptr, &RunTask, task.get());
  if (error != 0) {
    spdlog::error(
        "fdbroker worker: cannot start a thread for connection {}: {}; "
        "closing it",
        id, std::strerror(error));
    task.reset();  // Closes the connection.
    worker_.ConnectionClosed(id);
    return;
  }
  (void)task.release();  // RunTask owns it now.
  running_.emplace(key, thread);
}

void* HandlerThreads::RunTask(void* arg) {
  std::unique_ptr<Task> task(static_cast<Task*>(arg));
  HandlerThreads& self = *task->threads;
  const uint64_t id = task->connection.id;
  const uint64_t key = task->key;
  self.handler_(std::move(task->connection));
  task.reset();  // Closes the fd if the handler left it with us.
  self.worker_.ConnectionClosed(id);
  absl::MutexLock lock(&self.mu_);
  self.finished_.push_back(key);
  return nullptr;
}

void HandlerThreads::JoinFinished() {
  std::vector<uint64_t> finished;
  {
    absl::MutexLock lock(&mu_);
    finished.swap(finished_);
  }
  for (uint64_t key : finished) {
    auto it = running_.find(key);
    if (it == running_.end()) continue;
    ::pthread_join(it->second, nullptr);
    running_.erase(it);
  }
}

void HandlerThreads::JoinAll() {
  for (auto& [id, thread] : running_) ::pthread_join(thread, nullptr);
  running_.clear();
  absl::MutexLock lock(&mu_);
  finished_.clear();
}

}  // namespace fdbroker::worker
