#include "broker/peer_credentials.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "tests/util/test_util.h"
#include "wire/socket_address.h"
#include "wire/unique_fd.h"

namespace fdbroker {
namespace {

// A /proc/net with the lines the kernel prints (header, then one socket).
std::string FakeProcNet(const std::string& tcp, const std::string& tcp6) {
  const std::string dir = testing::MakeTempDir();
  const char* header =
      "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
      "retrnsmt   uid  timeout inode\n";
  std::ofstream(dir + "/tcp") << header << tcp;
  std::ofstream(dir + "/tcp6") << header << tcp6;
  return dir;
}

TEST(PeerCredentialsTest, FindsTheClientEndOfAnIpv4Connection) {
  // 127.0.0.1:40000 -> 127.0.0.1:50051 (0xC383), owned by uid 1000; the
  // server's end (local 50051) and another client's socket do not match.
  const std::string dir = FakeProcNet(
      "   0: 0100007F:C383 0100007F:9C40 01 00000000:00000000 00:00000000 "
      "00000000     0        0 1 1 0\n"
      "   1: 0100007F:9C40 0100007F:0050 01 00000000:00000000 00:00000000 "
      "00000000   999        0 2 1 0\n"
      "   2: 0100007F:9C40 0100007F:C383 01 00000000:00000000 00:00000000 "
      "00000000  1000        0 3 1 0\n",
      "");
  absl::StatusOr<uid_t> uid = TcpPeerUid("ipv4:127.0.0.1:40000", 50051, dir);
  ASSERT_TRUE(uid.ok()) << uid.status();
  EXPECT_EQ(*uid, 1000u);
  EXPECT_TRUE(absl::IsNotFound(
      TcpPeerUid("ipv4:127.0.0.1:40001", 50051, dir).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      TcpPeerUid("unix:/run/x.sock", 50051, dir).status()));
}

TEST(PeerCredentialsTest, FindsDualStackAndIpv6Clients) {
  // An IPv4 peer whose client socket is an IPv6 one (::ffff:127.0.0.1), and
  // a [::1] peer (percent-encoded brackets, as newer gRPC prints them).
  const std::string dir =
      FakeProcNet("",
                  "   0: 0000000000000000FFFF00000100007F:9C40 "
                  "0000000000000000FFFF00000100007F:C383 01 00000000:00000000 "
                  "00:00000000 00000000  1001        0 1 1 0\n"
                  "   1: 00000000000000000000000001000000:9C41 "
                  "00000000000000000000000001000000:C383 01 00000000:00000000 "
                  "00:00000000 00000000  1002        0 2 1 0\n");
  absl::StatusOr<uid_t> mapped = TcpPeerUid("ipv4:127.0.0.1:40000", 50051, dir);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_EQ(*mapped, 1001u);
  absl::StatusOr<uid_t> v6 = TcpPeerUid("ipv6:%5B::1%5D:40001", 50051, dir);
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(*v6, 1002u);
}

TEST(PeerCredentialsTest, AReallyConnectedSocketIsFoundAsOurs) {
  wire::UniqueFd server(::socket(AF_INET, SOCK_STREAM, 0));
  wire::SocketAddress any = *wire::SocketAddress::Parse("127.0.0.1:0");
  ASSERT_EQ(::bind(server.get(), any.addr(), any.length), 0);
  ASSERT_EQ(::listen(server.get(), 1), 0);
  wire::SocketAddress bound = *wire::SocketAddress::Of(server.get());
  wire::UniqueFd client(::socket(AF_INET, SOCK_STREAM, 0));
  ASSERT_EQ(::connect(client.get(), bound.addr(), bound.length), 0);
  wire::SocketAddress local = *wire::SocketAddress::Of(client.get());
  absl::StatusOr<uid_t> uid =
      TcpPeerUid("ipv4:" + local.ToString(), bound.port());
  ASSERT_TRUE(uid.ok()) << uid.status();
  EXPECT_EQ(*uid, ::geteuid());
  EXPECT_TRUE(CheckTrustedLocalCaller("ipv4:" + local.ToString(), bound.port(),
                                      ::geteuid())
                  .ok());
  absl::Status other = CheckTrustedLocalCaller("ipv4:" + local.ToString(),
                                               bound.port(), ::geteuid() + 1);
  if (::geteuid() != 0) {
    EXPECT_TRUE(absl::IsPermissionDenied(other)) << other;
  }
}

}  // namespace
}  // namespace fdbroker
