#include "worker_flags.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "wire/command_line.h"
#include "wire/message_channel.h"
#include "wire/unique_fd.h"

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
ABSL_FLAG(std::string, ready_file, "",
          "once serving, write key=value lines here (pid, mode, listen or "
          "worker_id)");

namespace fdbroker::http {
namespace {

constexpr absl::string_view kFlagNames[] = {"listen",     "socket",
                                            "capacity",   "reconnect_timeout",
                                            "no_release", "ready_file"};

}  // namespace

std::string WorkerUsage() {
  return "usage: fdbroker-http-worker [--listen=HOST:PORT | --socket=PATH] "
         "[--capacity=N] [--reconnect_timeout=DURATION] [--no_release] "
         "[--ready_file=PATH]\n"
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

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& contents) {
  const std::string temp = absl::StrCat(path, ".tmp.", ::getpid());
  wire::UniqueFd fd(
      ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) return absl::ErrnoToStatus(errno, absl::StrCat("open ", temp));
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n =
        ::write(fd.get(), contents.data() + written, contents.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int error = errno;
      ::unlink(temp.c_str());
      return absl::ErrnoToStatus(error, absl::StrCat("write ", temp));
    }
    written += static_cast<size_t>(n);
  }
  fd.Reset();
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temp.c_str());
    return absl::ErrnoToStatus(error, absl::StrCat("rename to ", path));
  }
  return absl::OkStatus();
}

}  // namespace fdbroker::http
