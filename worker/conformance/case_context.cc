#include "case_context.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace fdbroker::conformance {

bool HasId(const google::protobuf::RepeatedField<uint64_t>& ids, uint64_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

CaseContext::CaseContext(const KitOptions& options, std::string directory)
    : options_(options), directory_(std::move(directory)) {}

// The worker goes first (SIGKILL and reap), then the sockets.
CaseContext::~CaseContext() { worker_.reset(); }

absl::Status CaseContext::Start() {
  absl::StatusOr<std::unique_ptr<ScriptedBroker>> broker =
      ScriptedBroker::Create(directory_);
  if (!broker.ok()) return broker.status();
  broker_ = *std::move(broker);
  broker_->set_heartbeat(options_.heartbeat_interval,
                         options_.heartbeat_timeout);
  absl::StatusOr<std::unique_ptr<LoopbackListener>> tcp =
      LoopbackListener::Create();
  if (!tcp.ok()) return tcp.status();
  tcp_ = *std::move(tcp);
  absl::StatusOr<std::unique_ptr<WorkerProcess>> worker =
      WorkerProcess::Start(options_.worker_argv, broker_->socket_path(),
                           absl::StrCat(directory_, "/worker.log"));
  if (!worker.ok()) return worker.status();
  worker_ = *std::move(worker);
  return absl::OkStatus();
}

absl::StatusOr<v1::Hello> CaseContext::StartAndReadHello() {
  if (absl::Status s = Start(); !s.ok()) return s;
  // In short steps, so that a worker that dies at start-up fails at once.
  const absl::Time deadline = Deadline();
  for (;;) {
    absl::Status accepted = broker_->Accept(
        std::min(deadline, absl::Now() + absl::Milliseconds(20)));
    if (accepted.ok()) break;
    if (!absl::IsDeadlineExceeded(accepted)) return accepted;
    absl::StatusOr<int> exited = worker_->Wait(absl::Now());
    if (exited.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("§7.1 Registration: the worker ended (",
                       DescribeExit(*exited), ") without connecting"));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "§7.1 Registration: the worker did not connect to FDBROKER_SOCKET "
          "within ",
          absl::FormatDuration(options_.timeout)));
    }
  }
  absl::StatusOr<ScriptedBroker::Received> first = broker_->Receive(Deadline());
  if (!first.ok()) {
    return absl::Status(first.status().code(),
                        absl::StrCat("§7.1 Registration: no Hello (",
                                     first.status().message(), ")"));
  }
  const v1::Hello& hello = first->message.hello();
  if (hello.version().major() != 1) {
    return Violation("§5 ProtocolVersion",
                     absl::StrCat("Hello.version.major is ",
                                  hello.version().major(), ", not 1"));
  }
  if (hello.owned_connections_size() != 0 || hello.was_supervised()) {
    return Violation("§5 Hello",
                     "a first registration sets owned_connections or "
                     "was_supervised");
  }
  return hello;
}

absl::Status CaseContext::Register() {
  absl::StatusOr<v1::Hello> hello = StartAndReadHello();
  if (!hello.ok()) return hello.status();
  return broker_->SendWelcome(/*supervised=*/true);
}

absl::StatusOr<Client*> CaseContext::HandOff(
    const std::string& initial_data, const std::string& client_sends_first) {
  absl::StatusOr<TcpPair> tcp = tcp_->Connect();
  if (!tcp.ok()) return tcp.status();
  auto client = std::make_unique<Client>();
  client->id = next_id_++;
  client->tcp = *std::move(tcp);
  if (!client_sends_first.empty()) {
    if (absl::Status s = WriteAll(client->tcp.client.get(), client_sends_first);
        !s.ok()) {
      return s;
    }
    // Arrived at the server end before the Connection is sent.
    absl::StatusOr<std::string> arrived =
        PeekSome(client->tcp.server.get(), Deadline());
    if (!arrived.ok()) return arrived.status();
  }
  if (absl::Status s = broker_->SendConnection(
          client->id, client->tcp.server.get(), client->tcp.peer_address,
          client->tcp.local_address, initial_data);
      !s.ok()) {
    return s;
  }
  clients_.push_back(std::move(client));
  return clients_.back().get();
}

absl::StatusOr<Client*> CaseContext::HandOffAcked() {
  absl::StatusOr<Client*> client = HandOff();
  if (!client.ok()) return client.status();
  const uint64_t id = (*client)->id;
  absl::StatusOr<ScriptedBroker::Received> ack =
      Await(absl::StrCat("Ack for connection ", id),
            [id](const v1::HandoffMessage& m) {
              return (m.has_ack() && HasId(m.ack().connection_ids(), id)) ||
                     (m.has_reject() && HasId(m.reject().connection_ids(), id));
            });
  if (!ack.ok()) return ack.status();
  if (!ack->message.has_ack()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the worker rejected connection ", id,
                     " while registered and not draining (reason \"",
                     ack->message.reject().reason(), "\")"));
  }
  (*client)->tcp.server.Reset();  // the broker closes its copy on the Ack
  return *client;
}

absl::Status CaseContext::Exchange(Client& client) {
  if (absl::Status s = WriteAll(client.tcp.client.get(), options_.request);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::string> answer =
      ReadSome(client.tcp.client.get(), Deadline());
  if (!answer.ok()) {
    return absl::DeadlineExceededError(
        absl::StrCat("no answer to the request on connection ", client.id,
                     " within ", absl::FormatDuration(options_.timeout)));
  }
  if (answer->empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "connection ", client.id, " was closed instead of answered"));
  }
  // The rest of a response in several segments, so that the next exchange
  // reads only its own answer.
  // (A response may end the connection, "Connection: close": stop at EOF.)
  for (;;) {
    absl::StatusOr<std::string> more =
        ReadSome(client.tcp.client.get(), absl::Now() + absl::Milliseconds(30));
    if (!more.ok() || more->empty()) break;
  }
  return absl::OkStatus();
}

absl::StatusOr<ScriptedBroker::Received> CaseContext::Await(
    absl::string_view what,
    absl::FunctionRef<bool(const v1::HandoffMessage&)> wanted,
    absl::Time deadline) {
  std::vector<std::string> seen;
  for (;;) {
    absl::StatusOr<ScriptedBroker::Received> received =
        broker_->Receive(deadline);
    if (received.ok() && wanted(received->message)) return received;
    if (received.ok()) {
      if (!received->message.has_heartbeat()) {
        seen.push_back(Describe(received->message));
      }
      continue;
    }
    if (absl::IsFailedPrecondition(received.status())) return received;
    std::string got =
        seen.empty() ? "nothing but heartbeats" : absl::StrJoin(seen, ", ");
    if (absl::IsUnavailable(received.status())) {
      return absl::UnavailableError(
          absl::StrCat("the worker closed the channel before sending ", what,
                       " (received: ", got, ")"));
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "no ", what, " within ", absl::FormatDuration(options_.timeout),
        " (received: ", got, ")"));
  }
}

absl::Status CaseContext::AwaitChannelClosed(absl::string_view why,
                                             absl::Time deadline) {
  for (;;) {
    absl::StatusOr<ScriptedBroker::Received> received =
        broker_->Receive(deadline);
    if (received.ok()) continue;
    if (absl::IsUnavailable(received.status())) return absl::OkStatus();
    if (absl::IsDeadlineExceeded(received.status())) {
      return absl::DeadlineExceededError(
          absl::StrCat("the worker did not close the channel ", why));
    }
    return received.status();
  }
}

absl::Status CaseContext::Settle(absl::Duration duration) {
  const absl::Time deadline = absl::Now() + duration;
  for (;;) {
    absl::StatusOr<ScriptedBroker::Received> received =
        broker_->Receive(deadline);
    if (received.ok()) continue;
    if (absl::IsDeadlineExceeded(received.status())) return absl::OkStatus();
    return received.status();
  }
}

absl::StatusOr<int> CaseContext::AwaitExit() {
  absl::StatusOr<int> code = worker_->Wait(Deadline());
  if (!code.ok()) {
    return absl::DeadlineExceededError(
        absl::StrCat("the worker did not exit within ",
                     absl::FormatDuration(options_.timeout)));
  }
  return code;
}

bool CaseContext::Claims(absl::string_view capability) const {
  return options_.capabilities.count(std::string(capability)) != 0;
}

absl::Status CaseContext::Skip(std::string reason) {
  skip_reason_ = std::move(reason);
  return absl::OkStatus();
}

std::string CaseContext::WorkerLog(size_t lines) const {
  return worker_ != nullptr ? worker_->LogTail(lines) : "";
}

}  // namespace fdbroker::conformance
