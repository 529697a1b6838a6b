// fdbroker: accepts TCP connections and hands each one to a worker process.
#include <limits.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "broker/config.h"
#include "broker/daemon.h"
#include "google/protobuf/stubs/logging.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace {

std::string SelfDirectory() {
  char path[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (n <= 0) return ".";
  std::string self(path, static_cast<size_t>(n));
  return self.substr(0, self.rfind('/'));
}

// libprotobuf logs an ERROR for some malformed input (e.g. a string field
// that is not UTF-8) before the parse fails; the broker already logs one line
// per bad peer with the reason, so a peer sending garbage must not also
// produce protobuf's lines on stderr. Only its fatal errors stay loud.
void RouteProtobufLogs(google::protobuf::LogLevel level, const char* file,
                       int line, const std::string& message) {
  if (level == google::protobuf::LOGLEVEL_FATAL) {
    spdlog::critical("protobuf {}:{}: {}", file, line, message);
  } else {
    spdlog::debug("protobuf {}:{}: {}", file, line, message);
  }
}

// Each connection the broker holds (queued, up to --max_pending, 4096 by
// default; in flight until its Ack) is an fd: the usual soft limit of 1024
// would refuse connections long before the hard limit. The soft limit is
// raised to the hard one; the workers inherit it.
void RaiseFdLimit() {
  rlimit limit;
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 ||
      limit.rlim_cur == limit.rlim_max) {
    return;
  }
  const rlim_t was = limit.rlim_cur;
  limit.rlim_cur = limit.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &limit) == 0) {
    spdlog::info("open file limit raised from {} to {}", was, limit.rlim_cur);
  } else {
    spdlog::warn("cannot raise the open file limit from {}: {}", was,
                 std::strerror(errno));
  }
}

}  // namespace

int main(int argc, char** argv) {
  fdbroker::ParseFlagsOrExit(argc, argv);
  absl::StatusOr<fdbroker::BrokerConfig> config =
      fdbroker::ConfigFromFlags(SelfDirectory());
  if (!config.ok()) {
    std::fprintf(stderr, "fdbroker: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  // Logs go to stderr (stdout stays free for the operator's own use).
  spdlog::set_default_logger(spdlog::stderr_color_mt("fdbroker"));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ fdbroker[%P] %v");
  google::protobuf::SetLogHandler(&RouteProtobufLogs);
  RaiseFdLimit();
  // Signals are taken from a signalfd by the event loop; block them before
  // any thread exists so that every thread inherits the mask.
  const sigset_t signals = fdbroker::BrokerSignals();
  ::pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<std::unique_ptr<fdbroker::Daemon>> daemon =
      fdbroker::Daemon::Create(*config);
  if (!daemon.ok()) {
    spdlog::critical("cannot start: {}", daemon.status().ToString());
    return 1;
  }
  return (*daemon)->Run();
}
