#ifndef FDBROKER_WORKER_SRC_REGISTRATION_H_
#define FDBROKER_WORKER_SRC_REGISTRATION_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "fdbroker/v1/handoff.pb.h"
#include "wire/message_channel.h"
#include "wire/sys_calls.h"

// The first exchange on a broker channel: connect, Hello, Welcome or Refusal.
// Kept apart from the running worker: Connect() uses the blocking Register(),
// a re-registration after broker loss (Hello.owned_connections) the
// non-blocking halves SendHello() and WelcomeFrom() from the event loop.
namespace fdbroker::worker {

// `configured` if set, else $FDBROKER_SOCKET; InvalidArgument if neither.
absl::StatusOr<std::string> ResolveSocketPath(const std::string& configured);

struct Registration {
  std::unique_ptr<wire::MessageChannel> channel;
  v1::Welcome welcome;
};

// Connects a SOCK_SEQPACKET socket to `socket_path`, sends `hello` and waits
// until `timeout` for the broker's answer. A Refusal becomes an error status
// carrying the broker's reason and message (RefusalToStatus); a broker of
// another uid than ours or root's, PermissionDenied before any Hello.
absl::StatusOr<Registration> Register(const std::string& socket_path,
                                      v1::HandoffMessage hello,
                                      absl::Duration timeout,
                                      wire::SysCalls& sys);

// The two halves of Register(), for a caller that cannot block (a worker
// re-registering from its event loop).
//
// Connects (non-blocking) and sends `hello`. A full listen backlog (EAGAIN)
// is retried until `connect_deadline`; pass absl::Now() to fail at once.
// Unavailable if nobody listens at `socket_path`; PermissionDenied if a
// process of another uid than ours or root's does (SO_PEERCRED).
// `attached_fd` (-1: none) goes with it: the listener a Hello with
// returns_listener gives back (the caller keeps its copy).
absl::StatusOr<std::unique_ptr<wire::MessageChannel>> SendHello(
    const std::string& socket_path, v1::HandoffMessage& hello,
    absl::Time connect_deadline, wire::SysCalls& sys, int attached_fd = -1);

// Checks the broker's first message on a channel. Welcome: its body, if the
// major version matches (else FailedPrecondition). Refusal:
// RefusalToStatus(). Anything else: Unavailable.
absl::StatusOr<v1::Welcome> WelcomeFrom(const std::string& socket_path,
                                        const v1::HandoffMessage& reply);

// The status a refusal turns into: the code follows the reason (credentials:
// PermissionDenied, too many workers: ResourceExhausted, ...), the message
// names the reason and quotes the broker's explanation.
absl::Status RefusalToStatus(const v1::Refusal& refusal);

}  // namespace fdbroker::worker

#endif  // FDBROKER_WORKER_SRC_REGISTRATION_H_
