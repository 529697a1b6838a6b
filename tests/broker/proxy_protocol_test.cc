// The PROXY protocol: the parser on every valid and malformed form, and the
// broker's reading stage over real sockets in simulated time (partial
// headers, the deadline, garbage, the client's bytes left in the socket).
#include "broker/proxy_protocol.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "broker/listener.h"
#include "gtest/gtest.h"
#include "tests/broker/simulated_time.h"
#include "wire/sys_calls.h"

namespace fdbroker {
namespace {

using Status = ProxyHeader::Status;

std::string Bytes(std::initializer_list<int> bytes) {
  std::string out;
  for (int b : bytes) out.push_back(static_cast<char>(b));
  return out;
}

const std::string kV2Signature = Bytes(
    {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A});

// A v2 header: version/command byte, family byte, then `block` (addresses
// and TLVs), with the length field filled in.
std::string V2(int ver_cmd, int family, const std::string& block) {
  return kV2Signature + Bytes({ver_cmd, family}) +
         Bytes({static_cast<int>(block.size() >> 8),
                static_cast<int>(block.size() & 0xFF)}) +
         block;
}

// 192.0.2.1:56324 -> 198.51.100.2:443, and a TLV (PP2_TYPE_AUTHORITY).
const std::string kV2Inet =
    V2(0x21, 0x11,
       Bytes({192, 0, 2, 1, 198, 51, 100, 2, 0xDC, 0x04, 0x01, 0xBB}) +
           Bytes({0x02, 0x00, 0x03}) + "a.b");
// [2001:db8::1]:1 -> [::1]:65535.
const std::string kV2Inet6 =
    V2(0x21, 0x21,
       Bytes({0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}) +
           Bytes({0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}) +
           Bytes({0x00, 0x01, 0xFF, 0xFF}));
const std::string kV2Local = V2(0x20, 0x00, "");
const std::string kV2LocalWithBlock =
    V2(0x20, 0x11, Bytes({1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2}));
const std::string kV2Unspec = V2(0x21, 0x00, "");
const std::string kV2Unix = V2(0x21, 0x31, std::string(216, '\0'));

struct Valid {
  std::string header;
  bool has_addresses;
  std::string source;
  std::string destination;
};

std::vector<Valid> ValidHeaders() {
  return {
      {"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", true,
       "192.0.2.1:56324", "198.51.100.2:443"},
      {"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", true, "0.0.0.0:0",
       "255.255.255.255:65535"},
      {"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n", true, "[2001:db8::1]:1",
       "[::1]:65535"},
      // The longest v1 header there is (104 bytes).
      {"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
       "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
       true, "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
       "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"},
      {"PROXY UNKNOWN\r\n", false, "", ""},
      {"PROXY UNKNOWN ffff:: 1.2.3.4 1 2\r\n", false, "", ""},
      {kV2Inet, true, "192.0.2.1:56324", "198.51.100.2:443"},
      {kV2Inet6, true, "[2001:db8::1]:1", "[::1]:65535"},
      {kV2Local, false, "", ""},
      {kV2LocalWithBlock, false, "", ""},
      {kV2Unspec, false, "", ""},
      {kV2Unix, false, "", ""},
  };
}

TEST(ProxyHeaderTest, ParsesEveryValidForm) {
  for (const Valid& valid : ValidHeaders()) {
    SCOPED_TRACE(absl::CEscape(valid.header));
    const ProxyHeader header = ParseProxyHeader(valid.header);
    ASSERT_EQ(header.status, Status::kComplete) << header.error;
    EXPECT_EQ(header.length, valid.header.size());
    EXPECT_EQ(header.has_addresses, valid.has_addresses);
    if (valid.has_addresses) {
      EXPECT_EQ(header.source.ToString(), valid.source);
      EXPECT_EQ(header.destination.ToString(), valid.destination);
    }
  }
}

TEST(ProxyHeaderTest, TheClientsBytesAfterTheHeaderAreNotPartOfIt) {
  for (const Valid& valid : ValidHeaders()) {
    SCOPED_TRACE(absl::CEscape(valid.header));
    const ProxyHeader header =
        ParseProxyHeader(valid.header + "GET / HTTP/1.1\r\n\r\n");
    ASSERT_EQ(header.status, Status::kComplete) << header.error;
    EXPECT_EQ(header.length, valid.header.size());
  }
}

TEST(ProxyHeaderTest, EveryProperPrefixIsIncomplete) {
  for (const Valid& valid : ValidHeaders()) {
    for (size_t n = 0; n < valid.header.size(); ++n) {
      SCOPED_TRACE(absl::CEscape(valid.header.substr(0, n)));
      EXPECT_EQ(ParseProxyHeader(valid.header.substr(0, n)).status,
                Status::kIncomplete);
    }
  }
}

TEST(ProxyHeaderTest, RejectsEveryMalformedForm) {
  const std::string inet_block =
      Bytes({192, 0, 2, 1, 198, 51, 100, 2, 0xDC, 0x04, 0x01, 0xBB});
  using std::string_literals::operator""s;
  const std::vector<std::string> malformed = {
      "GET / HTTP/1.1\r\n",  // No PROXY header at all.
      "\x16\x03\x01",        // A TLS ClientHello.
      "PROXX",
      "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
      "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
      "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
      "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
      "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
      "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
      "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
      "PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
      "PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
      "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
      "PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
      "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
      "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
      "PROXY TCP4 1.2.3.4\0 5.6.7.8 1 2\r\n"s,
      "PROXY \r\n",
      "PROXY " + std::string(101, 'x'),                 // 107 bytes, no CRLF.
      "PROXY UNKNOWN" + std::string(94, ' ') + "\r\n",  // CRLF past 107.
      kV2Signature.substr(0, 5) + "X",
      V2(0x11, 0x11, inet_block),               // Version 1 in a v2 header.
      V2(0x22, 0x11, inet_block),               // Command 2.
      V2(0x21, 0x41, inet_block),               // Family 4.
      V2(0x21, 0x13, inet_block),               // Transport 3.
      V2(0x21, 0x11, inet_block.substr(0, 8)),  // Short INET block.
      V2(0x21, 0x21, inet_block),               // Short INET6 block.
      V2(0x21, 0x31, std::string(100, '\0')),   // Short UNIX block.
      // 16 + 521 bytes: over the bound (decided from the length field).
      kV2Signature + Bytes({0x21, 0x11, 0x02, 0x09}),
  };
  for (const std::string& data : malformed) {
    SCOPED_TRACE(absl::CEscape(data));
    const ProxyHeader header = ParseProxyHeader(data);
    EXPECT_EQ(header.status, Status::kInvalid);
    EXPECT_FALSE(header.error.empty());
  }
}

TEST(ProxyHeaderTest, TheLargestV2HeaderIsAccepted) {
  // 16 + 520 bytes: addresses and TLVs up to the bound.
  std::string block =
      Bytes({192, 0, 2, 1, 198, 51, 100, 2, 0xDC, 0x04, 0x01, 0xBB});
  block += Bytes({0x04, 0x01, 0xF9}) + std::string(505, 'x');  // PP2_TYPE_NOOP
  const std::string header = V2(0x21, 0x11, block);
  ASSERT_EQ(header.size(), kProxyHeaderMaxBytes);
  EXPECT_EQ(ParseProxyHeader(header).status, Status::kComplete);
}

// --- The reading stage, over socketpairs, in simulated time. --------------

class ProxyProtocolReaderTest : public ::testing::Test {
 protected:
  ProxyProtocolReaderTest()
      : reader_(
            time_.loop(), absl::Seconds(3),
            [this](AcceptedConnection c) { ready_.push_back(std::move(c)); },
            [this](absl::string_view why) {
              rejected_.push_back(std::string(why));
            }) {}

  // A connection accepted now; returns the client's end.
  wire::UniqueFd Accept() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    AcceptedConnection conn;
    conn.fd.Reset(sv[0]);
    conn.peer = *wire::SocketAddress::Parse("10.0.0.1:1000");
    conn.local = *wire::SocketAddress::Parse("10.0.0.2:80");
    reader_.Start(std::move(conn));
    return wire::UniqueFd(sv[1]);
  }
  static void Send(const wire::UniqueFd& client, absl::string_view data) {
    ASSERT_EQ(::send(client.get(), data.data(), data.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(data.size()));
  }
  // The broker's end is closed: the client reads EOF, or a reset if the
  // broker closed with the client's bytes unread.
  static bool Closed(const wire::UniqueFd& client) {
    char c;
    const ssize_t n = ::recv(client.get(), &c, 1, MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno == ECONNRESET);
  }
  // What the worker would read from a connection the stage handed on.
  static std::string Unread(const AcceptedConnection& c) {
    char buffer[256];
    const ssize_t n = ::recv(c.fd.get(), buffer, sizeof(buffer), MSG_DONTWAIT);
    return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : "";
  }

  SimulatedTime time_;
  std::vector<AcceptedConnection> ready_;
  std::vector<std::string> rejected_;
  ProxyProtocolReader reader_;
};

TEST_F(ProxyProtocolReaderTest, ByteByByteEveryFormThenTheClientsBytesStay) {
  for (const Valid& valid : ValidHeaders()) {
    SCOPED_TRACE(absl::CEscape(valid.header));
    ready_.clear();
    wire::UniqueFd client = Accept();
    for (char c : valid.header) {
      EXPECT_TRUE(ready_.empty());
      Send(client, absl::string_view(&c, 1));
      time_.RunUntilIdle();
    }
    ASSERT_EQ(ready_.size(), 1u);
    EXPECT_TRUE(rejected_.empty());
    // Without addresses, the socket's own stand.
    EXPECT_EQ(ready_[0].peer.ToString(),
              valid.has_addresses ? valid.source : "10.0.0.1:1000");
    EXPECT_EQ(ready_[0].local.ToString(),
              valid.has_addresses ? valid.destination : "10.0.0.2:80");
    Send(client, "GET / HTTP/1.1\r\n");
    EXPECT_EQ(Unread(ready_[0]), "GET / HTTP/1.1\r\n");
  }
  EXPECT_EQ(reader_.reading(), 0u);
}

TEST_F(ProxyProtocolReaderTest, BytesSentWithTheHeaderAreLeftForTheWorker) {
  for (const Valid& valid : ValidHeaders()) {
    SCOPED_TRACE(absl::CEscape(valid.header));
    ready_.clear();
    wire::UniqueFd client = Accept();
    Send(client, valid.header + "GET / HTTP/1.1\r\n\r\n");
    time_.RunUntilIdle();
    ASSERT_EQ(ready_.size(), 1u);
    EXPECT_EQ(Unread(ready_[0]), "GET / HTTP/1.1\r\n\r\n");
  }
}

TEST_F(ProxyProtocolReaderTest, ASilentClientIsClosedAtTheDeadline) {
  wire::UniqueFd silent = Accept();
  time_.Advance(absl::Seconds(1));
  wire::UniqueFd partial = Accept();
  Send(partial, "PROXY TCP4 1.2.3.4 ");
  time_.Advance(absl::Milliseconds(1999));
  EXPECT_FALSE(Closed(silent)) << "not before its 3s";
  EXPECT_TRUE(rejected_.empty());
  time_.Advance(absl::Milliseconds(1));
  EXPECT_TRUE(Closed(silent));
  EXPECT_FALSE(Closed(partial));
  ASSERT_EQ(rejected_.size(), 1u);
  EXPECT_NE(rejected_[0].find("within 3s"), std::string::npos) << rejected_[0];
  time_.Advance(absl::Seconds(1));
  EXPECT_TRUE(Closed(partial)) << "a partial header has the same deadline";
  EXPECT_EQ(rejected_.size(), 2u);
  EXPECT_TRUE(ready_.empty());
  EXPECT_EQ(reader_.reading(), 0u);
}

TEST_F(ProxyProtocolReaderTest, AHeaderInTimeCancelsTheDeadline) {
  wire::UniqueFd client = Accept();
  time_.Advance(absl::Milliseconds(2900));
  Send(client, "PROXY UNKNOWN\r\n");
  time_.Advance(absl::Seconds(10));
  EXPECT_EQ(ready_.size(), 1u);
  EXPECT_TRUE(rejected_.empty());
}

TEST_F(ProxyProtocolReaderTest, GarbageOrAnEarlyCloseIsClosedAtOnce) {
  wire::UniqueFd garbage = Accept();
  wire::UniqueFd gone = Accept();
  wire::UniqueFd good = Accept();
  Send(garbage, "GET / HTTP/1.1\r\n");
  Send(gone, "PROXY TCP4");
  ::shutdown(gone.get(), SHUT_WR);
  Send(good, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
  time_.RunUntilIdle();
  EXPECT_TRUE(Closed(garbage));
  EXPECT_TRUE(Closed(gone));
  EXPECT_EQ(rejected_.size(), 2u);
  ASSERT_EQ(ready_.size(), 1u);
  EXPECT_EQ(ready_[0].peer.ToString(), "1.2.3.4:1");
  EXPECT_EQ(reader_.reading(), 0u);
}

// --- A listener with proxy_protocol counts what it closes. ----------------

TEST(ProxyProtocolListenerTest, GarbageAndSilenceAreCountedOthersServed) {
  SimulatedTime time;
  std::vector<AcceptedConnection> accepted;
  Listener::Options options;
  options.proxy_protocol = true;
  options.proxy_header_timeout = absl::Seconds(3);
  auto listener = Listener::Create(
      time.loop(), *wire::SocketAddress::Parse("127.0.0.1:0"), options,
      wire::SysCalls::Real(),
      [&](AcceptedConnection c) { accepted.push_back(std::move(c)); });
  ASSERT_TRUE(listener.ok()) << listener.status();
  const auto connect = [&] {
    wire::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    EXPECT_EQ(::connect(fd.get(), (*listener)->address().addr(),
                        (*listener)->address().length),
              0);
    return fd;
  };
  wire::UniqueFd silent = connect();
  wire::UniqueFd garbage = connect();
  wire::UniqueFd good = connect();
  ::send(garbage.get(), "hello\r\n", 7, MSG_NOSIGNAL);
  const std::string header = "PROXY TCP6 2001:db8::7 ::1 4242 80\r\n";
  ::send(good.get(), header.data(), header.size(), MSG_NOSIGNAL);
  time.RunUntilIdle();
  ASSERT_EQ(accepted.size(), 1u);
  EXPECT_EQ(accepted[0].peer.ToString(), "[2001:db8::7]:4242");
  EXPECT_EQ((*listener)->stats().rejected_proxy_protocol, 1u);
  EXPECT_EQ((*listener)->reading_headers(), 1u);
  time.Advance(absl::Seconds(3));
  EXPECT_EQ((*listener)->stats().rejected_proxy_protocol, 2u);
  EXPECT_EQ((*listener)->reading_headers(), 0u);
  EXPECT_EQ((*listener)->stats().accepted, 3u);
}

TEST(ListenSpecTest, ParsesAddressesAndOptions) {
  absl::StatusOr<ListenSpec> tcp = ListenSpec::Parse("127.0.0.1:8080");
  ASSERT_TRUE(tcp.ok()) << tcp.status();
  EXPECT_EQ(tcp->name, "127.0.0.1:8080");
  EXPECT_FALSE(tcp->proxy_protocol);
  EXPECT_FALSE(tcp->is_unix());
  absl::StatusOr<ListenSpec> v6 = ListenSpec::Parse("[::1]:0,proxy_protocol");
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(v6->name, "[::1]:0");
  EXPECT_TRUE(v6->proxy_protocol);
  EXPECT_EQ(v6->address.family(), AF_INET6);
  absl::StatusOr<ListenSpec> unix_spec =
      ListenSpec::Parse("unix:/run/x.sock,mode=0660,proxy_protocol");
  ASSERT_TRUE(unix_spec.ok()) << unix_spec.status();
  EXPECT_EQ(unix_spec->name, "unix:/run/x.sock");
  EXPECT_EQ(unix_spec->unix_path, "/run/x.sock");
  EXPECT_EQ(unix_spec->unix_mode, 0660);
  EXPECT_TRUE(unix_spec->proxy_protocol);
  for (const char* bad : {"127.0.0.1:8080,proxy", "127.0.0.1:8080,mode=0660",
                          "unix:", "unix:relative", "unix:/x,mode=0999",
                          "unix:/x,mode=", "nohost", "127.0.0.1:99999"}) {
    EXPECT_FALSE(ListenSpec::Parse(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace fdbroker
