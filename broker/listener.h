#ifndef FDBROKER_BROKER_LISTENER_H_
#define FDBROKER_BROKER_LISTENER_H_

#include <cstdint>
#include <memory>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
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
};

// The TCP listening socket. Loop thread only. Accepts in batches while the
// socket is readable; on fd exhaustion (EMFILE/ENFILE/ENOBUFS/ENOMEM) it
// stops watching the socket for `exhaustion_pause` instead of spinning, and
// the connection stays in the kernel backlog.
class Listener {
 public:
  using AcceptCallback = absl::AnyInvocable<void(AcceptedConnection)>;
  struct Options {
    int backlog = 4096;
    absl::Duration exhaustion_pause = absl::Milliseconds(100);
    // Most accepts per wake-up, so one busy listener cannot starve the
    // hand-off channels of the same loop.
    int max_accepts_per_wake = 64;
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
  Timer resume_timer_{loop_};  // Armed while exhausted.
  Stats stats_;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_LISTENER_H_
