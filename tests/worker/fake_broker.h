#ifndef FDBROKER_TESTS_WORKER_FAKE_BROKER_H_
#define FDBROKER_TESTS_WORKER_FAKE_BROKER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/message_channel.h"
#include "wire/unique_fd.h"

namespace fdbroker::testing {

// The broker side of the hand-off protocol, driven step by step by a test:
// a real SOCK_SEQPACKET listener in a private temp directory and a
// wire::MessageChannel for the accepted worker. Every wait is bounded.
class FakeBroker {
 public:
  FakeBroker();
  ~FakeBroker();

  const std::string& socket_path() const { return socket_path_; }

  // Accepts the next worker (replacing any current channel).
  absl::Status Accept(absl::Duration timeout = absl::Seconds(10));
  // The next message from the worker; DeadlineExceeded if none arrives,
  // Unavailable if the worker closed the channel.
  absl::StatusOr<v1::HandoffMessage> Receive(
      absl::Duration timeout = absl::Seconds(5));
  // Same, keeping the fd that came with the message (a Release's) in `fd`.
  absl::StatusOr<v1::HandoffMessage> Receive(absl::Duration timeout,
                                             wire::UniqueFd& fd);
  // True once the worker has closed the channel (messages before that are
  // discarded) within `timeout`.
  bool WaitForClose(absl::Duration timeout = absl::Seconds(5));

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
                             const std::vector<int>& fds = {});
  // The sequence number the worker expects next from us.
  uint64_t next_sequence() const { return sent_ + 1; }

  // Closes the channel to the worker (a broker crash, as the worker sees it).
  void CloseChannel();
  // Closes the listening socket and removes the socket file (no broker at
  // the path any more; the channel, if any, stays).
  void StopListening();
  // Binds and listens on the same path again (a new broker on the same
  // --socket). The path must be free (StopListening()).
  void Listen();
  // A broker crash and a new broker on the same path: CloseChannel(),
  // StopListening(), Listen().
  void Restart();
  bool listening() const { return listen_fd_.valid(); }
  bool connected() const { return channel_ != nullptr; }

 private:
  std::string dir_;
  std::string socket_path_;
  wire::UniqueFd listen_fd_;
  std::unique_ptr<wire::MessageChannel> channel_;
  uint64_t sent_ = 0;
};

// A connected AF_UNIX stream pair standing in for a client TCP connection:
// `broker_end` is handed to the worker, the test talks through `client`.
struct FakeClient {
  wire::UniqueFd broker_end;
  wire::UniqueFd client;
};
FakeClient MakeFakeClient();

// True if `fd` reads EOF (or an error) within `timeout`: its peer, every
// copy of it, has been closed.
bool ReadsEof(int fd, absl::Duration timeout = absl::Seconds(5));

}  // namespace fdbroker::testing

#endif  // FDBROKER_TESTS_WORKER_FAKE_BROKER_H_
