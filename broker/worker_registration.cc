#include "broker/worker_registration.h"

#include <algorithm>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"
#include "wire/message_channel.h"

namespace fdbroker {
namespace {

// The parent of `pid` from /proc, or 0.
pid_t ParentPid(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(stat, line)) return 0;
  // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::vector<absl::string_view> fields = absl::StrSplit(
      absl::string_view(line).substr(close + 1), ' ', absl::SkipEmpty());
  int ppid = 0;
  if (fields.size() < 2 || !absl::SimpleAtoi(fields[1], &ppid)) return 0;
  return ppid;
}

}  // namespace

WorkerRegistration::WorkerRegistration(
    EventLoop& loop, WorkerRegistry& registry, ConnectionDispatcher& dispatcher,
    Supervisor& supervisor, wire::SysCalls& sys, WorkerLifecycle& lifecycle,
    WorkerStats& stats, HandoffChannel::Delegate& delegate,
    const Options& options)
    : loop_(loop),
      registry_(registry),
      dispatcher_(dispatcher),
      supervisor_(supervisor),
      sys_(sys),
      lifecycle_(lifecycle),
      stats_(stats),
      delegate_(delegate),
      options_(options) {}

void WorkerRegistration::OnNewPeer(wire::UniqueFd socket, const ucred& peer,
                                   bool allowed) {
  absl::StatusOr<std::unique_ptr<HandoffChannel>> channel =
      HandoffChannel::Create(loop_, std::move(socket), peer, sys_, delegate_);
  if (!channel.ok()) {
    spdlog::error("cannot watch worker channel: {}",
                  channel.status().ToString());
    return;
  }
  HandoffChannel* key = channel->get();
  if (!allowed) disallowed_.insert(key);
  unregistered_.emplace(key, *std::move(channel));
}

Worker* WorkerRegistration::OnMessage(HandoffChannel& channel,
                                      const v1::HandoffMessage& message,
                                      wire::UniqueFd fd) {
  if (channel.closed()) return nullptr;  // Refused or timed out: too late.
  if (disallowed_.contains(&channel)) {
    Refuse(channel, v1::REFUSAL_REASON_CREDENTIALS,
           absl::StrCat("uid ", channel.peer().uid,
                        " may not register with this broker"));
    return nullptr;
  }
  if (message.body_case() == v1::HandoffMessage::kUpgradeRequest &&
      on_upgrade_) {
    auto it = unregistered_.find(&channel);
    if (it == unregistered_.end()) return nullptr;
    std::unique_ptr<HandoffChannel> owned = std::move(it->second);
    unregistered_.erase(it);
    // Not a worker: later callbacks for it find no registry entry.
    owned->worker_id = kUpgradePeerId;
    on_upgrade_(std::move(owned), message.upgrade_request());
    return nullptr;
  }
  if (message.body_case() != v1::HandoffMessage::kHello) {
    ++stats_.protocol_errors;
    channel.Close(absl::InvalidArgumentError(
        absl::StrCat("expected hello, got ", wire::BodyName(message))));
    return nullptr;
  }
  return OnHello(channel, message.hello(), std::move(fd));
}

void WorkerRegistration::OnChannelClosed(HandoffChannel& channel,
                                         const absl::Status& reason) {
  if (!reason.ok() && !absl::IsPermissionDenied(reason)) {
    spdlog::warn("unregistered peer pid {} dropped: {}", channel.peer().pid,
                 reason.ToString());
  }
  disallowed_.erase(&channel);
  unregistered_.erase(&channel);
}

void WorkerRegistration::ExpireSilentPeers(int64_t now_nanos) {
  const int64_t timeout = absl::ToInt64Nanoseconds(options_.heartbeat_timeout);
  for (auto& [channel, owned] : unregistered_) {
    if (now_nanos - channel->last_received_nanos() > timeout &&
        !channel->closed()) {
      channel->Close(absl::DeadlineExceededError("no hello in time"));
    }
  }
}

void WorkerRegistration::Refuse(HandoffChannel& channel,
                                v1::RefusalReason reason,
                                absl::string_view message) {
  ++stats_.refused;
  spdlog::warn("refused worker pid {}: {}", channel.peer().pid,
               std::string(message));
  v1::HandoffMessage refusal;
  refusal.mutable_refusal()->set_reason(reason);
  refusal.mutable_refusal()->set_message(std::string(message));
  channel.SendControl(std::move(refusal));
  channel.Close(absl::PermissionDeniedError(message));
}

Worker* WorkerRegistration::FindSupervisedAncestor(pid_t pid) {
  // A --worker_cmd may be a wrapper (a shell script, an interpreter launcher)
  // whose child registers: walk a few generations up to the spawned pid.
  for (int depth = 0; depth < 4 && pid > 1; ++depth) {
    Worker* worker = registry_.FindByPid(pid);
    if (worker != nullptr) return worker->supervised ? worker : nullptr;
    pid = ParentPid(pid);
  }
  return nullptr;
}

absl::Status WorkerRegistration::CheckClaims(const v1::Hello& hello,
                                             const Worker* self) const {
  if (hello.owned_connections().empty()) return absl::OkStatus();
  // A worker re-registering claims what it kept serving; an id this broker
  // holds itself or knows another worker to own is not the claimant's (it
  // would have two owners).
  absl::flat_hash_set<uint64_t> held;
  dispatcher_.CollectHeldIds(held);
  absl::flat_hash_set<uint64_t> claimed;
  for (const v1::OwnedConnection& owned : hello.owned_connections()) {
    const uint64_t id = owned.connection_id();
    if (!claimed.insert(id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("the Hello claims connection ", id, " twice"));
    }
    if (held.contains(id)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the Hello claims connection ", id,
          ", which the broker holds (queued or in flight to a worker)"));
    }
  }
  for (const auto& [worker_id, other] : registry_.workers()) {
    if (other.get() == self || other->state == WorkerState::kExited) continue;
    for (const auto& [id, identity] : other->owned) {
      if (claimed.contains(id)) {
        return absl::InvalidArgumentError(
            absl::StrCat("the Hello claims connection ", id, ", which worker ",
                         worker_id, " owns"));
      }
    }
  }
  return absl::OkStatus();
}

bool WorkerRegistration::MayRejoin(const Worker& worker, pid_t pid) {
  // Only a lost channel: a worker declared dead was killed, one asked to
  // drain keeps draining. Only the very process that registered (not
  // another descendant of a wrapper), so no other process of the broker's
  // uid can take over its connections.
  return worker.channel == nullptr && worker.state == WorkerState::kDraining &&
         worker.drain_cause == DrainCause::kChannelLost &&
         worker.registered_pid == pid;
}

Worker* WorkerRegistration::OnHello(HandoffChannel& channel,
                                    const v1::Hello& hello,
                                    wire::UniqueFd returned_listener) {
  const ucred& peer = channel.peer();
  if (hello.version().major() != wire::kProtocolMajor) {
    Refuse(channel, v1::REFUSAL_REASON_VERSION,
           absl::StrCat("protocol major version ", hello.version().major(),
                        " is not supported (broker speaks ",
                        wire::kProtocolMajor, ".", wire::kProtocolMinor, ")"));
    return nullptr;
  }
  if (!accepting_) {
    Refuse(channel, v1::REFUSAL_REASON_SHUTTING_DOWN,
           "the broker is shutting down");
    return nullptr;
  }
  if (hello.pid() != 0 && hello.pid() != peer.pid) {
    // In another pid namespace the numbers differ; SO_PEERCRED is the truth.
    spdlog::debug("hello pid {} differs from SO_PEERCRED pid {}", hello.pid(),
                  peer.pid);
  }
  Worker* worker = FindSupervisedAncestor(peer.pid);
  const bool rejoining = worker != nullptr && MayRejoin(*worker, peer.pid);
  if (worker != nullptr && worker->state != WorkerState::kStarting &&
      !rejoining) {
    Refuse(channel, v1::REFUSAL_REASON_OTHER,
           worker->retiring()
               ? "this worker is being stopped"
               : absl::StrCat("worker ", worker->id, " is already registered"));
    return nullptr;
  }
  if (hello.returns_listener() && !hello.supports_listener_grant()) {
    ++stats_.protocol_errors;
    Refuse(channel, v1::REFUSAL_REASON_BAD_HELLO,
           "returns_listener without supports_listener_grant");
    return nullptr;
  }
  if (absl::Status claims = CheckClaims(hello, worker); !claims.ok()) {
    ++stats_.protocol_errors;
    Refuse(channel, v1::REFUSAL_REASON_OTHER, std::string(claims.message()));
    return nullptr;
  }
  if (rejoining) {
    // The broker knows exactly what it owns: it may claim only those, and
    // those it does not claim any more it closed meanwhile.
    absl::flat_hash_set<uint64_t> claimed;
    for (const v1::OwnedConnection& owned : hello.owned_connections()) {
      if (!worker->owned.contains(owned.connection_id())) {
        ++stats_.protocol_errors;
        Refuse(
            channel, v1::REFUSAL_REASON_OTHER,
            absl::StrCat("the Hello claims connection ", owned.connection_id(),
                         ", which worker ", worker->id, " did not own"));
        return nullptr;
      }
      claimed.insert(owned.connection_id());
    }
    absl::erase_if(worker->owned, [&](const auto& entry) {
      return !claimed.contains(entry.first);
    });
  }
  if (worker == nullptr) {
    size_t registered = 0;
    for (const auto& [id, w] : registry_.workers()) {
      registered += w->state != WorkerState::kExited;
    }
    if (registered >= static_cast<size_t>(options_.max_workers)) {
      Refuse(channel, v1::REFUSAL_REASON_TOO_MANY_WORKERS,
             absl::StrCat("the broker already has --max_workers=",
                          options_.max_workers, " workers"));
      return nullptr;
    }
    // A worker whose previous broker supervised it joins the supervised
    // pool (adopted: not our child, watched through a pidfd).
    const bool adopt = hello.was_supervised();
    if (adopt) {
      if (absl::Status s = supervisor_.Adopt(peer.pid); !s.ok()) {
        Refuse(channel, v1::REFUSAL_REASON_OTHER,
               absl::StrCat("cannot watch the process: ", s.message()));
        return nullptr;
      }
    }
    worker = &lifecycle_.Arrived(peer.pid, adopt);
  }
  Admit(channel, *worker, hello, std::move(returned_listener));
  return worker;
}

void WorkerRegistration::Admit(HandoffChannel& channel, Worker& worker,
                               const v1::Hello& hello,
                               wire::UniqueFd returned_listener) {
  const ucred& peer = channel.peer();
  worker.pid = worker.supervised ? worker.pid : peer.pid;
  worker.registered_pid = peer.pid;
  worker.capacity = hello.capacity();
  worker.max_connections_per_message =
      std::clamp<uint32_t>(hello.max_connections_per_message(), 1,
                           ConnectionDispatcher::kMaxConnectionsPerMessage);
  worker.supports_release = hello.supports_release();
  worker.supports_listener_grant = hello.supports_listener_grant();
  worker.reports_liveness = hello.reports_liveness();
  worker.app_alive_mono_nanos = loop_.NowNanos();
  worker.protocol_minor = hello.version().minor();
  worker.labels.clear();
  for (const auto& [key, value] : hello.labels()) worker.labels[key] = value;
  // Re-registration after a broker restart or upgrade: the worker keeps
  // serving these; our own ids must not collide with them.
  for (const v1::OwnedConnection& owned : hello.owned_connections()) {
    worker.owned.emplace(owned.connection_id(), 0);  // identity unknown
    dispatcher_.ReserveIdsAbove(owned.connection_id());
  }
  auto it = unregistered_.find(&channel);
  worker.channel = std::move(it->second);
  unregistered_.erase(it);
  worker.channel->worker_id = worker.id;

  v1::HandoffMessage welcome;
  v1::Welcome* body = welcome.mutable_welcome();
  body->mutable_version()->set_major(wire::kProtocolMajor);
  body->mutable_version()->set_minor(wire::kProtocolMinor);
  body->set_worker_id(worker.id);
  body->set_supervised(worker.supervised);
  if (worker.supports_listener_grant) {
    body->set_listener_load_interval_ms(listener_load_interval_ms_);
  }
  if (returned_listener) {
    // Not kept: closed here, and the worker closes its copy.
    body->set_listener_kept(
        on_listener_return_ &&
        on_listener_return_(worker, std::move(returned_listener)));
  }
  body->set_heartbeat_interval_ms(static_cast<uint32_t>(
      absl::ToInt64Milliseconds(options_.heartbeat_interval)));
  body->set_heartbeat_timeout_ms(static_cast<uint32_t>(
      absl::ToInt64Milliseconds(options_.heartbeat_timeout)));
  body->set_worker_timeout_ms(static_cast<uint32_t>(
      absl::ToInt64Milliseconds(options_.worker_timeout)));
  worker.channel->SendControl(std::move(welcome));
  const bool rejoined = worker.state == WorkerState::kDraining;
  spdlog::info(
      "worker {} {}: pid {}, {}, capacity {}{}", worker.id,
      rejoined ? "re-admitted on a new channel" : "registered", peer.pid,
      worker.adopted      ? "adopted"
      : worker.supervised ? "supervised"
                          : "external",
      worker.capacity == 0 ? std::string("unlimited")
                           : absl::StrCat(worker.capacity),
      worker.owned.empty() ? std::string()
                           : absl::StrCat(", ", worker.owned.size(),
                                          " connection(s) it still owns"));
  if (rejoined) {
    ++stats_.readmitted;
    lifecycle_.Readmitted(worker);
  } else {
    lifecycle_.Registered(worker);
  }
}

}  // namespace fdbroker
