#ifndef FDBROKER_BROKER_HANDOFF_SERVER_H_
#define FDBROKER_BROKER_HANDOFF_SERVER_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "broker/event_loop.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// The hand-off socket workers connect to: a SOCK_SEQPACKET Unix socket at
// --socket, created 0600. Loop thread only. Every peer is handed to the
// callback with its credentials (SO_PEERCRED) and whether its uid is
// allowed; the callback owns the socket and refuses disallowed peers.
class HandoffServer {
 public:
  using NewPeerCallback = absl::AnyInvocable<void(
      wire::UniqueFd socket, const ucred& peer, bool allowed)>;
  struct Options {
    // Uids allowed to register; empty means only the broker's own uid.
    std::vector<uid_t> allowed_uids;
    absl::Duration exhaustion_pause = absl::Milliseconds(100);
  };

  // Binds `path`. A stale socket file (nobody listening) is replaced; a live
  // one means another broker runs there, which is an error.
  static absl::StatusOr<std::unique_ptr<HandoffServer>> Create(
      EventLoop& loop, const std::string& path, const Options& options,
      wire::SysCalls& sys, NewPeerCallback on_peer);
  // Takes over an already listening hand-off socket bound at `path` (from
  // the previous broker during an upgrade).
  static absl::StatusOr<std::unique_ptr<HandoffServer>> Adopt(
      EventLoop& loop, const std::string& path, wire::UniqueFd socket,
      const Options& options, wire::SysCalls& sys, NewPeerCallback on_peer);
  // Removes the socket file, unless Release() was called.
  ~HandoffServer();

  const std::string& path() const { return path_; }
  int fd() const { return socket_.get(); }
  // Create() found a socket file nobody listened on: a broker died there,
  // and its workers may come back to re-register.
  bool replaced_stale_socket() const { return replaced_stale_socket_; }
  // Stops accepting and closes this copy of the socket, leaving the file
  // (another process now listens on it: upgrade hand-over).
  void Release();

 private:
  HandoffServer(EventLoop& loop, std::string path, wire::UniqueFd socket,
                const Options& options, wire::SysCalls& sys,
                NewPeerCallback on_peer);
  absl::Status Init();
  void OnReadable();
  bool Allowed(uid_t uid) const;

  EventLoop& loop_;
  const std::string path_;
  wire::UniqueFd socket_;
  const Options options_;
  wire::SysCalls& sys_;
  NewPeerCallback on_peer_;
  std::unique_ptr<IoWatch> watch_;
  Timer resume_timer_{loop_};
  bool replaced_stale_socket_ = false;
  bool released_ = false;
};

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_HANDOFF_SERVER_H_
