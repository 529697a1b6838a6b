#include "wire/socket_address.h"

#include <sys/socket.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace fdbroker::wire {
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

TEST(HostPortTest, SplitsTheOneSyntax) {
  absl::StatusOr<HostPort> v4 = HostPort::Parse("127.0.0.1:41234");
  ASSERT_TRUE(v4.ok());
  EXPECT_EQ(v4->host, "127.0.0.1");
  EXPECT_EQ(v4->port, 41234);
  absl::StatusOr<HostPort> v6 = HostPort::Parse("[::1]:80");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->ToString(), "[::1]:80");
  EXPECT_EQ(HostPort::Parse("example.com:0")->host, "example.com");
  EXPECT_EQ(HostPort::Parse(":8080")->host, "");
  for (const char* bad : {"nohost", "h:99999", "[::1:80", "::1:80",
                          "h:", "h:8o", "h:-1", "h: 80"}) {
    EXPECT_EQ(HostPort::Parse(bad).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(SocketAddressTest, OfABoundSocket) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  absl::StatusOr<SocketAddress> any = SocketAddress::Parse("127.0.0.1:0");
  ASSERT_EQ(::bind(fd, any->addr(), any->length), 0);
  absl::StatusOr<SocketAddress> bound = SocketAddress::Of(fd);
  ASSERT_TRUE(bound.ok());
  EXPECT_NE(bound->port(), 0);
  EXPECT_EQ(bound->ToString(), absl::StrCat("127.0.0.1:", bound->port()));
  EXPECT_FALSE(SocketAddress::Of(fd, /*peer=*/true).ok());  // not connected
  ::close(fd);
}

}  // namespace
}  // namespace fdbroker::wire
