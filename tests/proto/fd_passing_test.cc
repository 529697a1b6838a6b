#include "wire/fd_passing.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/test_util.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker::wire {
namespace {

using ::fdbroker::testing::CountOpenFds;
using ::testing::_;
using ::testing::HasSubstr;
using ::testing::Invoke;
using ::testing::Return;

struct SocketPair {
  UniqueFd sender;
  UniqueFd receiver;
};

SocketPair MakeSocketPair() {
  int fds[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds), 0);
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

struct Pipe {
  UniqueFd read;
  UniqueFd write;
};

Pipe MakePipe() {
  int fds[2];
  EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

// What /proc/self/fd/N points at, e.g. "pipe:[123456]".
std::string FdTarget(int fd) {
  char buf[256];
  const std::string link = absl::StrCat("/proc/self/fd/", fd);
  ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf));
  return n < 0 ? "" : std::string(buf, static_cast<size_t>(n));
}

int OwnFdCount() { return CountOpenFds(::getpid()).value_or(-1); }

absl::Span<const char> Bytes(const std::string& s) {
  return {s.data(), s.size()};
}

// Sends packets of `size` bytes until the socket buffer is full.
int FillSocket(int socket, size_t size) {
  const std::string data(size, 'f');
  for (int sent = 0; sent < 100000; ++sent) {
    absl::StatusOr<SendResult> result =
        SendPacket(SysCalls::Real(), socket, Bytes(data), {});
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok() || *result == SendResult::kWouldBlock) return sent;
  }
  ADD_FAILURE() << "the socket never filled up";
  return -1;
}

class FdCountTest : public ::testing::TestWithParam<int> {};

TEST_P(FdCountTest, ReceivedFdsAreTheSentFiles) {
  const int count = GetParam();
  SocketPair sockets = MakeSocketPair();
  std::vector<Pipe> pipes;
  std::vector<int> raw_fds;
  for (int i = 0; i < count; ++i) {
    pipes.push_back(MakePipe());
    raw_fds.push_back(pipes.back().read.get());
  }
  const std::string data = absl::StrCat("payload with ", count, " fds");

  absl::StatusOr<SendResult> sent =
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes(data), raw_fds);
  ASSERT_TRUE(sent.ok()) << sent.status();
  ASSERT_EQ(*sent, SendResult::kSent);

  Packet packet;
  absl::StatusOr<ReceiveResult> received =
      ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet);
  ASSERT_TRUE(received.ok()) << received.status();
  ASSERT_EQ(*received, ReceiveResult::kReceived);
  EXPECT_EQ(packet.data, data);
  ASSERT_EQ(packet.fds.size(), static_cast<size_t>(count));

  for (int i = 0; i < count; ++i) {
    const int got = packet.fds[i].get();
    SCOPED_TRACE(absl::StrCat("fd #", i, " (", got, ")"));
    // A new descriptor of ours ...
    EXPECT_NE(got, raw_fds[i]);
    EXPECT_EQ(::fcntl(got, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
    // ... for the same file, in the same order.
    EXPECT_EQ(FdTarget(got), FdTarget(raw_fds[i]));
    struct stat sent_stat, got_stat;
    ASSERT_EQ(::fstat(raw_fds[i], &sent_stat), 0);
    ASSERT_EQ(::fstat(got, &got_stat), 0);
    EXPECT_EQ(sent_stat.st_ino, got_stat.st_ino);
    EXPECT_EQ(sent_stat.st_dev, got_stat.st_dev);
    // Bytes written into the pipe come out of the received read end.
    const char c = static_cast<char>('a' + i % 26);
    ASSERT_EQ(::write(pipes[i].write.get(), &c, 1), 1);
    char out = 0;
    ASSERT_EQ(::read(got, &out, 1), 1);
    EXPECT_EQ(out, c);
  }
}

INSTANTIATE_TEST_SUITE_P(Counts, FdCountTest,
                         ::testing::Values(0, 1, 2,
                                           static_cast<int>(kMaxFdsPerPacket)),
                         ::testing::PrintToStringParamName());

TEST(FdPassingTest, MoreThanTheMaximumFdsIsRejectedOnSend) {
  SocketPair sockets = MakeSocketPair();
  Pipe pipe = MakePipe();
  std::vector<int> fds(kMaxFdsPerPacket + 1, pipe.read.get());
  absl::StatusOr<SendResult> sent =
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes("x"), fds);
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kInvalidArgument);
  // Nothing went out.
  Packet packet;
  EXPECT_EQ(ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet)
                .value_or(ReceiveResult::kReceived),
            ReceiveResult::kWouldBlock);
}

TEST(FdPassingTest, LargestPacketRoundTrips) {
  SocketPair sockets = MakeSocketPair();
  std::string data(kMaxPacketBytes, 'x');
  data.back() = 'y';
  ASSERT_EQ(SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes(data), {})
                .value_or(SendResult::kWouldBlock),
            SendResult::kSent);
  Packet packet;
  ASSERT_EQ(ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet)
                .value_or(ReceiveResult::kWouldBlock),
            ReceiveResult::kReceived);
  EXPECT_EQ(packet.data, data);
}

TEST(FdPassingTest, OversizedPacketIsRejectedOnSend) {
  SocketPair sockets = MakeSocketPair();
  const std::string data(kMaxPacketBytes + 1, 'x');
  absl::StatusOr<SendResult> sent =
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes(data), {});
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(sent.status().message(), HasSubstr("exceeds"));
}

// A peer that does not use SendPacket may send anything the kernel allows.
void SendRaw(int socket, const std::string& data, const std::vector<int>& fds) {
  // Large enough for the oversized packets below (the default is ~208 KiB).
  int sndbuf = 4 << 20;
  ::setsockopt(socket, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  ASSERT_EQ(::sendmsg(socket, &msg, MSG_NOSIGNAL),
            static_cast<ssize_t>(data.size()))
      << std::strerror(errno);
}

class OversizedReceiveTest : public ::testing::TestWithParam<size_t> {};

TEST_P(OversizedReceiveTest, IsAnErrorAndClosesItsFds) {
  SocketPair sockets = MakeSocketPair();
  Pipe a = MakePipe();
  Pipe b = MakePipe();
  SendRaw(sockets.sender.get(), std::string(GetParam(), 'x'),
          {a.read.get(), b.read.get(), b.write.get()});
  const int before = OwnFdCount();
  {
    Packet packet;
    absl::StatusOr<ReceiveResult> received =
        ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet);
    EXPECT_EQ(received.status().code(), absl::StatusCode::kInvalidArgument)
        << (received.ok()
                ? "received " + std::to_string(packet.data.size()) + " bytes"
                : received.status().ToString());
  }
  EXPECT_EQ(OwnFdCount(), before) << "the fds of the bad packet leaked";
}

INSTANTIATE_TEST_SUITE_P(Sizes, OversizedReceiveTest,
                         ::testing::Values(kMaxPacketBytes + 1,
                                           kMaxPacketBytes + 2,
                                           size_t{1} << 20));

TEST(FdPassingTest, UnexpectedControlDataIsAnErrorAndClosesTheFds) {
  SocketPair sockets = MakeSocketPair();
  // With SO_PASSCRED the kernel adds SCM_CREDENTIALS to every packet.
  int on = 1;
  ASSERT_EQ(::setsockopt(sockets.receiver.get(), SOL_SOCKET, SO_PASSCRED, &on,
                         sizeof(on)),
            0);
  Pipe pipe = MakePipe();
  const int raw = pipe.read.get();
  ASSERT_TRUE(
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes("x"), {&raw, 1})
          .ok());
  const int before = OwnFdCount();
  {
    Packet packet;
    absl::StatusOr<ReceiveResult> received =
        ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet);
    EXPECT_EQ(received.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(received.status().message(), HasSubstr("ancillary"));
  }
  EXPECT_EQ(OwnFdCount(), before);
}

TEST(FdPassingTest, FdsWithAnEmptyPayloadAreNotPeerClosed) {
  SocketPair sockets = MakeSocketPair();
  Pipe pipe = MakePipe();
  SendRaw(sockets.sender.get(), "", {pipe.read.get()});
  Packet packet;
  EXPECT_EQ(ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet)
                .value_or(ReceiveResult::kPeerClosed),
            ReceiveResult::kReceived);
  EXPECT_EQ(packet.data, "");
  EXPECT_EQ(packet.fds.size(), 1u);
}

TEST(FdPassingTest, ReceiveOnAnEmptySocketWouldBlock) {
  SocketPair sockets = MakeSocketPair();
  Packet packet;
  absl::StatusOr<ReceiveResult> received =
      ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet);
  ASSERT_TRUE(received.ok()) << received.status();
  EXPECT_EQ(*received, ReceiveResult::kWouldBlock);
  EXPECT_TRUE(packet.fds.empty());
}

TEST(FdPassingTest, SendOnAFullSocketWouldBlockUntilTheReceiverReads) {
  SocketPair sockets = MakeSocketPair();
  const int sent = FillSocket(sockets.sender.get(), 4096);
  ASSERT_GT(sent, 0);
  // Still full: an fd-carrying send would block too, and the fd stays ours.
  Pipe pipe = MakePipe();
  const int raw = pipe.read.get();
  EXPECT_EQ(
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes("x"), {&raw, 1})
          .value_or(SendResult::kSent),
      SendResult::kWouldBlock);
  EXPECT_EQ(::fcntl(raw, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);

  Packet packet;
  for (int i = 0; i < sent; ++i) {
    ASSERT_EQ(ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet)
                  .value_or(ReceiveResult::kWouldBlock),
              ReceiveResult::kReceived);
    EXPECT_EQ(packet.data.size(), 4096u);
  }
  EXPECT_EQ(ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet)
                .value_or(ReceiveResult::kReceived),
            ReceiveResult::kWouldBlock);
  EXPECT_EQ(
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes("x"), {&raw, 1})
          .value_or(SendResult::kWouldBlock),
      SendResult::kSent);
}

TEST(FdPassingTest, PeerCloseIsReportedAfterQueuedPackets) {
  SocketPair sockets = MakeSocketPair();
  ASSERT_TRUE(
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes("last"), {})
          .ok());
  sockets.sender.Reset();
  Packet packet;
  EXPECT_EQ(ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet)
                .value_or(ReceiveResult::kWouldBlock),
            ReceiveResult::kReceived);
  EXPECT_EQ(packet.data, "last");
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<ReceiveResult> received =
        ReceivePacket(SysCalls::Real(), sockets.receiver.get(), packet);
    ASSERT_TRUE(received.ok()) << received.status();
    EXPECT_EQ(*received, ReceiveResult::kPeerClosed);
  }
}

int sigpipe_count = 0;
void CountSigpipe(int) { ++sigpipe_count; }

TEST(FdPassingTest, SendToAClosedPeerIsAnErrorWithoutSigpipe) {
  struct sigaction counting {
  }, old{};
  counting.sa_handler = CountSigpipe;
  ASSERT_EQ(::sigaction(SIGPIPE, &counting, &old), 0);
  sigpipe_count = 0;

  SocketPair sockets = MakeSocketPair();
  sockets.receiver.Reset();
  absl::StatusOr<SendResult> sent =
      SendPacket(SysCalls::Real(), sockets.sender.get(), Bytes("x"), {});
  EXPECT_FALSE(sent.ok());
  EXPECT_THAT(sent.status().message(), HasSubstr("sendmsg"));
  EXPECT_EQ(sigpipe_count, 0);
  ::sigaction(SIGPIPE, &old, nullptr);
}

class MockSysCalls : public SysCalls {
 public:
  MOCK_METHOD(ssize_t, SendMsg, (int fd, const msghdr* msg, int flags),
              (override));
  MOCK_METHOD(ssize_t, RecvMsg, (int fd, msghdr* msg, int flags), (override));
  MOCK_METHOD(int, Accept4, (int fd, sockaddr* addr, socklen_t* len, int flags),
              (override));
};

// An action that fails the call with `error`.
auto FailWith(int error) {
  return [error](auto&&...) -> ssize_t {
    errno = error;
    return -1;
  };
}

TEST(FdPassingFakeTest, SendRetriesEintr) {
  MockSysCalls sys;
  EXPECT_CALL(sys, SendMsg(7, _, MSG_NOSIGNAL | MSG_DONTWAIT))
      .WillOnce(Invoke(FailWith(EINTR)))
      .WillOnce(Invoke(FailWith(EINTR)))
      .WillOnce(Return(3));
  absl::StatusOr<SendResult> sent = SendPacket(sys, 7, Bytes("abc"), {});
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_EQ(*sent, SendResult::kSent);
}

TEST(FdPassingFakeTest, SendEagainIsWouldBlock) {
  MockSysCalls sys;
  EXPECT_CALL(sys, SendMsg).WillOnce(Invoke(FailWith(EAGAIN)));
  EXPECT_EQ(SendPacket(sys, 7, Bytes("abc"), {}).value_or(SendResult::kSent),
            SendResult::kWouldBlock);
}

TEST(FdPassingFakeTest, SendEpipeIsAnError) {
  MockSysCalls sys;
  EXPECT_CALL(sys, SendMsg).WillOnce(Invoke(FailWith(EPIPE)));
  absl::StatusOr<SendResult> sent = SendPacket(sys, 7, Bytes("abc"), {});
  EXPECT_FALSE(sent.ok());
}

TEST(FdPassingFakeTest, SendAttachesTheFdsAsOneScmRights) {
  MockSysCalls sys;
  const int fds[] = {11, 12, 13};
  EXPECT_CALL(sys, SendMsg).WillOnce([&](int, const msghdr* msg, int) {
    EXPECT_EQ(msg->msg_iovlen, 1u);
    EXPECT_EQ(std::string(static_cast<char*>(msg->msg_iov[0].iov_base),
                          msg->msg_iov[0].iov_len),
              "abc");
    const cmsghdr* cmsg = CMSG_FIRSTHDR(msg);
    EXPECT_NE(cmsg, nullptr);
    if (cmsg == nullptr) return ssize_t{-1};
    EXPECT_EQ(cmsg->cmsg_level, SOL_SOCKET);
    EXPECT_EQ(cmsg->cmsg_type, SCM_RIGHTS);
    EXPECT_EQ(cmsg->cmsg_len, CMSG_LEN(sizeof(fds)));
    EXPECT_EQ(std::memcmp(CMSG_DATA(cmsg), fds, sizeof(fds)), 0);
    EXPECT_EQ(CMSG_NXTHDR(const_cast<msghdr*>(msg), const_cast<cmsghdr*>(cmsg)),
              nullptr);
    return ssize_t{3};
  });
  EXPECT_TRUE(SendPacket(sys, 7, Bytes("abc"), fds).ok());
}

TEST(FdPassingFakeTest, ReceiveRetriesEintrAndReportsEagain) {
  MockSysCalls sys;
  EXPECT_CALL(sys, RecvMsg(7, _, MSG_CMSG_CLOEXEC | MSG_DONTWAIT))
      .WillOnce(Invoke(FailWith(EINTR)))
      .WillOnce(Invoke(FailWith(EAGAIN)));
  Packet packet;
  EXPECT_EQ(ReceivePacket(sys, 7, packet).value_or(ReceiveResult::kReceived),
            ReceiveResult::kWouldBlock);
}

TEST(FdPassingFakeTest, ReceiveErrorIsAStatus) {
  MockSysCalls sys;
  EXPECT_CALL(sys, RecvMsg).WillOnce(Invoke(FailWith(ECONNRESET)));
  Packet packet;
  absl::StatusOr<ReceiveResult> received = ReceivePacket(sys, 7, packet);
  EXPECT_FALSE(received.ok());
  EXPECT_THAT(received.status().message(), HasSubstr("recvmsg"));
}

TEST(FdPassingFakeTest, TruncatedControlDataIsAnErrorAndClosesWhatArrived) {
  // The kernel sets MSG_CTRUNC when the receiver cannot take every fd (e.g.
  // at RLIMIT_NOFILE); the fds that did arrive must still be closed.
  Pipe pipe = MakePipe();
  const int arrived = ::fcntl(pipe.read.get(), F_DUPFD_CLOEXEC, 0);
  ASSERT_GE(arrived, 0);
  MockSysCalls sys;
  EXPECT_CALL(sys, RecvMsg).WillOnce([&](int, msghdr* msg, int) {
    cmsghdr* cmsg = CMSG_FIRSTHDR(msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &arrived, sizeof(int));
    msg->msg_controllen = CMSG_SPACE(sizeof(int));
    msg->msg_flags = MSG_CTRUNC;
    std::memcpy(msg->msg_iov[0].iov_base, "abc", 3);
    return ssize_t{3};
  });
  {
    Packet packet;
    absl::StatusOr<ReceiveResult> received = ReceivePacket(sys, 7, packet);
    EXPECT_EQ(received.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(received.status().message(), HasSubstr("truncated"));
  }
  EXPECT_EQ(::fcntl(arrived, F_GETFD), -1) << "fd " << arrived << " leaked";
}

}  // namespace
}  // namespace fdbroker::wire
