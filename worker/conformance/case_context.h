#ifndef FDBROKER_WORKER_CONFORMANCE_CASE_CONTEXT_H_
#define FDBROKER_WORKER_CONFORMANCE_CASE_CONTEXT_H_

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "loopback.h"
#include "scripted_broker.h"
#include "worker_process.h"

namespace fdbroker::conformance {

// What the kit was asked to do (main.cc's flags).
struct KitOptions {
  std::vector<std::string> worker_argv;
  // How long the kit waits for any one thing the worker must do.
  absl::Duration timeout = absl::Seconds(5);
  // Sent by a client where a case needs the worker to answer something.
  std::string request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  // The Welcome's heartbeat figures: short, so that the run is quick.
  absl::Duration heartbeat_interval = absl::Milliseconds(100);
  absl::Duration heartbeat_timeout = absl::Milliseconds(1500);
  // Behaviour a worker claims that its Hello cannot say (kCapabilities).
  std::set<std::string> capabilities;
};

// Capabilities that are not announced in the Hello; a case that needs one
// the worker does not claim is skipped. (Release and ConnectionBatch are
// decided from the Hello: supports_release, max_connections_per_message.)
inline constexpr const char* kCapabilities[] = {
    // The worker answers the --request bytes with at least one byte.
    "request_response",
    // §7.8: keeps serving after losing the broker and re-registers.
    "reconnect",
    // §7.7: drains on SIGTERM.
    "sigterm",
};

// One client connection the kit handed to the worker.
struct Client {
  uint64_t id = 0;
  TcpPair tcp;  // tcp.server: the kit's copy until the Ack
};

// Everything a case works with: a fresh worker process, the scripted broker
// it registers with, loopback clients, and bounded waits. One per case.
class CaseContext {
 public:
  CaseContext(const KitOptions& options, std::string directory);
  ~CaseContext();

  const KitOptions& options() const { return options_; }
  ScriptedBroker& broker() { return *broker_; }
  WorkerProcess& worker() { return *worker_; }
  absl::Time Deadline() const { return absl::Now() + options_.timeout; }

  // Creates the broker socket and the loopback listener, starts the worker.
  absl::Status Start();
  // Start(), the worker's channel and its Hello (checked: version 1.x, no
  // owned connections on a first registration).
  absl::StatusOr<v1::Hello> StartAndReadHello();
  // StartAndReadHello() and a Welcome (supervised, as the broker's own).
  absl::Status Register();

  // Connects a loopback client, which first sends `client_sends_first`,
  // and sends its Connection (with `initial_data`). The kit keeps its copy
  // of the socket until the Ack.
  absl::StatusOr<Client*> HandOff(const std::string& initial_data = "",
                                  const std::string& client_sends_first = "");
  // HandOff() and the worker's Ack for it; then the kit closes its copy.
  absl::StatusOr<Client*> HandOffAcked();
  // The client sends --request and reads a non-empty answer.
  absl::Status Exchange(Client& client);

  // Receives until a message satisfies `wanted` (returned); the others pass
  // the session checks and are listed in the error if none comes in time.
  absl::StatusOr<ScriptedBroker::Received> Await(
      absl::string_view what,
      absl::FunctionRef<bool(const v1::HandoffMessage&)> wanted,
      absl::Time deadline);
  absl::StatusOr<ScriptedBroker::Received> Await(
      absl::string_view what,
      absl::FunctionRef<bool(const v1::HandoffMessage&)> wanted) {
    return Await(what, wanted, Deadline());
  }
  // Receives until the worker closes the channel.
  absl::Status AwaitChannelClosed(absl::string_view why, absl::Time deadline);
  // Receives for `duration`: only a Violation or a closed channel is an
  // error (used to see that nothing wrong follows).
  absl::Status Settle(absl::Duration duration);
  // The worker's exit code within the timeout.
  absl::StatusOr<int> AwaitExit();

  bool Claims(absl::string_view capability) const;
  // Marks the case skipped; the case then returns OkStatus().
  absl::Status Skip(std::string reason);
  const std::string& skip_reason() const { return skip_reason_; }
  bool skipped() const { return !skip_reason_.empty(); }
  std::string WorkerLog(size_t lines) const;

 private:
  const KitOptions& options_;
  std::string directory_;
  std::unique_ptr<ScriptedBroker> broker_;
  std::unique_ptr<LoopbackListener> tcp_;
  std::unique_ptr<WorkerProcess> worker_;
  std::vector<std::unique_ptr<Client>> clients_;
  uint64_t next_id_ = 101;
  std::string skip_reason_;
};

bool HasId(const google::protobuf::RepeatedField<uint64_t>& ids, uint64_t id);

}  // namespace fdbroker::conformance

#endif  // FDBROKER_WORKER_CONFORMANCE_CASE_CONTEXT_H_
