// fdbroker-http-worker: the example HTTP/1.1 worker of fdbroker.
//
//   fdbroker-http-worker                      # supervised: $FDBROKER_SOCKET
//   fdbroker-http-worker --socket=PATH        # external worker
//   fdbroker-http-worker --listen=HOST:PORT   # standalone (benchmark baseline)
//
// Exit codes: 0 after a clean drain, 1 on a runtime failure (cannot bind,
// broker refused), 2 on a bad command line.

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "broker_source.h"
#include "http_server.h"
#include "listener_source.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#include "wire/files.h"
#include "worker_flags.h"

namespace {

// A worker holds one fd per client: use the hard limit, not the default
// soft limit of 1024.
void RaiseFdLimit() {
  rlimit limit;
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 &&
      limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &limit);
  }
}

int Run(const fdbroker::http::WorkerConfig& config) {
  using fdbroker::http::BrokerSource;
  using fdbroker::http::ListenerSource;
  std::unique_ptr<fdbroker::http::ConnectionSource> source;
  std::string ready = absl::StrCat("pid=", ::getpid(), "\n");
  if (config.listen.has_value()) {
    absl::StatusOr<std::unique_ptr<ListenerSource>> listener =
        ListenerSource::Create(*config.listen);
    if (!listener.ok()) {
      spdlog::error("cannot listen: {}", listener.status().ToString());
      return 1;
    }
    absl::StrAppend(
        &ready, "mode=standalone\nlisten=", (*listener)->bound_address(), "\n");
    source = *std::move(listener);
  } else {
    fdbroker::worker::Options options;
    options.socket_path = config.socket_path;
    options.capacity = config.capacity;
    options.reconnect_timeout = config.reconnect_timeout;
    options.accept_granted_listener = config.listener_grant;
    options.labels["program"] = "fdbroker-http-worker";
    absl::StatusOr<std::unique_ptr<BrokerSource>> broker =
        BrokerSource::Connect(std::move(options),
                              config.release ? BrokerSource::Migration::kOn
                                             : BrokerSource::Migration::kOff);
    if (!broker.ok()) {
      spdlog::error("cannot register with the broker: {}",
                    broker.status().ToString());
      return 1;
    }
    absl::StrAppend(&ready, "mode=broker\nworker_id=", (*broker)->worker_id(),
                    "\nsocket=", config.socket_path, "\n");
    source = *std::move(broker);
  }
  const std::string description = source->Describe();
  absl::StatusOr<std::unique_ptr<fdbroker::http::HttpServer>> server =
      fdbroker::http::HttpServer::Create(std::move(source));
  if (!server.ok()) {
    spdlog::error("cannot start: {}", server.status().ToString());
    return 1;
  }
  spdlog::info("fdbroker-http-worker pid {}: {}", ::getpid(), description);
  if (!config.ready_file.empty()) {
    absl::Status written =
        fdbroker::wire::WriteFileAtomically(config.ready_file, ready);
    if (!written.ok()) {
      spdlog::error("cannot write --ready_file: {}", written.ToString());
      return 1;
    }
  }
  absl::Status served = (*server)->Run();
  if (!served.ok()) {
    spdlog::error("event loop failed: {}", served.ToString());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  spdlog::set_default_logger(spdlog::stderr_color_mt("fdbroker-http-worker"));
  absl::StatusOr<fdbroker::http::WorkerConfig> config =
      fdbroker::http::ParseWorkerFlags(argc, argv);
  if (!config.ok()) {
    std::fprintf(stderr, "fdbroker-http-worker: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  if (config->help) {
    std::fputs(fdbroker::http::WorkerUsage().c_str(), stdout);
    return 0;
  }
  RaiseFdLimit();
  return Run(*config);
}
