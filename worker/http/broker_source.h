#ifndef FDBROKER_WORKER_HTTP_BROKER_SOURCE_H_
#define FDBROKER_WORKER_HTTP_BROKER_SOURCE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "connection_source.h"
#include "fdbroker/worker.h"
#include "wire/message_channel.h"

namespace fdbroker::http {

// Broker mode: connections come from the broker through the worker SDK in
// event-loop mode. The broker's Drain arrives as OnDrain(); losing the broker
// does not: the SDK keeps the server's connections, reconnects and
// re-registers them (options.reconnect_timeout), and only if that gives up
// does OnDrain() come (cause "broker lost"). It opts into migration: the
// broker's ReleaseRequest arrives as OnReleaseRequest(), and a Drain with
// release_idle makes ReleaseOnDrain() true.
class BrokerSource final : public ConnectionSource {
 public:
  // Registers with the broker (options.socket_path, or FDBROKER_SOCKET).
  // The callbacks in `options` are replaced; with Migration::kOff the worker
  // does not opt into migration (a drain closes idle connections).
  enum class Migration { kOn, kOff };
  static absl::StatusOr<std::unique_ptr<BrokerSource>> Connect(
      worker::Options options, Migration migration = Migration::kOn);

  uint64_t worker_id() const { return worker_->worker_id(); }

  std::string Describe() const override;
  int pollable_fd() const override { return worker_->pollable_fd(); }
  absl::Duration OnReadable(ConnectionSink& sink) override;
  void StopTaking(ConnectionSink& sink) override;
  // Handed by the broker, unlike what the SDK accepted from a granted
  // listener (--placement=kernel), which was never anyone else's.
  bool SharesSocket(uint64_t source_id) const override {
    return (source_id & wire::kWorkerAcceptedIdBit) == 0;
  }
  void ConnectionClosed(uint64_t source_id) override {
    worker_->ConnectionClosed(source_id);
  }
  void ConnectionCut(uint64_t source_id) override {
    worker_->ConnectionCut(source_id);
  }
  bool Finished() const override { return worker_->finished(); }
  bool ReleaseOnDrain() const override { return worker_->release_on_drain(); }
  absl::Status Release(uint64_t source_id, wire::UniqueFd& fd,
                       std::string unread_data,
                       worker::ReleaseReason reason) override {
    return worker_->Release(source_id, fd, std::move(unread_data), reason);
  }

 private:
  BrokerSource() = default;

  std::unique_ptr<worker::Worker> worker_;
  std::string socket_path_;
  uint32_t capacity_ = 0;
  // Set only while ProcessEvents() runs: the SDK's callbacks fire there.
  ConnectionSink* sink_ = nullptr;
};

}  // namespace fdbroker::http

#endif  // FDBROKER_WORKER_HTTP_BROKER_SOURCE_H_
