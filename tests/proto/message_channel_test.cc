#include "wire/message_channel.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"
#include "wire/sanitized.h"

namespace fdbroker::wire {
namespace {

using ::fdbroker::testing::CountOpenFds;
using ::fdbroker::testing::FdTableFull;
using ::google::protobuf::util::MessageDifferencer;
using ::testing::HasSubstr;
using v1::HandoffMessage;

struct Pipe {
  UniqueFd read;
  UniqueFd write;
};

Pipe MakePipe() {
  int fds[2];
  EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

std::string FdTarget(int fd) {
  char buf[256];
  const std::string link = absl::StrCat("/proc/self/fd/", fd);
  ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf));
  return n < 0 ? "" : std::string(buf, static_cast<size_t>(n));
}

int OwnFdCount() { return CountOpenFds(::getpid()).value_or(-1); }

// Two connected channels, plus the raw sending socket for tests that must
// bypass the channel's own checks (a misbehaving peer).
class MessageChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds), 0);
    raw_peer_ = fds[0];
    sender_ = std::make_unique<MessageChannel>(UniqueFd(fds[0]));
    receiver_ = std::make_unique<MessageChannel>(UniqueFd(fds[1]));
  }

  // Sends `message` exactly as given (its sequence included), with `fds`.
  void SendRaw(const HandoffMessage& message, std::vector<int> fds = {}) {
    SendRawBytes(message.SerializeAsString(), std::move(fds));
  }
  void SendRawBytes(const std::string& bytes, std::vector<int> fds = {}) {
    absl::StatusOr<SendResult> sent = SendPacket(
        SysCalls::Real(), raw_peer_, {bytes.data(), bytes.size()}, fds);
    ASSERT_TRUE(sent.ok()) << sent.status();
    ASSERT_EQ(*sent, SendResult::kSent);
  }

  // Receives one message, expecting success.
  HandoffMessage ReceiveOk(UniqueFd* fd = nullptr) {
    HandoffMessage message;
    UniqueFd attached;
    absl::StatusOr<ReceiveResult> result =
        receiver_->Receive(message, attached);
    EXPECT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result.value_or(ReceiveResult::kWouldBlock),
              ReceiveResult::kReceived);
    if (fd != nullptr) *fd = std::move(attached);
    return message;
  }

  // Receives one message, expecting a protocol error.
  absl::Status ReceiveError() {
    HandoffMessage message;
    UniqueFd attached;
    absl::StatusOr<ReceiveResult> result =
        receiver_->Receive(message, attached);
    EXPECT_FALSE(attached.valid());
    if (result.ok()) return absl::OkStatus();
    return result.status();
  }

  HandoffMessage Heartbeat() {
    HandoffMessage message;
    message.mutable_heartbeat()->set_sent_unix_nanos(1);
    return message;
  }

  int raw_peer_ = -1;  // Owned by sender_.
  std::unique_ptr<MessageChannel> sender_;
  std::unique_ptr<MessageChannel> receiver_;
};

// One message of every body type, fully populated.
std::vector<HandoffMessage> EveryBody() {
  std::vector<HandoffMessage> all;
  HandoffMessage m;

  v1::Hello* hello = m.mutable_hello();
  hello->mutable_version()->set_major(kProtocolMajor);
  hello->mutable_version()->set_minor(kProtocolMinor);
  hello->set_pid(1234);
  hello->set_capacity(100);
  (*hello->mutable_labels())["lang"] = "python";
  (*hello->mutable_labels())["zone"] = "a";
  v1::OwnedConnection* owned = hello->add_owned_connections();
  owned->set_connection_id(7);
  owned->set_peer_address("[::1]:5000");
  all.push_back(m);

  m.Clear();
  v1::Welcome* welcome = m.mutable_welcome();
  welcome->mutable_version()->set_major(1);
  welcome->set_worker_id(3);
  welcome->set_heartbeat_interval_ms(1000);
  welcome->set_heartbeat_timeout_ms(5000);
  all.push_back(m);

  m.Clear();
  m.mutable_refusal()->set_reason(v1::REFUSAL_REASON_TOO_MANY_WORKERS);
  m.mutable_refusal()->set_message("64 workers already");
  all.push_back(m);

  m.Clear();
  v1::Connection* connection = m.mutable_connection();
  connection->set_connection_id(42);
  connection->set_peer_address("10.0.0.1:34567");
  connection->set_local_address("10.0.0.2:8080");
  connection->set_accept_time_unix_nanos(1700000000123456789);
  connection->set_initial_data(std::string("GET / HTTP/1.1\r\n\0\xff", 18));
  all.push_back(m);

  m.Clear();
  m.mutable_ack()->add_connection_ids(42);
  m.mutable_ack()->add_connection_ids(43);
  all.push_back(m);

  m.Clear();
  m.mutable_reject()->add_connection_ids(44);
  m.mutable_reject()->set_reason("draining");
  all.push_back(m);

  m.Clear();
  m.mutable_closed()->add_connection_ids(42);
  all.push_back(m);

  m.Clear();
  m.mutable_release()->set_connection_id(43);
  m.mutable_release()->set_unread_data("partial");
  all.push_back(m);

  m.Clear();
  m.mutable_drain()->set_deadline_unix_nanos(1700000030000000000);
  all.push_back(m);

  m.Clear();
  m.mutable_goodbye()->set_reason("drained");
  all.push_back(m);

  m.Clear();
  m.mutable_heartbeat()->set_sent_unix_nanos(1700000000000000000);
  all.push_back(m);
  return all;
}

TEST_F(MessageChannelTest, EveryBodyTypeRoundTrips) {
  const std::vector<HandoffMessage> all = EveryBody();
  ASSERT_EQ(all.size(), 11u);  // A new body type needs a case here.
  uint64_t sequence = 0;
  for (const HandoffMessage& original : all) {
    SCOPED_TRACE(std::string(BodyName(original)));
    ++sequence;
    Pipe pipe = MakePipe();
    const bool with_fd = RequiredFds(original) == 1;
    HandoffMessage to_send = original;
    absl::StatusOr<SendResult> sent =
        sender_->Send(to_send, with_fd ? pipe.read.get() : -1);
    ASSERT_TRUE(sent.ok()) << sent.status();
    ASSERT_EQ(*sent, SendResult::kSent);
    EXPECT_EQ(to_send.sequence(), sequence);

    UniqueFd fd;
    HandoffMessage received = ReceiveOk(&fd);
    HandoffMessage expected = original;
    expected.set_sequence(sequence);
    EXPECT_TRUE(MessageDifferencer::Equals(received, expected))
        << received.DebugString() << " vs " << expected.DebugString();
    EXPECT_EQ(BodyName(received), BodyName(original));
    if (with_fd) {
      ASSERT_TRUE(fd.valid());
      EXPECT_EQ(FdTarget(fd.get()), FdTarget(pipe.read.get()));
      EXPECT_EQ(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
    } else {
      EXPECT_FALSE(fd.valid());
    }
  }
}

TEST(MessageChannelStaticTest, RequiredFdsAndBodyNames) {
  std::vector<std::string> names;
  for (const HandoffMessage& m : EveryBody()) {
    names.emplace_back(BodyName(m));
    const bool carries_fd = m.has_connection() || m.has_release();
    EXPECT_EQ(RequiredFds(m), carries_fd ? 1u : 0u) << BodyName(m);
  }
  EXPECT_THAT(
      names, ::testing::ElementsAre("hello", "welcome", "refusal", "connection",
                                    "ack", "reject", "closed", "release",
                                    "drain", "goodbye", "heartbeat"));
  EXPECT_EQ(BodyName(HandoffMessage()), "none");
}

// Minor 4: a re-registering Hello carries the listener it returns; an
// upgrade hand-over carries the kernel placement slots after the listeners.
TEST(MessageChannelStaticTest, RequiredFdsDependOnTheFields) {
  HandoffMessage hello;
  hello.mutable_hello();
  EXPECT_EQ(RequiredFds(hello), 0u);
  hello.mutable_hello()->set_returns_listener(true);
  EXPECT_EQ(RequiredFds(hello), 1u);
  HandoffMessage handover;
  handover.mutable_upgrade_handover()->add_more_listen_addresses("[::1]:80");
  EXPECT_EQ(RequiredFds(handover), 3u);
  handover.mutable_upgrade_handover()->set_kernel_slots(4);
  EXPECT_EQ(RequiredFds(handover), 7u);
}

TEST_F(MessageChannelTest, SequenceNumbersStartAtOneAndIncrease) {
  for (uint64_t expected = 1; expected <= 5; ++expected) {
    HandoffMessage message = Heartbeat();
    ASSERT_TRUE(sender_->Send(message).ok());
    EXPECT_EQ(message.sequence(), expected);
  }
  for (uint64_t expected = 1; expected <= 5; ++expected) {
    EXPECT_EQ(ReceiveOk().sequence(), expected);
  }
}

TEST_F(MessageChannelTest, SequenceGapIsAnError) {
  HandoffMessage message = Heartbeat();
  message.set_sequence(2);
  SendRaw(message);
  absl::Status status = ReceiveError();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("sequence 2, expected 1"));
}

TEST_F(MessageChannelTest, RepeatedSequenceIsAnError) {
  HandoffMessage message = Heartbeat();
  message.set_sequence(1);
  SendRaw(message);
  SendRaw(message);
  EXPECT_EQ(ReceiveOk().sequence(), 1u);
  absl::Status status = ReceiveError();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("sequence 1, expected 2"));
}

TEST_F(MessageChannelTest, ZeroSequenceIsAnError) {
  HandoffMessage message = Heartbeat();  // sequence unset: 0.
  SendRaw(message);
  EXPECT_EQ(ReceiveError().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(MessageChannelTest, GarbageIsAnError) {
  SendRawBytes("\xff\xff\xff\xff\xff");
  absl::Status status = ReceiveError();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("malformed"));
}

TEST_F(MessageChannelTest, MessageWithoutABodyIsAnError) {
  HandoffMessage message;
  message.set_sequence(1);
  SendRaw(message);
  absl::Status status = ReceiveError();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("without a body"));
}

TEST_F(MessageChannelTest, UnknownBodyFieldIsAnError) {
  // A body from a newer protocol (field 99) parses as "no body".
  HandoffMessage message;
  message.set_sequence(1);
  std::string bytes = message.SerializeAsString();
  bytes += std::string("\x9a\x06\x00", 3);  // Field 99, length-delimited, 0.
  SendRawBytes(bytes);
  EXPECT_EQ(ReceiveError().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(MessageChannelTest, ConnectionWithoutAnFdIsAnError) {
  HandoffMessage message;
  message.set_sequence(1);
  message.mutable_connection()->set_connection_id(1);
  SendRaw(message);
  absl::Status status = ReceiveError();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("carried 0 fds, expected 1"));
}

TEST_F(MessageChannelTest, ConnectionWithTwoFdsIsAnErrorAndClosesBoth) {
  Pipe pipe = MakePipe();
  HandoffMessage message;
  message.set_sequence(1);
  message.mutable_connection()->set_connection_id(1);
  SendRaw(message, {pipe.read.get(), pipe.write.get()});
  const int before = OwnFdCount();
  absl::Status status = ReceiveError();
  EXPECT_THAT(status.message(), HasSubstr("carried 2 fds, expected 1"));
  EXPECT_EQ(OwnFdCount(), before);
}

TEST_F(MessageChannelTest, StrayFdIsAnErrorAndIsClosed) {
  Pipe pipe = MakePipe();
  HandoffMessage message;
  message.set_sequence(1);
  message.mutable_hello()->set_pid(1);
  SendRaw(message, {pipe.read.get()});
  const int before = OwnFdCount();
  absl::Status status = ReceiveError();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("hello #1 carried 1 fds"));
  // Closed at once, not when the channel goes away.
  EXPECT_EQ(OwnFdCount(), before);
}

TEST_F(MessageChannelTest, FdOnGarbageIsClosed) {
  Pipe pipe = MakePipe();
  SendRawBytes("\xff\xff", {pipe.read.get(), pipe.write.get()});
  const int before = OwnFdCount();
  EXPECT_FALSE(ReceiveError().ok());
  EXPECT_EQ(OwnFdCount(), before);
}

TEST_F(MessageChannelTest, SendWithTheWrongFdCountIsRefused) {
  Pipe pipe = MakePipe();
  HandoffMessage connection;
  connection.mutable_connection()->set_connection_id(1);
  EXPECT_FALSE(sender_->Send(connection).ok());
  HandoffMessage hello;
  hello.mutable_hello()->set_pid(1);
  EXPECT_FALSE(sender_->Send(hello, pipe.read.get()).ok());
  HandoffMessage empty;
  EXPECT_FALSE(sender_->Send(empty, pipe.read.get()).ok());

  // Nothing went out and no sequence number was used.
  HandoffMessage message;
  UniqueFd fd;
  EXPECT_EQ(receiver_->Receive(message, fd).value_or(ReceiveResult::kReceived),
            ReceiveResult::kWouldBlock);
  HandoffMessage heartbeat = Heartbeat();
  ASSERT_TRUE(sender_->Send(heartbeat).ok());
  EXPECT_EQ(heartbeat.sequence(), 1u);
  EXPECT_EQ(ReceiveOk().sequence(), 1u);
}

TEST_F(MessageChannelTest, WouldBlockDoesNotConsumeASequenceNumber) {
  uint64_t sent = 0;
  for (;;) {
    HandoffMessage message = Heartbeat();
    absl::StatusOr<SendResult> result = sender_->Send(message);
    ASSERT_TRUE(result.ok()) << result.status();
    if (*result == SendResult::kWouldBlock) break;
    ++sent;
    ASSERT_LT(sent, 1000000u) << "the socket never filled up";
  }
  ASSERT_GT(sent, 0u);
  // The receiver makes room; the retried message takes the next number.
  for (uint64_t i = 1; i <= sent; ++i) EXPECT_EQ(ReceiveOk().sequence(), i);
  HandoffMessage retry = Heartbeat();
  ASSERT_EQ(sender_->Send(retry).value_or(SendResult::kWouldBlock),
            SendResult::kSent);
  EXPECT_EQ(retry.sequence(), sent + 1);
  EXPECT_EQ(ReceiveOk().sequence(), sent + 1);
}

TEST_F(MessageChannelTest, ReceiveReportsWouldBlockAndPeerClosed) {
  HandoffMessage message;
  UniqueFd fd;
  EXPECT_EQ(receiver_->Receive(message, fd).value_or(ReceiveResult::kReceived),
            ReceiveResult::kWouldBlock);
  sender_.reset();
  EXPECT_EQ(receiver_->Receive(message, fd).value_or(ReceiveResult::kReceived),
            ReceiveResult::kPeerClosed);
}

TEST(MessageDecoderTest, AFailedDecodeDoesNotAdvanceTheSequence) {
  MessageDecoder decoder;
  Packet packet;
  HandoffMessage message;
  UniqueFd fd;
  message.set_sequence(2);
  message.mutable_ack()->add_connection_ids(1);
  packet.data = message.SerializeAsString();
  EXPECT_FALSE(decoder.Decode(packet, message, fd).ok());
  EXPECT_EQ(decoder.next_sequence(), 1u);

  message.set_sequence(1);
  packet.data = message.SerializeAsString();
  EXPECT_TRUE(decoder.Decode(packet, message, fd).ok());
  EXPECT_EQ(decoder.next_sequence(), 2u);
  EXPECT_EQ(message.ack().connection_ids(0), 1u);
}

class MockSysCalls : public SysCalls {
 public:
  MOCK_METHOD(ssize_t, SendMsg, (int fd, const msghdr* msg, int flags),
              (override));
  MOCK_METHOD(ssize_t, RecvMsg, (int fd, msghdr* msg, int flags), (override));
  MOCK_METHOD(int, Accept4, (int fd, sockaddr* addr, socklen_t* len, int flags),
              (override));
};

TEST(MessageChannelFakeTest, EagainThenSuccessKeepsTheSequence) {
  MockSysCalls sys;
  std::vector<uint64_t> sequences;
  auto record = [&](int, const msghdr* msg, int) {
    HandoffMessage sent;
    EXPECT_TRUE(sent.ParseFromArray(msg->msg_iov[0].iov_base,
                                    static_cast<int>(msg->msg_iov[0].iov_len)));
    sequences.push_back(sent.sequence());
    return static_cast<ssize_t>(msg->msg_iov[0].iov_len);
  };
  EXPECT_CALL(sys, SendMsg)
      .WillOnce(record)
      .WillOnce([](int, const msghdr*, int) -> ssize_t {
        errno = EAGAIN;
        return -1;
      })
      .WillOnce(record);
  MessageChannel channel(UniqueFd(), sys);
  HandoffMessage first;
  first.mutable_heartbeat();
  EXPECT_EQ(channel.Send(first).value_or(SendResult::kWouldBlock),
            SendResult::kSent);
  HandoffMessage second;
  second.mutable_closed()->add_connection_ids(9);
  EXPECT_EQ(channel.Send(second).value_or(SendResult::kSent),
            SendResult::kWouldBlock);
  EXPECT_EQ(channel.Send(second).value_or(SendResult::kWouldBlock),
            SendResult::kSent);
  EXPECT_THAT(sequences, ::testing::ElementsAre(1u, 2u));
}

// The real kernel, this process out of fds: a Connection arrives with
// MSG_CTRUNC and no fd. By default a protocol error; with
// ReportTruncatedFds() it is kFdsTruncated with the message, its sequence
// number counts, and the channel goes on.
TEST_F(MessageChannelTest, OutOfFdsATruncatedConnectionIsReportedNotAnError) {
  if (wire::kSanitized) {
    GTEST_SKIP() << "a sanitized process out of fds reports false errors "
                    "(wire/sanitized.h); the plain build runs this";
  }
  Pipe pipe = MakePipe();
  HandoffMessage connection;
  connection.mutable_connection()->set_connection_id(42);
  ASSERT_TRUE(sender_->Send(connection, pipe.read.get()).ok());
  HandoffMessage heartbeat = Heartbeat();
  ASSERT_TRUE(sender_->Send(heartbeat).ok());
  ASSERT_TRUE(sender_->Send(connection, pipe.read.get()).ok());
  receiver_->ReportTruncatedFds();
  HandoffMessage message;
  UniqueFd fd;
  absl::StatusOr<ReceiveResult> first;
  {
    FdTableFull full;
    ASSERT_TRUE(full.ok());
    first = receiver_->Receive(message, fd);
  }
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, ReceiveResult::kFdsTruncated);
  EXPECT_FALSE(fd.valid());
  EXPECT_EQ(message.connection().connection_id(), 42u);
  // The channel goes on: the next messages are in sequence.
  EXPECT_TRUE(ReceiveOk().has_heartbeat());
  UniqueFd arrived;
  EXPECT_EQ(ReceiveOk(&arrived).connection().connection_id(), 42u);
  EXPECT_TRUE(arrived.valid());
}

TEST_F(MessageChannelTest, OutOfFdsIsAnErrorUnlessReported) {
  if (wire::kSanitized) {
    GTEST_SKIP() << "a sanitized process out of fds reports false errors "
                    "(wire/sanitized.h); the plain build runs this";
  }
  Pipe pipe = MakePipe();
  HandoffMessage connection;
  connection.mutable_connection()->set_connection_id(42);
  ASSERT_TRUE(sender_->Send(connection, pipe.read.get()).ok());
  absl::Status error;
  {
    FdTableFull full;
    ASSERT_TRUE(full.ok());
    error = ReceiveError();
  }
  EXPECT_THAT(error.message(), HasSubstr("truncated"));
}

// MSG_CTRUNC on a message that carries no fds is still a protocol error.
TEST(MessageDecoderTest, TruncationOfAMessageWithoutFdsIsAnError) {
  Packet packet;
  HandoffMessage heartbeat;
  heartbeat.set_sequence(1);
  heartbeat.mutable_heartbeat();
  packet.data = heartbeat.SerializeAsString();
  MessageDecoder decoder;
  HandoffMessage message;
  EXPECT_FALSE(decoder.DecodeTruncated(packet, message).ok());
  EXPECT_EQ(decoder.next_sequence(), 1u);
}

}  // namespace
}  // namespace fdbroker::wire
