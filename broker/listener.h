#ifndef FDBROKER_BROKER_LISTENER_H_
#define FDBROKER_BROKER_LISTENER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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
  wire::SocketAddress peer;   // Empty (family 0) for a Unix-socket client.
  wire::SocketAddress local;  // Same.
  int64_t accept_unix_nanos = 0;
  int64_t accept_mono_nanos = 0;
  // `peer` and `local` come from a PROXY header, not from the socket (which
  // names the balancer): they must travel with the connection.
  bool proxied = false;
  // The name of the listening socket it came from (Listener::name()); owned
  // by the Listener, which outlives every connection. Null in tests.
  const std::string* listener = nullptr;
};

// One --listen: "HOST:PORT", "[V6]:PORT" or "unix:/path", each optionally
// followed by options: ",proxy_protocol" (connections start with a PROXY
// header) and, for a Unix socket, ",mode=0660" (octal permissions of the
// socket file; without it the umask decides).
struct ListenSpec {
  // The address as given, without its options (for messages).
  std::string name;
  wire::SocketAddress address;  // TCP.
  std::string unix_path;        // "unix:" (empty for TCP).
  int unix_mode = -1;           // -1: not given.
  bool proxy_protocol = false;

  static absl::StatusOr<ListenSpec> Parse(absl::string_view text);
  bool is_unix() const { return !unix_path.empty(); }
};

class ProxyProtocolReader;

// The client listening sockets (one per --listen: TCP over IPv4 or IPv6, or
// a Unix stream socket). Loop thread only. Accepts in batches while a
// socket is readable; on fd exhaustion (EMFILE/ENFILE/ENOBUFS/ENOMEM, a
// process-wide condition) it stops watching every socket for
// `exhaustion_pause` instead of spinning, and connections stay in the kernel
// backlogs. A socket with proxy_protocol passes each connection through a
// ProxyProtocolReader first.
//
// Each socket has a name, which every Connection carries (`listener`): its
// bound address in --listen syntax ("127.0.0.1:8080", "[::]:8080",
// "unix:/run/app.sock"), so it is unique, and the same after an upgrade or
// from socket activation.
class Listener {
 public:
  using AcceptCallback = absl::AnyInvocable<void(AcceptedConnection)>;
  struct Options {
    int backlog = 4096;
    absl::Duration exhaustion_pause = absl::Milliseconds(100);
    // Most accepts per wake-up and socket, so one busy listener cannot
    // starve the hand-off channels of the same loop.
    int max_accepts_per_wake = 64;
    // For Create() and Adopt(): connections start with a PROXY protocol
    // header (v1 or v2), read and stripped before the connection is handed
    // on with the addresses it names (broker/proxy_protocol.h). One without
    // a complete header within `proxy_header_timeout`, or with a malformed
    // one, is closed and counted. Bind() and AdoptSocket() say it per socket.
    bool proxy_protocol = false;
    absl::Duration proxy_header_timeout = absl::Seconds(3);
    // TCP sockets Bind() creates set SO_REUSEPORT, so that more sockets can
    // join their group (--placement=kernel: one per worker).
    bool reuseport = false;
  };
  // broker/metrics_list.h declares the fields (and their metrics); summed
  // over the sockets.
  struct Stats {
    FDBROKER_STATS_STRUCT_FIELDS(FDBROKER_LISTENER_STATS)
  };

  // No socket yet: Bind() and AdoptSocket() add them.
  Listener(EventLoop& loop, const Options& options, wire::SysCalls& sys,
           AcceptCallback on_accept);
  // One socket bound to `address` (port 0 picks a free port; see address()).
  static absl::StatusOr<std::unique_ptr<Listener>> Create(
      EventLoop& loop, const wire::SocketAddress& address,
      const Options& options, wire::SysCalls& sys, AcceptCallback on_accept);
  // One already listening socket (systemd socket activation, or one handed
  // over by the previous broker during an upgrade).
  static absl::StatusOr<std::unique_ptr<Listener>> Adopt(
      EventLoop& loop, wire::UniqueFd socket, const Options& options,
      wire::SysCalls& sys, AcceptCallback on_accept);
  ~Listener();

  // Binds and listens as `spec` says. A Unix socket file left by a broker
  // that is gone is replaced; one another process listens on is an error.
  absl::Status Bind(const ListenSpec& spec);
  // Takes over a listening socket (TCP or Unix stream).
  absl::Status AdoptSocket(wire::UniqueFd socket, bool proxy_protocol);

  size_t size() const { return sockets_.size(); }
  // The i-th listening socket, for handing it over (the caller dups it).
  int fd(size_t i = 0) const { return sockets_[i]->fd.get(); }
  // The address it is bound to (for a Unix socket, its sockaddr_un).
  const wire::SocketAddress& address(size_t i = 0) const {
    return sockets_[i]->address;
  }
  const std::string& name(size_t i = 0) const { return sockets_[i]->name; }
  // Connections the i-th socket accepted (fdbroker_listener_connections_
  // accepted_total{listener=name(i)}).
  uint64_t accepted(size_t i) const { return sockets_[i]->accepted; }
  // Every name, comma-separated, for the log.
  std::string Describe() const;
  // The name of the listening socket that accepted the connection `fd`
  // (from its local address); null if none of these.
  const std::string* NameOfConnection(int fd) const;

  // Stops taking connections; the sockets stay bound, so clients queue in
  // the backlogs instead of being refused. Resume() takes them again.
  void Pause();
  void Resume();
  // Apart from Pause (which an operator may undo, and which health
  // reports): a new broker in an upgrade holds off while the running one
  // still accepts from the same sockets, until it has a worker.
  void Hold(bool held);
  bool held() const { return held_; }
  // Whether the i-th socket is watched at all (while the listener accepts):
  // a worker's listener under --placement=kernel is watched only while no
  // worker accepts from it.
  void SetWatched(size_t i, bool watched);
  // Closes the sockets for good (shutdown, upgrade): clients are refused
  // from now on (after an upgrade, the new broker holds them).
  void Close();
  bool accepting() const { return accepting_ && !closed_; }
  // Connections whose PROXY header is still being read (they go on to the
  // callback, or are closed, even after Close()).
  size_t reading_headers() const;
  const Stats& stats() const { return stats_; }

 private:
  struct Socket {
    std::string name;
    wire::UniqueFd fd;
    wire::SocketAddress address;
    bool is_unix = false;
    uint64_t accepted = 0;
    bool watched = true;  // See SetWatched().
    // Destroyed first: it watches `fd` and holds the connections it reads.
    std::unique_ptr<IoWatch> watch;
    std::unique_ptr<ProxyProtocolReader> proxy;
  };
  absl::Status Add(wire::UniqueFd fd, bool proxy_protocol);
  void OnReadable(Socket& socket);
  void UpdateWatches();

  EventLoop& loop_;
  const Options options_;
  wire::SysCalls& sys_;
  AcceptCallback on_accept_;
  std::vector<std::unique_ptr<Socket>> sockets_;
  bool accepting_ = true;
  bool held_ = false;
  bool closed_ = false;
  Timer resume_timer_{loop_};  // Armed while exhausted.
  Stats stats_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_LISTENER_H_
