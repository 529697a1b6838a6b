#include "worker_flags.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "wire/command_line.h"
#include "wire/message_channel.h"

ABSL_FLAG(std::string, listen, "",
          "HOST:PORT: run standalone on this address with SO_REUSEPORT "
          "instead of registering with a broker (port 0: any free port)");
ABSL_FLAG(std::string, socket, "",
          "the broker's hand-off socket (default: $FDBROKER_SOCKET)");
ABSL_FLAG(uint32_t, capacity, 0,
          "most connections this worker takes at once; 0 = unlimited");
ABSL_FLAG(absl::Duration, reconnect_timeout, absl::Seconds(30),
          "after losing the broker, keep serving and try this long to "
          "reconnect and re-register (with the connections still owned) "
          "before draining; 0 = drain at once");
ABSL_FLAG(bool, no_release, false,
          "never give connections back to the broker (no Hello."
          "supports_release): a drain closes idle connections");
ABSL_FLAG(bool, no_listener_grant, false,
          "never accept from a listener of the broker's (no Hello."
          "supports_listener_grant): under --placement=kernel it gets "
          "hand-offs");
ABSL_FLAG(std::string, ready_file, "",
          "once serving, write key=value lines here (pid, mode, listen or "
          "worker_id)");

namespace fdbroker::http {
namespace {

constexpr absl::string_view kFlagNames[] = {"listen",     "socket",
                                            "capacity",   "reconnect_timeout",
                                            "no_release", "no_listener_grant",
                                            "ready_file"};

}  // namespace

std::string WorkerUsage() {
  return "usage: fdbroker-http-worker [--listen=HOST:PORT | --socket=PATH] "
         "[--capacity=N] [--reconnect_timeout=DURATION] [--no_release] "
         "[--no_listener_grant] [--ready_file=PATH]\n"
         "  An HTTP/1.1 keep-alive example worker for fdbroker.\n"
         "  --listen=HOST:PORT  run standalone (SO_REUSEPORT), no broker\n"
         "  --socket=PATH       register with the broker at PATH (default "
         "$FDBROKER_SOCKET)\n"
         "  --capacity=N        most connections at once (0 = unlimited)\n"
         "  --reconnect_timeout=D  after losing the broker, keep serving and "
         "re-register\n"
         "                      within D (default 30s; 0: drain at once)\n"
         "  --no_release        never release idle connections to the broker "
         "(drain closes them)\n"
         "  --no_listener_grant  take hand-offs only, even from a broker "
         "with --placement=kernel\n"
         "  --ready_file=PATH   write pid/mode/address here once serving\n";
}

absl::StatusOr<WorkerConfig> ParseWorkerFlags(int argc, char** argv) {
  WorkerConfig config;
  absl::StatusOr<wire::CommandLine> parsed =
      wire::ParseFlags(argc, argv, kFlagNames);
  if (!parsed.ok()) return parsed.status();
  if (*parsed == wire::CommandLine::kHelp) {
    config.help = true;
    return config;
  }

  config.capacity = absl::GetFlag(FLAGS_capacity);
  config.reconnect_timeout = absl::GetFlag(FLAGS_reconnect_timeout);
  if (config.reconnect_timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "invalid --reconnect_timeout: must not be negative");
  }
  config.release = !absl::GetFlag(FLAGS_no_release);
  config.listener_grant = !absl::GetFlag(FLAGS_no_listener_grant);
  config.ready_file = absl::GetFlag(FLAGS_ready_file);
  const std::string listen = absl::GetFlag(FLAGS_listen);
  std::string socket_path = absl::GetFlag(FLAGS_socket);
  if (!listen.empty()) {
    if (!socket_path.empty()) {
      return absl::InvalidArgumentError(
          "--listen (standalone) and --socket (broker) exclude each other");
    }
    absl::StatusOr<wire::HostPort> address = wire::HostPort::Parse(listen);
    if (!address.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("invalid --listen: ", address.status().message()));
    }
    config.listen = *address;
    return config;
  }
  if (socket_path.empty()) {
    const char* from_env = std::getenv(wire::kSocketEnvVar);
    if (from_env != nullptr) socket_path = from_env;
  }
  if (socket_path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "no broker socket: pass --socket=PATH or set ", wire::kSocketEnvVar,
        " to register with a broker, or --listen=HOST:PORT to "
        "run standalone"));
  }
  config.socket_path = socket_path;
  return config;
}

}  // namespace fdbroker::http
