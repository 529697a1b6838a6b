#include "tests/worker/fake_broker.h"

#include <sys/socket.h>

#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {

FakeBroker::FakeBroker() : dir_(MakeTempDir()) {
  absl::StatusOr<std::unique_ptr<conformance::ScriptedBroker>> broker =
      conformance::ScriptedBroker::Create(dir_);
  EXPECT_TRUE(broker.ok()) << broker.status();
  broker_ = *std::move(broker);
  // The test decides what the broker sends and when.
  broker_->set_send_heartbeats(false);
}

FakeBroker::~FakeBroker() {
  broker_.reset();
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

void FakeBroker::Listen() {
  const absl::Status listening = broker_->Listen();
  EXPECT_TRUE(listening.ok()) << listening;
}

void FakeBroker::Restart() {
  CloseChannel();
  StopListening();
  Listen();
}

absl::Status FakeBroker::Accept(absl::Duration timeout) {
  return broker_->Accept(absl::Now() + timeout);
}

absl::StatusOr<v1::HandoffMessage> FakeBroker::Receive(absl::Duration timeout) {
  wire::UniqueFd fd;  // Closed on return.
  return Receive(timeout, fd);
}

absl::StatusOr<v1::HandoffMessage> FakeBroker::Receive(absl::Duration timeout,
                                                       wire::UniqueFd& fd) {
  fd.Reset();
  absl::StatusOr<conformance::ScriptedBroker::Received> received =
      broker_->Receive(absl::Now() + timeout);
  if (!received.ok()) return received.status();
  if (!received->fds.empty()) fd = std::move(received->fds[0]);
  return std::move(received->message);
}

bool FakeBroker::WaitForClose(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    absl::StatusOr<v1::HandoffMessage> message =
        Receive(deadline - absl::Now());
    if (message.ok()) continue;
    return absl::IsUnavailable(message.status());
  }
}

absl::Status FakeBroker::Send(v1::HandoffMessage message, int fd) {
  if (fd < 0) return SendWithFds(std::move(message), {});
  return SendWithFds(std::move(message), {&fd, 1});
}

absl::Status FakeBroker::SendWithFds(v1::HandoffMessage message,
                                     absl::Span<const int> fds) {
  std::vector<uint64_t> offered;
  if (message.has_connection()) {
    offered.push_back(message.connection().connection_id());
  }
  for (const v1::Connection& c : message.connection_batch().connections()) {
    offered.push_back(c.connection_id());
  }
  if (absl::Status sent = broker_->Send(std::move(message), fds); !sent.ok()) {
    return sent;
  }
  for (uint64_t id : offered) broker_->AwaitAnswer(id);
  return absl::OkStatus();
}

absl::Status FakeBroker::SendWelcome(uint32_t heartbeat_interval_ms,
                                     uint32_t heartbeat_timeout_ms,
                                     uint64_t worker_id, bool supervised) {
  broker_->set_heartbeat(absl::Milliseconds(heartbeat_interval_ms),
                         absl::Milliseconds(heartbeat_timeout_ms));
  return broker_->SendWelcome(supervised, worker_id);
}

absl::Status FakeBroker::SendRefusal(v1::RefusalReason reason,
                                     const std::string& text) {
  v1::HandoffMessage message;
  message.mutable_refusal()->set_reason(reason);
  message.mutable_refusal()->set_message(text);
  return Send(std::move(message));
}

namespace {

void FillConnection(uint64_t id, const std::string& initial_data,
                    v1::Connection& connection) {
  connection.set_connection_id(id);
  connection.set_peer_address(absl::StrCat("192.0.2.1:", 40000 + id));
  connection.set_local_address("198.51.100.1:8080");
  connection.set_accept_time_unix_nanos(absl::ToUnixNanos(absl::Now()));
  connection.set_initial_data(initial_data);
}

}  // namespace

absl::Status FakeBroker::SendConnection(uint64_t id, int fd,
                                        const std::string& initial_data) {
  v1::HandoffMessage message;
  FillConnection(id, initial_data, *message.mutable_connection());
  return Send(std::move(message), fd);
}

absl::Status FakeBroker::SendConnectionBatch(const std::vector<uint64_t>& ids,
                                             const std::vector<int>& fds) {
  v1::HandoffMessage message;
  for (uint64_t id : ids) {
    FillConnection(id, "",
                   *message.mutable_connection_batch()->add_connections());
  }
  return SendWithFds(std::move(message), fds);
}

absl::Status FakeBroker::SendDrain(absl::Time deadline, bool release_idle) {
  v1::HandoffMessage message;
  message.mutable_drain()->set_deadline_unix_nanos(
      deadline == absl::InfiniteFuture() ? 0 : absl::ToUnixNanos(deadline));
  message.mutable_drain()->set_release_idle(release_idle);
  return Send(std::move(message));
}

absl::Status FakeBroker::SendReleaseRequest(uint32_t max_connections,
                                            v1::ReleaseReason reason) {
  v1::HandoffMessage message;
  message.mutable_release_request()->set_max_connections(max_connections);
  message.mutable_release_request()->set_reason(reason);
  return Send(std::move(message));
}

absl::Status FakeBroker::SendHeartbeat() {
  v1::HandoffMessage message;
  message.mutable_heartbeat()->set_sent_unix_nanos(
      absl::ToUnixNanos(absl::Now()));
  return Send(std::move(message));
}

FakeClient MakeFakeClient() {
  int fds[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  return FakeClient{wire::UniqueFd(fds[0]), wire::UniqueFd(fds[1])};
}

}  // namespace fdbroker::testing
