#ifndef FDBROKER_WORKER_CONFORMANCE_SCRIPTED_BROKER_H_
#define FDBROKER_WORKER_CONFORMANCE_SCRIPTED_BROKER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/message_channel.h"
#include "wire/unique_fd.h"

namespace fdbroker::conformance {

// The broker's side of the hand-off protocol (docs/protocol.md), driven
// step by step by a conformance case: a SOCK_SEQPACKET listener at a path in
// the case's private directory, and one wire::MessageChannel per accepted
// worker channel (the framing, fd and sequence rules are the wire library's,
// the same code the broker runs).
//
// Every message the worker sends passes through a session check before a
// case sees it: the framing rules of §2–§4 (MessageChannel), Hello first and
// only once (§7.1), the direction of each message (§5), Ack and Reject only
// for connections sent and not yet answered, Closed only for owned ones
// (§7.3), Release only with supports_release and for an owned connection
// (§5 Release), Goodbye only when nothing is owned, and nothing after it.
// A breach is a Violation: a FailedPrecondition status whose message starts
// with the rule ("§7.3: ...").
//
// While a case waits, the kit sends Heartbeat when it has sent nothing for
// the Welcome's interval (unless a case turns that off), so a worker that
// follows §7.6 never declares the kit dead.
class ScriptedBroker {
 public:
  struct Received {
    v1::HandoffMessage message;
    std::vector<wire::UniqueFd> fds;
    absl::Time when;
  };

  static absl::StatusOr<std::unique_ptr<ScriptedBroker>> Create(
      const std::string& directory);

  const std::string& socket_path() const { return socket_path_; }

  // Accepts the worker's next channel (dropping the current one); a new
  // channel starts a new session (sequence numbers from 1, Hello first).
  absl::Status Accept(absl::Time deadline);
  // Closes the listening socket and removes its file (no broker at the
  // path; the channel, if any, stays); Listen() binds the same path again
  // (a new broker on the same --socket).
  void StopListening();
  absl::Status Listen();
  // True if a worker is waiting to connect (a new channel) right now.
  bool ConnectPending() const;
  // Closes the channel (the worker sees a broker crash).
  void CloseChannel();
  bool connected() const { return channel_ != nullptr; }

  // The worker's next message. DeadlineExceeded if none came, Unavailable
  // once the worker closed the channel, FailedPrecondition on a Violation.
  absl::StatusOr<Received> Receive(absl::Time deadline);

  // Sends `message` (its sequence number is set here) with `fds` attached.
  absl::Status Send(v1::HandoffMessage message, absl::Span<const int> fds = {});
  // `listener_load_interval_ms` > 0: ListenerGrants follow (minor 4).
  absl::Status SendWelcome(bool supervised = true, uint64_t worker_id = 1,
                           uint32_t listener_load_interval_ms = 0,
                           bool listener_kept = false);
  // Sends a Connection for `fd` (which the caller keeps, as the broker keeps
  // its copy until the Ack) and records it as awaiting an answer.
  absl::Status SendConnection(uint64_t id, int fd,
                              const std::string& peer_address,
                              const std::string& local_address,
                              const std::string& initial_data = "");
  absl::Status SendDrain(absl::Time deadline, bool release_idle);
  // Records a connection sent by other means (a ConnectionBatch, a raw
  // packet) as awaiting the worker's Ack or Reject.
  void AwaitAnswer(uint64_t id) { unanswered_.insert(id); }
  // Sends bytes as one packet outside the channel's numbering (a broken
  // broker): the kit's own numbering does not move on.
  absl::Status SendRaw(const std::string& bytes, absl::Span<const int> fds);
  // SendRaw for a packet over the limit, which the wire library refuses to
  // send: a direct sendmsg (the only one in the kit), for the §2 case.
  absl::Status SendOversized(const std::string& bytes, int fd);
  // The sequence number the worker expects next from the kit.
  uint64_t next_sequence() const { return sent_ + 1; }

  void set_send_heartbeats(bool on) { send_heartbeats_ = on; }
  absl::Duration heartbeat_interval() const { return heartbeat_interval_; }
  absl::Duration heartbeat_timeout() const { return heartbeat_timeout_; }
  void set_heartbeat(absl::Duration interval, absl::Duration timeout) {
    heartbeat_interval_ = interval;
    heartbeat_timeout_ = timeout;
  }
  // Welcome.worker_timeout_ms of later Welcomes (0: the watchdog is off).
  void set_worker_timeout(absl::Duration timeout) { worker_timeout_ = timeout; }

  // The Hello of the current channel (empty before it arrived).
  const v1::Hello& hello() const { return hello_; }
  // Connections the worker owns on this channel (acked or owned at Hello,
  // not Closed or Released), and those sent but not yet answered.
  const std::set<uint64_t>& owned() const { return owned_; }
  const std::set<uint64_t>& unanswered() const { return unanswered_; }
  bool goodbye_received() const { return goodbye_; }
  absl::Time last_sent() const { return last_sent_; }

 private:
  explicit ScriptedBroker(std::string socket_path, wire::UniqueFd listen_fd)
      : socket_path_(std::move(socket_path)),
        listen_fd_(std::move(listen_fd)) {}
  absl::Status Check(const Received& received);

  std::string socket_path_;
  wire::UniqueFd listen_fd_;
  std::unique_ptr<wire::MessageChannel> channel_;
  uint64_t sent_ = 0;
  uint64_t received_count_ = 0;
  // The channel reported ECONNRESET once; what was queued is still read.
  bool reset_seen_ = false;
  absl::Time last_sent_ = absl::InfinitePast();
  bool send_heartbeats_ = true;
  absl::Duration heartbeat_interval_ = absl::Milliseconds(100);
  absl::Duration heartbeat_timeout_ = absl::Milliseconds(1500);
  absl::Duration worker_timeout_ = absl::ZeroDuration();

  v1::Hello hello_;
  std::set<uint64_t> owned_;
  std::set<uint64_t> unanswered_;
  std::set<uint64_t> finished_;  // Closed or Released on this channel
  bool goodbye_ = false;
  // The Welcome asked for ListenerLoad (listener_load_interval_ms > 0).
  bool listener_load_expected_ = false;
};

// A Violation: the worker broke `rule` ("§7.3 Closed").
absl::Status Violation(absl::string_view rule, absl::string_view what);

// "ack{[3, 4]}", "heartbeat", ... for failure messages.
std::string Describe(const v1::HandoffMessage& message);

}  // namespace fdbroker::conformance

#endif  // FDBROKER_WORKER_CONFORMANCE_SCRIPTED_BROKER_H_
