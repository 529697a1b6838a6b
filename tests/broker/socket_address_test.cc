#include "broker/socket_address.h"

#include "gtest/gtest.h"

namespace fdbroker {
namespace {

TEST(SocketAddressTest, ParsesAndFormats) {
  EXPECT_EQ(SocketAddress::Parse("127.0.0.1:8080")->ToString(),
            "127.0.0.1:8080");
  EXPECT_EQ(SocketAddress::Parse(":0")->ToString(), "0.0.0.0:0");
  EXPECT_EQ(SocketAddress::Parse("localhost:1")->ToString(), "127.0.0.1:1");
  EXPECT_EQ(SocketAddress::Parse("[::1]:443")->ToString(), "[::1]:443");
  EXPECT_TRUE(SocketAddress::Parse("0.0.0.0:80")->IsWildcard());
  EXPECT_FALSE(SocketAddress::Parse("127.0.0.1:80")->IsWildcard());
}

TEST(SocketAddressTest, RejectsBadInputWithAReason) {
  for (const char* bad :
       {"8080", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:-1",
        "example.com:80", "[::1:80", "1.2.3:80", "127.0.0.1:8o"}) {
    absl::StatusOr<SocketAddress> parsed = SocketAddress::Parse(bad);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

}  // namespace
}  // namespace fdbroker
