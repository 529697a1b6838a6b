#ifndef FDBROKER_TESTS_WORKER_FAKE_BROKER_H_
#define FDBROKER_TESTS_WORKER_FAKE_BROKER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "fdbroker/v1/handoff.pb.h"
#include "loopback.h"
#include "scripted_broker.h"
#include "wire/unique_fd.h"

namespace fdbroker::testing {

// The broker side of the hand-off protocol for the SDKs' own tests: the
// conformance kit's ScriptedBroker (worker/conformance/scripted_broker.h:
// its socket, its channel, and a broker's session checks on every message
// the worker sends, so a message the kit would call a Violation fails
// Receive() here too), driven by hand: no automatic heartbeats, relative
// timeouts, a private temp directory. What only these tests need: a broker
// that goes away and comes back on the same path, a chosen Welcome,
// ConnectionBatch and ReleaseRequest, raw packets.
class FakeBroker {
 public:
  FakeBroker();
  ~FakeBroker();

  const std::string& socket_path() const { return broker_->socket_path(); }

  // Accepts the next worker (replacing any current channel).
  absl::Status Accept(absl::Duration timeout = absl::Seconds(10));
  // The next message from the worker; DeadlineExceeded if none arrives,
  // Unavailable if the worker closed the channel, FailedPrecondition if it
  // broke a rule (the kit's Violation).
  absl::StatusOr<v1::HandoffMessage> Receive(
      absl::Duration timeout = absl::Seconds(5));
  // Same, keeping the fd that came with the message (a Release's) in `fd`.
  absl::StatusOr<v1::HandoffMessage> Receive(absl::Duration timeout,
                                             wire::UniqueFd& fd);
  // True once the worker has closed the channel (messages before that are
  // discarded) within `timeout`.
  bool WaitForClose(absl::Duration timeout = absl::Seconds(5));

  // Sends `message` in the channel's numbering; a Connection or
  // ConnectionBatch in it is recorded as awaiting the worker's answer.
  absl::Status Send(v1::HandoffMessage message, int fd = -1);
  absl::Status SendWithFds(v1::HandoffMessage message,
                           absl::Span<const int> fds);
  absl::Status SendWelcome(uint32_t heartbeat_interval_ms = 10000,
                           uint32_t heartbeat_timeout_ms = 60000,
                           uint64_t worker_id = 7, bool supervised = false);
  absl::Status SendRefusal(v1::RefusalReason reason,
                           const std::string& message);
  absl::Status SendConnection(uint64_t id, int fd,
                              const std::string& initial_data = "");
  // One ConnectionBatch: connection ids[i] carries fds[i].
  absl::Status SendConnectionBatch(const std::vector<uint64_t>& ids,
                                   const std::vector<int>& fds);
  absl::Status SendDrain(absl::Time deadline, bool release_idle = false);
  absl::Status SendReleaseRequest(
      uint32_t max_connections,
      v1::ReleaseReason reason = v1::RELEASE_REASON_REBALANCE);
  absl::Status SendHeartbeat();
  // Sends bytes as one packet, bypassing the channel's checks (a
  // misbehaving broker). Does not count as a sent message.
  absl::Status SendRawPacket(const std::string& bytes,
                             const std::vector<int>& fds = {}) {
    return broker_->SendRaw(bytes, fds);
  }
  // The sequence number the worker expects next from us.
  uint64_t next_sequence() const { return broker_->next_sequence(); }

  // Closes the channel to the worker (a broker crash, as the worker sees it).
  void CloseChannel() { broker_->CloseChannel(); }
  // Closes the listening socket and removes the socket file (no broker at
  // the path any more; the channel, if any, stays).
  void StopListening() { broker_->StopListening(); }
  // Binds and listens on the same path again (a new broker on the same
  // --socket). The path must be free (StopListening()).
  void Listen();
  // A broker crash and a new broker on the same path: CloseChannel(),
  // StopListening(), Listen().
  void Restart();

 private:
  std::string dir_;
  std::unique_ptr<conformance::ScriptedBroker> broker_;
};

// A connected AF_UNIX stream pair standing in for a client TCP connection:
// `broker_end` is handed to the worker, the test talks through `client`.
struct FakeClient {
  wire::UniqueFd broker_end;
  wire::UniqueFd client;
};
FakeClient MakeFakeClient();

// True if `fd` reads EOF (or a reset) within `timeout`: its peer, every
// copy of it, has been closed.
inline bool ReadsEof(int fd, absl::Duration timeout = absl::Seconds(5)) {
  return conformance::ReadsEof(fd, absl::Now() + timeout);
}

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_WORKER_FAKE_BROKER_H_
