// Worker::Connect(): resolve the socket, register, build the running worker.

#include "fdbroker/worker.h"

#include <unistd.h>

#include <utility>

#include "registration.h"
#include "wire/message_channel.h"
#include "worker_impl.h"

namespace fdbroker::worker {

absl::string_view DrainCauseName(DrainCause cause) {
  switch (cause) {
    case DrainCause::kBrokerRequest:
      return "broker request";
    case DrainCause::kBrokerLost:
      return "broker lost";
    case DrainCause::kLocal:
      return "local";
  }
  return "unknown";
}

absl::string_view ReleaseReasonName(ReleaseReason reason) {
  switch (reason) {
    case ReleaseReason::kRebalance:
      return "rebalance";
    case ReleaseReason::kDrain:
      return "drain";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<Worker>> Worker::Connect(Options options) {
  absl::StatusOr<std::string> socket_path =
      ResolveSocketPath(options.socket_path);
  if (!socket_path.ok()) return socket_path.status();

  v1::HandoffMessage hello;
  v1::Hello& body = *hello.mutable_hello();
  body.mutable_version()->set_major(wire::kProtocolMajor);
  body.mutable_version()->set_minor(wire::kProtocolMinor);
  body.set_pid(static_cast<int32_t>(::getpid()));
  body.set_capacity(options.capacity);
  body.set_max_connections_per_message(options.max_connections_per_message);
  body.set_supports_release(static_cast<bool>(options.on_release_request));
  body.set_supports_listener_grant(options.accept_granted_listener);
  // Heartbeats go out from ProcessEvents(), on the application's loop
  // thread: each one is proof that thread runs.
  body.set_reports_liveness(true);
  for (const auto& [key, value] : options.labels) {
    (*body.mutable_labels())[key] = value;
  }

  wire::SysCalls& sys =
      options.syscalls != nullptr ? *options.syscalls : wire::SysCalls::Real();
  absl::StatusOr<Registration> registration =
      Register(*socket_path, hello, options.connect_timeout, sys);
  if (!registration.ok()) return registration.status();
  // The same Hello (and path) serve a re-registration after broker loss.
  absl::StatusOr<std::unique_ptr<WorkerImpl>> worker =
      WorkerImpl::Create(std::move(options), *std::move(socket_path),
                         std::move(hello), *std::move(registration));
  if (!worker.ok()) return worker.status();
  return std::unique_ptr<Worker>(*std::move(worker));
}

}  // namespace fdbroker::worker
