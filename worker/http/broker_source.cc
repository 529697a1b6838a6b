#include "broker_source.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace fdbroker::http {

absl::StatusOr<std::unique_ptr<BrokerSource>> BrokerSource::Connect(
    worker::Options options, Migration migration) {
  std::unique_ptr<BrokerSource> source(new BrokerSource());
  BrokerSource* self = source.get();
  options.on_connection = [self](worker::ClientConnection connection) {
    if (self->sink_ == nullptr) {
      // Cannot happen: the SDK delivers only inside ProcessEvents().
      const uint64_t id = connection.id;
      connection.fd.Reset();
      self->worker_->ConnectionClosed(id);
      return;
    }
    self->sink_->OnNewConnection(std::move(connection.fd), connection.id,
                                 std::move(connection.initial_data),
                                 std::move(connection.peer_address));
  };
  options.on_drain = [self](worker::DrainCause cause, absl::Time deadline) {
    spdlog::info(
        "draining ({}){}", std::string(worker::DrainCauseName(cause)),
        deadline == absl::InfiniteFuture()
            ? std::string()
            : absl::StrCat(", deadline in ", absl::FormatDuration(absl::Trunc(
                                                 deadline - absl::Now(),
                                                 absl::Milliseconds(1)))));
    if (self->sink_ != nullptr) self->sink_->OnDrain(deadline);
  };
  options.on_release_request = nullptr;
  if (migration == Migration::kOn) {
    options.on_release_request = [self](uint32_t max_connections,
                                        worker::ReleaseReason reason) {
      if (self->sink_ != nullptr) {
        self->sink_->OnReleaseRequest(max_connections, reason);
      }
    };
  }
  source->capacity_ = options.capacity;
  source->socket_path_ = options.socket_path;
  absl::StatusOr<std::unique_ptr<worker::Worker>> worker =
      worker::Worker::Connect(std::move(options));
  if (!worker.ok()) return worker.status();
  source->worker_ = *std::move(worker);
  return source;
}

std::string BrokerSource::Describe() const {
  return absl::StrCat(
      "registered with the broker", socket_path_.empty() ? "" : " at ",
      socket_path_, " as worker ", worker_->worker_id(), " (capacity ",
      capacity_ == 0 ? std::string("unlimited") : absl::StrCat(capacity_), ")");
}

absl::Duration BrokerSource::OnReadable(ConnectionSink& sink) {
  sink_ = &sink;
  worker_->ProcessEvents();
  sink_ = nullptr;
  return absl::ZeroDuration();
}

void BrokerSource::StopTaking(ConnectionSink& sink) {
  // The SDK returns later connections to the broker and says Goodbye once
  // the server has closed the last one.
  worker_->StartDrain();
}

}  // namespace fdbroker::http
