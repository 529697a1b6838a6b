#ifndef FDBROKER_WORKER_SRC_HANDLER_THREADS_H_
#define FDBROKER_WORKER_SRC_HANDLER_THREADS_H_

#include <pthread.h>

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "fdbroker/worker.h"

namespace fdbroker::worker {

// The threads of ServeThreadPerConnection(): one per connection, running the
// application's handler and then reporting the connection closed.
//
// Start(), JoinFinished() and JoinAll() run on the serving (loop) thread
// only; handler threads touch nothing but `finished_` (under mu_) and the
// Worker's thread-safe ConnectionClosed().
class HandlerThreads {
 public:
  HandlerThreads(Worker& worker, Worker::ConnectionHandler handler);
  // Joins every thread still running.
  ~HandlerThreads();
  HandlerThreads(const HandlerThreads&) = delete;
  HandlerThreads& operator=(const HandlerThreads&) = delete;

  // Runs the handler for `connection` on a new thread (its fd made
  // blocking first). If no thread can be created the connection is closed
  // and reported closed.
  void Start(ClientConnection connection);
  // Joins the threads whose handler has returned.
  void JoinFinished();
  // Joins every thread (waits for all handlers to return).
  void JoinAll();

 private:
  struct Task;
  static void* RunTask(void* task);

  Worker& worker_;
  const Worker::ConnectionHandler handler_;
  // Loop thread only: thread key -> its thread. Keys are our own serial
  // numbers, not connection ids: after a re-registration a new broker may
  // hand out an id whose previous connection's thread has not been joined.
  absl::flat_hash_map<uint64_t, pthread_t> running_;
  uint64_t next_key_ = 1;
  absl::Mutex mu_;
  // Keys of the threads about to exit.
  std::vector<uint64_t> finished_ ABSL_GUARDED_BY(mu_);
};

}  // namespace fdbroker::worker

#endif  // FDBROKER_WORKER_SRC_HANDLER_THREADS_H_
