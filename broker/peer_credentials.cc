#include "broker/peer_credentials.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "wire/socket_address.h"

namespace fdbroker {
namespace {

// An address as /proc/net/tcp{,6} prints it: each 32-bit word of the
// address in host byte order as %08X, then ":%04X" for the port.
std::string ProcNetAddress(const void* address, size_t words, uint16_t port) {
  std::string out;
  const auto* word = static_cast<const uint32_t*>(address);
  for (size_t i = 0; i < words; ++i)
    absl::StrAppendFormat(&out, "%08X", word[i]);
  absl::StrAppendFormat(&out, ":%04X", port);
  return out;
}

}  // namespace

absl::StatusOr<uid_t> TcpPeerUid(absl::string_view peer, uint16_t server_port,
                                 const std::string& proc_net) {
  absl::string_view text = peer;
  if (!absl::ConsumePrefix(&text, "ipv4:") &&
      !absl::ConsumePrefix(&text, "ipv6:")) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer \"", peer, "\" is not a TCP address"));
  }
  // Newer gRPC versions percent-encode the brackets of an IPv6 address.
  const std::string host_port =
      absl::StrReplaceAll(text, {{"%5B", "["}, {"%5D", "]"}});
  absl::StatusOr<wire::SocketAddress> address =
      wire::SocketAddress::Parse(host_port);
  if (!address.ok()) return address.status();
  // Where the client's socket may be: an IPv4 address is in `tcp`, or in
  // `tcp6` as ::ffff:a.b.c.d when the client used a dual-stack socket.
  std::vector<std::pair<std::string, std::string>> candidates;  // table, local
  const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&address->storage);
  if (address->family() == AF_INET || IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
    in_addr v4;
    uint16_t port;
    if (address->family() == AF_INET) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(&address->storage);
      v4 = sin->sin_addr;
      port = ntohs(sin->sin_port);
    } else {
      std::memcpy(&v4, &sin6->sin6_addr.s6_addr[12], sizeof(v4));
      port = ntohs(sin6->sin6_port);
    }
    in6_addr mapped{};
    mapped.s6_addr[10] = mapped.s6_addr[11] = 0xff;
    std::memcpy(&mapped.s6_addr[12], &v4, sizeof(v4));
    candidates.emplace_back("tcp", ProcNetAddress(&v4, 1, port));
    candidates.emplace_back("tcp6", ProcNetAddress(&mapped, 4, port));
  } else {
    candidates.emplace_back(
        "tcp6", ProcNetAddress(&sin6->sin6_addr, 4, ntohs(sin6->sin6_port)));
  }
  const std::string remote_port = absl::StrFormat(":%04X", server_port);
  for (const auto& [table, local] : candidates) {
    const std::string path = absl::StrCat(proc_net, "/", table);
    std::ifstream in(path);
    if (!in) return absl::UnavailableError(absl::StrCat("cannot read ", path));
    // "sl local_address rem_address st tx_queue:rx_queue tr:tm->when
    //  retrnsmt uid timeout inode ..."
    std::string line;
    while (std::getline(in, line)) {
      std::vector<absl::string_view> fields =
          absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (fields.size() < 8 || fields[1] != local ||
          !absl::EndsWith(fields[2], remote_port)) {
        continue;
      }
      uint32_t uid = 0;
      if (!absl::SimpleAtoi(fields[7], &uid)) break;
      return static_cast<uid_t>(uid);
    }
  }
  return absl::NotFoundError(absl::StrCat(
      "no socket of this host's network namespace is the client end of ",
      peer));
}

absl::Status CheckTrustedLocalCaller(absl::string_view peer,
                                     uint16_t server_port, uid_t self) {
  absl::StatusOr<uid_t> uid = TcpPeerUid(peer, server_port);
  if (uid.ok() && (*uid == 0 || *uid == self)) return absl::OkStatus();
  const std::string who =
      uid.ok() ? absl::StrCat("the caller ", peer, " is uid ", *uid)
               : absl::StrCat("the caller ", peer, " has no known uid (",
                              uid.status().message(), ")");
  return absl::PermissionDeniedError(absl::StrCat(
      "over plaintext only root and the broker's uid ", self,
      " may change the broker, and ", who,
      "; for other callers serve the control plane with mTLS (--tls_cert, "
      "--tls_key, --tls_client_ca, --admin_subjects)"));
}

}  // namespace fdbroker
