// BuildPlacementProgram on a real SO_REUSEPORT group of this kernel: the
// program's answer is the group index (listen() order) that receives the
// connection, in proportion to the weights.
#include "broker/kernel_placement.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <array>
#include <vector>

#include "gtest/gtest.h"
#include "tests/util/test_util.h"
#include "wire/unique_fd.h"

namespace fdbroker {
namespace {

#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif

constexpr int kSockets = 3;

class ReuseportGroup {
 public:
  ReuseportGroup() {
    for (int i = 0; i < kSockets; ++i) {
      wire::UniqueFd& s = sockets_[i];
      s.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
      int one = 1;
      ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(static_cast<uint16_t>(port_));
      EXPECT_EQ(
          ::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
      EXPECT_EQ(::listen(s.get(), 256), 0);
      if (i == 0) {
        socklen_t len = sizeof(addr);
        ::getsockname(s.get(), reinterpret_cast<sockaddr*>(&addr), &len);
        port_ = ntohs(addr.sin_port);
      }
    }
  }

  bool Attach(const std::vector<uint64_t>& weights) {
    std::vector<sock_filter> program = BuildPlacementProgram(weights);
    sock_fprog fprog{static_cast<unsigned short>(program.size()),
                     program.data()};
    return ::setsockopt(sockets_[0].get(), SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                        &fprog, sizeof(fprog)) == 0;
  }

  // Connects `n` times; how many connections each socket received.
  std::array<int, kSockets> Connect(int n) {
    std::array<int, kSockets> counts{};
    for (int i = 0; i < n; ++i) {
      absl::StatusOr<wire::UniqueFd> client =
          testing::ConnectTcp("127.0.0.1", port_, absl::Seconds(5));
      EXPECT_TRUE(client.ok()) << client.status();
      std::array<pollfd, kSockets> fds;
      for (int s = 0; s < kSockets; ++s) {
        fds[s] = pollfd{sockets_[s].get(), POLLIN, 0};
      }
      EXPECT_EQ(::poll(fds.data(), kSockets, 5000), 1);
      for (int s = 0; s < kSockets; ++s) {
        if ((fds[s].revents & POLLIN) == 0) continue;
        wire::UniqueFd accepted(
            ::accept4(sockets_[s].get(), nullptr, nullptr, SOCK_CLOEXEC));
        counts[s] += accepted.valid();
      }
    }
    return counts;
  }

 private:
  int port_ = 0;
  std::array<wire::UniqueFd, kSockets> sockets_;
};

TEST(PlacementProgramTest, AllWeightOnOneIndexSendsEveryConnectionThere) {
  ReuseportGroup group;
  for (int target = 0; target < kSockets; ++target) {
    std::vector<uint64_t> weights(kSockets, 0);
    weights[target] = 5;
    ASSERT_TRUE(group.Attach(weights));
    std::array<int, kSockets> counts = group.Connect(30);
    EXPECT_EQ(counts[target], 30) << "target " << target;
  }
}

TEST(PlacementProgramTest, NoWeightSendsEverythingToIndexZero) {
  ReuseportGroup group;
  ASSERT_TRUE(group.Attach({0, 0, 0}));
  EXPECT_EQ(group.Connect(20)[0], 20);
  ASSERT_TRUE(group.Attach({}));
  EXPECT_EQ(group.Connect(20)[0], 20);
}

TEST(PlacementProgramTest, SplitsInProportionToWeights) {
  ReuseportGroup group;
  ASSERT_TRUE(group.Attach({1, 0, 3}));
  std::array<int, kSockets> counts = group.Connect(800);
  EXPECT_EQ(counts[1], 0);
  // Expected 200 : 600; a binomial spread of about 12, so 120..280 is over
  // six standard deviations wide.
  EXPECT_GT(counts[0], 120);
  EXPECT_LT(counts[0], 280);
  EXPECT_EQ(counts[0] + counts[2], 800);
}

TEST(PlacementProgramTest, IsShortAndEndsWithAReturn) {
  std::vector<sock_filter> program = BuildPlacementProgram({2, 0, 1, 1});
  // Load, two (compare, return) pairs for indexes 0 and 2, the last return.
  ASSERT_EQ(program.size(), 6u);
  EXPECT_EQ(program.back().code, BPF_RET | BPF_K);
  EXPECT_EQ(program.back().k, 3u);
  EXPECT_EQ(program[1].k, 0x80000000u);  // Index 0 takes the first half.
  EXPECT_EQ(program[3].k, 0xC0000000u);  // Index 2 the next quarter.
}

}  // namespace
}  // namespace fdbroker
