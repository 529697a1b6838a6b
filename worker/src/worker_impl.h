#ifndef FDBROKER_WORKER_SRC_WORKER_IMPL_H_
#define FDBROKER_WORKER_SRC_WORKER_IMPL_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "fdbroker/v1/handoff.pb.h"
#include "fdbroker/worker.h"
#include "loop_fds.h"
#include "registration.h"
#include "wire/message_channel.h"
#include "wire/unique_fd.h"

namespace fdbroker::worker {

// The Worker behind Worker::Connect().
//
// Threads: ProcessEvents() (or the loop inside ServeThreadPerConnection())
// runs on one thread at a time, the "loop thread"; it alone receives from the
// channel and runs the application's callbacks, never holding mu_.
// ConnectionClosed(), StartDrain() and the queries may come from any thread:
// they update state under mu_ and wake the loop through wake_.
//
// Connection ownership: a Connection's fd is owned by `taken` while its batch
// is received, then by an Outgoing (the Ack that covers it) until that Ack is
// sent, then by ready_ until it is delivered to the application. If the
// channel dies before the Ack is sent, the fd is closed with its Outgoing and
// never delivered: the broker still holds its copy and re-places it.
class WorkerImpl final : public Worker {
 public:
  static absl::StatusOr<std::unique_ptr<WorkerImpl>> Create(
      Options options, Registration registration);
  ~WorkerImpl() override;

  uint64_t worker_id() const override { return worker_id_; }
  int pollable_fd() const override { return epoll_fd_.get(); }
  void ProcessEvents() override;
  void ConnectionClosed(uint64_t id) override;
  void StartDrain() override;
  bool draining() const override;
  bool finished() const override;
  size_t active_connections() const override;
  absl::Status ServeThreadPerConnection(ConnectionHandler handler) override;

 private:
  // epoll data of the fds in epoll_fd_.
  enum FdTag : uint64_t { kChannelTag = 1, kTimerTag, kWakeTag };

  // A message waiting for room in the socket's send buffer.
  struct Outgoing {
    v1::HandoffMessage message;
    // The connections this message Acks (empty for other messages).
    std::vector<ClientConnection> acked;
  };

  WorkerImpl(Options options, Registration registration,
             wire::UniqueFd epoll_fd, TimerFd timer, WakeFd wake);

  // The body of ProcessEvents(); `deliver` gets each new connection, after
  // mu_ is released.
  void ProcessEventsWith(absl::FunctionRef<void(ClientConnection)> deliver)
      ABSL_LOCKS_EXCLUDED(mu_);

  void ReceiveLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sends now if nothing is queued and the socket has room, else queues.
  void SendLocked(Outgoing outgoing) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FlushOutboxLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnSentLocked(Outgoing& outgoing) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReportClosedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckHeartbeatLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ArmTimerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SayGoodbyeIfDrainedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void BeginDrainLocked(DrainCause cause, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Closes the channel after an error: un-acked connections are closed
  // undelivered, owned ones stay with the application, the worker drains.
  void LoseChannelLocked(absl::string_view reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseChannelLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetWritableInterestLocked(bool want) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WakeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint32_t capacity_;
  const uint64_t worker_id_;
  const std::chrono::milliseconds heartbeat_interval_;  // 0: never send
  const std::chrono::milliseconds heartbeat_timeout_;   // 0: never expire
  // Loop thread only (see the class comment).
  absl::AnyInvocable<void(ClientConnection)> on_connection_;
  absl::AnyInvocable<void(DrainCause, absl::Time)> on_drain_;

  const wire::UniqueFd epoll_fd_;
  TimerFd timer_;
  WakeFd wake_;

  mutable absl::Mutex mu_;
  // Null once the channel is closed (lost, or after Goodbye).
  std::unique_ptr<wire::MessageChannel> channel_ ABSL_GUARDED_BY(mu_);
  bool want_writable_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<Outgoing> outbox_ ABSL_GUARDED_BY(mu_);
  // Connections covered by Acks still in outbox_.
  size_t unsent_acks_ ABSL_GUARDED_BY(mu_) = 0;
  // Acked and not reported closed: id -> peer address (what a re-registering
  // Hello lists in owned_connections).
  absl::flat_hash_map<uint64_t, std::string> owned_ ABSL_GUARDED_BY(mu_);
  // Acked, waiting to be delivered at the end of ProcessEvents().
  std::vector<ClientConnection> ready_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> closed_to_report_ ABSL_GUARDED_BY(mu_);
  bool wake_signalled_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  DrainCause drain_cause_ ABSL_GUARDED_BY(mu_) = DrainCause::kLocal;
  absl::Time drain_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  bool drain_to_announce_ ABSL_GUARDED_BY(mu_) = false;
  // Goodbye sent or queued: nothing else is sent or received after it.
  bool goodbye_sent_ ABSL_GUARDED_BY(mu_) = false;
  MonoTime last_sent_ ABSL_GUARDED_BY(mu_);
  MonoTime last_received_ ABSL_GUARDED_BY(mu_);
  bool serving_threads_ ABSL_GUARDED_BY(mu_) = false;
  // Reused between receives so that steady traffic does not allocate.
  v1::HandoffMessage incoming_ ABSL_GUARDED_BY(mu_);
};

}  // namespace fdbroker::worker

#endif  // FDBROKER_WORKER_SRC_WORKER_IMPL_H_
