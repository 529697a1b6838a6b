#include "tests/worker/fake_broker.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"

namespace fdbroker::testing {
namespace {

bool WaitReadable(int fd, absl::Time deadline) {
  for (;;) {
    const absl::Duration left = deadline - absl::Now();
    const int ms = left <= absl::ZeroDuration()
                       ? 0
                       : static_cast<int>(absl::ToInt64Milliseconds(
                             absl::Ceil(left, absl::Milliseconds(1))));
    pollfd p{fd, POLLIN, 0};
    const int n = ::poll(&p, 1, ms);
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) return false;
  }
}

}  // namespace

FakeBroker::FakeBroker() : dir_(MakeTempDir()) {
  socket_path_ = dir_ + "/handoff.sock";
  Listen();
}

void FakeBroker::Listen() {
  listen_fd_.Reset(
      ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  EXPECT_TRUE(listen_fd_.valid());
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, socket_path_.c_str(),
               sizeof(address.sun_path) - 1);
  EXPECT_EQ(::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&address),
                   sizeof(address)),
            0)
      << std::strerror(errno);
  EXPECT_EQ(::listen(listen_fd_.get(), 16), 0) << std::strerror(errno);
}

FakeBroker::~FakeBroker() {
  channel_.reset();
  listen_fd_.Reset();
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

absl::Status FakeBroker::Accept(absl::Duration timeout) {
  if (!listen_fd_.valid())
    return absl::FailedPreconditionError("not listening");
  if (!WaitReadable(listen_fd_.get(), absl::Now() + timeout)) {
    return absl::DeadlineExceededError("no worker connected");
  }
  wire::UniqueFd fd(
      ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!fd) return absl::ErrnoToStatus(errno, "accept4");
  channel_ = std::make_unique<wire::MessageChannel>(std::move(fd));
  sent_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<v1::HandoffMessage> FakeBroker::Receive(absl::Duration timeout) {
  wire::UniqueFd fd;  // Closed on return.
  return Receive(timeout, fd);
}

absl::StatusOr<v1::HandoffMessage> FakeBroker::Receive(absl::Duration timeout,
                                                       wire::UniqueFd& fd) {
  if (channel_ == nullptr) return absl::FailedPreconditionError("no channel");
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    v1::HandoffMessage message;
    fd.Reset();
    absl::StatusOr<wire::ReceiveResult> received =
        channel_->Receive(message, fd);
    if (!received.ok()) return received.status();
    switch (*received) {
      case wire::ReceiveResult::kReceived:
        return message;
      case wire::ReceiveResult::kPeerClosed:
        return absl::UnavailableError("the worker closed the channel");
      case wire::ReceiveResult::kWouldBlock:
        break;
    }
    if (!WaitReadable(channel_->fd(), deadline)) {
      return absl::DeadlineExceededError("no message from the worker");
    }
  }
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
  if (channel_ == nullptr) return absl::FailedPreconditionError("no channel");
  absl::StatusOr<wire::SendResult> sent = channel_->SendWithFds(message, fds);
  if (!sent.ok()) return sent.status();
  if (*sent != wire::SendResult::kSent) {
    return absl::ResourceExhaustedError("channel full");
  }
  ++sent_;
  return absl::OkStatus();
}

absl::Status FakeBroker::SendWelcome(uint32_t heartbeat_interval_ms,
                                     uint32_t heartbeat_timeout_ms,
                                     uint64_t worker_id, bool supervised) {
  v1::HandoffMessage message;
  v1::Welcome& welcome = *message.mutable_welcome();
  welcome.mutable_version()->set_major(wire::kProtocolMajor);
  welcome.mutable_version()->set_minor(wire::kProtocolMinor);
  welcome.set_worker_id(worker_id);
  welcome.set_heartbeat_interval_ms(heartbeat_interval_ms);
  welcome.set_heartbeat_timeout_ms(heartbeat_timeout_ms);
  welcome.set_supervised(supervised);
  return Send(std::move(message));
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

absl::Status FakeBroker::SendRawPacket(const std::string& bytes,
                                       const std::vector<int>& fds) {
  if (channel_ == nullptr) return absl::FailedPreconditionError("no channel");
  absl::StatusOr<wire::SendResult> sent =
      wire::SendPacket(wire::SysCalls::Real(), channel_->fd(),
                       {bytes.data(), bytes.size()}, fds);
  if (!sent.ok()) return sent.status();
  if (*sent != wire::SendResult::kSent) {
    return absl::ResourceExhaustedError("channel full");
  }
  return absl::OkStatus();
}

void FakeBroker::CloseChannel() { channel_.reset(); }

void FakeBroker::StopListening() {
  listen_fd_.Reset();
  EXPECT_EQ(::unlink(socket_path_.c_str()), 0) << std::strerror(errno);
}

void FakeBroker::Restart() {
  CloseChannel();
  StopListening();
  Listen();
}

FakeClient MakeFakeClient() {
  int fds[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  return FakeClient{wire::UniqueFd(fds[0]), wire::UniqueFd(fds[1])};
}

bool ReadsEof(int fd, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  char buffer[256];
  for (;;) {
    if (!WaitReadable(fd, deadline)) return false;
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n == 0) return true;
    if (n < 0 && errno != EAGAIN && errno != EINTR) return true;
  }
}

}  // namespace fdbroker::testing
