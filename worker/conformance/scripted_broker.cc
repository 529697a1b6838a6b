#include "scripted_broker.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "wire/fd_passing.h"
#include "wire/sys_calls.h"

namespace fdbroker::conformance {
namespace {

// Release.unread_data limit (§5 Release).

int MillisUntil(absl::Time deadline) {
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(
      absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))));
}

std::string Ids(const google::protobuf::RepeatedField<uint64_t>& ids) {
  return absl::StrCat("[", absl::StrJoin(ids, ", "), "]");
}

bool IsBrokerMessage(v1::HandoffMessage::BodyCase body) {
  switch (body) {
    case v1::HandoffMessage::kWelcome:
    case v1::HandoffMessage::kRefusal:
    case v1::HandoffMessage::kConnection:
    case v1::HandoffMessage::kConnectionBatch:
    case v1::HandoffMessage::kDrain:
    case v1::HandoffMessage::kReleaseRequest:
    case v1::HandoffMessage::kUpgradeRequest:
    case v1::HandoffMessage::kUpgradeHandover:
      return true;
    default:
      return false;
  }
}

}  // namespace

absl::Status Violation(absl::string_view rule, absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat(rule, ": ", what));
}

std::string Describe(const v1::HandoffMessage& message) {
  const std::string name(wire::BodyName(message));
  switch (message.body_case()) {
    case v1::HandoffMessage::kAck:
      return absl::StrCat(name, "{", Ids(message.ack().connection_ids()), "}");
    case v1::HandoffMessage::kReject:
      return absl::StrCat(name, "{", Ids(message.reject().connection_ids()),
                          "}");
    case v1::HandoffMessage::kClosed:
      return absl::StrCat(
          name, "{", Ids(message.closed().connection_ids()),
          message.closed().cut_connection_ids_size() > 0
              ? absl::StrCat(" cut ",
                             Ids(message.closed().cut_connection_ids()))
              : "",
          "}");
    case v1::HandoffMessage::kRelease:
      return absl::StrCat(name, "{", message.release().connection_id(), "}");
    default:
      return name;
  }
}

namespace {

absl::StatusOr<wire::UniqueFd> ListenAt(const std::string& path) {
  wire::UniqueFd fd(
      ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return absl::ErrnoToStatus(errno, "socket");
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("socket path too long: ", path));
  }
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&address),
             sizeof(address)) != 0 ||
      ::listen(fd.get(), 16) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("bind/listen ", path));
  }
  return fd;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ScriptedBroker>> ScriptedBroker::Create(
    const std::string& directory) {
  std::string path = absl::StrCat(directory, "/handoff.sock");
  absl::StatusOr<wire::UniqueFd> fd = ListenAt(path);
  if (!fd.ok()) return fd.status();
  return std::unique_ptr<ScriptedBroker>(
      new ScriptedBroker(std::move(path), *std::move(fd)));
}

void ScriptedBroker::StopListening() {
  listen_fd_.Reset();
  ::unlink(socket_path_.c_str());
}

absl::Status ScriptedBroker::Listen() {
  absl::StatusOr<wire::UniqueFd> fd = ListenAt(socket_path_);
  if (!fd.ok()) return fd.status();
  listen_fd_ = *std::move(fd);
  return absl::OkStatus();
}

absl::Status ScriptedBroker::Accept(absl::Time deadline) {
  if (!listen_fd_) return absl::FailedPreconditionError("not listening");
  pollfd p{listen_fd_.get(), POLLIN, 0};
  while (::poll(&p, 1, MillisUntil(deadline)) <= 0) {
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          "the worker did not connect to FDBROKER_SOCKET");
    }
  }
  wire::UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr,
                              SOCK_CLOEXEC | SOCK_NONBLOCK));
  if (!fd) return absl::ErrnoToStatus(errno, "accept4");
  channel_ = std::make_unique<wire::MessageChannel>(std::move(fd));
  sent_ = 0;
  received_count_ = 0;
  reset_seen_ = false;
  last_sent_ = absl::Now();
  hello_.Clear();
  owned_.clear();
  unanswered_.clear();
  finished_.clear();
  goodbye_ = false;
  return absl::OkStatus();
}

bool ScriptedBroker::ConnectPending() const {
  pollfd p{listen_fd_.get(), POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

void ScriptedBroker::CloseChannel() { channel_.reset(); }

absl::StatusOr<ScriptedBroker::Received> ScriptedBroker::Receive(
    absl::Time deadline) {
  if (channel_ == nullptr) return absl::UnavailableError("no channel");
  for (;;) {
    absl::Time wake = deadline;
    const bool heartbeats = send_heartbeats_ && received_count_ > 0 &&
                            hello_.has_version() && sent_ > 0;
    if (heartbeats) wake = std::min(wake, last_sent_ + heartbeat_interval_);
    pollfd p{channel_->fd(), POLLIN, 0};
    const int n = ::poll(&p, 1, MillisUntil(wake));
    if (n < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "poll");
    if (n > 0) {
      Received received;
      absl::StatusOr<wire::ReceiveResult> result =
          channel_->Receive(received.message, received.fds);
      if (!result.ok() && absl::IsUnavailable(result.status())) {
        // ECONNRESET: the worker closed the channel with packets of the
        // kit's unread (a Connection that crossed its Goodbye). The kernel
        // says so once, ahead of what the worker sent before closing: read
        // that too, as the broker does (§7.2), then the end of the channel.
        if (!reset_seen_) {
          reset_seen_ = true;
          continue;
        }
        channel_.reset();
        return absl::UnavailableError(absl::StrCat(
            "the worker closed the channel (", result.status().message(), ")"));
      }
      if (!result.ok()) {
        const absl::string_view text = result.status().message();
        // The wire library's messages name what broke (message_channel.cc).
        const auto has = [&](absl::string_view word) {
          return text.find(word) != absl::string_view::npos;
        };
        return Violation(has("fds, expected") ? "§3 File descriptors"
                         : has("sequence") || has("malformed") || has("body")
                             ? "§4 Sequence numbers"
                             : "§2 Framing",
                         text);
      }
      if (*result == wire::ReceiveResult::kPeerClosed) {
        channel_.reset();
        return absl::UnavailableError("the worker closed the channel");
      }
      if (*result == wire::ReceiveResult::kWouldBlock) continue;
      received.when = absl::Now();
      ++received_count_;
      if (absl::Status ok = Check(received); !ok.ok()) return ok;
      return received;
    }
    if (heartbeats && absl::Now() >= last_sent_ + heartbeat_interval_) {
      v1::HandoffMessage beat;
      beat.mutable_heartbeat()->set_sent_unix_nanos(
          absl::GetCurrentTimeNanos());
      if (absl::Status s = Send(std::move(beat)); !s.ok()) {
        channel_.reset();
        return absl::UnavailableError(
            absl::StrCat("the channel broke: ", s.message()));
      }
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError("nothing received");
    }
  }
}

absl::Status ScriptedBroker::Check(const Received& received) {
  const v1::HandoffMessage& m = received.message;
  if (goodbye_) {
    return Violation("§5 Goodbye", absl::StrCat("sent ", Describe(m),
                                                " after Goodbye, which "
                                                "promises nothing else"));
  }
  if (received_count_ == 1 && !m.has_hello()) {
    return Violation(
        "§7.1 Registration",
        absl::StrCat("the first message was ", Describe(m), ", not Hello"));
  }
  if (IsBrokerMessage(m.body_case())) {
    return Violation(
        "§5 Messages",
        absl::StrCat("sent ", Describe(m), ", a broker-to-worker message"));
  }
  const auto check_answer = [&](const auto& ids, absl::string_view what) {
    for (uint64_t id : ids) {
      if (unanswered_.erase(id) == 0) {
        return Violation(
            absl::StrCat("§5 ", what),
            absl::StrCat(what, " for connection ", id,
                         owned_.count(id) || finished_.count(id)
                             ? ", which was already answered"
                             : ", which was never sent to this worker"));
      }
    }
    return absl::OkStatus();
  };
  switch (m.body_case()) {
    case v1::HandoffMessage::kHello:
      if (received_count_ != 1) {
        return Violation("§6 Session state machine",
                         "a second Hello on the same channel");
      }
      hello_ = m.hello();
      for (const v1::OwnedConnection& owned : hello_.owned_connections()) {
        owned_.insert(owned.connection_id());
      }
      return absl::OkStatus();
    case v1::HandoffMessage::kAck:
      if (absl::Status s = check_answer(m.ack().connection_ids(), "Ack");
          !s.ok()) {
        return s;
      }
      for (uint64_t id : m.ack().connection_ids()) owned_.insert(id);
      return absl::OkStatus();
    case v1::HandoffMessage::kReject:
      return check_answer(m.reject().connection_ids(), "Reject");
    case v1::HandoffMessage::kClosed:
      // cut_connection_ids (minor 4): closed too, each id in one list only.
      for (const auto* ids :
           {&m.closed().connection_ids(), &m.closed().cut_connection_ids()}) {
        for (uint64_t id : *ids) {
          if (owned_.erase(id) == 0) {
            return Violation(
                "§7.3 Closed",
                absl::StrCat("Closed for connection ", id,
                             finished_.count(id)
                                 ? ", already reported Closed or Released"
                                 : ", which the worker does not own"));
          }
          finished_.insert(id);
        }
      }
      return absl::OkStatus();
    case v1::HandoffMessage::kRelease: {
      const uint64_t id = m.release().connection_id();
      if (!hello_.supports_release()) {
        return Violation("§5 Release",
                         "Release from a worker whose Hello did not set "
                         "supports_release");
      }
      if (owned_.erase(id) == 0) {
        return Violation("§5 Release",
                         absl::StrCat("Release of connection ", id,
                                      ", which the worker does not own"));
      }
      if (m.release().unread_data().size() > wire::kMaxUnreadData) {
        return Violation(
            "§5 Release",
            absl::StrCat("unread_data of ", m.release().unread_data().size(),
                         " bytes (limit 65024)"));
      }
      finished_.insert(id);
      return absl::OkStatus();
    }
    case v1::HandoffMessage::kGoodbye:
      if (!owned_.empty()) {
        return Violation(
            "§5 Goodbye",
            absl::StrCat("Goodbye while still owning ", owned_.size(),
                         " connection(s) (no Closed or Release for them)"));
      }
      goodbye_ = true;
      return absl::OkStatus();
    case v1::HandoffMessage::kHeartbeat:
      return absl::OkStatus();
    case v1::HandoffMessage::kListenerLoad:
      if (!listener_load_expected_) {
        return Violation("§7.10 Listener grant",
                         "ListenerLoad, but the Welcome's "
                         "listener_load_interval_ms was 0");
      }
      return absl::OkStatus();
    default:
      return Violation("§5 Messages",
                       absl::StrCat("unexpected message ", Describe(m)));
  }
}

absl::Status ScriptedBroker::Send(v1::HandoffMessage message,
                                  absl::Span<const int> fds) {
  if (channel_ == nullptr) return absl::UnavailableError("no channel");
  absl::StatusOr<wire::SendResult> result = channel_->SendWithFds(message, fds);
  if (!result.ok()) return result.status();
  if (*result == wire::SendResult::kWouldBlock) {
    return absl::ResourceExhaustedError("the worker's channel is full");
  }
  ++sent_;
  last_sent_ = absl::Now();
  return absl::OkStatus();
}

absl::Status ScriptedBroker::SendWelcome(bool supervised, uint64_t worker_id,
                                         uint32_t listener_load_interval_ms,
                                         bool listener_kept) {
  v1::HandoffMessage message;
  v1::Welcome* welcome = message.mutable_welcome();
  welcome->mutable_version()->set_major(wire::kProtocolMajor);
  welcome->mutable_version()->set_minor(wire::kProtocolMinor);
  welcome->set_worker_id(worker_id);
  welcome->set_heartbeat_interval_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(heartbeat_interval_)));
  welcome->set_heartbeat_timeout_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(heartbeat_timeout_)));
  welcome->set_supervised(supervised);
  welcome->set_listener_load_interval_ms(listener_load_interval_ms);
  welcome->set_listener_kept(listener_kept);
  listener_load_expected_ = listener_load_interval_ms > 0;
  welcome->set_worker_timeout_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(worker_timeout_)));
  return Send(std::move(message));
}

absl::Status ScriptedBroker::SendConnection(uint64_t id, int fd,
                                            const std::string& peer_address,
                                            const std::string& local_address,
                                            const std::string& initial_data) {
  v1::HandoffMessage message;
  v1::Connection* connection = message.mutable_connection();
  connection->set_connection_id(id);
  connection->set_peer_address(peer_address);
  connection->set_local_address(local_address);
  connection->set_accept_time_unix_nanos(absl::GetCurrentTimeNanos());
  connection->set_initial_data(initial_data);
  const int fds[] = {fd};
  if (absl::Status s = Send(std::move(message), fds); !s.ok()) return s;
  unanswered_.insert(id);
  return absl::OkStatus();
}

absl::Status ScriptedBroker::SendDrain(absl::Time deadline, bool release_idle) {
  v1::HandoffMessage message;
  message.mutable_drain()->set_deadline_unix_nanos(absl::ToUnixNanos(deadline));
  message.mutable_drain()->set_release_idle(release_idle);
  return Send(std::move(message));
}

absl::Status ScriptedBroker::SendRaw(const std::string& bytes,
                                     absl::Span<const int> fds) {
  if (channel_ == nullptr) return absl::UnavailableError("no channel");
  absl::StatusOr<wire::SendResult> result = wire::SendPacket(
      wire::SysCalls::Real(), channel_->fd(), absl::MakeConstSpan(bytes), fds);
  if (!result.ok()) return result.status();
  if (*result == wire::SendResult::kWouldBlock) {
    return absl::ResourceExhaustedError("the worker's channel is full");
  }
  last_sent_ = absl::Now();
  return absl::OkStatus();
}

absl::Status ScriptedBroker::SendOversized(const std::string& bytes, int fd) {
  if (channel_ == nullptr) return absl::UnavailableError("no channel");
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
  if (::sendmsg(channel_->fd(), &msg, MSG_NOSIGNAL) < 0) {
    return absl::ErrnoToStatus(errno, "sendmsg (oversized packet)");
  }
  last_sent_ = absl::Now();
  return absl::OkStatus();
}

}  // namespace fdbroker::conformance
