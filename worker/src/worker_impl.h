#ifndef FDBROKER_WORKER_SRC_WORKER_IMPL_H_
#define FDBROKER_WORKER_SRC_WORKER_IMPL_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
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
//
// Broker loss (see worker.h): the channel is closed (with the outbox and the
// un-acked fds in it) and, unless draining or disabled, the worker
// reconnects: `reconnecting_` is set, the timer fires at the next attempt,
// and an attempt connects and sends Hello without blocking. Its channel is
// `registering_` (epoll tag kRegisterTag) until the broker's answer arrives:
// Welcome makes it channel_ again, a Refusal or the reconnect deadline
// drains the worker (kBrokerLost), anything else fails the attempt and the
// next one is scheduled (back-off). Ids closed while no channel exists are
// forgotten; ids closed while `registering_` waits were listed in its Hello
// and are reported after the Welcome.
//
// Release: an id being released stays in owned_ (and in releasing_) until
// its Release is sent, so that Goodbye waits for it and a re-registration
// lists it; its fd is owned by the Outgoing. If the channel dies first, the
// connection moves to ready_ and is delivered again (never lost).
class WorkerImpl final : public Worker {
 public:
  // `socket_path` is the resolved broker socket, `hello` the Hello that
  // registered (without owned connections): re-registration reuses both.
  static absl::StatusOr<std::unique_ptr<WorkerImpl>> Create(
      Options options, std::string socket_path, v1::HandoffMessage hello,
      Registration registration);
  ~WorkerImpl() override;

  uint64_t worker_id() const override;
  bool registered() const override;
  int pollable_fd() const override { return epoll_fd_.get(); }
  void ProcessEvents() override;
  void ConnectionClosed(uint64_t id) override;
  void ConnectionCut(uint64_t id) override;
  void StartDrain() override;
  bool draining() const override;
  bool release_on_drain() const override;
  absl::Status Release(uint64_t id, wire::UniqueFd& fd, std::string unread_data,
                       ReleaseReason reason) override;
  bool finished() const override;
  size_t active_connections() const override;
  absl::Status ServeThreadPerConnection(ConnectionHandler handler) override;

 private:
  enum class Closure { kFinished, kCut };
  // ConnectionClosed() and ConnectionCut().
  void Closed(uint64_t id, Closure closure) ABSL_LOCKS_EXCLUDED(mu_);
  // epoll data of the fds in epoll_fd_.
  enum FdTag : uint64_t {
    kChannelTag = 1,
    kTimerTag,
    kWakeTag,
    kRegisterTag,
    kListenerTag
  };

  // A message waiting for room in the socket's send buffer.
  struct Outgoing {
    v1::HandoffMessage message;
    // The connections this message Acks (empty for other messages).
    std::vector<ClientConnection> acked;
    // Release only: the connection given back; its fd is attached.
    std::optional<ClientConnection> released;
  };

  WorkerImpl(Options options, std::string socket_path, v1::HandoffMessage hello,
             Registration registration, wire::UniqueFd epoll_fd, TimerFd timer,
             WakeFd wake);

  // The body of ProcessEvents(); `deliver` gets each new connection, after
  // mu_ is released.
  void ProcessEventsWith(absl::FunctionRef<void(ClientConnection)> deliver)
      ABSL_LOCKS_EXCLUDED(mu_);

  void ReceiveLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One connection the broker offered (alone or in a ConnectionBatch): into
  // `taken` (to ack) or `rejected`. False if the broker broke the protocol
  // (the channel is then lost).
  bool OfferLocked(v1::Connection& offered, wire::UniqueFd fd,
                   std::vector<ClientConnection>& taken,
                   std::vector<uint64_t>& rejected)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sends now if nothing is queued and the socket has room, else queues.
  void SendLocked(Outgoing outgoing) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One send attempt of `outgoing`, with its fd if it is a Release.
  absl::StatusOr<wire::SendResult> SendNowLocked(Outgoing& outgoing)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FlushOutboxLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnSentLocked(Outgoing& outgoing) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sends closed_to_report_ as one Closed: at once if `now` or urgent, else
  // only once closed_report_at_ has come.
  void ReportClosedLocked(bool now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ClosedReportsAreUrgentLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckHeartbeatLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // --placement=kernel (ListenerGrant): takes the granted listener (closing
  // any earlier one), unless draining.
  void TakeListenerLocked(wire::UniqueFd listener, std::string name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseListenerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Accepts a batch from the granted listener into ready_.
  void AcceptLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The ListenerLoad figures changed: report within the Welcome's interval
  // (at once while draining).
  void LoadChangedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReportLoadLocked(bool now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // When the next Heartbeat is due (MonoTime::max(): none).
  MonoTime NextHeartbeatLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ArmTimerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SayGoodbyeIfDrainedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void BeginDrainLocked(DrainCause cause, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Closes the channel after an error: un-acked connections are closed
  // undelivered, owned ones stay with the application, and the worker
  // reconnects (or drains, if it was draining or reconnecting is disabled).
  // `at_once`: the broker asked (Reconnect), the first attempt comes
  // without back-off.
  void LoseChannelLocked(absl::string_view reason, bool at_once = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reconnect (§7.9): once every Ack, Reject and Closed owed to this broker
  // is out, closes the channel and registers again at once.
  void MaybeReconnectNowLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The timer fired: heartbeats when connected, else the reconnect steps.
  void OnTimerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StartReconnectingLocked(bool at_once = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One attempt: connect and send Hello (non-blocking).
  void TryRegisterLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Hello.owned_connections for a re-registration; fills unlisted_.
  void ListOwnedLocked(v1::Hello& hello) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // registering_ is readable: Welcome, Refusal, or a failed attempt.
  void ReceiveRegistrationAnswerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RegisteredLocked(const v1::Welcome& welcome)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Closes the attempt's channel and schedules the next attempt.
  void FailAttemptLocked(absl::string_view reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Stops reconnecting (closes an attempt in progress).
  void StopReconnectingLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Stops reconnecting and drains with kBrokerLost.
  void GiveUpReconnectingLocked(absl::string_view reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseChannelLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetWritableInterestLocked(bool want) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WakeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint32_t capacity_;
  // What our Hello declared; a bigger ConnectionBatch is a protocol error.
  const uint32_t max_connections_per_message_;
  // What re-registration needs: where, the first Hello (no owned
  // connections), how long to try, how long an attempt waits for Welcome.
  const std::string socket_path_;
  const v1::HandoffMessage hello_;
  const std::chrono::nanoseconds reconnect_timeout_;  // 0: never reconnect
  const std::chrono::nanoseconds attempt_timeout_;
  wire::SysCalls& sys_;
  // Loop thread only (see the class comment).
  absl::AnyInvocable<void(ClientConnection)> on_connection_;
  absl::AnyInvocable<void(DrainCause, absl::Time)> on_drain_;
  absl::AnyInvocable<void(uint32_t, ReleaseReason)> on_release_request_;
  // Hello.supports_release (on_release_request_ is set).
  const bool supports_release_;
  // Hello.supports_listener_grant.
  const bool supports_listener_grant_;

  const wire::UniqueFd epoll_fd_;
  TimerFd timer_;
  WakeFd wake_;

  mutable absl::Mutex mu_;
  // From the latest Welcome. Heartbeat interval/timeout 0: never send/expire.
  uint64_t worker_id_ ABSL_GUARDED_BY(mu_);
  std::chrono::milliseconds heartbeat_interval_ ABSL_GUARDED_BY(mu_);
  std::chrono::milliseconds heartbeat_timeout_ ABSL_GUARDED_BY(mu_);
  // Welcome.worker_timeout_ms: while > 0, a Heartbeat at least every
  // heartbeat_interval_, busy or not (the broker's proof of life).
  std::chrono::milliseconds worker_timeout_ ABSL_GUARDED_BY(mu_);
  // The broker counts this worker in its supervised pool (Welcome.supervised);
  // a re-registration says so (Hello.was_supervised) to be adopted there.
  bool supervised_ ABSL_GUARDED_BY(mu_);
  // Null once the channel is closed (lost, or after Goodbye).
  std::unique_ptr<wire::MessageChannel> channel_ ABSL_GUARDED_BY(mu_);
  bool want_writable_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<Outgoing> outbox_ ABSL_GUARDED_BY(mu_);
  // Connections covered by Acks still in outbox_.
  size_t unsent_acks_ ABSL_GUARDED_BY(mu_) = 0;
  // Acked and not reported closed: id -> peer address (what a re-registering
  // Hello lists in owned_connections).
  absl::flat_hash_map<uint64_t, std::string> owned_ ABSL_GUARDED_BY(mu_);
  // Owned ids the current broker does not know (left out of a Hello that
  // would not fit in a packet): their Closed is not sent.
  absl::flat_hash_set<uint64_t> unlisted_ ABSL_GUARDED_BY(mu_);
  // Acked, waiting to be delivered at the end of ProcessEvents().
  std::vector<ClientConnection> ready_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> closed_to_report_ ABSL_GUARDED_BY(mu_);
  // Those of closed_to_report_ that were cut (Closed.cut_connection_ids).
  absl::flat_hash_set<uint64_t> cut_to_report_ ABSL_GUARDED_BY(mu_);
  // When the oldest of closed_to_report_ must be sent (kClosedReportDelay).
  MonoTime closed_report_at_ ABSL_GUARDED_BY(mu_) = MonoTime::max();
  bool wake_signalled_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  DrainCause drain_cause_ ABSL_GUARDED_BY(mu_) = DrainCause::kLocal;
  absl::Time drain_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  bool drain_to_announce_ ABSL_GUARDED_BY(mu_) = false;
  // The broker's Drain asked for release_idle (and we support it).
  bool release_on_drain_ ABSL_GUARDED_BY(mu_) = false;
  // ReleaseRequests received, passed to on_release_request_ at the end of
  // ProcessEvents().
  std::vector<std::pair<uint32_t, ReleaseReason>> release_requests_
      ABSL_GUARDED_BY(mu_);
  // Owned ids whose Release is queued in outbox_.
  absl::flat_hash_set<uint64_t> releasing_ ABSL_GUARDED_BY(mu_);
  // Goodbye sent or queued: nothing else is sent or received after it.
  bool goodbye_sent_ ABSL_GUARDED_BY(mu_) = false;
  // The broker sent Reconnect; see MaybeReconnectNowLocked().
  bool reconnect_requested_ ABSL_GUARDED_BY(mu_) = false;
  MonoTime last_sent_ ABSL_GUARDED_BY(mu_);
  MonoTime last_heartbeat_ ABSL_GUARDED_BY(mu_);
  MonoTime last_received_ ABSL_GUARDED_BY(mu_);
  bool serving_threads_ ABSL_GUARDED_BY(mu_) = false;

  // --placement=kernel. The listener the broker granted (invalid: none, or
  // closed by a drain); the SDK accepts from it on the loop thread, and the
  // broker accepts whatever is left once we stop. Its connections are ours
  // from accept on, with ids that have wire::kWorkerAcceptedIdBit set: no
  // Ack, no Closed, their figures go in ListenerLoad.
  wire::UniqueFd listener_ ABSL_GUARDED_BY(mu_);
  std::string listener_name_ ABSL_GUARDED_BY(mu_);
  // The local address of every connection from listener_, unless it is
  // bound to a wildcard address (empty: getsockname per connection).
  std::string listener_local_address_ ABSL_GUARDED_BY(mu_);
  // Accepted from the listener and still ours: id -> peer address.
  absl::flat_hash_map<uint64_t, std::string> accepted_ ABSL_GUARDED_BY(mu_);
  uint64_t accepted_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_accepted_id_ ABSL_GUARDED_BY(mu_) = 0;
  // Welcome.listener_load_interval_ms; 0: this broker wants no ListenerLoad.
  std::chrono::milliseconds listener_load_interval_ ABSL_GUARDED_BY(mu_);
  // The figures changed since the last ListenerLoad, which is due then.
  bool load_changed_ ABSL_GUARDED_BY(mu_) = false;
  MonoTime load_report_at_ ABSL_GUARDED_BY(mu_) = MonoTime::max();

  // Reconnecting after losing the broker (never while draining).
  bool reconnecting_ ABSL_GUARDED_BY(mu_) = false;
  // The attempt waiting for the broker's answer to its Hello.
  std::unique_ptr<wire::MessageChannel> registering_ ABSL_GUARDED_BY(mu_);
  // Owned connections listed in registering_'s Hello.
  size_t registering_owned_ ABSL_GUARDED_BY(mu_) = 0;
  // The registering Hello gave our granted listener back
  // (Hello.returns_listener; --placement=kernel after a broker restart or
  // upgrade): Welcome.listener_kept says whether we keep accepting from it.
  bool registering_returned_listener_ ABSL_GUARDED_BY(mu_) = false;
  MonoTime lost_at_ ABSL_GUARDED_BY(mu_);
  MonoTime reconnect_deadline_ ABSL_GUARDED_BY(mu_);
  MonoTime next_attempt_at_ ABSL_GUARDED_BY(mu_);
  MonoTime attempt_deadline_ ABSL_GUARDED_BY(mu_);
  std::chrono::milliseconds retry_delay_ ABSL_GUARDED_BY(mu_);
  int attempts_ ABSL_GUARDED_BY(mu_) = 0;
  // Reused between receives so that steady traffic does not allocate.
  v1::HandoffMessage incoming_ ABSL_GUARDED_BY(mu_);
  std::vector<wire::UniqueFd> incoming_fds_ ABSL_GUARDED_BY(mu_);
};

}  // namespace fdbroker::worker

#endif  // FDBROKER_WORKER_SRC_WORKER_IMPL_H_
