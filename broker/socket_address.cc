#include "broker/socket_address.h"

#include <arpa/inet.h>

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace fdbroker {

absl::StatusOr<SocketAddress> SocketAddress::Parse(absl::string_view text) {
  const size_t colon = text.rfind(':');
  if (colon == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("address \"", text, "\" is not HOST:PORT"));
  }
  absl::string_view host = text.substr(0, colon);
  absl::string_view port_text = text.substr(colon + 1);
  int port;
  if (!absl::SimpleAtoi(port_text, &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "address \"", text, "\": port must be a number in 0..65535"));
  }
  SocketAddress result;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    std::string h(host.substr(1, host.size() - 2));
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&result.storage);
    if (::inet_pton(AF_INET6, h.c_str(), &sin6->sin6_addr) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("address \"", text, "\": bad IPv6 host"));
    }
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(static_cast<uint16_t>(port));
    result.length = sizeof(sockaddr_in6);
    return result;
  }
  std::string h = (host.empty() || host == "*") ? "0.0.0.0" : std::string(host);
  if (h == "localhost") h = "127.0.0.1";
  auto* sin = reinterpret_cast<sockaddr_in*>(&result.storage);
  if (::inet_pton(AF_INET, h.c_str(), &sin->sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "address \"", text,
        "\": host must be a numeric IPv4 address, [IPv6] or localhost"));
  }
  sin->sin_family = AF_INET;
  sin->sin_port = htons(static_cast<uint16_t>(port));
  result.length = sizeof(sockaddr_in);
  return result;
}

int SocketAddress::port() const {
  if (family() == AF_INET) {
    return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
  }
  if (family() == AF_INET6) {
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  }
  return 0;
}

bool SocketAddress::IsWildcard() const {
  if (family() == AF_INET) {
    return reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr.s_addr ==
           htonl(INADDR_ANY);
  }
  if (family() == AF_INET6) {
    const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    return std::memcmp(&sin6->sin6_addr, &in6addr_any, sizeof(in6_addr)) == 0;
  }
  return false;
}

void SocketAddress::Format(std::string& out) const {
  out.clear();
  if (family() == AF_INET) {
    // By hand: inet_ntop() goes through vfprintf, and this runs for every
    // handed-off connection.
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&storage);
    uint8_t octets[4];
    std::memcpy(octets, &sin->sin_addr, sizeof(octets));
    absl::StrAppend(&out, octets[0], ".", octets[1], ".", octets[2], ".",
                    octets[3], ":", port());
  } else if (family() == AF_INET6) {
    const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    char host[INET6_ADDRSTRLEN];
    ::inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
    absl::StrAppend(&out, "[", host, "]:", port());
  } else {
    out = "unknown";
  }
}

std::string SocketAddress::ToString() const {
  std::string out;
  Format(out);
  return out;
}

}  // namespace fdbroker
