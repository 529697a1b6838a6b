#include "broker/config.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "broker/balancing_policy.h"
#include "broker/control_server.h"
#include "broker/supervisor.h"
#include "wire/command_line.h"

ABSL_FLAG(fdbroker::wire::RepeatedFlag, listen,
          fdbroker::wire::RepeatedFlag{{"0.0.0.0:8080"}},
          "Address for client connections, may be given several times: "
          "HOST:PORT, [V6]:PORT (port 0 picks one; an IPv6 listener is IPv6 "
          "only) or unix:/path, optionally followed by ,proxy_protocol (each "
          "connection starts with a PROXY protocol v1 or v2 header, as "
          "HAProxy's send-proxy and send-proxy-v2 send) and, for unix:, "
          ",mode=0660 (the socket file's permissions; a stale file is "
          "replaced).");
ABSL_FLAG(absl::Duration, proxy_header_timeout, absl::Seconds(3),
          "On a ,proxy_protocol listener: a connection whose PROXY header is "
          "not complete within this time is closed (and counted in "
          "fdbroker_connections_rejected_total{reason=\"proxy_protocol\"}).");
ABSL_FLAG(std::string, socket, "",
          "Path of the hand-off Unix socket workers register on. Default: "
          "$XDG_RUNTIME_DIR/fdbroker.sock, else /tmp/fdbroker-<uid>.sock.");
ABSL_FLAG(int, workers, 0, "Supervised workers to start.");
ABSL_FLAG(std::string, worker_cmd, "",
          "Command line of a supervised worker (split on whitespace, quotes "
          "group). Default: the fdbroker-http-worker next to this binary.");
ABSL_FLAG(int, max_workers, 64,
          "Upper bound on registered workers (supervised and external).");
ABSL_FLAG(std::string, policy, "least_conn",
          "Balancing policy: least_conn, round_robin (smooth weighted), p2c "
          "(less loaded of two random picks) or ip_hash (sticky by client "
          "IP). Workers weigh by the capacity they declare.");
ABSL_FLAG(std::string, placement, "handoff",
          "How connections reach workers: handoff (the broker accepts each "
          "one and passes it over the hand-off socket) or kernel (each "
          "worker that supports it gets its own listening socket in one "
          "SO_REUSEPORT group on --listen and accepts itself; the broker "
          "steers the kernel by weights with a classic BPF program). kernel "
          "needs one TCP --listen without ,proxy_protocol.");
ABSL_FLAG(absl::Duration, kernel_rebalance_after, absl::Seconds(1),
          "With --placement=kernel (any --policy but ip_hash): worker "
          "loads that stay more than 10% above even this long are evened "
          "out by a rebalance (idle keep-alive connections released and "
          "placed again), at most once per second. 0 turns it off.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "How long a draining worker may take before it is ended.");
ABSL_FLAG(bool, rebalance_after_scale, false,
          "After a ScaleWorkers scale-up, once the new workers are ready, "
          "rebalance once (as the Rebalance RPC does): idle connections move "
          "to them.");
ABSL_FLAG(int64_t, max_connections_per_worker, 0,
          "Recycle a supervised worker once it was handed this many new "
          "connections (idle ones moved to it from other workers are not "
          "counted): a replacement starts and "
          "registers, then the worker drains, its idle connections moving. "
          "0: never.");
ABSL_FLAG(int64_t, max_connections_jitter, 0,
          "A random 0..N added to --max_connections_per_worker for each "
          "worker, so that workers started together are not recycled "
          "together.");
ABSL_FLAG(std::string, max_worker_rss, "",
          "Recycle a supervised worker whose resident memory, its child "
          "processes' included, reaches this size (bytes, or with a suffix: "
          "KiB/MiB/GiB/TiB or K/M/G/T, powers of 1024; KB/MB/GB/TB, powers "
          "of 1000), e.g. 512MiB; at least 1MiB. Sampled from /proc once a "
          "second. Empty or 0: never.");
ABSL_FLAG(absl::Duration, max_worker_age, absl::ZeroDuration(),
          "Recycle a supervised worker this long after it started, e.g. 6h; "
          "at least 1s. 0: never.");
ABSL_FLAG(absl::Duration, heartbeat_interval, absl::Seconds(1),
          "A side sends a heartbeat after this much silence.");
ABSL_FLAG(absl::Duration, heartbeat_timeout, absl::Seconds(10),
          "A worker silent for this long is declared dead.");
ABSL_FLAG(absl::Duration, ack_timeout, absl::Seconds(5),
          "A worker that has not acked a connection this long after it was "
          "sent is cut off (supervised: killed with its process group) and "
          "its un-acked connections go to other workers.");
ABSL_FLAG(absl::Duration, worker_timeout, absl::Seconds(30),
          "Hung-worker watchdog (0 = off): a worker whose application thread "
          "(event loop, consumer loop) proves no life for this long is sent "
          "SIGABRT to dump its stacks, then killed (supervised) or cut off "
          "(external) and replaced. Applies to workers whose SDK reports "
          "liveness (Hello.reports_liveness, protocol 1.4).");
ABSL_FLAG(absl::Duration, worker_start_timeout, absl::Seconds(30),
          "A supervised worker must register within this time.");
ABSL_FLAG(int, max_pending, 4096,
          "Accepted connections that may wait for a worker with room; more "
          "are closed and counted as overload.");
ABSL_FLAG(absl::Duration, pending_timeout, absl::Seconds(10),
          "Longest a connection waits for a worker before it is closed.");
ABSL_FLAG(absl::Duration, loop_slice, absl::Microseconds(100),
          "Scheduler time slice the data-plane thread asks for (Linux 6.12+ "
          "EEVDF custom slice, 100us..100ms): a short slice lets it preempt "
          "a busy CPU as soon as a connection arrives. 0 keeps the kernel's "
          "default.");
ABSL_FLAG(std::string, metrics, "0.0.0.0:9464",
          "Address of the Prometheus endpoint (GET /metrics), HOST:PORT "
          "(port 0 picks one; empty disables it).");
ABSL_FLAG(std::string, control, "127.0.0.1:50051",
          "Address of the gRPC control plane, HOST:PORT (port 0 picks one; "
          "empty disables it).");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain for the control plane (enables TLS).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls_cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: require and verify client certificates (mTLS).");
ABSL_FLAG(std::vector<std::string>, admin_subjects, {},
          "With --tls_client_ca: comma-separated client-certificate subjects "
          "(e.g. CN=ops) allowed to call mutating RPCs; any verified client "
          "may call the read-only ones.");
ABSL_FLAG(bool, allow_insecure_control, false,
          "Serve the control plane in plaintext on a non-loopback address.");
ABSL_FLAG(bool, upgrade, false,
          "Planned upgrade: take the listening sockets and the workers over "
          "from the broker running on --socket, which then exits.");
ABSL_FLAG(absl::Duration, adopt_grace, absl::Seconds(2),
          "After a broker crash (stale --socket) or with --upgrade: how long "
          "to wait for the previous broker's workers to re-register before "
          "starting new ones.");
ABSL_FLAG(std::string, ready_file, "",
          "Once listening, write key=value lines (listen=, listeners=, "
          "socket=, pid=) to "
          "this file (atomically), for scripts and tests using port 0.");

namespace fdbroker {
namespace {

[[noreturn]] void FlagError(const std::string& message) {
  std::fprintf(stderr, "fdbroker: %s\n", message.c_str());
  std::exit(2);
}

std::string DefaultSocketPath() {
  const char* runtime = ::getenv("XDG_RUNTIME_DIR");
  if (runtime != nullptr && *runtime != '\0') {
    return absl::StrCat(runtime, "/fdbroker.sock");
  }
  return absl::StrCat("/tmp/fdbroker-", ::getuid(), ".sock");
}

// --max_connections_per_worker, --max_connections_jitter, --max_worker_rss,
// --max_worker_age.
absl::Status RecycleOptionsFromFlags(WorkerRecycler::Options& recycle) {
  const int64_t max_connections =
      absl::GetFlag(FLAGS_max_connections_per_worker);
  const int64_t jitter = absl::GetFlag(FLAGS_max_connections_jitter);
  if (max_connections < 0) {
    return absl::InvalidArgumentError(
        "--max_connections_per_worker must be >= 0 (0: never recycle)");
  }
  if (jitter < 0) {
    return absl::InvalidArgumentError("--max_connections_jitter must be >= 0");
  }
  if (jitter > 0 && max_connections == 0) {
    return absl::InvalidArgumentError(
        "--max_connections_jitter needs --max_connections_per_worker");
  }
  recycle.max_connections = static_cast<uint64_t>(max_connections);
  recycle.max_connections_jitter = static_cast<uint64_t>(jitter);
  absl::StatusOr<uint64_t> rss =
      ParseByteSize(absl::GetFlag(FLAGS_max_worker_rss));
  if (!rss.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_worker_rss: ", rss.status().message()));
  }
  if (*rss != 0 && *rss < (uint64_t{1} << 20)) {
    return absl::InvalidArgumentError(
        "--max_worker_rss must be 0 (never) or at least 1MiB");
  }
  recycle.max_rss_bytes = *rss;
  recycle.max_age = absl::GetFlag(FLAGS_max_worker_age);
  if (recycle.max_age != absl::ZeroDuration() &&
      (recycle.max_age < absl::Seconds(1) ||
       recycle.max_age == absl::InfiniteDuration())) {
    return absl::InvalidArgumentError(
        "--max_worker_age must be 0 (never) or a duration of at least 1s "
        "such as 6h");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  if (text.empty()) return 0;
  size_t digits = 0;
  while (digits < text.size() && absl::ascii_isdigit(text[digits])) ++digits;
  uint64_t value = 0;
  if (digits == 0 || digits > 15 ||
      !absl::SimpleAtoi(text.substr(0, digits), &value)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", text, "\" is not a size such as 512MiB, 2G or 1000000"));
  }
  const std::string suffix = absl::AsciiStrToLower(text.substr(digits));
  static constexpr std::pair<const char*, uint64_t> kUnits[] = {
      {"", 1},
      {"b", 1},
      {"k", uint64_t{1} << 10},
      {"kib", uint64_t{1} << 10},
      {"kb", 1000},
      {"m", uint64_t{1} << 20},
      {"mib", uint64_t{1} << 20},
      {"mb", 1000 * 1000},
      {"g", uint64_t{1} << 30},
      {"gib", uint64_t{1} << 30},
      {"gb", 1000 * 1000 * 1000},
      {"t", uint64_t{1} << 40},
      {"tib", uint64_t{1} << 40},
      {"tb", uint64_t{1000} * 1000 * 1000 * 1000}};
  for (const auto& [name, unit] : kUnits) {
    if (suffix != name) continue;
    if (value > (uint64_t{1} << 50) / unit) {
      return absl::InvalidArgumentError(
          absl::StrCat("\"", text, "\" is larger than 1PiB"));
    }
    return value * unit;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown unit \"", text.substr(digits),
      "\" (use B, KiB, MiB, GiB, TiB, K, M, G, T, KB, MB, GB, TB)"));
}

void ParseFlagsOrExit(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "fdbroker: accepts TCP connections and hands each one to a worker "
      "process.\nUsage: fdbroker [--listen=HOST:PORT] [--workers=N] "
      "[--worker_cmd=CMD] ...");
  absl::StatusOr<wire::CommandLine> parsed = wire::ParseFlags(argc, argv);
  if (!parsed.ok()) FlagError(std::string(parsed.status().message()));
  if (*parsed == wire::CommandLine::kHelp) {
    // Let absl print the usage text (and exit) as usual.
    absl::ParseCommandLine(argc, argv);
    std::exit(0);
  }
}

absl::StatusOr<BrokerConfig> ConfigFromFlags(const std::string& self_dir) {
  BrokerConfig config;
  for (const std::string& text : absl::GetFlag(FLAGS_listen).values) {
    absl::StatusOr<ListenSpec> listen = ListenSpec::Parse(text);
    if (!listen.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--listen: ", listen.status().message()));
    }
    config.listen.push_back(*std::move(listen));
  }
  if (config.listen.empty() || config.listen.size() > 64) {
    return absl::InvalidArgumentError("--listen: give 1 to 64 listeners");
  }
  config.listener.proxy_header_timeout =
      absl::GetFlag(FLAGS_proxy_header_timeout);

  config.socket_path = absl::GetFlag(FLAGS_socket);
  if (config.socket_path.empty()) config.socket_path = DefaultSocketPath();
  if (config.socket_path.size() >= 108) {
    return absl::InvalidArgumentError(
        "--socket: path longer than 107 bytes (a Unix socket limit)");
  }

  WorkerManager::Options& manager = config.manager;
  manager.max_workers = absl::GetFlag(FLAGS_max_workers);
  if (manager.max_workers < 1 || manager.max_workers > 1024) {
    return absl::InvalidArgumentError("--max_workers must be in 1..1024");
  }
  manager.target_workers = absl::GetFlag(FLAGS_workers);
  if (manager.target_workers < 0 ||
      manager.target_workers > manager.max_workers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--workers must be in 0..--max_workers (", manager.max_workers, ")"));
  }

  std::string command = absl::GetFlag(FLAGS_worker_cmd);
  if (command.empty()) {
    command = absl::StrCat(self_dir, "/fdbroker-http-worker");
  }
  absl::StatusOr<std::vector<std::string>> argv =
      wire::SplitCommandLine(command);
  if (!argv.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--worker_cmd: ", argv.status().message()));
  }
  config.worker_argv = *std::move(argv);
  if (manager.target_workers > 0 &&
      config.worker_argv[0].find('/') != std::string::npos &&
      ::access(config.worker_argv[0].c_str(), X_OK) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--worker_cmd: ", config.worker_argv[0], " is not an executable"));
  }

  config.policy = absl::GetFlag(FLAGS_policy);
  if (absl::Status s = CreateBalancingPolicy(config.policy).status(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--policy: ", s.message()));
  }

  const std::string placement = absl::GetFlag(FLAGS_placement);
  if (placement != "handoff" && placement != "kernel") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--placement: \"", placement, "\" is not handoff or kernel"));
  }
  config.kernel_placement = placement == "kernel";
  if (config.kernel_placement &&
      (config.listen.size() != 1 || config.listen[0].is_unix() ||
       config.listen[0].proxy_protocol)) {
    return absl::InvalidArgumentError(
        "--placement=kernel needs exactly one TCP --listen without "
        ",proxy_protocol (the workers' listeners join its SO_REUSEPORT "
        "group)");
  }
  config.listener.reuseport = config.kernel_placement;
  using Mode = KernelPlacement::Options::Mode;
  config.kernel.mode =
      config.policy == "ip_hash" ? Mode::kSticky : Mode::kWeighted;
  const absl::Duration rebalance_after =
      absl::GetFlag(FLAGS_kernel_rebalance_after);
  if (rebalance_after < absl::ZeroDuration() ||
      rebalance_after == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(
        "--kernel_rebalance_after must be a duration such as 1s, or 0 (off)");
  }
  if (rebalance_after != absl::Seconds(1) &&
      (!config.kernel_placement || config.kernel.mode == Mode::kSticky)) {
    return absl::InvalidArgumentError(
        "--kernel_rebalance_after applies to --placement=kernel with "
        "--policy=least_conn, p2c or round_robin (ip_hash keeps each client "
        "on its worker)");
  }
  config.kernel.uneven_for = rebalance_after;

  manager.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  manager.rebalance_after_scale = absl::GetFlag(FLAGS_rebalance_after_scale);
  manager.heartbeat_interval = absl::GetFlag(FLAGS_heartbeat_interval);
  manager.heartbeat_timeout = absl::GetFlag(FLAGS_heartbeat_timeout);
  manager.start_timeout = absl::GetFlag(FLAGS_worker_start_timeout);
  manager.ack_timeout = absl::GetFlag(FLAGS_ack_timeout);
  manager.worker_timeout = absl::GetFlag(FLAGS_worker_timeout);
  config.dispatcher.pending_timeout = absl::GetFlag(FLAGS_pending_timeout);
  const std::pair<const char*, absl::Duration> positive[] = {
      {"--drain_timeout", manager.drain_timeout},
      {"--heartbeat_interval", manager.heartbeat_interval},
      {"--heartbeat_timeout", manager.heartbeat_timeout},
      {"--worker_start_timeout", manager.start_timeout},
      {"--ack_timeout", manager.ack_timeout},
      {"--pending_timeout", config.dispatcher.pending_timeout},
      {"--proxy_header_timeout", config.listener.proxy_header_timeout}};
  for (const auto& [name, value] : positive) {
    if (value <= absl::ZeroDuration() || value == absl::InfiniteDuration()) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be a positive duration such as 5s"));
    }
  }
  if (manager.heartbeat_interval < absl::Milliseconds(10) ||
      manager.heartbeat_timeout < 2 * manager.heartbeat_interval) {
    return absl::InvalidArgumentError(
        "--heartbeat_timeout must be at least twice --heartbeat_interval "
        "(and the interval at least 10ms)");
  }
  // Liveness arrives once per heartbeat interval: a shorter timeout would
  // kill healthy workers between two reports.
  if (manager.worker_timeout != absl::ZeroDuration() &&
      (manager.worker_timeout < 2 * manager.heartbeat_interval ||
       manager.worker_timeout == absl::InfiniteDuration())) {
    return absl::InvalidArgumentError(
        "--worker_timeout must be 0 (off) or a duration of at least twice "
        "--heartbeat_interval, such as 30s");
  }
  const int max_pending = absl::GetFlag(FLAGS_max_pending);
  if (max_pending < 0) {
    return absl::InvalidArgumentError("--max_pending must be >= 0");
  }
  config.dispatcher.max_pending = static_cast<size_t>(max_pending);
  config.loop_slice = absl::GetFlag(FLAGS_loop_slice);
  if (config.loop_slice != absl::ZeroDuration() &&
      (config.loop_slice < absl::Microseconds(100) ||
       config.loop_slice > absl::Milliseconds(100))) {
    return absl::InvalidArgumentError(
        "--loop_slice must be 0 (kernel default) or in 100us..100ms");
  }
  if (absl::Status s = RecycleOptionsFromFlags(manager.recycle); !s.ok()) {
    return s;
  }
  config.ready_file = absl::GetFlag(FLAGS_ready_file);
  config.upgrade = absl::GetFlag(FLAGS_upgrade);
  config.adopt_grace = absl::GetFlag(FLAGS_adopt_grace);
  if (config.adopt_grace < absl::ZeroDuration() ||
      config.adopt_grace > absl::Minutes(10)) {
    return absl::InvalidArgumentError("--adopt_grace must be in 0s..10m");
  }

  config.metrics_address = absl::GetFlag(FLAGS_metrics);
  if (!config.metrics_address.empty()) {
    absl::StatusOr<wire::SocketAddress> metrics =
        wire::SocketAddress::Parse(config.metrics_address);
    if (!metrics.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--metrics: ", metrics.status().message()));
    }
  }
  ControlServer::Options& control = config.control;
  control.address = absl::GetFlag(FLAGS_control);
  if (!control.address.empty() &&
      !absl::StartsWith(control.address, "localhost:")) {
    absl::StatusOr<wire::SocketAddress> parsed =
        wire::SocketAddress::Parse(control.address);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--control: ", parsed.status().message()));
    }
  }
  control.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  control.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  control.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  control.allow_insecure = absl::GetFlag(FLAGS_allow_insecure_control);
  config.admin_subjects = absl::GetFlag(FLAGS_admin_subjects);
  if (!config.admin_subjects.empty() && control.tls_client_ca_file.empty()) {
    return absl::InvalidArgumentError(
        "--admin_subjects needs mTLS (--tls_client_ca): without client "
        "certificates there is no subject to check");
  }
  if (control.tls_cert_file.empty() != control.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert and --tls_key must be given together");
  }
  if (!control.tls_client_ca_file.empty() && control.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_client_ca (mTLS) needs --tls_cert and --tls_key");
  }
  if (!control.address.empty() && control.tls_cert_file.empty() &&
      !control.allow_insecure && !IsLoopbackAddress(control.address)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--control=", control.address,
        " is not a loopback address: give --tls_cert and --tls_key, or "
        "--allow_insecure_control to serve plaintext anyway"));
  }
  for (const auto& [flag, path] :
       {std::pair<const char*, const std::string&>{"--tls_cert",
                                                   control.tls_cert_file},
        {"--tls_key", control.tls_key_file},
        {"--tls_client_ca", control.tls_client_ca_file}}) {
    if (!path.empty() && ::access(path.c_str(), R_OK) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": cannot read ", path));
    }
  }
  return config;
}

}  // namespace fdbroker
