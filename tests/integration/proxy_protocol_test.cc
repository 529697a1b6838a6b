// The PROXY protocol end to end: the real broker with
// --listen=...,proxy_protocol, its real fdbroker-http-worker, and real
// HAProxy in front (send-proxy and send-proxy-v2). The worker's
// X-Client-Address must be the real client (bound to 127.0.0.2, while
// HAProxy reaches the broker from 127.0.0.1); a client that talks to the
// broker directly with garbage, or says nothing, is closed and counted while
// the others are served.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/substitute.h"
#include "gtest/gtest.h"
#include "tests/integration/broker_process.h"
#include "tests/util/subprocess.h"
#include "tests/util/test_util.h"
#include "wire/socket_address.h"

namespace fdbroker::testing {
namespace {

constexpr char kHaproxy[] = "/usr/sbin/haproxy";

// A port free right now on 127.0.0.1 (HAProxy's config needs a number).
int FreePort() {
  wire::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  wire::SocketAddress any = *wire::SocketAddress::Parse("127.0.0.1:0");
  if (::bind(fd.get(), any.addr(), any.length) != 0) return 0;
  absl::StatusOr<wire::SocketAddress> bound = wire::SocketAddress::Of(fd.get());
  return bound.ok() ? bound->port() : 0;
}

// A TCP connection to 127.0.0.1:`port` from 127.0.0.2 (another loopback
// address, so the client is not mistaken for HAProxy); `local` is set to
// the client's own address.
absl::StatusOr<wire::UniqueFd> ConnectFrom127002(int port, std::string& local) {
  wire::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  wire::SocketAddress from = *wire::SocketAddress::Parse("127.0.0.2:0");
  if (::bind(fd.get(), from.addr(), from.length) != 0) {
    return absl::ErrnoToStatus(errno, "bind 127.0.0.2");
  }
  wire::SocketAddress to =
      *wire::SocketAddress::Parse(absl::StrCat("127.0.0.1:", port));
  if (::connect(fd.get(), to.addr(), to.length) != 0) {
    return absl::ErrnoToStatus(errno, "connect");
  }
  absl::StatusOr<wire::SocketAddress> self = wire::SocketAddress::Of(fd.get());
  if (!self.ok()) return self.status();
  local = self->ToString();
  return fd;
}

// Whether the peer closes `fd` within `timeout` (EOF or a reset).
bool ClosedWithin(int fd, absl::Duration timeout) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) <=
      0) {
    return false;
  }
  char buffer[256];
  return ::recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT) <= 0;
}

class ProxyProtocolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access(kHaproxy, X_OK) != 0) GTEST_SKIP() << "no " << kHaproxy;
    absl::StatusOr<std::unique_ptr<BrokerProcess>> broker =
        BrokerProcess::Start({"--listen=127.0.0.1:0,proxy_protocol",
                              "--proxy_header_timeout=1s", "--workers=2"});
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *std::move(broker);
    absl::StatusOr<std::map<std::string, std::string>> ready =
        ReadKeyValueFile(broker_->dir() + "/ready");
    ASSERT_TRUE(ready.ok());
    metrics_ = (*ready)["metrics"];

    v1_port_ = FreePort();
    v2_port_ = FreePort();
    ASSERT_NE(v1_port_, 0);
    ASSERT_NE(v2_port_, 0);
    config_ = broker_->dir() + "/haproxy.cfg";
    std::ofstream(config_) << absl::Substitute(
        R"(global
  maxconn 256
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend v1
  bind 127.0.0.1:$0
  default_backend v1
backend v1
  server broker 127.0.0.1:$2 send-proxy
frontend v2
  bind 127.0.0.1:$1
  default_backend v2
backend v2
  server broker 127.0.0.1:$2 send-proxy-v2
)",
        v1_port_, v2_port_, broker_->port());
    // -db: stay in the foreground, so the pid is HAProxy's own.
    absl::StatusOr<std::unique_ptr<Subprocess>> haproxy =
        Subprocess::Start({kHaproxy, "-db", "-f", config_});
    ASSERT_TRUE(haproxy.ok()) << haproxy.status();
    haproxy_ = *std::move(haproxy);
    // Ready once both frontends answer through the broker.
    for (int port : {v1_port_, v2_port_}) {
      ASSERT_TRUE(WaitFor(
          [&] {
            absl::StatusOr<HttpResponse> r =
                HttpGetOnce("127.0.0.1", port, "/", absl::Seconds(2));
            return r.ok() && r->status == 200;
          },
          absl::Seconds(20), absl::Milliseconds(50)))
          << "HAProxy on " << port << " never answered\n"
          << haproxy_->Output() << broker_->process().Output();
    }
  }

  void TearDown() override {
    if (haproxy_ != nullptr && haproxy_->Running()) {
      (void)haproxy_->Signal(SIGTERM);
      (void)haproxy_->Wait(absl::Seconds(10));
    }
    haproxy_.reset();
    if (broker_ != nullptr) {
      std::string dir = broker_->dir();
      broker_.reset();
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
    }
  }

  // GET / through HAProxy's `port` from 127.0.0.2: the X-Client-Address it
  // answered and the client's own address.
  void ExpectRealClientThrough(int port) {
    std::string local;
    absl::StatusOr<wire::UniqueFd> fd = ConnectFrom127002(port, local);
    ASSERT_TRUE(fd.ok()) << fd.status();
    for (int i = 0; i < 3; ++i) {  // Keep-alive: every response says it.
      absl::StatusOr<HttpResponse> r =
          HttpGet(fd->get(), "/", /*keep_alive=*/true);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->status, 200);
      EXPECT_EQ(r->headers["x-client-address"], local)
          << "through HAProxy port " << port;
    }
  }

  double Rejected(const std::string& reason) {
    absl::StatusOr<std::string> scrape = ScrapeMetrics(metrics_);
    if (!scrape.ok()) return -1;
    return MetricSamples(*scrape)[absl::StrCat(
        "fdbroker_connections_rejected_total{reason=\"", reason, "\"}")];
  }

  std::unique_ptr<BrokerProcess> broker_;
  std::unique_ptr<Subprocess> haproxy_;
  std::string metrics_;
  std::string config_;
  int v1_port_ = 0;
  int v2_port_ = 0;
};

TEST_F(ProxyProtocolTest, XClientAddressIsTheRealClientThroughV1AndV2) {
  ExpectRealClientThrough(v1_port_);
  ExpectRealClientThrough(v2_port_);
}

TEST_F(ProxyProtocolTest, GarbageAndSilentClientsAreClosedAndCounted) {
  const double before = Rejected("proxy_protocol");
  ASSERT_GE(before, 0);
  // Straight to the broker, bypassing HAProxy: no PROXY header.
  absl::StatusOr<wire::UniqueFd> silent =
      ConnectTcp("127.0.0.1", broker_->port());
  ASSERT_TRUE(silent.ok()) << silent.status();
  absl::StatusOr<wire::UniqueFd> garbage =
      ConnectTcp("127.0.0.1", broker_->port());
  ASSERT_TRUE(garbage.ok()) << garbage.status();
  const std::string request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(
      ::send(garbage->get(), request.data(), request.size(), MSG_NOSIGNAL),
      static_cast<ssize_t>(request.size()));
  EXPECT_TRUE(ClosedWithin(garbage->get(), absl::Seconds(5)));
  // While the silent one waits for its deadline, others are served.
  ExpectRealClientThrough(v1_port_);
  ExpectRealClientThrough(v2_port_);
  EXPECT_TRUE(ClosedWithin(silent->get(), absl::Seconds(10)))
      << "--proxy_header_timeout=1s";
  EXPECT_TRUE(WaitFor([&] { return Rejected("proxy_protocol") == before + 2; },
                      absl::Seconds(5)))
      << Rejected("proxy_protocol");
  ExpectRealClientThrough(v2_port_);
}

}  // namespace
}  // namespace fdbroker::testing
