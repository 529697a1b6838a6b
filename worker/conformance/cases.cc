#include "cases.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "wire/sanitized.h"

namespace fdbroker::conformance {
namespace {

// "At once" for §7.9 Reconnect: well below the 50 ms first back-off.
constexpr absl::Duration kReconnectAtOnce = absl::Milliseconds(40);

#define KIT_CONCAT_INNER(a, b) a##b
#define KIT_CONCAT(a, b) KIT_CONCAT_INNER(a, b)
#define KIT_RETURN_IF_ERROR(expr)            \
  do {                                       \
    absl::Status kit_status = expr;          \
    if (!kit_status.ok()) return kit_status; \
  } while (0)
#define KIT_ASSIGN_OR_RETURN_IMPL(result, lhs, expr) \
  auto result = (expr);                              \
  if (!result.ok()) return result.status();          \
  lhs = *std::move(result)
#define KIT_ASSIGN_OR_RETURN(lhs, expr) \
  KIT_ASSIGN_OR_RETURN_IMPL(KIT_CONCAT(kit_result_, __LINE__), lhs, expr)

using Received = ScriptedBroker::Received;

absl::Status Fail(absl::string_view what) {
  return absl::FailedPreconditionError(what);
}

const google::protobuf::RepeatedField<uint64_t>* ClosedIds(
    const v1::HandoffMessage& m) {
  return m.has_closed() ? &m.closed().connection_ids() : nullptr;
}
const google::protobuf::RepeatedField<uint64_t>* AckedIds(
    const v1::HandoffMessage& m) {
  return m.has_ack() ? &m.ack().connection_ids() : nullptr;
}

// Receives until messages of one kind (`of` gives their ids, or null for
// other kinds) have covered every id in `ids`.
absl::Status AwaitIdsOf(CaseContext& context, absl::string_view what,
                        std::set<uint64_t> ids,
                        const google::protobuf::RepeatedField<uint64_t>* (*of)(
                            const v1::HandoffMessage&),
                        absl::Time deadline) {
  while (!ids.empty()) {
    KIT_ASSIGN_OR_RETURN(
        Received received,
        context.Await(
            absl::StrCat(what, " for connection(s) [", absl::StrJoin(ids, ", "),
                         "]"),
            [&](const v1::HandoffMessage& m) { return of(m) != nullptr; },
            deadline));
    for (uint64_t id : *of(received.message)) ids.erase(id);
  }
  return absl::OkStatus();
}
absl::Status AwaitIdsOf(CaseContext& context, absl::string_view what,
                        std::set<uint64_t> ids,
                        const google::protobuf::RepeatedField<uint64_t>* (*of)(
                            const v1::HandoffMessage&)) {
  return AwaitIdsOf(context, what, std::move(ids), of, context.Deadline());
}

// Exit code 0 after a Goodbye (the kit's Welcome says supervised).
absl::Status AwaitCleanExit(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(int code, context.AwaitExit());
  if (code != 0) {
    return Fail(
        absl::StrCat("a supervised worker that said Goodbye must exit "
                     "cleanly; it ended with ",
                     DescribeExit(code)));
  }
  return absl::OkStatus();
}

// Goodbye, the channel closed, and exit code 0 (the kit's Welcome says
// supervised); and no new channel: after a Drain a worker never reconnects.
absl::Status AwaitGoodbyeAndExit(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(
      Received goodbye,
      context.Await("Goodbye", [](const v1::HandoffMessage& m) {
        return m.has_goodbye();
      }));
  (void)goodbye;
  KIT_RETURN_IF_ERROR(
      context.AwaitChannelClosed("after Goodbye", context.Deadline()));
  KIT_RETURN_IF_ERROR(AwaitCleanExit(context));
  if (context.broker().ConnectPending()) {
    return Violation("§7.8", "the worker reconnected after a Drain");
  }
  return absl::OkStatus();
}

// Each of `clients`, reported Closed, saw its connection end (EOF).
absl::Status ExpectClientsSawTheEnd(CaseContext& context,
                                    const std::vector<Client*>& clients) {
  for (Client* client : clients) {
    if (!ReadsEof(client->tcp.client.get(), context.Deadline())) {
      return Fail(absl::StrCat("idle connection ", client->id,
                               " was reported Closed but its client never "
                               "saw the connection end"));
    }
  }
  return absl::OkStatus();
}

// Acked clients, each served once when the worker claims request_response
// (so they are idle between requests, not fresh).
absl::StatusOr<std::vector<Client*>> IdleClients(CaseContext& context,
                                                 int count) {
  std::vector<Client*> clients;
  for (int i = 0; i < count; ++i) {
    KIT_ASSIGN_OR_RETURN(Client * client, context.HandOffAcked());
    if (context.Claims("request_response")) {
      KIT_RETURN_IF_ERROR(context.Exchange(*client));
    }
    clients.push_back(client);
  }
  return clients;
}

// A Release's socket is the client's connection, untouched: no FIN or byte
// reached the client, no unread_data (the client sent nothing unanswered),
// and what the client sends next is still unread.
absl::Status CheckReleasedSocket(CaseContext& context, Client& client,
                                 const Received& release) {
  const wire::UniqueFd& fd = release.fds[0];
  if (PeerAddress(fd.get()) != LocalAddress(client.tcp.client.get())) {
    return Violation("§5 Release",
                     absl::StrCat("the fd released for connection ", client.id,
                                  " is not that client's socket"));
  }
  if (!NothingReadable(client.tcp.client.get())) {
    return Violation(
        "§5 Release",
        absl::StrCat("the client of released connection ", client.id,
                     " received bytes or a FIN: the worker must "
                     "close its copy untouched"));
  }
  if (!release.message.release().unread_data().empty()) {
    return Violation("§5 Release",
                     absl::StrCat("unread_data of connection ", client.id,
                                  " is not empty although its client sent "
                                  "nothing unanswered"));
  }
  const std::string probe = "conformance-probe";
  KIT_RETURN_IF_ERROR(WriteAll(client.tcp.client.get(), probe));
  absl::StatusOr<std::string> seen = PeekSome(fd.get(), context.Deadline());
  if (!seen.ok() || *seen != probe) {
    return Violation("§5 Release",
                     absl::StrCat("connection ", client.id,
                                  " does not deliver the client's next bytes "
                                  "to the released fd (the worker read or "
                                  "shut down the socket)"));
  }
  return absl::OkStatus();
}

// Each Release says `reason` (else a Violation saying `wrong_reason`) and
// passes CheckReleasedSocket. The session check has made sure that each is
// for one of `clients` (owned, not released before).
absl::Status CheckReleases(CaseContext& context,
                           const std::vector<Client*>& clients,
                           const std::vector<Received>& releases,
                           v1::ReleaseReason reason,
                           absl::string_view wrong_reason) {
  for (const Received& release : releases) {
    if (release.message.release().reason() != reason) {
      return Violation("§5 Release", wrong_reason);
    }
    const uint64_t id = release.message.release().connection_id();
    auto it = std::find_if(clients.begin(), clients.end(),
                           [id](Client* c) { return c->id == id; });
    KIT_RETURN_IF_ERROR(CheckReleasedSocket(context, **it, release));
  }
  return absl::OkStatus();
}

// Registers a worker whose Hello says supports_release == `claims`, and
// gives it `idle` IdleClients; another worker skips the case (the caller
// returns when context.skipped()).
absl::StatusOr<std::vector<Client*>> RegisterIfRelease(CaseContext& context,
                                                       bool claims, int idle) {
  KIT_ASSIGN_OR_RETURN(v1::Hello hello, context.StartAndReadHello());
  if (hello.supports_release() != claims) {
    KIT_RETURN_IF_ERROR(context.Skip(
        claims ? "Hello.supports_release is not set"
               : "Hello.supports_release is set: the case is for a worker "
                 "that did not claim it"));
    return std::vector<Client*>();
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  return IdleClients(context, idle);
}

// ---- §7.1 Registration, §5 Refusal ----

absl::Status Hello(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  // Nothing but valid messages may follow the Welcome.
  return context.Settle(3 * context.options().heartbeat_interval);
}

absl::Status RefusalVersion(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(v1::Hello hello, context.StartAndReadHello());
  (void)hello;
  v1::HandoffMessage refusal;
  refusal.mutable_refusal()->set_reason(v1::REFUSAL_REASON_VERSION);
  refusal.mutable_refusal()->set_message("conformance kit: version refused");
  KIT_RETURN_IF_ERROR(context.broker().Send(std::move(refusal)));
  context.broker().CloseChannel();
  KIT_ASSIGN_OR_RETURN(int code, context.AwaitExit());
  if (code == 0 || code > 128) {
    return Fail(
        absl::StrCat("after Refusal{VERSION} a worker exits with an "
                     "error; it ended with ",
                     DescribeExit(code)));
  }
  if (context.broker().ConnectPending()) {
    return Fail(
        "the worker connected again after Refusal{VERSION} "
        "(retrying cannot help)");
  }
  return absl::OkStatus();
}

// ---- §7.6 Heartbeats ----

absl::Status HeartbeatSend(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  const absl::Duration interval = context.options().heartbeat_interval;
  const absl::Duration slack = std::max(3 * interval, absl::Milliseconds(300));
  absl::Time last = absl::Now();
  const absl::Time end = last + std::max(10 * interval, absl::Seconds(1));
  int heartbeats = 0;
  while (absl::Now() < end) {
    absl::StatusOr<Received> received = context.broker().Receive(end);
    if (absl::IsDeadlineExceeded(received.status())) break;
    if (!received.ok()) return received.status();
    if (received->when - last > interval + slack) {
      return Fail(absl::StrCat(
          "silent for ", absl::FormatDuration(received->when - last),
          " with heartbeat_interval_ms ", absl::ToInt64Milliseconds(interval)));
    }
    last = received->when;
    if (received->message.has_heartbeat()) ++heartbeats;
  }
  if (absl::Now() - last > interval + slack) {
    return Fail(absl::StrCat(
        "no Heartbeat for ", absl::FormatDuration(absl::Now() - last),
        " with heartbeat_interval_ms ", absl::ToInt64Milliseconds(interval)));
  }
  if (heartbeats < 3) {
    return Fail(absl::StrCat("only ", heartbeats, " Heartbeat(s) in ",
                             absl::FormatDuration(10 * interval)));
  }
  return absl::OkStatus();
}

// §7.11: with Welcome.worker_timeout_ms set, a worker whose Hello set
// reports_liveness sends a Heartbeat every heartbeat_interval_ms although
// its channel is busy (here with the Acks of a Connection every third of an
// interval), each with app_silent_ms below the timeout (the worker is idle:
// its application thread is alive).
absl::Status LivenessHeartbeat(CaseContext& context) {
  const absl::Duration worker_timeout = absl::Seconds(2);
  absl::StatusOr<v1::Hello> hello = context.StartAndReadHello();
  if (!hello.ok()) return hello.status();
  context.broker().set_worker_timeout(worker_timeout);
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome(/*supervised=*/true));
  if (!hello->reports_liveness()) {
    return context.Skip(
        "Hello.reports_liveness is not set: the watchdog does not apply");
  }
  const absl::Duration interval = context.options().heartbeat_interval;
  const absl::Duration slack = std::max(3 * interval, absl::Milliseconds(300));
  const absl::Time start = absl::Now();
  const absl::Time end = start + std::max(10 * interval, absl::Seconds(1));
  absl::Time last_heartbeat = start;
  absl::Time next_offer = start;
  int heartbeats = 0;
  while (absl::Now() < end) {
    if (absl::Now() >= next_offer) {
      KIT_RETURN_IF_ERROR(context.HandOff().status());
      next_offer = absl::Now() + interval / 3;
    }
    absl::StatusOr<Received> received =
        context.broker().Receive(std::min(next_offer, end));
    if (absl::IsDeadlineExceeded(received.status())) continue;
    if (!received.ok()) return received.status();
    if (!received->message.has_heartbeat()) continue;
    const v1::Heartbeat& heartbeat = received->message.heartbeat();
    if (absl::Milliseconds(heartbeat.app_silent_ms()) >= worker_timeout) {
      return Fail(absl::StrCat("an idle worker's Heartbeat says app_silent_ms ",
                               heartbeat.app_silent_ms(),
                               " (worker_timeout_ms ",
                               absl::ToInt64Milliseconds(worker_timeout), ")"));
    }
    if (received->when - last_heartbeat > interval + slack) {
      return Fail(
          absl::StrCat("no Heartbeat for ",
                       absl::FormatDuration(received->when - last_heartbeat),
                       " on a busy channel with worker_timeout_ms set"));
    }
    last_heartbeat = received->when;
    ++heartbeats;
  }
  if (heartbeats < 3) {
    return Fail(absl::StrCat("only ", heartbeats, " Heartbeat(s) in ",
                             absl::FormatDuration(end - start),
                             " on a busy channel with worker_timeout_ms set"));
  }
  return absl::OkStatus();
}

absl::Status HeartbeatTimeout(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  context.broker().set_send_heartbeats(false);
  const absl::Time silent_since = context.broker().last_sent();
  const absl::Duration timeout = context.options().heartbeat_timeout;
  absl::Status closed = context.AwaitChannelClosed(
      absl::StrCat("within heartbeat_timeout_ms (",
                   absl::ToInt64Milliseconds(timeout),
                   ") of the kit's silence"),
      silent_since + timeout + context.options().timeout);
  KIT_RETURN_IF_ERROR(closed);
  const absl::Duration after = absl::Now() - silent_since;
  if (after < timeout * 0.9) {
    return Fail(absl::StrCat("declared the kit dead after ",
                             absl::FormatDuration(after),
                             " of silence, before heartbeat_timeout_ms ",
                             absl::ToInt64Milliseconds(timeout)));
  }
  return absl::OkStatus();
}

// ---- §7.2 Hand-off, §5 Connection, §7.3 Closed, §7.4 Capacity ----

absl::Status Ack(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(Client * client, context.HandOffAcked());
  (void)client;
  return context.Settle(3 * context.options().heartbeat_interval);
}

absl::Status Serve(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(Client * client, context.HandOffAcked());
  return context.Exchange(*client);
}

absl::Status InitialData(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(Client * client,
                       context.HandOff(context.options().request));
  const uint64_t id = client->id;
  KIT_ASSIGN_OR_RETURN(
      Received ack, context.Await(absl::StrCat("Ack for connection ", id),
                                  [id](const v1::HandoffMessage& m) {
                                    return m.has_ack() &&
                                           HasId(m.ack().connection_ids(), id);
                                  }));
  (void)ack;
  client->tcp.server.Reset();
  absl::StatusOr<std::string> answer =
      ReadSome(client->tcp.client.get(), context.Deadline());
  if (!answer.ok() || answer->empty()) {
    return Fail(absl::StrCat(
        "the request sent as Connection.initial_data was not answered "
        "(the client itself sent nothing): ",
        answer.ok() ? "the connection was closed" : "no answer"));
  }
  return absl::OkStatus();
}

// §7.3: a Closed may wait for an Ack to ride on, but not longer than
// 100 ms; the kit allows this long (the worker must also notice the close).
constexpr absl::Duration kClosedBound = absl::Milliseconds(500);

absl::Status Closed(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients, IdleClients(context, 1));
  const absl::Time closed_at = absl::Now();
  clients[0]->tcp.client.Reset();
  // No Ack is due: the report must not wait for one.
  absl::Status closed =
      AwaitIdsOf(context, "Closed (the client closed)", {clients[0]->id},
                 ClosedIds, closed_at + kClosedBound);
  if (absl::IsDeadlineExceeded(closed)) {
    KIT_RETURN_IF_ERROR(AwaitIdsOf(context, "Closed (the client closed)",
                                   {clients[0]->id}, ClosedIds));
    return Violation(
        "§7.3 Closed",
        absl::StrCat("Closed for connection ", clients[0]->id, " came ",
                     absl::FormatDuration(absl::Now() - closed_at),
                     " after the client closed, with no Ack to "
                     "ride on (at most 100 ms; the kit allows ",
                     absl::FormatDuration(kClosedBound), ")"));
  }
  KIT_RETURN_IF_ERROR(closed);
  // A second Closed for it would be a Violation.
  return context.Settle(3 * context.options().heartbeat_interval);
}

absl::Status ClosedMany(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients, IdleClients(context, 4));
  std::set<uint64_t> ids;
  for (Client* client : clients) {
    client->tcp.client.Reset();
    ids.insert(client->id);
  }
  KIT_RETURN_IF_ERROR(
      AwaitIdsOf(context, "Closed (the clients closed)", ids, ClosedIds));
  return context.Settle(3 * context.options().heartbeat_interval);
}

absl::Status Batch(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(v1::Hello hello, context.StartAndReadHello());
  if (hello.max_connections_per_message() <= 1) {
    return context.Skip(
        "Hello.max_connections_per_message <= 1: the worker "
        "did not opt into ConnectionBatch");
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  const int count = static_cast<int>(
      std::min<uint32_t>(hello.max_connections_per_message(), 3));
  std::vector<std::unique_ptr<Client>> clients;
  v1::HandoffMessage message;
  std::vector<int> fds;
  absl::StatusOr<std::unique_ptr<LoopbackListener>> tcp =
      LoopbackListener::Create();
  if (!tcp.ok()) return tcp.status();
  std::set<uint64_t> ids;
  for (int i = 0; i < count; ++i) {
    auto client = std::make_unique<Client>();
    KIT_ASSIGN_OR_RETURN(client->tcp, (*tcp)->Connect());
    client->id = 9001 + i;
    v1::Connection* c = message.mutable_connection_batch()->add_connections();
    c->set_connection_id(client->id);
    c->set_peer_address(client->tcp.peer_address);
    c->set_local_address(client->tcp.local_address);
    c->set_accept_time_unix_nanos(absl::GetCurrentTimeNanos());
    fds.push_back(client->tcp.server.get());
    ids.insert(client->id);
    clients.push_back(std::move(client));
  }
  KIT_RETURN_IF_ERROR(context.broker().Send(std::move(message), fds));
  for (uint64_t id : ids) context.broker().AwaitAnswer(id);
  KIT_RETURN_IF_ERROR(
      AwaitIdsOf(context, "Ack (ConnectionBatch)", ids, AckedIds));
  for (auto& client : clients) {
    client->tcp.server.Reset();
    if (context.Claims("request_response")) {
      KIT_RETURN_IF_ERROR(context.Exchange(*client));
    }
  }
  return absl::OkStatus();
}

absl::Status Capacity(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(v1::Hello hello, context.StartAndReadHello());
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  const int count =
      hello.capacity() > 0
          ? static_cast<int>(std::min<uint32_t>(hello.capacity(), 8))
          : 8;
  std::vector<Client*> clients;
  for (int i = 0; i < count; ++i) {
    absl::StatusOr<Client*> client = context.HandOffAcked();
    if (!client.ok()) {
      return Fail(absl::StrCat("connection ", i + 1, " of ", count,
                               " (Hello.capacity ", hello.capacity(),
                               "): ", client.status().message()));
    }
    clients.push_back(*client);
  }
  // Full: a Closed frees room, and the next Connection is taken.
  clients[0]->tcp.client.Reset();
  KIT_RETURN_IF_ERROR(
      AwaitIdsOf(context, "Closed", {clients[0]->id}, ClosedIds));
  KIT_ASSIGN_OR_RETURN(Client * next, context.HandOffAcked());
  (void)next;
  return absl::OkStatus();
}

// ---- §7.7 Drain ----

absl::Status DrainEmpty(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_RETURN_IF_ERROR(context.broker().SendDrain(context.Deadline(), false));
  return AwaitGoodbyeAndExit(context);
}

// §7.7: an idle connection that has served a request is closed at once on a
// Drain; the kit allows this long (the worker must notice the Drain and
// close, on a loaded machine).
constexpr absl::Duration kIdleCloseBound = absl::Seconds(1);
// §7.7: a connection on which the client has sent nothing yet is not closed
// for FIRST_REQUEST_GRACE (2 s) after its hand-over: its first request may
// be on the way. The kit's client sends it this late after the Drain.
constexpr absl::Duration kLateFirstRequest = absl::Milliseconds(500);

absl::Status DrainIdle(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients, IdleClients(context, 2));
  const std::set<uint64_t> ids = {clients[0]->id, clients[1]->id};
  const absl::Time drained_at = absl::Now();
  KIT_RETURN_IF_ERROR(context.broker().SendDrain(context.Deadline(), false));
  if (context.Claims("request_response")) {
    // Served, so past their first request: no grace.
    absl::Status closed = AwaitIdsOf(context, "Closed (idle, draining)", ids,
                                     ClosedIds, drained_at + kIdleCloseBound);
    if (absl::IsDeadlineExceeded(closed)) {
      return Violation(
          "§7.7 Drain",
          absl::StrCat("idle connections [", absl::StrJoin(ids, ", "),
                       "], which had served a request, were not closed "
                       "(Closed) within ",
                       absl::FormatDuration(kIdleCloseBound),
                       " of the Drain: only a connection that has received "
                       "nothing yet gets a first-request grace"));
    }
    KIT_RETURN_IF_ERROR(closed);
  } else {
    // Never used: closed once their first-request grace is over.
    KIT_RETURN_IF_ERROR(
        AwaitIdsOf(context, "Closed (idle, draining)", ids, ClosedIds));
  }
  KIT_RETURN_IF_ERROR(AwaitGoodbyeAndExit(context));
  return ExpectClientsSawTheEnd(context, clients);
}

// §7.3 (minor 4): a connection the worker cuts at its drain deadline with
// a request half-received is reported in Closed.cut_connection_ids, never
// as an ordinary close. A worker that leaves it to the broker (no Closed by
// the deadline) conforms too.
absl::Status DrainDeadlineCut(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  if (context.broker().hello().version().minor() < 4) {
    return context.Skip("the worker speaks minor < 4 (cut_connection_ids)");
  }
  if (!context.Claims("request_response")) {
    return context.Skip("needs request_response (a request half-sent)");
  }
  const std::string& request = context.options().request;
  KIT_ASSIGN_OR_RETURN(
      Client * client,
      context.HandOff(
          "", request.substr(0, std::max<size_t>(1, request.size() / 2))));
  const uint64_t id = client->id;
  KIT_RETURN_IF_ERROR(AwaitIdsOf(context, "Ack", {id}, AckedIds));
  constexpr absl::Duration kToDeadline = absl::Seconds(1);
  const absl::Time deadline = absl::Now() + kToDeadline;
  KIT_RETURN_IF_ERROR(context.broker().SendDrain(deadline, false));
  absl::StatusOr<Received> closed = context.Await(
      absl::StrCat("Closed for connection ", id, " (cut at the deadline)"),
      [id](const v1::HandoffMessage& m) {
        return m.has_closed() && (HasId(m.closed().connection_ids(), id) ||
                                  HasId(m.closed().cut_connection_ids(), id));
      },
      deadline + absl::Milliseconds(500));
  if (absl::IsDeadlineExceeded(closed.status())) return absl::OkStatus();
  if (!closed.ok()) return closed.status();
  if (HasId(closed->message.closed().connection_ids(), id) &&
      absl::Now() >= deadline - absl::Milliseconds(300)) {
    return Violation(
        "§7.3 Closed",
        absl::StrCat("connection ", id,
                     ", with a request half-received, was "
                     "closed at the drain deadline and reported as finished "
                     "(connection_ids); minor 4 reports it in "
                     "cut_connection_ids"));
  }
  return absl::OkStatus();
}

absl::Status DrainFirstRequest(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  // Acked, nothing sent yet: `late` sends its first request after the
  // Drain, `silent` never does.
  KIT_ASSIGN_OR_RETURN(Client * late, context.HandOffAcked());
  KIT_ASSIGN_OR_RETURN(Client * silent, context.HandOffAcked());
  const absl::Time drained_at = absl::Now();
  KIT_RETURN_IF_ERROR(context.broker().SendDrain(context.Deadline(), false));
  // (ReadsEof waits until then unless the connection ends.)
  if (ReadsEof(late->tcp.client.get(), drained_at + kLateFirstRequest)) {
    return Violation(
        "§7.7 Drain",
        absl::StrCat("connection ", late->id,
                     ", on which the client had sent nothing yet, was "
                     "closed ",
                     absl::FormatDuration(absl::Now() - drained_at),
                     " after the Drain: its first request may still be on "
                     "the way (grace: 2 s after the hand-over)"));
  }
  absl::Status answered = context.Exchange(*late);
  if (!answered.ok()) {
    return Violation(
        "§7.7 Drain",
        absl::StrCat(
            "a first request sent ", absl::FormatDuration(kLateFirstRequest),
            " after the Drain was not answered: ", answered.message()));
  }
  // Served now, so closed like any idle connection; the silent one once its
  // grace is over.
  KIT_RETURN_IF_ERROR(AwaitIdsOf(context, "Closed (draining)",
                                 {late->id, silent->id}, ClosedIds));
  return AwaitGoodbyeAndExit(context);
}

absl::Status DrainNewConnection(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  // A connection that has sent nothing keeps the draining worker for its
  // first-request grace, so the Connection below reaches it (a worker with
  // nothing to finish may otherwise be gone before it is sent).
  KIT_ASSIGN_OR_RETURN(Client * keeper, context.HandOffAcked());
  (void)keeper;
  KIT_RETURN_IF_ERROR(context.broker().SendDrain(context.Deadline(), false));
  // The client's bytes are in the socket before the hand-off: a worker that
  // reads the socket it does not take consumes them.
  const std::string request = context.options().request;
  KIT_ASSIGN_OR_RETURN(Client * client, context.HandOff("", request));
  const uint64_t id = client->id;
  bool acked = false;
  const absl::Time deadline = context.Deadline();
  for (;;) {
    absl::StatusOr<Received> received = context.broker().Receive(deadline);
    if (absl::IsUnavailable(received.status())) break;
    if (absl::IsDeadlineExceeded(received.status())) {
      return Fail(
          "the draining worker did not say Goodbye and close the "
          "channel");
    }
    if (!received.ok()) return received.status();
    if (received->message.has_ack() &&
        HasId(received->message.ack().connection_ids(), id)) {
      acked = true;  // allowed (§6: Ack*), then served and Closed
    }
  }
  if (!context.broker().goodbye_received()) {
    return Fail("the draining worker closed the channel without Goodbye");
  }
  if (!acked) {
    absl::StatusOr<std::string> unread =
        PeekSome(client->tcp.server.get(), context.Deadline());
    if (!unread.ok() || *unread != request ||
        !NothingReadable(client->tcp.client.get())) {
      return Violation("§5 Reject",
                       absl::StrCat("connection ", id,
                                    " was not taken but its socket was "
                                    "touched (read, written or shut down): "
                                    "close your copy untouched"));
    }
  }
  return AwaitCleanExit(context);
}

absl::Status Sigterm(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients, IdleClients(context, 1));
  context.worker().Signal(SIGTERM);
  KIT_RETURN_IF_ERROR(AwaitIdsOf(context, "Closed (SIGTERM drain)",
                                 {clients[0]->id}, ClosedIds));
  KIT_RETURN_IF_ERROR(AwaitGoodbyeAndExit(context));
  return ExpectClientsSawTheEnd(context, clients);
}

// ---- §5 Release, ReleaseRequest; §7.7 release_idle ----

v1::HandoffMessage RebalanceRequest(uint32_t max_connections) {
  v1::HandoffMessage message;
  message.mutable_release_request()->set_max_connections(max_connections);
  message.mutable_release_request()->set_reason(v1::RELEASE_REASON_REBALANCE);
  return message;
}

absl::Status ReleaseRequest(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients,
                       RegisterIfRelease(context, true, 3));
  if (context.skipped()) return absl::OkStatus();
  KIT_RETURN_IF_ERROR(context.broker().Send(RebalanceRequest(2)));
  std::vector<Received> releases;
  absl::Time deadline = context.Deadline();
  while (releases.size() < 3) {
    absl::StatusOr<Received> release = context.Await(
        "Release (ReleaseRequest{max_connections: 2} with 3 idle "
        "connections)",
        [](const v1::HandoffMessage& m) { return m.has_release(); }, deadline);
    if (!release.ok()) {
      if (!releases.empty() && absl::IsDeadlineExceeded(release.status())) {
        break;
      }
      return release.status();
    }
    releases.push_back(*std::move(release));
    // One arrived: the others (if any) come promptly.
    deadline = absl::Now() + 10 * context.options().heartbeat_interval;
  }
  if (releases.size() > 2) {
    return Violation("§5 ReleaseRequest",
                     "released 3 connections when asked for at most 2");
  }
  KIT_RETURN_IF_ERROR(CheckReleases(
      context, clients, releases, v1::RELEASE_REASON_REBALANCE,
      "Release.reason does not echo ReleaseRequest.reason (REBALANCE)"));
  // No Closed may follow for a released connection (a Violation).
  return context.Settle(3 * context.options().heartbeat_interval);
}

absl::Status DrainRelease(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients,
                       RegisterIfRelease(context, true, 2));
  if (context.skipped()) return absl::OkStatus();
  KIT_RETURN_IF_ERROR(context.broker().SendDrain(context.Deadline(), true));
  std::vector<Received> releases;
  const absl::Time deadline = context.Deadline();
  while (releases.size() < clients.size()) {
    KIT_ASSIGN_OR_RETURN(
        Received release,
        context.Await(
            "Release of each idle connection (Drain{release_idle})",
            [](const v1::HandoffMessage& m) { return m.has_release(); },
            deadline));
    releases.push_back(std::move(release));
  }
  KIT_RETURN_IF_ERROR(
      CheckReleases(context, clients, releases, v1::RELEASE_REASON_DRAIN,
                    "a Release while draining with release_idle must say "
                    "RELEASE_REASON_DRAIN"));
  return AwaitGoodbyeAndExit(context);
}

// ---- §7.10 Listener grant (--placement=kernel) ----

// ListenerLoad with these figures.
auto LoadIs(uint64_t accepted_total, uint32_t active) {
  return [=](const v1::HandoffMessage& m) {
    return m.has_listener_load() &&
           m.listener_load().accepted_total() == accepted_total &&
           m.listener_load().active() == active;
  };
}

constexpr uint32_t kLoadIntervalMs = 50;

// StartAndReadHello() and, if the worker set supports_listener_grant, a
// Welcome with a ListenerLoad interval; false (the case skipped) if not.
absl::StatusOr<bool> RegisterForListenerGrant(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(v1::Hello hello, context.StartAndReadHello());
  if (!hello.supports_listener_grant()) {
    KIT_RETURN_IF_ERROR(
        context.Skip("Hello.supports_listener_grant is unset: the worker takes "
                     "hand-offs only"));
    return false;
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome(true, 1, kLoadIntervalMs));
  return true;
}

// RegisterForListenerGrant(), a loopback listener granted, and a client the
// worker accepts from it itself and reports (no Ack, no Closed). Null if
// the case was skipped.
absl::StatusOr<std::unique_ptr<LoopbackListener>> GrantAndServeOne(
    CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(bool granting, RegisterForListenerGrant(context));
  if (!granting) return std::unique_ptr<LoopbackListener>();
  absl::StatusOr<std::unique_ptr<LoopbackListener>> tcp =
      LoopbackListener::Create();
  if (!tcp.ok()) return tcp.status();
  v1::HandoffMessage grant;
  grant.mutable_listener_grant()->set_listener(LocalAddress((*tcp)->fd()));
  const int fds[] = {(*tcp)->fd()};
  KIT_RETURN_IF_ERROR(context.broker().Send(std::move(grant), fds));
  KIT_ASSIGN_OR_RETURN(wire::UniqueFd client, (*tcp)->ConnectClient());
  KIT_RETURN_IF_ERROR(
      context
          .Await("ListenerLoad{accepted_total 1, active 1} after a client "
                 "connected to the granted listener",
                 LoadIs(1, 1))
          .status());
  client.Reset();
  KIT_RETURN_IF_ERROR(context
                          .Await("ListenerLoad{accepted_total 1, active 0} "
                                 "after that client closed",
                                 LoadIs(1, 0))
                          .status());
  return *std::move(tcp);
}

absl::Status ListenerGrant(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(std::unique_ptr<LoopbackListener> tcp,
                       GrantAndServeOne(context));
  if (tcp == nullptr) return absl::OkStatus();  // Skipped.
  // Draining, it stops accepting and closes its copy: a client that comes
  // now is left in the queue for the broker.
  KIT_RETURN_IF_ERROR(context.broker().SendDrain(context.Deadline(), false));
  KIT_RETURN_IF_ERROR(AwaitGoodbyeAndExit(context));
  KIT_ASSIGN_OR_RETURN(wire::UniqueFd late, tcp->ConnectClient());
  pollfd queued{tcp->fd(), POLLIN, 0};
  if (::poll(&queued, 1, 1000) != 1) {
    return Violation("§7.10 Listener grant",
                     "a client that connected after the worker drained "
                     "was not left in the listener's queue for the broker");
  }
  return absl::OkStatus();
}

// §7.10 Across upgrades and restarts: a worker that re-registers while it
// holds a granted listener returns that very socket with its Hello, and
// closes it when the Welcome does not keep it.
absl::Status ListenerReturn(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(std::unique_ptr<LoopbackListener> tcp,
                       GrantAndServeOne(context));
  if (tcp == nullptr) return absl::OkStatus();  // Skipped.
  // The broker goes (an upgrade's Reconnect, or a crash: the same rule).
  context.broker().CloseChannel();
  KIT_RETURN_IF_ERROR(context.broker().Accept(context.Deadline()));
  KIT_ASSIGN_OR_RETURN(Received again,
                       context.broker().Receive(context.Deadline()));
  if (!again.message.hello().returns_listener()) {
    // Allowed (the broker then cannot hold it after a crash, and keeps the
    // kernel's hash), but the listener is not checked.
    return context.Skip(
        "the re-registration Hello does not return the granted listener "
        "(Hello.returns_listener unset)");
  }
  struct stat granted {
  }, returned{};
  ::fstat(tcp->fd(), &granted);
  if (again.fds.size() != 1 || ::fstat(again.fds[0].get(), &returned) != 0 ||
      returned.st_ino != granted.st_ino) {
    return Violation("§7.10 Across upgrades and restarts",
                     "the re-registration Hello does not return the granted "
                     "listener (returns_listener, that socket attached)");
  }
  // Not kept: the worker closes its copy. Once it has reported its load on
  // the new channel it has read the Welcome; a client that comes then is
  // left in the queue for the broker.
  KIT_RETURN_IF_ERROR(
      context.broker().SendWelcome(true, 2, kLoadIntervalMs, false));
  KIT_RETURN_IF_ERROR(
      context
          .Await("ListenerLoad on the new channel (§7.10: reported again "
                 "after re-registering)",
                 LoadIs(1, 0))
          .status());
  KIT_ASSIGN_OR_RETURN(wire::UniqueFd late, tcp->ConnectClient());
  pollfd queued{tcp->fd(), POLLIN, 0};
  if (::poll(&queued, 1, 1000) != 1) {
    return Violation("§7.10 Across upgrades and restarts",
                     "the worker kept accepting from a returned listener the "
                     "Welcome did not keep (listener_kept false)");
  }
  return absl::OkStatus();
}

// ---- §7.8 Losing the broker, and re-registration ----

absl::Status Reconnect(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients, IdleClients(context, 1));
  Client& client = *clients[0];
  context.broker().CloseChannel();
  if (context.Claims("request_response")) {
    if (absl::Status s = context.Exchange(client); !s.ok()) {
      return Fail(
          absl::StrCat("an acked connection was not served while the "
                       "broker was gone: ",
                       s.message()));
    }
  }
  KIT_RETURN_IF_ERROR(context.broker().Accept(context.Deadline()));
  KIT_ASSIGN_OR_RETURN(Received hello,
                       context.broker().Receive(context.Deadline()));
  const v1::Hello& h = hello.message.hello();
  if (h.owned_connections_size() != 1 ||
      h.owned_connections(0).connection_id() != client.id ||
      h.owned_connections(0).peer_address() != client.tcp.peer_address) {
    std::vector<std::string> owned;
    for (const v1::OwnedConnection& o : h.owned_connections()) {
      owned.push_back(absl::StrCat(o.connection_id(), "@", o.peer_address()));
    }
    return Fail(
        absl::StrCat("the re-registration Hello lists owned_connections "
                     "[",
                     absl::StrJoin(owned, ", "), "], expected [", client.id,
                     "@", client.tcp.peer_address, "]"));
  }
  if (!h.was_supervised()) {
    return Fail(
        "the re-registration Hello does not set was_supervised "
        "(the previous Welcome said supervised)");
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  client.tcp.client.Reset();
  return AwaitIdsOf(context, "Closed on the new channel (an owned connection)",
                    {client.id}, ClosedIds);
}

// §7.9: a worker of minor 3 or later, sent Reconnect (the broker hands over
// to a new one), sends what it owes, closes the channel and registers again
// at once, without its reconnect back-off, listing what it owns.
absl::Status ReconnectNow(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(v1::Hello first, context.StartAndReadHello());
  if (first.version().minor() < 3) {
    return context.Skip(absl::StrCat("its Hello says minor ",
                                     first.version().minor(),
                                     ": brokers send Reconnect from minor 3"));
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients, IdleClients(context, 1));
  Client& client = *clients[0];
  v1::HandoffMessage reconnect;
  reconnect.mutable_reconnect();
  const absl::Time sent = absl::Now();
  KIT_RETURN_IF_ERROR(context.broker().Send(std::move(reconnect)));
  KIT_RETURN_IF_ERROR(context.AwaitChannelClosed(
      "after Reconnect (§7.9: close the channel once nothing is owed)",
      context.Deadline()));
  KIT_RETURN_IF_ERROR(context.broker().Accept(context.Deadline()));
  KIT_ASSIGN_OR_RETURN(Received hello,
                       context.broker().Receive(context.Deadline()));
  const absl::Duration took = absl::Now() - sent;
  const v1::Hello& h = hello.message.hello();
  if (h.owned_connections_size() != 1 ||
      h.owned_connections(0).connection_id() != client.id) {
    return Fail(absl::StrCat(
        "the Hello after Reconnect lists ", h.owned_connections_size(),
        " owned connection(s), expected only ", client.id));
  }
  // Reconnect back-offs start at 50 ms in both SDKs.
  if (took > kReconnectAtOnce) {
    return Violation(
        "§7.9 Reconnect",
        absl::StrCat("registered again ", absl::FormatDuration(took),
                     " after Reconnect; at once means without back-off (at "
                     "most ",
                     absl::FormatDuration(kReconnectAtOnce), ")"));
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  if (context.Claims("request_response")) {
    if (absl::Status s = context.Exchange(client); !s.ok()) {
      return Fail(absl::StrCat(
          "the connection it owned was not served after Reconnect: ",
          s.message()));
    }
  }
  return absl::OkStatus();
}

// ---- §7.5 Errors ----

enum class Size { kNormal, kOversized };

// `count` loopback clients, whose server ends go with a bad packet.
absl::StatusOr<std::vector<Client>> PacketClients(int count) {
  std::vector<Client> clients(static_cast<size_t>(count));
  absl::StatusOr<std::unique_ptr<LoopbackListener>> tcp =
      LoopbackListener::Create();
  if (!tcp.ok()) return tcp.status();
  for (Client& client : clients) {
    KIT_ASSIGN_OR_RETURN(client.tcp, (*tcp)->Connect());
  }
  return clients;
}

std::vector<int> ServerFds(const std::vector<Client>& clients) {
  std::vector<int> fds;
  for (const Client& client : clients) fds.push_back(client.tcp.server.get());
  return fds;
}

// After the bad packet: the worker closes the channel without crashing, and
// closes the fds that came with the packet (`clients`' server ends).
absl::Status AwaitProtocolError(CaseContext& context,
                                std::vector<Client>& clients) {
  KIT_RETURN_IF_ERROR(context.AwaitChannelClosed(
      "after a protocol error (§7.5: log it and close the channel)",
      context.Deadline()));
  absl::StatusOr<int> code = context.worker().Wait(absl::Now());
  if (code.ok() && *code > 128) {
    return Fail(absl::StrCat("the worker crashed on a protocol error (",
                             DescribeExit(*code), ")"));
  }
  for (Client& client : clients) {
    client.tcp.server.Reset();
    if (!ReadsEof(client.tcp.client.get(), context.Deadline())) {
      return Violation("§3 File descriptors",
                       "the fd that came with the bad packet was not closed "
                       "(it leaks, and its client never sees the end)");
    }
  }
  return absl::OkStatus();
}

// Sends one packet that breaks framing or numbering (with `fd_count`
// client sockets attached) outside the kit's numbering, and expects
// AwaitProtocolError.
absl::Status ExpectProtocolError(CaseContext& context, const std::string& bytes,
                                 int fd_count, Size size = Size::kNormal) {
  KIT_ASSIGN_OR_RETURN(std::vector<Client> clients, PacketClients(fd_count));
  const std::vector<int> fds = ServerFds(clients);
  KIT_RETURN_IF_ERROR(size == Size::kOversized
                          ? context.broker().SendOversized(bytes, fds[0])
                          : context.broker().SendRaw(bytes, fds));
  return AwaitProtocolError(context, clients);
}

// Sends a well-formed message the worker may not receive in its state (the
// wrong direction, a second Welcome, a batch it did not opt into) in the
// kit's numbering, so that only its body is wrong: the kit's next message
// (a Heartbeat) is in sequence, and a worker that ignores the bad one is
// seen to. Expects AwaitProtocolError.
absl::Status ExpectProtocolError(CaseContext& context,
                                 v1::HandoffMessage message, int fd_count) {
  KIT_ASSIGN_OR_RETURN(std::vector<Client> clients, PacketClients(fd_count));
  KIT_RETURN_IF_ERROR(
      context.broker().Send(std::move(message), ServerFds(clients)));
  return AwaitProtocolError(context, clients);
}

std::string Serialized(v1::HandoffMessage message) {
  return message.SerializeAsString();
}

v1::HandoffMessage Heartbeat(uint64_t sequence) {
  v1::HandoffMessage message;
  message.set_sequence(sequence);
  message.mutable_heartbeat()->set_sent_unix_nanos(absl::GetCurrentTimeNanos());
  return message;
}

v1::HandoffMessage ConnectionMessage(uint64_t sequence, uint64_t id,
                                     std::string initial_data = "") {
  v1::HandoffMessage message;
  message.set_sequence(sequence);
  message.mutable_connection()->set_connection_id(id);
  message.mutable_connection()->set_peer_address("127.0.0.1:1");
  message.mutable_connection()->set_local_address("127.0.0.1:2");
  message.mutable_connection()->set_initial_data(std::move(initial_data));
  return message;
}

absl::Status ErrorSequenceGap(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(
      context, Serialized(Heartbeat(context.broker().next_sequence() + 1)), 0);
}

absl::Status ErrorSequenceRepeat(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(
      context, Serialized(Heartbeat(context.broker().next_sequence() - 1)), 0);
}

absl::Status ErrorSequenceZero(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(context, Serialized(Heartbeat(0)), 0);
}

absl::Status ErrorUnparseable(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(context, std::string("\xff\xff\xff\xff", 4), 0);
}

absl::Status ErrorNoBody(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  v1::HandoffMessage message;
  message.set_sequence(context.broker().next_sequence());
  return ExpectProtocolError(context, Serialized(message), 0);
}

absl::Status ErrorUnknownBody(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  v1::HandoffMessage message;
  message.set_sequence(context.broker().next_sequence());
  // Field 99, a varint: a body type from a newer protocol version.
  return ExpectProtocolError(
      context, Serialized(message) + std::string("\x98\x06\x01", 3), 0);
}

absl::Status ErrorConnectionWithoutFd(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(
      context,
      Serialized(ConnectionMessage(context.broker().next_sequence(), 7)), 0);
}

absl::Status ErrorConnectionTwoFds(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(
      context,
      Serialized(ConnectionMessage(context.broker().next_sequence(), 7)), 2);
}

absl::Status ErrorHeartbeatWithFd(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(
      context, Serialized(Heartbeat(context.broker().next_sequence())), 1);
}

absl::Status ErrorOversized(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  return ExpectProtocolError(
      context,
      Serialized(ConnectionMessage(context.broker().next_sequence(), 7,
                                   std::string(70000, 'x'))),
      1, Size::kOversized);
}

absl::Status ErrorWrongDirection(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  v1::HandoffMessage message;
  message.mutable_ack()->add_connection_ids(1);
  return ExpectProtocolError(context, std::move(message), 0);
}

absl::Status ErrorSecondWelcome(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  v1::HandoffMessage message;
  message.mutable_welcome()->mutable_version()->set_major(1);
  message.mutable_welcome()->set_worker_id(2);
  message.mutable_welcome()->set_heartbeat_interval_ms(100);
  message.mutable_welcome()->set_heartbeat_timeout_ms(1500);
  return ExpectProtocolError(context, std::move(message), 0);
}

absl::Status ErrorFirstNotWelcome(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(v1::Hello hello, context.StartAndReadHello());
  (void)hello;
  return ExpectProtocolError(context, Heartbeat(1), 0);
}

// True once the pipe's read end `fd` reads EOF before `deadline`: every
// copy of its write end has been closed. (ReadsEof() uses recv(), which a
// pipe does not take.)
bool PipeWritersGone(int fd, absl::Time deadline) {
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    const int ms = static_cast<int>(std::max<int64_t>(
        0, absl::ToInt64Milliseconds(deadline - absl::Now())));
    const int ready = ::poll(&p, 1, ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return false;
    char byte;
    const ssize_t n = ::read(fd, &byte, 1);
    if (n == 0) return true;
    if (n < 0 && errno != EINTR) return false;
  }
}

// §3: a Connection carries a client's stream socket. One that carries
// anything else (here a pipe) is the broker's protocol error (§7.5): the
// worker closes the channel and the fd, acks nothing, keeps serving what it
// owns, and re-registers listing only that (§7.8).
// The lowest fd number process `pid` does not use: with its soft
// RLIMIT_NOFILE there, it cannot take one more fd.
absl::StatusOr<int> LowestFreeFd(pid_t pid) {
  const std::string path = absl::StrCat("/proc/", pid, "/fd");
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return absl::ErrnoToStatus(errno, path);
  std::set<int> used;
  while (dirent* entry = ::readdir(dir)) {
    int fd = 0;
    if (absl::SimpleAtoi(entry->d_name, &fd)) used.insert(fd);
  }
  ::closedir(dir);
  int lowest = 0;
  while (used.count(lowest) != 0) ++lowest;
  return lowest;
}

// §3.1 (minor 4): a Connection arriving while the worker has no free fd
// slot comes with MSG_CTRUNC and no fd. The worker Rejects it and keeps
// the channel: the next Connection, with room again, is acked.
absl::Status OutOfFdsRejects(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  if (context.broker().hello().version().minor() < 4) {
    return context.Skip("the worker speaks minor < 4 (§3.1 is minor 4)");
  }
  if (wire::kSanitized) {
    // Its workers are built the same way, and a sanitized process out of
    // fds reports false errors (wire/sanitized.h).
    return context.Skip("the kit is a sanitizer build");
  }
  // One connection served first: the worker is done setting up (it may
  // need fds of its own after the Welcome).
  KIT_ASSIGN_OR_RETURN(Client * first, context.HandOffAcked());
  if (context.Claims("request_response")) {
    KIT_RETURN_IF_ERROR(context.Exchange(*first));
  }
  const pid_t pid = context.worker().pid();
  rlimit before{};
  if (::prlimit(pid, RLIMIT_NOFILE, nullptr, &before) != 0) {
    return absl::ErrnoToStatus(errno, "prlimit");
  }
  KIT_ASSIGN_OR_RETURN(int lowest, LowestFreeFd(pid));
  rlimit full = before;
  full.rlim_cur = static_cast<rlim_t>(lowest);
  if (::prlimit(pid, RLIMIT_NOFILE, &full, nullptr) != 0) {
    return absl::ErrnoToStatus(errno, "prlimit");
  }
  absl::StatusOr<Client*> client = context.HandOff();
  absl::Status rejected =
      client.ok()
          ? AwaitIdsOf(context, "Reject (no fd slot: §3.1)", {(*client)->id},
                       [](const v1::HandoffMessage& m) {
                         return m.has_reject() ? &m.reject().connection_ids()
                                               : nullptr;
                       })
          : client.status();
  (void)::prlimit(pid, RLIMIT_NOFILE, &before, nullptr);
  if (!rejected.ok()) return rejected;
  // The channel is still there, and the worker serves the next one.
  KIT_ASSIGN_OR_RETURN(Client * served, context.HandOffAcked());
  if (context.Claims("request_response")) return context.Exchange(*served);
  return absl::OkStatus();
}

// A ListenerGrant whose fd is a connected socket, not a listening one
// (§7.10: a protocol error; the fd is closed).
absl::Status ErrorListenerGrantNotListening(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(bool granting, RegisterForListenerGrant(context));
  if (!granting) return absl::OkStatus();
  v1::HandoffMessage grant;
  grant.mutable_listener_grant()->set_listener("127.0.0.1:1");
  return ExpectProtocolError(context, std::move(grant), 1);
}

absl::Status ErrorConnectionNotASocket(CaseContext& context) {
  KIT_RETURN_IF_ERROR(context.Register());
  // A connection to keep through it all, for a worker that says it keeps
  // serving without a broker (one that exits may wait for it first).
  const bool reconnects = context.Claims("reconnect");
  std::vector<Client*> clients;
  if (reconnects) {
    KIT_ASSIGN_OR_RETURN(clients, IdleClients(context, 1));
  }
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    return absl::ErrnoToStatus(errno, "pipe2");
  }
  wire::UniqueFd read_end(pipe_fds[0]);
  wire::UniqueFd write_end(pipe_fds[1]);
  constexpr uint64_t kPipeId = 7777;
  KIT_RETURN_IF_ERROR(context.broker().SendConnection(
      kPipeId, write_end.get(), "127.0.0.1:1", "127.0.0.1:2"));
  write_end.Reset();  // The worker's copy is the last writer.
  KIT_RETURN_IF_ERROR(context.AwaitChannelClosed(
      "after a Connection whose fd is a pipe (§3: a client's stream socket; "
      "§7.5: log it and close the channel)",
      context.Deadline()));
  if (context.broker().owned().count(kPipeId) != 0) {
    return Violation("§3 File descriptors",
                     "acked a Connection whose fd is a pipe, not a socket");
  }
  absl::StatusOr<int> code = context.worker().Wait(absl::Now());
  if (code.ok() && *code > 128) {
    return Fail(absl::StrCat("the worker crashed on a pipe in a Connection (",
                             DescribeExit(*code), ")"));
  }
  if (!PipeWritersGone(read_end.get(), context.Deadline())) {
    return Violation("§3 File descriptors",
                     "the pipe that came in a Connection was not closed");
  }
  if (!reconnects) return absl::OkStatus();
  Client& owned = *clients[0];
  KIT_RETURN_IF_ERROR(context.broker().Accept(context.Deadline()));
  KIT_ASSIGN_OR_RETURN(Received hello,
                       context.broker().Receive(context.Deadline()));
  const v1::Hello& h = hello.message.hello();
  if (h.owned_connections_size() != 1 ||
      h.owned_connections(0).connection_id() != owned.id) {
    return Fail(absl::StrCat("after the pipe, the re-registration Hello lists ",
                             h.owned_connections_size(),
                             " owned connection(s), expected only ", owned.id));
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  if (context.Claims("request_response")) {
    if (absl::Status s = context.Exchange(owned); !s.ok()) {
      return Fail(absl::StrCat(
          "the connection the worker owned was not served after the pipe: ",
          s.message()));
    }
  }
  return absl::OkStatus();
}

enum class BatchFault { kTooBig, kTooFewFds, kTooManyFds };

absl::Status BatchError(CaseContext& context, BatchFault fault) {
  KIT_ASSIGN_OR_RETURN(v1::Hello hello, context.StartAndReadHello());
  if (hello.max_connections_per_message() <= 1) {
    return context.Skip(
        "Hello.max_connections_per_message <= 1: the worker "
        "did not opt into ConnectionBatch");
  }
  KIT_RETURN_IF_ERROR(context.broker().SendWelcome());
  const bool too_big = fault == BatchFault::kTooBig;
  const uint32_t entries =
      too_big ? std::min<uint32_t>(hello.max_connections_per_message(), 252) + 1
              : 2;
  v1::HandoffMessage message;
  message.set_sequence(context.broker().next_sequence());
  for (uint32_t i = 0; i < entries; ++i) {
    v1::Connection* c = message.mutable_connection_batch()->add_connections();
    c->set_connection_id(5000 + i);
    c->set_peer_address("127.0.0.1:1");
  }
  // Too big: well-formed, one fd per entry, but not what the worker opted
  // into. The fd mismatch breaks the framing itself.
  if (fault == BatchFault::kTooBig) {
    return ExpectProtocolError(context, std::move(message),
                               static_cast<int>(entries));
  }
  const int fds = fault == BatchFault::kTooFewFds ? 1 : 3;
  return ExpectProtocolError(context, Serialized(message), fds);
}

absl::Status ErrorBatchTooBig(CaseContext& context) {
  return BatchError(context, BatchFault::kTooBig);
}

absl::Status ErrorBatchFdMismatch(CaseContext& context) {
  return BatchError(context, BatchFault::kTooFewFds);
}

absl::Status ErrorBatchExtraFd(CaseContext& context) {
  return BatchError(context, BatchFault::kTooManyFds);
}

// §5: the broker sends ReleaseRequest only to a worker whose Hello set
// supports_release. One sent to any other worker is a message in the wrong
// state, a protocol error like a batch over max_connections_per_message:
// the broker has misread the Hello, so the worker closes the channel (and,
// with "reconnect", keeps serving and registers again, §7.8).
absl::Status ErrorReleaseRequestUnclaimed(CaseContext& context) {
  KIT_ASSIGN_OR_RETURN(std::vector<Client*> clients,
                       RegisterIfRelease(context, false, 1));
  if (context.skipped()) return absl::OkStatus();
  absl::Status closed = ExpectProtocolError(context, RebalanceRequest(1), 0);
  if (absl::IsDeadlineExceeded(closed)) {
    return Violation("§5 ReleaseRequest",
                     absl::StrCat("a ReleaseRequest to a worker whose Hello "
                                  "did not set supports_release is a "
                                  "protocol error: ",
                                  closed.message()));
  }
  KIT_RETURN_IF_ERROR(closed);
  if (context.Claims("reconnect") && context.Claims("request_response")) {
    if (absl::Status s = context.Exchange(*clients[0]); !s.ok()) {
      return Violation(
          "§7.8",
          absl::StrCat("after closing the channel over the ReleaseRequest "
                       "the worker no longer serves its acked connection: ",
                       s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

const std::vector<Case>& AllCases() {
  static const auto* cases = new std::vector<Case>{
      {"hello",
       "§7.1 Registration",
       "Hello first, sequence 1, version 1.x, no owned connections",
       {},
       Hello},
      {"refusal-version",
       "§5 Refusal",
       "after Refusal{VERSION} the worker exits with an error, no retry",
       {},
       RefusalVersion},
      {"heartbeat-send",
       "§7.6 Heartbeats",
       "a Heartbeat whenever the worker was silent for heartbeat_interval_ms",
       {},
       HeartbeatSend},
      {"heartbeat-timeout",
       "§7.6 Heartbeats",
       "the kit falls silent: the worker closes the channel after "
       "heartbeat_timeout_ms, not before",
       {},
       HeartbeatTimeout},
      {"liveness-heartbeat",
       "§7.11 Liveness",
       "with worker_timeout_ms set, a worker that reports liveness sends a "
       "Heartbeat every interval even on a busy channel, with app_silent_ms "
       "below the timeout while idle",
       {},
       LivenessHeartbeat},
      {"ack", "§7.2 Hand-off", "a Connection is acked with its id", {}, Ack},
      {"serve",
       "§7.2 Hand-off",
       "an acked client gets an answer",
       {"request_response"},
       Serve},
      {"initial-data",
       "§5 Connection",
       "Connection.initial_data is processed as if read from the socket",
       {"request_response"},
       InitialData},
      {"closed",
       "§7.3 Closed",
       "Closed once, within 500 ms, when the client closes an acked "
       "connection",
       {},
       Closed},
      {"closed-many",
       "§7.3 Closed",
       "Closed exactly once for each of four connections",
       {},
       ClosedMany},
      {"batch",
       "§5 ConnectionBatch",
       "each entry of a ConnectionBatch is acked and served (opted-in "
       "workers)",
       {},
       Batch},
      {"capacity",
       "§7.4 Capacity",
       "up to Hello.capacity connections are taken; a Closed frees room",
       {},
       Capacity},
      {"drain-empty",
       "§7.7 Drain",
       "Drain with no connections: Goodbye, close, exit 0",
       {},
       DrainEmpty},
      {"drain-idle",
       "§7.7 Drain",
       "Drain closes idle connections (served ones within 1 s), Closed for "
       "each, Goodbye, exit 0",
       {},
       DrainIdle},
      {"drain-first-request",
       "§7.7 Drain",
       "a connection that has sent nothing yet gets its first-request "
       "grace: a request sent after the Drain is answered",
       {"request_response"},
       DrainFirstRequest},
      {"drain-new-connection",
       "§7.7 Drain",
       "a Connection after Drain is rejected (or left) untouched",
       {},
       DrainNewConnection},
      {"sigterm",
       "§7.7 Drain",
       "SIGTERM drains: Closed, Goodbye, exit 0",
       {"sigterm"},
       Sigterm},
      {"release-request",
       "§5 ReleaseRequest",
       "idle connections released (at most max_connections), socket "
       "untouched, reason echoed, no Closed for them",
       {},
       ReleaseRequest},
      {"drain-release",
       "§7.7 Drain",
       "Drain{release_idle}: idle connections released (DRAIN), Goodbye",
       {},
       DrainRelease},
      {"listener-grant",
       "§7.10 Listener grant",
       "a granted listener is accepted from, reported in ListenerLoad (no "
       "Ack, no Closed), and left to the broker on Drain",
       {},
       ListenerGrant},
      {"listener-return",
       "§7.10 Listener grant",
       "re-registering, the worker returns its granted listener with the "
       "Hello (returns_listener) and closes it unless listener_kept",
       {"reconnect"},
       ListenerReturn},
      {"error-listener-grant-not-listening",
       "§7.10 Listener grant",
       "a ListenerGrant whose fd is a connected socket, not a listening "
       "one, is a protocol error (channel closed, fd closed)",
       {},
       ErrorListenerGrantNotListening},
      {"reconnect-now",
       "§7.9 Reconnect",
       "on Reconnect, close the channel and register again at once with "
       "what it owns",
       {"reconnect"},
       ReconnectNow},
      {"reconnect",
       "§7.8 Re-registration",
       "after losing the broker: keeps serving, new Hello with "
       "owned_connections and was_supervised, Closed on the new channel",
       {"reconnect"},
       Reconnect},
      {"error-sequence-gap",
       "§4 Sequence numbers",
       "a skipped sequence number closes the channel",
       {},
       ErrorSequenceGap},
      {"error-sequence-repeat",
       "§4 Sequence numbers",
       "a repeated sequence number closes the channel",
       {},
       ErrorSequenceRepeat},
      {"error-sequence-zero",
       "§4 Sequence numbers",
       "sequence 0 closes the channel",
       {},
       ErrorSequenceZero},
      {"error-unparseable",
       "§4 Sequence numbers",
       "a packet that does not parse closes the channel",
       {},
       ErrorUnparseable},
      {"error-no-body",
       "§4 Sequence numbers",
       "a HandoffMessage with no body closes the channel",
       {},
       ErrorNoBody},
      {"error-unknown-body",
       "§4 Sequence numbers",
       "a body type from a newer version (unknown field) closes the channel",
       {},
       ErrorUnknownBody},
      {"error-connection-without-fd",
       "§3 File descriptors",
       "a Connection without its fd closes the channel",
       {},
       ErrorConnectionWithoutFd},
      {"error-connection-two-fds",
       "§3 File descriptors",
       "a Connection with two fds closes the channel and both fds",
       {},
       ErrorConnectionTwoFds},
      {"drain-deadline-cut",
       "§7.3 Closed",
       "a connection with a request half-received that the worker closes "
       "at its drain deadline is reported in Closed.cut_connection_ids",
       {},
       DrainDeadlineCut},
      {"out-of-fds-reject",
       "§3.1 Out of file descriptors",
       "a Connection whose fd the kernel dropped (the worker at its fd "
       "limit: MSG_CTRUNC) is rejected and the channel stays; the next one "
       "is acked",
       {},
       OutOfFdsRejects},
      {"error-connection-not-a-socket",
       "§3 File descriptors",
       "a Connection whose fd is a pipe closes the channel and the pipe, is "
       "never acked; the worker keeps what it owns and re-registers",
       {},
       ErrorConnectionNotASocket},
      {"error-stray-fd",
       "§3 File descriptors",
       "a Heartbeat with an fd closes the channel and the fd",
       {},
       ErrorHeartbeatWithFd},
      {"error-oversized",
       "§2 Framing",
       "a packet over 65536 bytes closes the channel and its fd",
       {},
       ErrorOversized},
      {"error-wrong-direction",
       "§5 Messages",
       "an Ack from the broker closes the channel",
       {},
       ErrorWrongDirection},
      {"error-second-welcome",
       "§6 Session state machine",
       "a second Welcome closes the channel",
       {},
       ErrorSecondWelcome},
      {"error-first-not-welcome",
       "§7.1 Registration",
       "a first broker message other than Welcome/Refusal closes the channel",
       {},
       ErrorFirstNotWelcome},
      {"error-batch-too-big",
       "§5 ConnectionBatch",
       "a batch over max_connections_per_message closes the channel and its "
       "fds",
       {},
       ErrorBatchTooBig},
      {"error-batch-fd-mismatch",
       "§5 ConnectionBatch",
       "a batch with fewer fds than entries closes the channel",
       {},
       ErrorBatchFdMismatch},
      {"error-release-request",
       "§5 ReleaseRequest",
       "a ReleaseRequest to a worker whose Hello did not set "
       "supports_release closes the channel",
       {},
       ErrorReleaseRequestUnclaimed},
      {"error-batch-extra-fd",
       "§5 ConnectionBatch",
       "a batch with more fds than entries closes the channel and its fds",
       {},
       ErrorBatchExtraFd},
  };
  return *cases;
}

CaseResult RunCase(const Case& c, const KitOptions& options,
                   const std::string& directory) {
  CaseResult result;
  const absl::Time start = absl::Now();
  for (const char* need : c.needs) {
    if (options.capabilities.count(need) == 0) {
      result.verdict = Verdict::kSkip;
      result.detail = absl::StrCat("the worker does not claim '", need,
                                   "' (--capabilities)");
      return result;
    }
  }
  CaseContext context(options, directory);
  absl::Status status = c.run(context);
  result.elapsed = absl::Now() - start;
  if (!status.ok()) {
    result.verdict = Verdict::kFail;
    result.detail = std::string(status.message());
    result.worker_log = context.WorkerLog(8);
  } else if (!context.skip_reason().empty()) {
    result.verdict = Verdict::kSkip;
    result.detail = context.skip_reason();
  }
  return result;
}

}  // namespace fdbroker::conformance
