#ifndef FDBROKER_BROKER_PROXY_PROTOCOL_H_
#define FDBROKER_BROKER_PROXY_PROTOCOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/event_loop.h"
#include "broker/listener.h"
#include "wire/socket_address.h"

namespace fdbroker {

// The PROXY protocol (HAProxy's proxy-protocol.txt), versions 1 (text) and 2
// (binary), as a load balancer in front of the broker sends it first on each
// connection to say whom it relays.
//
// Bounds: a v1 header is at most 107 bytes (CRLF included); a v2 header at
// most kProxyHeaderMaxBytes (16 fixed bytes plus 520 of addresses and TLVs,
// the 536 bytes the specification asks a receiver to accept and HAProxy's
// default). Anything longer is invalid.
inline constexpr size_t kProxyV1MaxBytes = 107;
inline constexpr size_t kProxyHeaderMaxBytes = 536;

// What ParseProxyHeader() made of the bytes received so far.
struct ProxyHeader {
  enum class Status {
    kIncomplete,  // Valid so far; more bytes are needed.
    kInvalid,     // Not a PROXY header (or a malformed one): close.
    kComplete,
  };
  Status status = Status::kIncomplete;
  // kComplete: the header's size; the bytes after it are the client's.
  size_t length = 0;
  // kComplete: whether the header names the client (v1 TCP4/TCP6, v2 PROXY
  // over AF_INET/AF_INET6). Without (v1 UNKNOWN, v2 LOCAL, v2 AF_UNSPEC or
  // AF_UNIX) the socket's own addresses stand.
  bool has_addresses = false;
  wire::SocketAddress source;       // The client.
  wire::SocketAddress destination;  // The address the client connected to.
  // kInvalid: why, for the log.
  std::string error;
};

// Parses the PROXY header at the start of `data`, every byte received from
// the connection so far. Pure: call again with more bytes while it says
// kIncomplete. Decides as early as the bytes allow (a first byte that starts
// neither signature is kInvalid at once).
ProxyHeader ParseProxyHeader(absl::string_view data);

// The broker's PROXY stage of a listener: reads and strips the header of
// each accepted connection on the event loop, never blocking it, then hands
// the connection on with the addresses the header names (peer = the client,
// local = where it connected). Loop thread only.
//
// Reads never take a byte past the header: each read peeks (MSG_PEEK), parses
// the header so far, and consumes only the bytes that belong to it, so the
// client's own bytes stay in the socket for the worker and initial_data stays
// empty. A connection holds at most kProxyHeaderMaxBytes here. One that sends
// a malformed header, closes, or has not completed its header within
// `timeout` is closed and reported to `on_rejected`.
class ProxyProtocolReader {
 public:
  using ReadyCallback = absl::AnyInvocable<void(AcceptedConnection)>;
  // Why a connection was closed (one line, for the log).
  using RejectedCallback = absl::AnyInvocable<void(absl::string_view)>;

  ProxyProtocolReader(EventLoop& loop, absl::Duration timeout,
                      ReadyCallback on_ready, RejectedCallback on_rejected);
  // Closes the connections still reading their header (not reported).
  ~ProxyProtocolReader();
  ProxyProtocolReader(const ProxyProtocolReader&) = delete;
  ProxyProtocolReader& operator=(const ProxyProtocolReader&) = delete;

  // Takes a freshly accepted connection and reads its header.
  void Start(AcceptedConnection connection);
  // Connections whose header is still being read.
  size_t reading() const { return reading_.size(); }

 private:
  struct Reading {
    explicit Reading(EventLoop& loop) : timer(loop) {}
    AcceptedConnection connection;
    std::string header;  // The header's bytes so far.
    std::unique_ptr<IoWatch> watch;
    Timer timer;  // The deadline; goes with the Reading.
  };
  void OnReadable(uint64_t key);
  // Closes the connection under `key`.
  void Reject(uint64_t key, absl::string_view why);

  EventLoop& loop_;
  const absl::Duration timeout_;
  ReadyCallback on_ready_;
  RejectedCallback on_rejected_;
  uint64_t next_key_ = 1;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Reading>> reading_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_PROXY_PROTOCOL_H_
