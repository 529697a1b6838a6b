#include "wire/socket_address.h"

#include <arpa/inet.h>

#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace fdbroker::wire {

absl::StatusOr<HostPort> HostPort::Parse(absl::string_view text) {
  const size_t colon = text.rfind(':');
  if (colon == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("address \"", text, "\" is not HOST:PORT"));
  }
  absl::string_view host = text.substr(0, colon);
  const absl::string_view port_text = text.substr(colon + 1);
  if (!host.empty() && host.front() == '[') {
    if (host.size() < 2 || host.back() != ']') {
      return absl::InvalidArgumentError(absl::StrCat(
          "address \"", text, "\": unbalanced [ ] around the host"));
    }
    host = host.substr(1, host.size() - 2);
  } else if (host.find(':') != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "address \"", text, "\": write an IPv6 host in brackets, [::1]:8080"));
  }
  uint32_t port;
  if (port_text.empty() ||
      port_text.find_first_not_of("0123456789") != absl::string_view::npos ||
      !absl::SimpleAtoi(port_text, &port) || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "address \"", text, "\": port must be a number in 0..65535"));
  }
  return HostPort{std::string(host), static_cast<uint16_t>(port)};
}

std::string HostPort::ToString() const {
  return host.find(':') != std::string::npos
             ? absl::StrCat("[", host, "]:", port)
             : absl::StrCat(host, ":", port);
}

absl::StatusOr<SocketAddress> SocketAddress::Parse(absl::string_view text) {
  absl::StatusOr<HostPort> parsed = HostPort::Parse(text);
  if (!parsed.ok()) return parsed.status();
  SocketAddress result;
  if (parsed->host.find(':') != std::string::npos) {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&result.storage);
    if (::inet_pton(AF_INET6, parsed->host.c_str(), &sin6->sin6_addr) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("address \"", text, "\": bad IPv6 host"));
    }
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(parsed->port);
    result.length = sizeof(sockaddr_in6);
    return result;
  }
  std::string host = parsed->host;
  if (host.empty() || host == "*") host = "0.0.0.0";
  if (host == "localhost") host = "127.0.0.1";
  auto* sin = reinterpret_cast<sockaddr_in*>(&result.storage);
  if (::inet_pton(AF_INET, host.c_str(), &sin->sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "address \"", text,
        "\": host must be a numeric IPv4 address, [IPv6] or localhost"));
  }
  sin->sin_family = AF_INET;
  sin->sin_port = htons(parsed->port);
  result.length = sizeof(sockaddr_in);
  return result;
}

absl::StatusOr<SocketAddress> SocketAddress::Of(int fd, bool peer) {
  SocketAddress result;
  result.length = sizeof(result.storage);
  const int done =
      peer ? ::getpeername(fd, result.mutable_addr(), &result.length)
           : ::getsockname(fd, result.mutable_addr(), &result.length);
  if (done != 0) {
    return absl::ErrnoToStatus(errno, peer ? "getpeername" : "getsockname");
  }
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

}  // namespace fdbroker::wire
