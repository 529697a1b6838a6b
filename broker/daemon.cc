#include "broker/daemon.h"

#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "broker/peer_credentials.h"
#include "broker/thread_slice.h"
#include "broker/upgrade.h"
#include "spdlog/spdlog.h"
#include "wire/files.h"
#include "wire/message_channel.h"
#include "wire/socket_address.h"
#include "wire/sys_calls.h"

namespace fdbroker {
namespace {

// A worker told Reconnect at an upgrade's commit, whose channel is still
// open: it closes it itself once it has sent what it owes.
bool MovesOnReconnect(const Worker& worker) {
  return worker.channel != nullptr && !worker.channel->closed() &&
         worker.protocol_minor >= kReconnectMinor;
}

}  // namespace

// During an upgrade the previous broker frees its control and metrics ports
// a moment after the hand-over: retry binding them for a while.
template <typename Start>
auto Daemon::RetryWhileUpgrading(Start start) -> decltype(start()) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  for (;;) {
    auto result = start();
    // Only a port still held (Unavailable) is worth waiting for.
    if (result.ok() || !config_.upgrade || !absl::IsUnavailable(result) ||
        absl::Now() > deadline) {
      return result;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(
    const BrokerConfig& config) {
  std::unique_ptr<Daemon> daemon(new Daemon(config));
  if (absl::Status s = daemon->Init(); !s.ok()) return s;
  return daemon;
}

Daemon::Daemon(const BrokerConfig& config) : config_(config) {}

Daemon::~Daemon() {
  // Tear down in dependency order while the loop still exists. The control
  // server goes first: its handlers post to the loop.
  hub_.Close();
  if (control_shutdown_.joinable()) control_shutdown_.join();
  control_server_.reset();
  control_service_.reset();
  operations_.reset();
  metrics_server_.reset();
  metrics_timer_.reset();
  listener_.reset();
  // A new broker that fails before it is up leaves the socket file to the
  // running broker, which carries on.
  if (upgrade_reporter_ != nullptr && handoff_server_ != nullptr) {
    handoff_server_->Release();
  }
  handoff_server_.reset();
  manager_.reset();
  registry_ = WorkerRegistry();
  supervisor_.reset();
  dispatcher_.reset();
  signal_watch_.reset();
}

absl::Status Daemon::Init() {
  absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Create();
  if (!loop.ok()) return loop.status();
  loop_ = *std::move(loop);

  // Signals arrive through a signalfd (main() blocked them in every thread),
  // so handling them is ordinary loop work.
  const sigset_t signals = BrokerSignals();
  signal_fd_.Reset(::signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!signal_fd_) return absl::ErrnoToStatus(errno, "signalfd");
  absl::StatusOr<std::unique_ptr<IoWatch>> watch =
      loop_->Watch(signal_fd_.get(), EPOLLIN, [this](uint32_t) { OnSignal(); });
  if (!watch.ok()) return watch.status();
  signal_watch_ = *std::move(watch);

  wire::SysCalls& sys = wire::SysCalls::Real();
  absl::StatusOr<std::unique_ptr<BalancingPolicy>> policy =
      CreateBalancingPolicy(config_.policy);
  if (!policy.ok()) return policy.status();
  policy_ = *std::move(policy);

  dispatcher_ = std::make_unique<ConnectionDispatcher>(
      *loop_, registry_, *policy_, config_.dispatcher);

  supervisor_ = std::make_unique<Supervisor>(
      *loop_, Supervisor::Options{config_.worker_argv, config_.socket_path},
      [this](pid_t pid, int status) { manager_->OnChildExited(pid, status); });

  manager_ = std::make_unique<WorkerManager>(
      *loop_, registry_, *dispatcher_, *supervisor_, sys, config_.manager,
      [this](const WorkerEvent& event) { OnEvent(event); });

  auto on_peer = [this](wire::UniqueFd socket, const ucred& peer,
                        bool allowed) {
    manager_->OnNewPeer(std::move(socket), peer, allowed);
  };
  auto on_accept = [this](AcceptedConnection conn) {
    dispatcher_->Dispatch(std::move(conn));
  };
  absl::StatusOr<std::unique_ptr<HandoffServer>> server;
  // Sockets taken over (from the running broker, or from systemd): they
  // replace binding --listen; the i-th takes the i-th --listen's options.
  std::vector<wire::UniqueFd> inherited;
  KernelPlacement::Inherited inherited_slots;
  if (config_.upgrade) {
    // Take every listening socket over from the running broker: they never
    // close, so no client connect and no worker reconnect is refused.
    absl::StatusOr<UpgradeSockets> sockets =
        RequestUpgrade(config_.socket_path, absl::Seconds(10));
    if (!sockets.ok()) return sockets.status();
    upgrade_reporter_ = std::move(sockets->channel);
    // Clear of every id the running broker hands out before it leaves: its
    // workers bring those along when they re-register here.
    if (sockets->first_connection_id != 0) {
      dispatcher_->ReserveIdsAbove(sockets->first_connection_id - 1);
    }
    server = HandoffServer::Adopt(*loop_, config_.socket_path,
                                  std::move(sockets->handoff),
                                  HandoffServer::Options{}, sys, on_peer);
    inherited = std::move(sockets->listeners);
    inherited_slots.slots = std::move(sockets->kernel_slots);
    inherited_slots.layout_unknown = sockets->kernel_layout_unknown;
    inherited_slots.slots_in_use = sockets->kernel_slots_in_use;
    inherited_slots.keep_program_for = config_.adopt_grace;
  } else {
    server = HandoffServer::Create(*loop_, config_.socket_path,
                                   HandoffServer::Options{}, sys, on_peer);
    absl::StatusOr<std::vector<wire::UniqueFd>> activated =
        TakeActivatedListeners();
    if (!activated.ok()) return activated.status();
    inherited = *std::move(activated);
  }
  if (!server.ok()) return server.status();
  handoff_server_ = *std::move(server);
  listener_ =
      std::make_unique<Listener>(*loop_, config_.listener, sys, on_accept);
  for (size_t i = 0; i < inherited.size(); ++i) {
    const bool proxy =
        i < config_.listen.size() && config_.listen[i].proxy_protocol;
    if (absl::Status s = listener_->AdoptSocket(std::move(inherited[i]), proxy);
        !s.ok()) {
      return s;
    }
  }
  if (inherited.empty()) {
    for (const ListenSpec& spec : config_.listen) {
      if (absl::Status s = listener_->Bind(spec); !s.ok()) return s;
    }
  }
  // The running broker accepts and places with its workers until one of
  // them has registered here (UpgradeAccepting).
  if (config_.upgrade) listener_->Hold(true);
  if (config_.kernel_placement) {
    if (absl::Status s = manager_->EnableKernelPlacement(
            listener_->fd(0), config_.kernel, sys, on_accept,
            config_.upgrade ? &inherited_slots : nullptr);
        !s.ok()) {
      return s;
    }
    if (config_.upgrade) manager_->kernel_placement()->Hold(true);
  } else if (!inherited_slots.slots.empty()) {
    return absl::FailedPreconditionError(
        "--upgrade: the running broker runs --placement=kernel; an upgrade "
        "keeps the placement mode (restart to change it)");
  }
  dispatcher_->set_listener_resolver([listener = listener_.get()](int fd) {
    return listener->NameOfConnection(fd);
  });
  manager_->set_upgrade_handler([this](std::unique_ptr<HandoffChannel> channel,
                                       const v1::UpgradeRequest& request) {
    OnUpgradeRequest(std::move(channel), request);
  });

  operations_ = std::make_unique<DataPlaneOperations>(
      *loop_, *listener_, registry_, *dispatcher_, *manager_,
      [this](const WorkerEvent& event) { OnEvent(event); });
  metrics_registry_ = std::make_shared<prometheus::Registry>();
  metrics_ = std::make_unique<BrokerMetrics>(*metrics_registry_);
  process_metrics_ = std::make_shared<ProcessMetrics>();
  if (absl::Status s =
          RetryWhileUpgrading([&] { return StartMetricsServer(); });
      !s.ok()) {
    return s;
  }
  if (!config_.control.address.empty()) {
    control_service_ = std::make_unique<ControlService>(
        *loop_, *operations_, hub_,
        [metrics = metrics_.get()](absl::string_view method,
                                   grpc::StatusCode code) {
          metrics->CountControlRequest(method, static_cast<int>(code));
        },
        ControlAuthorization());
    if (!config_.control.tls_client_ca_file.empty() &&
        config_.admin_subjects.empty()) {
      spdlog::warn(
          "mTLS without --admin_subjects: every mutating RPC will be "
          "refused (read-only RPCs work)");
    }
    if (absl::Status s =
            RetryWhileUpgrading([&] { return StartControlServer(); });
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status Daemon::StartMetricsServer() {
  if (config_.metrics_address.empty()) return absl::OkStatus();
  // Once bound, the same port again (port 0 picked one).
  absl::StatusOr<std::unique_ptr<MetricsServer>> metrics = MetricsServer::Start(
      metrics_address_.empty() ? config_.metrics_address : metrics_address_,
      metrics_registry_);
  if (!metrics.ok()) return metrics.status();
  metrics_server_ = *std::move(metrics);
  metrics_address_ = metrics_server_->address();
  // The ProcessMetrics collectable is registered beside the registry.
  metrics_server_->Register(process_metrics_);
  return absl::OkStatus();
}

absl::Status Daemon::StartControlServer() {
  if (control_service_ == nullptr) return absl::OkStatus();
  ControlServer::Options options = config_.control;
  // Once bound, the same port again (port 0 picked one).
  if (control_port_.load() != 0) {
    absl::StatusOr<wire::HostPort> asked =
        wire::HostPort::Parse(options.address);
    if (asked.ok()) {
      options.address =
          wire::HostPort{asked->host, control_port_.load()}.ToString();
    }
  }
  absl::StatusOr<std::unique_ptr<ControlServer>> control =
      ControlServer::Start(options, *control_service_);
  if (!control.ok()) return control.status();
  control_server_ = *std::move(control);
  control_port_.store(control_server_->port());
  return absl::OkStatus();
}

ControlService::Authorization Daemon::ControlAuthorization() {
  ControlService::Authorization authorization;
  authorization.require_admin_subject =
      !config_.control.tls_client_ca_file.empty();
  authorization.admin_subjects = {config_.admin_subjects.begin(),
                                  config_.admin_subjects.end()};
  // Plaintext callers have no certificate, but a local one has a uid: the
  // control plane is then no weaker than the hand-off socket. (With TLS but
  // no client certificates, anyone who reaches the port may, as configured.)
  if (config_.control.tls_cert_file.empty()) {
    authorization.check_plaintext_caller =
        [this, self = ::geteuid()](absl::string_view peer) {
          const uint16_t port = control_port_.load();
          if (port == 0) {
            return absl::UnavailableError("the control plane is starting");
          }
          return CheckTrustedLocalCaller(peer, port, self);
        };
  }
  return authorization;
}

void Daemon::SyncMetrics() {
  if (metrics_timer_ == nullptr)
    metrics_timer_ = std::make_unique<Timer>(*loop_);
  metrics_timer_->Arm(absl::Milliseconds(500), [this] { SyncMetrics(); });
  metrics_->Sync(*listener_, registry_, *dispatcher_, *manager_);
}

void Daemon::OnEvent(const WorkerEvent& event) {
  hub_.Publish(event);
  if (listener_ != nullptr && listener_->held() &&
      (event.type == v1::EVENT_TYPE_WORKER_READY ||
       event.type == v1::EVENT_TYPE_WORKER_READMITTED)) {
    AcceptAfterUpgrade();
    if (upgrade_inbox_ != nullptr) {
      upgrade_inbox_->ReportAccepting(
          static_cast<uint32_t>(registry_.workers().size()));
    }
  }
  // Readiness may have changed (a worker became ready or went away).
  if (operations_ != nullptr) operations_->RefreshHealth();
}

absl::Status Daemon::WriteReadyFile() const {
  if (config_.ready_file.empty()) return absl::OkStatus();
  std::string listeners;
  for (size_t i = 0; i < listener_->size(); ++i) {
    absl::StrAppend(&listeners, i == 0 ? "" : " ", listener_->name(i));
  }
  // listen= the first listener (as before several), listeners= every one.
  std::string contents = absl::StrCat(
      "listen=", listener_->name(), "\n", "listeners=", listeners, "\n",
      "socket=", handoff_server_->path(), "\n", "pid=", ::getpid(), "\n");
  if (control_server_ != nullptr) {
    absl::StrAppend(&contents, "control=", control_server_->address(), "\n");
  }
  if (metrics_server_ != nullptr) {
    absl::StrAppend(&contents, "metrics=", metrics_server_->address(), "\n");
  }
  return wire::WriteFileAtomically(config_.ready_file, contents);
}

void Daemon::ApplyLoopSlice() {
  absl::StatusOr<absl::Duration> slice = SetThreadSlice(config_.loop_slice);
  if (!slice.ok()) {
    spdlog::warn("--loop_slice: {}; the data plane keeps the default slice",
                 slice.status().ToString());
  } else if (*slice == absl::ZeroDuration()) {
    spdlog::info(
        "--loop_slice: the kernel keeps its default slice (custom slices "
        "need Linux 6.12+ and a SCHED_OTHER thread)");
  } else {
    spdlog::info("data-plane thread: {} scheduler slice",
                 absl::FormatDuration(*slice));
  }
}

int Daemon::Run() {
  // Run() is the loop thread; set before it spawns any worker.
  if (config_.loop_slice != absl::ZeroDuration()) ApplyLoopSlice();
  // After a crash (stale socket) or during an upgrade, workers of the
  // previous broker come back: let them count toward --workers first.
  manager_->Start(config_.upgrade || handoff_server_->replaced_stale_socket()
                      ? config_.adopt_grace
                      : absl::ZeroDuration());
  operations_->Start([this](bool serving) {
    if (control_server_ != nullptr) control_server_->SetServing(serving);
  });
  SyncMetrics();
  if (metrics_server_ != nullptr) {
    spdlog::info("metrics on http://{}/metrics", metrics_server_->address());
  }
  if (control_server_ != nullptr) {
    spdlog::info("control plane on {} ({}; reflection and health on)",
                 control_server_->address(),
                 control_server_->tls() ? "TLS" : "plaintext");
  }
  spdlog::info(
      "fdbroker listening on {}, hand-off socket {}, {} worker(s), "
      "policy {}",
      listener_->Describe(), handoff_server_->path(),
      config_.manager.target_workers, std::string(policy_->name()));
  if (absl::Status s = WriteReadyFile(); !s.ok()) {
    spdlog::error("--ready_file: {}", s.ToString());
    return 1;
  }
  if (upgrade_reporter_ != nullptr) {
    // Everything that could fail is up: the previous broker may go.
    if (absl::Status s = ReportUpgradeReady(*upgrade_reporter_); !s.ok()) {
      spdlog::error("upgrade: {}", std::string(s.message()));
      return 1;
    }
    absl::StatusOr<std::unique_ptr<UpgradeInbox>> inbox = UpgradeInbox::Create(
        *loop_, std::move(*upgrade_reporter_),
        [this](const v1::Connection& passed, wire::UniqueFd fd) {
          TakePassedConnection(passed, std::move(fd));
        },
        [this] { AcceptAfterUpgrade(); },
        [this] {
          AcceptAfterUpgrade();
          loop_->RunSoon([this] { upgrade_inbox_.reset(); });
        });
    upgrade_reporter_.reset();
    if (inbox.ok()) {
      upgrade_inbox_ = *std::move(inbox);
    } else {
      spdlog::warn("upgrade: {}", inbox.status().ToString());
      AcceptAfterUpgrade();
    }
    spdlog::info("upgrade: up; the previous broker hands over and exits");
  }
  loop_->Run();
  // No RPC may wait on a loop that is gone: refuse new posts, end streams,
  // then stop the gRPC server.
  loop_->Close();
  hub_.Close();
  if (control_shutdown_.joinable()) control_shutdown_.join();
  if (control_server_ != nullptr) control_server_->Shutdown();
  const ConnectionDispatcher::Stats& stats = dispatcher_->stats();
  spdlog::info(
      "fdbroker stopped: {} accepted, {} handed off, {} re-placed, "
      "{} rejected (overload), {} closed at shutdown",
      stats.dispatched, stats.handed_off, stats.replaced,
      stats.rejected_overload,
      stats.rejected_shutdown + dispatcher_->pending());
  return 0;
}

void Daemon::OnUpgradeRequest(std::unique_ptr<HandoffChannel> channel,
                              const v1::UpgradeRequest& request) {
  const pid_t pid = channel->peer().pid;
  // An upgrade runs from the hand-over until this broker exits or has its
  // control plane back after an abort.
  const bool busy = upgrade_ != nullptr || control_shutdown_.joinable();
  if (shutting_down_ || busy) {
    spdlog::warn("refused an upgrade request from pid {}: {}", pid,
                 shutting_down_ ? "shutting down" : "already upgrading");
    v1::HandoffMessage refusal;
    refusal.mutable_refusal()->set_reason(
        shutting_down_ ? v1::REFUSAL_REASON_SHUTTING_DOWN
                       : v1::REFUSAL_REASON_UPGRADE_IN_PROGRESS);
    refusal.mutable_refusal()->set_message(
        shutting_down_ ? "the broker is shutting down"
                       : "another upgrade is in progress");
    channel->SendControl(std::move(refusal));
    Discard(std::move(channel));
    return;
  }
  if (request.version().major() != wire::kProtocolMajor) {
    spdlog::warn("refused an upgrade from pid {}: protocol major {}", pid,
                 request.version().major());
    Discard(std::move(channel));
    return;
  }
  v1::HandoffMessage handover;
  v1::UpgradeHandover* body = handover.mutable_upgrade_handover();
  body->set_listen_address(listener_->name(0));
  body->set_socket_path(handoff_server_->path());
  // This broker goes on numbering until the new one is up: far fewer than
  // 2^32 connections in that time (60 s at most).
  body->set_first_connection_id(dispatcher_->next_connection_id() +
                                (uint64_t{1} << 32));
  // [0] the first listener, [1] the hand-off socket, then the others.
  std::vector<int> fds = {listener_->fd(0), handoff_server_->fd()};
  for (size_t i = 1; i < listener_->size(); ++i) {
    body->add_more_listen_addresses(listener_->name(i));
    fds.push_back(listener_->fd(i));
  }
  // Then the workers' listeners in slot order: the new broker keeps that
  // order, so the group indexes stay valid (both hold copies meanwhile).
  KernelPlacement* placement = manager_->kernel_placement();
  if (placement != nullptr) {
    const std::vector<int> slots = placement->slot_fds();
    body->set_kernel_slots(static_cast<uint32_t>(slots.size()));
    body->set_kernel_layout_unknown(!placement->standard_layout());
    body->set_kernel_slots_in_use(placement->slots_in_use());
    fds.insert(fds.end(), slots.begin(), slots.end());
  }
  if (absl::Status s = channel->SendWithFds(handover, fds); !s.ok()) {
    spdlog::error("upgrade hand-over to pid {} failed ({}); still serving", pid,
                  s.ToString());
    Discard(std::move(channel));
    return;
  }
  // No listener joins the group now that the new broker would not hold.
  if (placement != nullptr) placement->set_frozen(true);
  upgrade_ = std::make_unique<PendingUpgrade>(
      *loop_, std::move(channel), request.version().minor(),
      kUpgradeReadyTimeout, [this] { CommitUpgrade(); },
      [this](const absl::Status& reason) { AbortUpgrade(reason); });
  // The new broker binds the control and metrics ports next; this broker
  // serves clients and workers on until it is up.
  StopControlPlane();
  if (request.version().minor() < kTwoPhaseUpgradeMinor) {
    upgrade_->Commit();  // It will not say when it is up.
    CommitUpgrade();
    return;
  }
  spdlog::info(
      "upgrade: handed the listening sockets to the new broker (pid {}); "
      "serving until it is up",
      pid);
}

void Daemon::StopControlPlane() {
  // Not on the loop thread: shutting gRPC down waits for handlers, and a
  // handler may be waiting for the loop; stopping the metrics server waits
  // for its threads (2 s measured: the loop placed nothing meanwhile).
  control_stopped_ = false;
  control_shutdown_ =
      std::thread([this, metrics = std::move(metrics_server_)]() mutable {
        metrics.reset();
        if (control_server_ != nullptr) control_server_->Shutdown();
        control_stopped_ = true;
      });
}

void Daemon::CommitUpgrade() {
  spdlog::info("upgrade: the new broker (pid {}) is up; moving the workers",
               upgrade_->peer_pid());
  // The new broker takes workers from now on (the hand-off socket itself
  // never closes).
  handoff_server_->Release();
  // The new broker programs the group from now on and accepts from the
  // slots whose workers are away; its copies keep them in the group.
  if (manager_->kernel_placement() != nullptr) {
    manager_->kernel_placement()->Close();
  }
  manager_->PrepareForUpgrade();
  // Workers move now, not when this broker exits: each sends what it owes
  // here, then registers with the new broker at once (Reconnect), so the
  // new broker has workers within about a millisecond. Older workers learn
  // it from their channel closing, after the hand-offs (FinishUpgrade).
  // Half of them go first while this broker keeps accepting and placing
  // with the others: nobody accepts without a worker to place on.
  std::vector<Worker*> first;
  for (const auto& [id, worker] : registry_.workers()) {
    if (MovesOnReconnect(*worker)) first.push_back(worker.get());
  }
  if (upgrade_->inbox() == nullptr || first.size() < 2) {
    return StopAcceptingForUpgrade();
  }
  first.resize(first.size() / 2);
  MoveWorkers(first);
  upgrade_->set_on_accepting([this] { StopAcceptingForUpgrade(); });
  loop_->RunAfter(kUpgradeFirstGroupTimeout,
                  [this] { StopAcceptingForUpgrade(); });
}

void Daemon::StopAcceptingForUpgrade() {
  if (upgrade_stopped_accepting_) return;
  upgrade_stopped_accepting_ = true;
  // The new broker accepts from now on (the sockets themselves never
  // close). This broker only finishes what it holds.
  listener_->Close();
  upgrade_->SendAccepting();
  operations_->RefreshHealth();
  std::vector<Worker*> rest;
  for (const auto& [id, worker] : registry_.workers()) {
    if (!worker->moving && MovesOnReconnect(*worker)) {
      rest.push_back(worker.get());
    }
  }
  MoveWorkers(rest);
  const int64_t deadline = loop_->clock().MonotonicNanos() +
                           absl::ToInt64Nanoseconds(absl::Seconds(5));
  FinishUpgrade(deadline);
}

void Daemon::MoveWorkers(const std::vector<Worker*>& group) {
  // A worker reads nothing after Reconnect: nothing is placed with it from
  // here on, and the connections staged for it go before the Reconnect.
  dispatcher_->PlacePending();
  for (Worker* worker : group) worker->moving = true;
  dispatcher_->SendStaged();
  for (Worker* worker : group) {
    // Sending the staged batch may have found the channel closed.
    if (!MovesOnReconnect(*worker)) continue;
    v1::HandoffMessage reconnect;
    reconnect.mutable_reconnect();
    worker->channel->SendControl(std::move(reconnect));
  }
}

void Daemon::AbortUpgrade(const absl::Status& reason) {
  spdlog::warn("upgrade aborted: {}; still serving",
               std::string(reason.message()));
  // Destroyed after the channel's close callbacks (not inside one).
  loop_->RunSoon([this] { upgrade_.reset(); });
  if (manager_->kernel_placement() != nullptr) {
    manager_->kernel_placement()->set_frozen(false);
  }
  if (shutting_down_) return;
  RestoreControlPlane(loop_->clock().MonotonicNanos() +
                      absl::ToInt64Nanoseconds(absl::Seconds(10)));
}

void Daemon::RestoreControlPlane(int64_t deadline_nanos) {
  auto retry = [this, deadline_nanos] {
    loop_->RunAfter(absl::Milliseconds(20), [this, deadline_nanos] {
      RestoreControlPlane(deadline_nanos);
    });
  };
  // The loop must not wait for gRPC's shutdown (see StopControlPlane).
  if (control_shutdown_.joinable()) {
    if (!control_stopped_) return retry();
    control_shutdown_.join();
    control_server_.reset();
  }
  // The new broker may hold the ports until it has exited.
  absl::Status metrics =
      metrics_server_ == nullptr ? StartMetricsServer() : absl::OkStatus();
  absl::Status control =
      control_server_ == nullptr ? StartControlServer() : absl::OkStatus();
  if (metrics.ok() && control.ok()) {
    operations_->RefreshHealth();
    spdlog::info("upgrade aborted: control plane and metrics are back");
    return;
  }
  if (loop_->clock().MonotonicNanos() < deadline_nanos) return retry();
  spdlog::error("upgrade aborted, and the ports are not free: {} {}",
                metrics.ToString(), control.ToString());
}

void Daemon::AcceptAfterUpgrade() {
  if (!listener_->held()) return;
  listener_->Hold(false);
  if (manager_->kernel_placement() != nullptr) {
    manager_->kernel_placement()->Hold(false);
  }
  spdlog::info("upgrade: accepting clients");
}

void Daemon::TakePassedConnection(const v1::Connection& passed,
                                  wire::UniqueFd fd) {
  // Its addresses as the previous broker knew them (from a PROXY header
  // they are not the socket's own).
  auto address = [](const std::string& text) {
    absl::StatusOr<wire::SocketAddress> parsed =
        text.empty() ? absl::InvalidArgumentError("none")
                     : wire::SocketAddress::Parse(text);
    return parsed.ok() ? *parsed : wire::SocketAddress();
  };
  AcceptedConnection connection;
  connection.peer = address(passed.peer_address());
  connection.local = address(passed.local_address());
  absl::StatusOr<wire::SocketAddress> own =
      wire::SocketAddress::Of(fd.get(), /*peer=*/true);
  connection.proxied = connection.peer.family() != 0 && own.ok() &&
                       own->ToString() != passed.peer_address();
  connection.accept_unix_nanos = passed.accept_time_unix_nanos();
  connection.accept_mono_nanos = loop_->NowNanos();
  connection.listener = listener_->NameOfConnection(fd.get());
  connection.fd = std::move(fd);
  dispatcher_->Dispatch(std::move(connection), passed.initial_data());
}

void Daemon::Discard(std::unique_ptr<HandoffChannel> channel) {
  channel->Close(absl::OkStatus());
  // Destroyed (its fd closed) after the close's own deferred callbacks, which
  // were queued first: not here, inside the channel's message callback.
  loop_->RunSoon([channel = std::move(channel)]() mutable { channel.reset(); });
}

void Daemon::FinishUpgrade(int64_t deadline_nanos) {
  dispatcher_->PlacePending();
  // Workers sent Reconnect close their channels themselves once they have
  // sent what they owe: closing first would cost them the back-off.
  bool moving = false;
  for (const auto& [id, worker] : registry_.workers()) {
    moving |= MovesOnReconnect(*worker);
  }
  // Once every worker has answered what it was sent and moved, what is
  // still queued here (rejected, or done with its PROXY header only now)
  // has nobody left here: the new broker places it.
  if (!moving && dispatcher_->in_flight() == 0 && dispatcher_->pending() > 0 &&
      upgrade_->inbox() != nullptr) {
    passed_to_new_broker_ += dispatcher_->PassPendingTo(*upgrade_->inbox());
  }
  // Connections still reading their PROXY header go on to the dispatcher
  // (or are closed) within --proxy_header_timeout: wait for them too.
  const bool done = dispatcher_->in_flight() == 0 &&
                    dispatcher_->pending() == 0 &&
                    listener_->reading_headers() == 0 && !moving;
  if (!done && loop_->clock().MonotonicNanos() < deadline_nanos) {
    loop_->RunAfter(absl::Milliseconds(5),
                    [this, deadline_nanos] { FinishUpgrade(deadline_nanos); });
    return;
  }
  if (!done) {
    spdlog::warn(
        "upgrade: {} connection(s) still waiting for a worker; they "
        "are closed{}",
        dispatcher_->in_flight() + dispatcher_->pending(),
        moving ? " (and some workers did not move in time)" : "");
    dispatcher_->AbandonInFlight();
    dispatcher_->CloseAllPending();
  }
  // Every hand-off is acked: closing the worker channels loses nothing, and
  // the workers re-register with the new broker. Now, not at exit: the exit
  // waits for the metrics server's threads (about 2 s), longer than the new
  // broker waits for them (--adopt_grace).
  for (const auto& [id, worker] : registry_.workers()) worker->channel.reset();
  spdlog::info(
      "upgrade complete: exiting; workers move to the new broker ({} queued "
      "connection(s) passed on to it)",
      passed_to_new_broker_);
  loop_->Stop();
}

sigset_t BrokerSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  for (int signal : {SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2}) {
    sigaddset(&signals, signal);
  }
  return signals;
}

void Daemon::OnSignal() {
  signalfd_siginfo info;
  while (::read(signal_fd_.get(), &info, sizeof(info)) == sizeof(info)) {
    const int signal = static_cast<int>(info.ssi_signo);
    if (signal == SIGHUP) {
      // As gunicorn's HUP: a rolling restart with the defaults (max_surge
      // 1, --drain_timeout, the current command).
      absl::StatusOr<WorkerRecycler::RestartPlan> plan =
          shutting_down_
              ? absl::FailedPreconditionError("shutting down")
              : manager_->RestartWorkers(WorkerRecycler::RestartRequest{
                    1, config_.manager.drain_timeout, std::nullopt});
      if (plan.ok()) {
        spdlog::info("received SIGHUP: rolling restart of {} worker(s)",
                     plan->replacing.size());
      } else {
        spdlog::warn("received SIGHUP: no rolling restart: {}",
                     std::string(plan.status().message()));
      }
      continue;
    }
    if (signal == SIGUSR1 || signal == SIGUSR2) {
      spdlog::info(
          "received SIG{}: ignored (SIGTERM, SIGINT or SIGQUIT drain the "
          "broker, SIGHUP restarts the workers)",
          sigabbrev_np(signal));
      continue;
    }
    if (!shutting_down_) {
      spdlog::info(
          "received SIG{}: draining (deadline {}); send it again to "
          "stop at once",
          sigabbrev_np(signal),
          absl::FormatDuration(config_.manager.drain_timeout));
      BeginShutdown();
    } else {
      spdlog::warn("second signal: stopping now");
      supervisor_->SignalAll(SIGKILL);
      loop_->Stop();
    }
  }
}

void Daemon::BeginShutdown() {
  shutting_down_ = true;
  // A new broker not up yet must not take over a broker that is leaving.
  if (upgrade_ != nullptr && !upgrade_->committed()) {
    upgrade_->Abort(
        absl::CancelledError("the running broker is shutting down"));
  }
  // Closing the listener refuses new clients at once rather than letting
  // them wait in a backlog nobody will serve (the workers' listeners close
  // as they drain).
  listener_->Close();
  if (manager_->kernel_placement() != nullptr) {
    manager_->kernel_placement()->Close();
  }
  operations_->RefreshHealth();
  // Give queued connections to workers before they are told to drain; the
  // channel's order guarantees each Connection arrives before the Drain.
  dispatcher_->PlacePending();
  dispatcher_->CloseAllPending();
  manager_->DrainAll(config_.manager.drain_timeout, [this] {
    dispatcher_->CloseAllPending();
    loop_->Stop();
  });
}

}  // namespace fdbroker
