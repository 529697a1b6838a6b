#ifndef FDBROKER_BROKER_UPGRADE_H_
#define FDBROKER_BROKER_UPGRADE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "wire/unique_fd.h"

namespace fdbroker {

// What `fdbroker --upgrade` receives from the running broker.
struct UpgradeSockets {
  // The listening sockets for clients, in the running broker's order (one
  // from a broker that predates several listeners).
  std::vector<wire::UniqueFd> listeners;
  wire::UniqueFd handoff;  // Listening hand-off Unix socket.
};

// The new broker's side of a planned upgrade: connects to the running
// broker's hand-off socket, sends UpgradeRequest and waits (up to
// `timeout`) for UpgradeHandover with its sockets. The running broker
// then finishes its hand-offs and exits; its workers re-register here.
absl::StatusOr<UpgradeSockets> RequestUpgrade(const std::string& socket_path,
                                              absl::Duration timeout);

// The systemd socket-activation listeners (LISTEN_PID/LISTEN_FDS: fds 3,
// 4, ...), if the environment passes them to this process; the variables
// are removed so that workers do not inherit them. Empty when not
// socket-activated.
absl::StatusOr<std::vector<wire::UniqueFd>> TakeActivatedListeners();

}  // namespace fdbroker

#endif  // FDBROKER_BROKER_UPGRADE_H_
