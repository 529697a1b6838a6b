#include "broker/listener.h"

#include <sys/socket.h>

#include <cerrno>
#include <vector>

#include "gtest/gtest.h"

namespace fdbroker {
namespace {

// accept4 fails with EMFILE for the first `emfile_left` calls, then passes
// through to the kernel.
class ExhaustedSysCalls : public wire::SysCalls {
 public:
  ssize_t SendMsg(int fd, const msghdr* msg, int flags) override {
    return ::sendmsg(fd, msg, flags);
  }
  ssize_t RecvMsg(int fd, msghdr* msg, int flags) override {
    return ::recvmsg(fd, msg, flags);
  }
  int Accept4(int fd, sockaddr* addr, socklen_t* len, int flags) override {
    ++calls;
    if (emfile_left > 0) {
      --emfile_left;
      errno = EMFILE;
      return -1;
    }
    return ::accept4(fd, addr, len, flags);
  }
  int emfile_left = 0;
  int calls = 0;
};

TEST(ListenerTest, FdExhaustionPausesInsteadOfSpinning) {
  auto loop = *EventLoop::Create();
  ExhaustedSysCalls sys;
  sys.emfile_left = 1;
  std::vector<AcceptedConnection> accepted;
  Listener::Options options;
  options.exhaustion_pause = absl::Milliseconds(200);
  auto listener = Listener::Create(
      *loop, *wire::SocketAddress::Parse("127.0.0.1:0"), options, sys,
      [&](AcceptedConnection c) { accepted.push_back(std::move(c)); });
  ASSERT_TRUE(listener.ok()) << listener.status();
  const int port = (*listener)->address().port();
  ASSERT_GT(port, 0);

  wire::UniqueFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(
      ::connect(client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
      0);

  // While paused the socket stays readable, yet accept4 is not retried.
  loop->RunAfter(absl::Milliseconds(100), [&] { loop->Stop(); });
  loop->Run();
  EXPECT_EQ(sys.calls, 1) << "no busy loop on EMFILE";
  EXPECT_EQ((*listener)->stats().exhaustion_pauses, 1u);
  EXPECT_TRUE(accepted.empty());

  // After the pause the waiting client is accepted.
  loop->RunAfter(absl::Milliseconds(300), [&] { loop->Stop(); });
  loop->Run();
  ASSERT_EQ(accepted.size(), 1u);
  EXPECT_EQ(accepted[0].peer.ToString().rfind("127.0.0.1:", 0), 0u);
  EXPECT_EQ(accepted[0].local.port(), port);
}

TEST(ListenerTest, PauseKeepsTheSocketBound) {
  auto loop = *EventLoop::Create();
  std::vector<AcceptedConnection> accepted;
  auto listener = Listener::Create(
      *loop, *wire::SocketAddress::Parse("127.0.0.1:0"), Listener::Options{},
      wire::SysCalls::Real(),
      [&](AcceptedConnection c) { accepted.push_back(std::move(c)); });
  ASSERT_TRUE(listener.ok());
  (*listener)->Pause();
  EXPECT_FALSE((*listener)->accepting());
  wire::UniqueFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>((*listener)->address().port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  // The connect completes against the backlog: not refused.
  ASSERT_EQ(
      ::connect(client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)),
      0);
  loop->RunAfter(absl::Milliseconds(50), [&] { loop->Stop(); });
  loop->Run();
  EXPECT_TRUE(accepted.empty());
  (*listener)->Resume();
  loop->RunAfter(absl::Milliseconds(50), [&] { loop->Stop(); });
  loop->Run();
  EXPECT_EQ(accepted.size(), 1u);
}

}  // namespace
}  // namespace fdbroker
