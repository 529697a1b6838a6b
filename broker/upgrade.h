#ifndef FDBROKER_BROKER_UPGRADE_H_
#define FDBROKER_BROKER_UPGRADE_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// What `fdbroker --upgrade` receives from the running broker.
struct UpgradeSockets {
  wire::UniqueFd listener;  // Listening TCP socket for clients.
  wire::UniqueFd handoff;   // Listening hand-off Unix socket.
  std::string listen_address;
};

// The new broker's side of a planned upgrade: connects to the running
// broker's hand-off socket, sends UpgradeRequest and waits (up to
// `timeout`) for UpgradeHandover with its two sockets. The running broker
// then finishes its hand-offs and exits; its workers re-register here.
absl::StatusOr<UpgradeSockets> RequestUpgrade(const std::string& socket_path,
                                              absl::Duration timeout);

// The systemd socket-activation listener (LISTEN_PID/LISTEN_FDS: fd 3), if
// the environment passes one to this process; the variables are removed so
// that workers do not inherit them. Empty fd when not socket-activated.
absl::StatusOr<wire::UniqueFd> TakeActivatedListener();

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_UPGRADE_H_
