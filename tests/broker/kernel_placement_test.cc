// BuildPlacementProgram on a real SO_REUSEPORT group of this kernel: the
// program's answer is the group index (listen() order) that receives the
// connection, in proportion to the weights. BuildStickyPlacementProgram the
// same way (connections from distinct 127.0.0.0/8 sources) and through a
// small classic BPF interpreter (IPv6 sources, which loopback cannot vary).
#include "broker/kernel_placement.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "broker/balancing_policy.h"
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
    return Load(BuildPlacementProgram(weights));
  }

  bool Load(std::vector<sock_filter> program) {
    sock_fprog fprog{static_cast<unsigned short>(program.size()),
                     program.data()};
    return ::setsockopt(sockets_[0].get(), SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                        &fprog, sizeof(fprog)) == 0;
  }

  bool AttachSticky(const std::vector<StickyMember>& members) {
    return Load(BuildStickyPlacementProgram(members));
  }

  // Connects `n` times; how many connections each socket received.
  std::array<int, kSockets> Connect(int n) {
    std::array<int, kSockets> counts{};
    for (int i = 0; i < n; ++i) {
      const int s = ConnectFrom("");
      if (s >= 0) ++counts[s];
    }
    return counts;
  }

  // Connects once from `source` (empty: any); the index of the socket that
  // received it, -1 if none did.
  int ConnectFrom(const std::string& source) {
    absl::StatusOr<wire::UniqueFd> client =
        testing::ConnectTcp("127.0.0.1", port_, absl::Seconds(5), source);
    EXPECT_TRUE(client.ok()) << client.status();
    std::array<pollfd, kSockets> fds;
    for (int s = 0; s < kSockets; ++s) {
      fds[s] = pollfd{sockets_[s].get(), POLLIN, 0};
    }
    EXPECT_EQ(::poll(fds.data(), kSockets, 5000), 1);
    int received = -1;
    for (int s = 0; s < kSockets; ++s) {
      if ((fds[s].revents & POLLIN) == 0) continue;
      wire::UniqueFd accepted(
          ::accept4(sockets_[s].get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (accepted.valid()) received = s;
    }
    return received;
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

// Runs the subset of classic BPF the placement programs use over a SYN whose
// IP header is `header` (what SKF_NET_OFF addresses); SKF_AD_RANDOM is not
// supported. Returns the program's answer; fails the test on anything else.
uint32_t RunProgram(const std::vector<sock_filter>& program,
                    const std::vector<uint8_t>& header) {
  uint32_t a = 0;
  uint32_t x = 0;
  const auto load = [&](uint32_t k, size_t size) -> uint32_t {
    const size_t offset = k - static_cast<uint32_t>(SKF_NET_OFF);
    EXPECT_LE(offset + size, header.size()) << "load at " << offset;
    uint32_t value = 0;
    for (size_t i = 0; i < size && offset + i < header.size(); ++i) {
      value = (value << 8) | header[offset + i];
    }
    return value;
  };
  for (size_t pc = 0; pc < program.size(); ++pc) {
    const sock_filter& op = program[pc];
    switch (op.code) {
      case BPF_LD | BPF_W | BPF_ABS:
        a = load(op.k, 4);
        break;
      case BPF_LD | BPF_B | BPF_ABS:
        a = load(op.k, 1);
        break;
      case BPF_MISC | BPF_TAX:
        x = a;
        break;
      case BPF_ALU | BPF_RSH | BPF_K:
        a >>= op.k;
        break;
      case BPF_ALU | BPF_MUL | BPF_K:
        a *= op.k;
        break;
      case BPF_ALU | BPF_XOR | BPF_X:
        a ^= x;
        break;
      case BPF_JMP | BPF_JA:
        pc += op.k;
        break;
      case BPF_JMP | BPF_JEQ | BPF_K:
        pc += a == op.k ? op.jt : op.jf;
        break;
      case BPF_JMP | BPF_JGE | BPF_K:
        pc += a >= op.k ? op.jt : op.jf;
        break;
      case BPF_RET | BPF_K:
        return op.k;
      default:
        ADD_FAILURE() << "unexpected opcode " << op.code << " at " << pc;
        return ~0u;
    }
  }
  ADD_FAILURE() << "ran off the end";
  return ~0u;
}

// The IP header of a SYN from `ip` (only the version and source matter).
std::vector<uint8_t> HeaderFrom(const wire::SocketAddress& ip) {
  if (ip.family() == AF_INET) {
    std::vector<uint8_t> header(20, 0);
    header[0] = 0x45;
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&ip.storage);
    std::memcpy(&header[12], &sin->sin_addr, 4);
    return header;
  }
  std::vector<uint8_t> header(40, 0);
  header[0] = 0x60;
  const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&ip.storage);
  std::memcpy(&header[8], &sin6->sin6_addr, 16);
  return header;
}

wire::SocketAddress Address(const std::string& host_port) {
  absl::StatusOr<wire::SocketAddress> address =
      wire::SocketAddress::Parse(host_port);
  EXPECT_TRUE(address.ok()) << address.status();
  return address.value_or(wire::SocketAddress{});
}

// The group index the sticky program should pick for `peer`.
uint32_t ExpectedIndex(const std::vector<uint32_t>& owners,
                       const wire::SocketAddress& peer) {
  return owners[StickyHash(peer) >> (32 - kStickyBucketBits)];
}

const std::vector<StickyMember> kMembers = {{7, 1, 0}, {9, 1, 1}, {12, 2, 2}};

TEST(StickyPlacementProgramTest, KernelPicksTheOwnerOfTheSourcesBucket) {
  ReuseportGroup group;
  ASSERT_TRUE(group.AttachSticky(kMembers));
  const std::vector<uint32_t> owners = StickyBucketOwners(kMembers);
  std::array<int, kSockets> per_index{};
  for (int host = 2; host < 42; ++host) {
    const std::string source = absl::StrCat("127.0.0.", host);
    const uint32_t expected =
        ExpectedIndex(owners, Address(absl::StrCat(source, ":1")));
    // The same source address lands on the same index every time.
    for (int repeat = 0; repeat < 3; ++repeat) {
      ASSERT_EQ(group.ConnectFrom(source), static_cast<int>(expected))
          << source << " connect " << repeat;
    }
    ++per_index[expected];
  }
  // 40 addresses over weights 1:1:2 reach every index.
  for (int i = 0; i < kSockets; ++i) EXPECT_GT(per_index[i], 0) << i;
}

TEST(StickyPlacementProgramTest, InterpreterAgreesOnIpv4AndIpv6Sources) {
  const std::vector<sock_filter> program =
      BuildStickyPlacementProgram(kMembers);
  const std::vector<uint32_t> owners = StickyBucketOwners(kMembers);
  std::map<uint32_t, int> per_index;
  for (int i = 0; i < 300; ++i) {
    for (const std::string& text :
         {absl::StrCat("10.", i % 7, ".", i / 7, ".", i % 250, ":80"),
          absl::StrCat("[2001:db8::", absl::Hex((i * 7919) & 0xffff), ":", i,
                       "]:80")}) {
      const wire::SocketAddress peer = Address(text);
      const uint32_t index = RunProgram(program, HeaderFrom(peer));
      ASSERT_EQ(index, ExpectedIndex(owners, peer)) << text;
      ++per_index[index];
    }
  }
  EXPECT_EQ(per_index.size(), 3u);
  // An IPv4-mapped address is its IPv4 address (the SYN is IPv4).
  EXPECT_EQ(StickyHash(Address("[::ffff:10.1.2.3]:5")),
            StickyHash(Address("10.1.2.3:6")));
}

TEST(StickyPlacementProgramTest, BucketsFollowWeightsAndMoveOnlyWhenTheirs) {
  const std::vector<uint32_t> before = StickyBucketOwners(kMembers);
  std::array<int, kSockets> share{};
  for (uint32_t owner : before) ++share[owner];
  // 1024 buckets at 1:1:2: 256, 256, 512, a binomial spread of about 14.
  EXPECT_NEAR(share[0], 256, 70);
  EXPECT_NEAR(share[1], 256, 70);
  EXPECT_NEAR(share[2], 512, 80);
  // Index 1 loses its weight (drained, full): only its buckets move.
  std::vector<StickyMember> members = kMembers;
  members[1].weight = 0;
  const std::vector<uint32_t> without = StickyBucketOwners(members);
  for (size_t b = 0; b < before.size(); ++b) {
    if (before[b] != 1) {
      EXPECT_EQ(without[b], before[b]) << b;
    }
    EXPECT_NE(without[b], 1u) << b;
  }
  // A new member takes buckets from the others and moves nothing else.
  members = kMembers;
  members.push_back({20, 1, 3});
  const std::vector<uint32_t> with = StickyBucketOwners(members);
  int taken = 0;
  for (size_t b = 0; b < before.size(); ++b) {
    if (with[b] == 3) {
      ++taken;
    } else {
      EXPECT_EQ(with[b], before[b]) << b;
    }
  }
  EXPECT_NEAR(taken, 1024 / 5, 70);
}

TEST(StickyPlacementProgramTest, NoWeightReturnsIndexZeroAndSizeIsBounded) {
  EXPECT_EQ(BuildStickyPlacementProgram({}).size(), 1u);
  const std::vector<sock_filter> none =
      BuildStickyPlacementProgram({{3, 0, 2}});
  ASSERT_EQ(none.size(), 1u);
  EXPECT_EQ(none[0].k, 0u);
  // One member takes every bucket: a single return.
  EXPECT_EQ(BuildStickyPlacementProgram({{3, 5, 2}})[0].k, 2u);
  // --max_workers' worst case: 64 members, each on its own index.
  std::vector<StickyMember> many;
  for (uint32_t i = 0; i < 64; ++i) many.push_back({i + 1, 1, i});
  const std::vector<sock_filter> program = BuildStickyPlacementProgram(many);
  EXPECT_LE(program.size(), static_cast<size_t>(BPF_MAXINSNS));
  // The kernel's checker takes it (an index beyond the group's sockets
  // would fall back to the kernel's hash; only the attach is tested).
  ReuseportGroup group;
  EXPECT_TRUE(group.Load(program)) << strerror(errno);
  const std::vector<uint32_t> owners = StickyBucketOwners(many);
  for (int i = 0; i < 200; ++i) {
    const wire::SocketAddress peer =
        Address(absl::StrCat("192.168.", i / 200, ".", i % 200, ":1"));
    EXPECT_EQ(RunProgram(program, HeaderFrom(peer)),
              ExpectedIndex(owners, peer));
  }
  std::printf("sticky program for 64 members: %zu instructions\n",
              program.size());
}

}  // namespace
}  // namespace fdbroker
