#include "broker/proxy_protocol.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace fdbroker {
namespace {

constexpr absl::string_view kV1Prefix = "PROXY ";
constexpr char kV2SignatureBytes[] = "\r\n\r\n\0\r\nQUIT\n";
constexpr absl::string_view kV2Signature(kV2SignatureBytes, 12);
constexpr size_t kV2FixedBytes = 16;

ProxyHeader Invalid(std::string error) {
  ProxyHeader header;
  header.status = ProxyHeader::Status::kInvalid;
  header.error = std::move(error);
  return header;
}

ProxyHeader Complete(size_t length) {
  ProxyHeader header;
  header.status = ProxyHeader::Status::kComplete;
  header.length = length;
  return header;
}

// Whether `data` is a prefix of `expected` (or starts with all of it).
bool MatchesSoFar(absl::string_view data, absl::string_view expected) {
  const size_t n = std::min(data.size(), expected.size());
  return data.substr(0, n) == expected.substr(0, n);
}

// `ip` and `port` in network byte order (v2's layout) as a SocketAddress.
wire::SocketAddress MakeAddress(int family, const void* ip, uint16_t port) {
  wire::SocketAddress address;
  if (family == AF_INET) {
    auto* in = reinterpret_cast<sockaddr_in*>(&address.storage);
    in->sin_family = AF_INET;
    std::memcpy(&in->sin_addr, ip, sizeof(in->sin_addr));
    in->sin_port = port;
    address.length = sizeof(sockaddr_in);
  } else {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&address.storage);
    in6->sin6_family = AF_INET6;
    std::memcpy(&in6->sin6_addr, ip, sizeof(in6->sin6_addr));
    in6->sin6_port = port;
    address.length = sizeof(sockaddr_in6);
  }
  return address;
}

// A v1 port: 1 to 5 decimal digits, no leading zero, at most 65535.
bool ParseV1Port(absl::string_view text, uint16_t& port) {
  if (text.empty() || text.size() > 5 || (text[0] == '0' && text.size() > 1)) {
    return false;
  }
  uint32_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<uint32_t>(c - '0');
  }
  if (value > 65535) return false;
  port = htons(static_cast<uint16_t>(value));
  return true;
}

ProxyHeader ParseV1(absl::string_view data) {
  if (!MatchesSoFar(data, kV1Prefix)) {
    return Invalid("not a PROXY header (bad v1 signature)");
  }
  const size_t end = data.substr(0, kProxyV1MaxBytes).find("\r\n");
  if (end == absl::string_view::npos) {
    if (data.size() >= kProxyV1MaxBytes) {
      return Invalid("PROXY v1 header without CRLF within 107 bytes");
    }
    // A line feed or a NUL before the CRLF can never become valid.
    const absl::string_view seen = data.substr(0, kProxyV1MaxBytes);
    if (seen.find('\n') != absl::string_view::npos ||
        seen.find('\0') != absl::string_view::npos) {
      return Invalid("PROXY v1 header with a stray control character");
    }
    return ProxyHeader();
  }
  const absl::string_view line =
      data.substr(kV1Prefix.size(), end - kV1Prefix.size());
  for (char c : line) {
    if (c < 0x20 || c > 0x7E) {
      return Invalid("PROXY v1 header with a control character");
    }
  }
  // "UNKNOWN" may be followed by anything, which the receiver ignores.
  if (line == "UNKNOWN" || absl::StartsWith(line, "UNKNOWN ")) {
    return Complete(end + 2);
  }
  const std::vector<absl::string_view> fields = absl::StrSplit(line, ' ');
  if (fields.size() != 5 || (fields[0] != "TCP4" && fields[0] != "TCP6")) {
    return Invalid(absl::StrCat("malformed PROXY v1 header \"",
                                absl::CEscape(line), "\""));
  }
  const int family = fields[0] == "TCP4" ? AF_INET : AF_INET6;
  in6_addr ips[2];  // Big enough for either family.
  uint16_t ports[2];
  for (int i = 0; i < 2; ++i) {
    const std::string ip(fields[1 + i]);
    if (ip.empty() || ::inet_pton(family, ip.c_str(), &ips[i]) != 1) {
      return Invalid(absl::StrCat("PROXY v1 header: bad ", fields[0],
                                  " address \"", absl::CEscape(ip), "\""));
    }
    if (!ParseV1Port(fields[3 + i], ports[i])) {
      return Invalid(absl::StrCat("PROXY v1 header: bad port \"",
                                  absl::CEscape(fields[3 + i]), "\""));
    }
  }
  ProxyHeader header = Complete(end + 2);
  header.has_addresses = true;
  header.source = MakeAddress(family, &ips[0], ports[0]);
  header.destination = MakeAddress(family, &ips[1], ports[1]);
  return header;
}

ProxyHeader ParseV2(absl::string_view data) {
  if (!MatchesSoFar(data, kV2Signature)) {
    return Invalid("not a PROXY header (bad v2 signature)");
  }
  if (data.size() < kV2FixedBytes) return ProxyHeader();
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(data[i]); };
  const uint8_t version = byte(12) >> 4, command = byte(12) & 0xF;
  if (version != 2) {
    return Invalid(absl::StrCat("PROXY v2 header with version ", version));
  }
  if (command > 1) {
    return Invalid(absl::StrCat("PROXY v2 header with command ", command));
  }
  const uint8_t family = byte(13) >> 4, transport = byte(13) & 0xF;
  if (family > 3 || transport > 2) {
    return Invalid(
        absl::StrCat("PROXY v2 header with address family byte ", byte(13)));
  }
  const size_t length = kV2FixedBytes + ((size_t{byte(14)} << 8) | byte(15));
  if (length > kProxyHeaderMaxBytes) {
    return Invalid(absl::StrCat("PROXY v2 header of ", length,
                                " bytes; the limit is ", kProxyHeaderMaxBytes));
  }
  if (data.size() < length) return ProxyHeader();
  // LOCAL (a health check by the balancer itself): no client to name.
  if (command == 0) return Complete(length);
  const size_t ip_size = family == 1 ? 4 : family == 2 ? 16 : 0;
  const size_t needed = family == 3 ? 216 : family == 0 ? 0 : 2 * ip_size + 4;
  if (length - kV2FixedBytes < needed) {
    return Invalid(absl::StrCat("PROXY v2 header: address block of ",
                                length - kV2FixedBytes, " bytes, need ",
                                needed));
  }
  // AF_UNSPEC and AF_UNIX: keep the socket's addresses. TLVs are skipped.
  if (ip_size == 0) return Complete(length);
  const char* block = data.data() + kV2FixedBytes;
  uint16_t ports[2];
  std::memcpy(ports, block + 2 * ip_size, sizeof(ports));
  const int af = family == 1 ? AF_INET : AF_INET6;
  ProxyHeader header = Complete(length);
  header.has_addresses = true;
  header.source = MakeAddress(af, block, ports[0]);
  header.destination = MakeAddress(af, block + ip_size, ports[1]);
  return header;
}

}  // namespace

ProxyHeader ParseProxyHeader(absl::string_view data) {
  if (data.empty()) return ProxyHeader();
  if (data[0] == 'P') return ParseV1(data);
  if (data[0] == '\r') return ParseV2(data);
  return Invalid("not a PROXY header (neither the v1 nor the v2 signature)");
}

ProxyProtocolReader::ProxyProtocolReader(EventLoop& loop,
                                         absl::Duration timeout,
                                         ReadyCallback on_ready,
                                         RejectedCallback on_rejected)
    : loop_(loop),
      timeout_(timeout),
      on_ready_(std::move(on_ready)),
      on_rejected_(std::move(on_rejected)) {}

ProxyProtocolReader::~ProxyProtocolReader() = default;

void ProxyProtocolReader::Start(AcceptedConnection connection) {
  const uint64_t key = next_key_++;
  auto reading = std::make_unique<Reading>(loop_);
  reading->connection = std::move(connection);
  absl::StatusOr<std::unique_ptr<IoWatch>> watch =
      loop_.Watch(reading->connection.fd.get(), EPOLLIN,
                  [this, key](uint32_t) { OnReadable(key); });
  if (!watch.ok()) {
    on_rejected_(absl::StrCat("epoll: ", watch.status().message()));
    return;  // The connection closes here.
  }
  reading->watch = *std::move(watch);
  reading->timer.Arm(timeout_, [this, key] {
    Reject(key, absl::StrCat("no complete PROXY header within ",
                             absl::FormatDuration(timeout_)));
  });
  reading_.emplace(key, std::move(reading));
}

void ProxyProtocolReader::OnReadable(uint64_t key) {
  auto it = reading_.find(key);
  if (it == reading_.end()) return;
  Reading& r = *it->second;
  const int fd = r.connection.fd.get();
  char buffer[kProxyHeaderMaxBytes];
  const size_t before = r.header.size();
  // The client's socket stays blocking (the worker chooses its mode): every
  // read here says MSG_DONTWAIT.
  const ssize_t peeked = ::recv(fd, buffer, kProxyHeaderMaxBytes - before,
                                MSG_PEEK | MSG_DONTWAIT);
  if (peeked < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    return Reject(key, absl::StrCat("recv: ", std::strerror(errno)));
  }
  if (peeked == 0) {
    return Reject(key, "closed before the end of its PROXY header");
  }
  r.header.append(buffer, static_cast<size_t>(peeked));
  ProxyHeader header = ParseProxyHeader(r.header);
  if (header.status == ProxyHeader::Status::kInvalid) {
    return Reject(key, header.error);
  }
  // Consume only the header's bytes: all of the peek while it is incomplete
  // (they are all the header's), else up to its end.
  const size_t take = header.status == ProxyHeader::Status::kComplete
                          ? header.length - before
                          : static_cast<size_t>(peeked);
  if (::recv(fd, buffer, take, MSG_DONTWAIT) != static_cast<ssize_t>(take)) {
    return Reject(key, "the PROXY header could not be consumed");
  }
  if (header.status == ProxyHeader::Status::kIncomplete) {
    // The parser refuses anything longer than the bounds, so this cannot
    // grow past kProxyHeaderMaxBytes; stay defensive anyway.
    if (r.header.size() >= kProxyHeaderMaxBytes) {
      return Reject(key, "PROXY header too long");
    }
    return;
  }
  AcceptedConnection connection = std::move(r.connection);
  reading_.erase(it);  // Its timer is cancelled with it.  // The watch goes
                       // (safe inside its own callback).
  if (header.has_addresses) {
    connection.peer = header.source;
    connection.local = header.destination;
    connection.proxied = true;
  }
  on_ready_(std::move(connection));
}

void ProxyProtocolReader::Reject(uint64_t key, absl::string_view why) {
  auto it = reading_.find(key);
  if (it == reading_.end()) return;
  // The watch goes before the fd it watches closes.
  std::unique_ptr<Reading> reading = std::move(it->second);
  reading_.erase(it);
  reading->watch.reset();
  reading.reset();
  on_rejected_(why);
}

}  // namespace fdbroker
