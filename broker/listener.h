#ifndef FDBROKER_BROKER_LISTENER_H_
#define FDBROKER_BROKER_LISTENER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/event_loop.h"
#include "broker/metrics_list.h"
#include "wire/socket_address.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// A client connection the broker has accepted and not yet handed off.
struct AcceptedConnection {
  wire::UniqueFd fd;
  wire::SocketAddress peer;
  wire::SocketAddress local;
  int64_t accept_unix_nanos = 0;
  int64_t accept_mono_nanos = 0;
  // `peer` and `local` come from a PROXY header, not from the socket (which
  // names the balancer): they must travel with the connection.
  bool proxied = false;
};

// The TCP listening socket. Loop thread only. Accepts in batches while the
// socket is readable; on fd exhaustion (EMFILE/ENFILE/ENOBUFS/ENOMEM) it
// stops watching the socket for `exhaustion_pause` instead of spinning, and
// the connection stays in the kernel backlog.
// One --listen: "HOST:PORT", "[V6]:PORT" or "unix:/path", each optionally
// followed by options: ",proxy_protocol" (connections start with a PROXY
// header) and, for a Unix socket, ",mode=0660" (octal permissions of the
// socket file; without it the umask decides).
struct ListenSpec {
  // The address as given, without its options: the listener's name.
  std::string name;
  wire::SocketAddress address;  // TCP.
  std::string unix_path;        // "unix:" (empty for TCP).
  int unix_mode = -1;           // -1: not given.
  bool proxy_protocol = false;

  static absl::StatusOr<ListenSpec> Parse(absl::string_view text);
  bool is_unix() const { return !unix_path.empty(); }
};

class ProxyProtocolReader;

class Listener {
 public:
  using AcceptCallback = absl::AnyInvocable<void(AcceptedConnection)>;
  struct Options {
    int backlog = 4096;
    absl::Duration exhaustion_pause = absl::Milliseconds(100);
    // Most accepts per wake-up, so one busy listener cannot starve the
    // hand-off channels of the same loop.
    int max_accepts_per_wake = 64;
    // Each connection starts with a PROXY protocol header (v1 or v2), read
    // and stripped before the connection is handed on with the addresses it
    // names (broker/proxy_protocol.h). One without a complete header within
    // `proxy_header_timeout`, or with a malformed one, is closed and counted.
    bool proxy_protocol = false;
    absl::Duration proxy_header_timeout = absl::Seconds(3);
  };
  // broker/metrics_list.h declares the fields (and their metrics).
  struct Stats {
    FDBROKER_STATS_STRUCT_FIELDS(FDBROKER_LISTENER_STATS)
  };

  // Binds and listens on `address` (port 0 picks a free port; see address()).
  static absl::StatusOr<std::unique_ptr<Listener>> Create(
      EventLoop& loop, const wire::SocketAddress& address,
      const Options& options, wire::SysCalls& sys, AcceptCallback on_accept);
  // Takes over an already listening socket (systemd socket activation, or
  // one handed over by the previous broker during an upgrade).
  static absl::StatusOr<std::unique_ptr<Listener>> Adopt(
      EventLoop& loop, wire::UniqueFd socket, const Options& options,
      wire::SysCalls& sys, AcceptCallback on_accept);
  ~Listener();

  // The listening socket, for handing it over (the caller dups it).
  int fd() const { return socket_.get(); }

  // The address actually bound.
  const wire::SocketAddress& address() const { return address_; }

  // Stops taking connections; the socket stays bound, so clients queue in the
  // backlog instead of being refused. Resume() takes them again.
  void Pause();
  void Resume();
  // Closes the socket for good (shutdown): clients are refused from now on.
  void Close();
  bool accepting() const { return accepting_ && socket_.valid(); }
  // Connections whose PROXY header is still being read (they go on to the
  // callback, or are closed, even after Close()).
  size_t reading_headers() const;
  const Stats& stats() const { return stats_; }

 private:
  Listener(EventLoop& loop, wire::UniqueFd socket, wire::SocketAddress address,
           const Options& options, wire::SysCalls& sys,
           AcceptCallback on_accept);
  absl::Status Init();
  void OnReadable();
  void UpdateWatch();

  EventLoop& loop_;
  wire::UniqueFd socket_;
  wire::SocketAddress address_;
  const Options options_;
  wire::SysCalls& sys_;
  AcceptCallback on_accept_;
  std::unique_ptr<IoWatch> watch_;
  bool accepting_ = true;
  EventLoop::TimerId resume_timer_ = 0;  // Non-zero while exhausted.
  Stats stats_;
  // With Options::proxy_protocol.
  std::unique_ptr<ProxyProtocolReader> proxy_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_LISTENER_H_
