#ifndef FDBROKER_WORKER_INCLUDE_FDBROKER_WORKER_H_
#define FDBROKER_WORKER_INCLUDE_FDBROKER_WORKER_H_

// The C++ worker SDK of fdbroker: registers with the broker over the hand-off
// socket and turns its protocol (Hello/Welcome, Connection/Ack, Reject,
// Closed, Drain/Goodbye, heartbeats, and on request Release) into "here is a
// new connection".
//
// Two ways to use it:
//  - Event-loop mode: poll pollable_fd() for readability in your own loop
//    (epoll, poll, libuv, asyncio...) and call ProcessEvents() when it is
//    readable. New connections and the start of a drain arrive through the
//    callbacks in Options; call ConnectionClosed() when you close one.
//  - Thread-per-connection mode: ServeThreadPerConnection() blocks, runs each
//    connection's handler on its own thread, and returns when the worker has
//    drained.
//
// Ownership rule: a connection delivered to the application belongs to it
// (the fd arrives as a UniqueFd) and the broker has been told so (Ack). A
// connection that could not be acknowledged is closed by the SDK and never
// delivered: the broker still holds its copy and places it elsewhere.
//
// Losing the broker (channel closed, malformed message, heartbeat timeout)
// does not cost the application its connections. The SDK closes the
// connections it had not acknowledged yet (the broker still owned them),
// keeps serving the acknowledged ones and reconnects to the same socket with
// capped exponential back-off (50 ms doubling up to 1 s) for up to
// Options::reconnect_timeout. Each attempt sends a fresh Hello that lists
// every connection the application still owns (Hello.owned_connections; if
// that would not fit in one packet, the lowest ids lose their peer address
// first, then their entry, see worker/README.md) and says whether the last
// broker supervised the worker (Hello.was_supervised). A broker that answers
// Welcome adopts them, and the worker carries on as before under its new
// worker_id(): new connections arrive, Closed for an adopted connection goes
// to the new broker. Nothing reaches the application during all this:
// on_drain is not called, draining() stays false.
// Only if reconnecting fails (the timeout passes, or the new broker sends a
// Refusal) does the worker drain with cause kBrokerLost. A worker that was
// already draining (broker Drain, StartDrain()) when it lost the broker does
// not reconnect: it finishes its connections and is done. With
// reconnect_timeout zero, losing the broker drains at once (kBrokerLost).
//
// Releasing connections (opt-in, event-loop mode only: set
// Options::on_release_request). The broker may ask the worker to give idle
// connections back (ReleaseRequest: rebalancing) or, when it drains the
// worker while others remain, to release them instead of closing them
// (release_on_drain()). The application calls Release() for a connection
// that is between requests with nothing half-written; the broker places it
// on another worker, passing `unread_data` along. Rule for failures: a
// connection is never lost. Release() either returns OK (the SDK owns the fd
// now; the application forgets the connection and never calls
// ConnectionClosed() for it) or fails and leaves the fd with the caller. A
// Release that was accepted but queued behind a full socket buffer and then
// lost with the channel comes back through on_connection (same id and
// peer_address, initial_data = the unread_data given to Release(), no
// local_address); the application owns it again.
//
// The SDK logs through spdlog's default logger.

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "wire/sys_calls.h"
#include "wire/unique_fd.h"

namespace fdbroker::worker {

// A client connection the broker handed to this worker.
struct ClientConnection {
  // The broker's id for the connection (what ConnectionClosed() takes).
  uint64_t id = 0;
  // The connected client socket, close-on-exec. Its O_NONBLOCK flag is the
  // broker's choice in event-loop mode; in thread-per-connection mode the SDK
  // makes it blocking. Use MSG_DONTWAIT if you need to be sure.
  wire::UniqueFd fd;
  // Client address "ip:port" ("[v6]:port") and the address it connected to.
  std::string peer_address;
  std::string local_address;
  // The broker's listening socket the client came through ("0.0.0.0:8080",
  // "unix:/run/app.sock"; empty from an older broker).
  std::string listener;
  // When the broker accepted the connection.
  absl::Time accept_time;
  // Bytes a previous owner already read from the socket: process them as if
  // they had been read first, before reading from the socket.
  std::string initial_data;
};

// Why the worker drains.
enum class DrainCause {
  // The broker sent Drain (scale-down, rolling restart, broker shutdown).
  kBrokerRequest,
  // The broker channel closed, failed, sent garbage or fell silent, and
  // reconnecting gave up (Options::reconnect_timeout passed, or the broker
  // refused the re-registration), or reconnecting is disabled.
  kBrokerLost,
  // The application called StartDrain() (e.g. on SIGTERM).
  kLocal,
};

absl::string_view DrainCauseName(DrainCause cause);

// Why the broker asks for connections back (Release.reason echoes it).
enum class ReleaseReason {
  // Rebalance: this worker holds more than its share.
  kRebalance,
  // The worker is draining and other workers remain (release_on_drain()).
  kDrain,
};

absl::string_view ReleaseReasonName(ReleaseReason reason);

struct Options {
  // The broker's hand-off socket. Empty: the FDBROKER_SOCKET environment
  // variable; Connect() fails if neither is set.
  std::string socket_path;
  // The most connections this worker wants at once; 0 means no limit. Extra
  // connections are returned to the broker (Reject).
  uint32_t capacity = 0;
  // The most connections the broker may send in one packet (a burst of
  // accepts then costs both sides one message instead of one each). 1
  // disables batching; the broker caps it at 64.
  uint32_t max_connections_per_message = 32;
  // Shown by the broker's control plane (ListWorkers).
  std::map<std::string, std::string> labels;
  // How long Connect() waits for the broker's Welcome (also the most a
  // re-registration attempt waits for it).
  absl::Duration connect_timeout = absl::Seconds(10);
  // After losing the broker, how long to keep trying to reconnect and
  // re-register (same socket path) before draining with kBrokerLost. Zero
  // disables reconnecting: losing the broker drains at once.
  absl::Duration reconnect_timeout = absl::Seconds(30);

  // Event-loop mode callbacks, run on the thread that calls ProcessEvents(),
  // never with an SDK lock held (they may call any Worker method).
  // A new connection; the application owns it now and must eventually call
  // ConnectionClosed(id). Required in event-loop mode.
  absl::AnyInvocable<void(ClientConnection)> on_connection;
  // The worker started draining: take no new work, finish in-flight
  // requests, close idle connections. `deadline` is InfiniteFuture() unless
  // the broker set one (it ends a supervised worker after it). Called once.
  // Not called while the SDK reconnects after losing the broker, only if
  // that gives up (kBrokerLost).
  absl::AnyInvocable<void(DrainCause cause, absl::Time deadline)> on_drain;
  // Opts into connection migration (Hello.supports_release): the broker asks
  // for up to `max_connections` idle connections back; call Release() for
  // each one that is idle (fewer, or none, is fine: the broker does not
  // wait). Event-loop mode only: with it set, ServeThreadPerConnection()
  // fails. Unset, the broker never asks and never drains by releasing.
  absl::AnyInvocable<void(uint32_t max_connections, ReleaseReason reason)>
      on_release_request;

  // Opts into --placement=kernel (Hello.supports_listener_grant): a broker
  // in that mode grants the worker its own listening socket, and the SDK
  // accepts from it in ProcessEvents() and delivers those connections
  // through on_connection like handed ones (their ids have bit 63 set).
  // A broker in the default --placement=handoff ignores it.
  bool accept_granted_listener = true;

  // Test seam for sendmsg/recvmsg on the broker channel; nullptr means the
  // real syscalls. Must outlive the Worker.
  wire::SysCalls* syscalls = nullptr;
};

// A registered worker. Created by Connect(); destroying it closes the broker
// channel (connections already delivered stay open: the application owns
// them). Thread-safe, except that ProcessEvents() and
// ServeThreadPerConnection() must not run on two threads at once.
class Worker {
 public:
  // Runs a connection to completion on its own thread (it owns conn.fd).
  // Called concurrently from several threads.
  using ConnectionHandler = std::function<void(ClientConnection conn)>;

  // Connects to the broker, sends Hello and waits (at most
  // options.connect_timeout) for Welcome. Errors: InvalidArgument (no socket
  // path), Unavailable (no broker listening), DeadlineExceeded, or the
  // broker's refusal with its reason and message (PermissionDenied,
  // ResourceExhausted, FailedPrecondition, ...).
  static absl::StatusOr<std::unique_ptr<Worker>> Connect(Options options);

  virtual ~Worker() = default;

  // The broker's id for this worker (from the latest Welcome: it changes
  // when the worker re-registers with a new broker).
  virtual uint64_t worker_id() const = 0;

  // True while registered with a broker; false while reconnecting after
  // losing it, and once the channel is closed for good.
  virtual bool registered() const = 0;

  // --- Event-loop mode -----------------------------------------------------

  // Readable (level-triggered) whenever ProcessEvents() has work: broker
  // messages, a heartbeat due, Closed reports due, a reconnect attempt due.
  // Valid for the Worker's lifetime, also while reconnecting and after the
  // broker is gone. Do not read it.
  virtual int pollable_fd() const = 0;

  // Handles everything that is ready, without blocking: receives and
  // acknowledges connections (one Ack per batch) and delivers them through
  // on_connection, reports closed connections, sends and checks heartbeats,
  // reconnects after losing the broker (a non-blocking connect and Hello per
  // attempt; the Welcome is read when it arrives), and says Goodbye once a
  // draining worker owns no connection.
  virtual void ProcessEvents() = 0;

  // The application closed (or otherwise finished) connection `id`. Reported
  // to the broker in a batch: just before the next Ack, or within 5 ms
  // (pollable_fd() becomes readable then) so that a busy worker's reports
  // cost the broker no wake-up of their own; at once (the next
  // ProcessEvents()) for a worker with a capacity or while draining. While
  // the broker is lost the id is just forgotten (it is not listed in the
  // next re-registration). Callable from any thread.
  virtual void ConnectionClosed(uint64_t id) = 0;
  // As ConnectionClosed(), for a connection the application cut unfinished
  // (its drain deadline passed with the client still being served): the
  // broker counts it lost (Closed.cut_connection_ids, protocol 1.4).
  virtual void ConnectionCut(uint64_t id) = 0;

  // Drains on the worker's own initiative: new connections are returned to
  // the broker, and once the application owns none the worker says Goodbye
  // and finished() becomes true. While reconnecting after losing the
  // broker, it stops reconnecting. Callable from any thread.
  virtual void StartDrain() = 0;

  // True from the start of a drain (any cause). Not while reconnecting.
  virtual bool draining() const = 0;
  // True while draining on a broker Drain that asked for release_idle (only
  // with on_release_request set), as long as the channel is up: Release()
  // idle connections (ReleaseReason::kDrain) instead of closing them, and
  // each busy one as soon as its current response is out. Already true
  // inside on_drain. Should a Release() fail (the broker went away), close
  // idle connections as in an ordinary drain.
  virtual bool release_on_drain() const = 0;

  // Gives connection `id` back to the broker (Release, with the fd attached)
  // so that another worker serves its next request. Only for a connection
  // that is idle: no request being processed, nothing half-written, no
  // partial request read. `unread_data` is what the application read from
  // the socket and did not consume (a whole pipelined request); the next
  // owner processes it first. Remove the fd from your epoll set first: the
  // broker's copy keeps the socket open, and epoll would keep reporting it.
  // OK: the SDK took `fd` (it is closed once the message is out, without
  // touching the socket), the id is no longer the application's, and no
  // Closed is sent for it (if the channel dies before a queued Release went
  // out, the connection comes back through on_connection, see above). Any
  // error leaves `fd` with the caller, who still owns the connection:
  // FailedPrecondition (on_release_request unset, or a connection the
  // current broker does not know), NotFound (not an active connection),
  // InvalidArgument (no fd), Unavailable (not registered: reconnecting,
  // Goodbye said, or the channel failed during this send). Callable from
  // any thread; usually from on_release_request or the loop.
  virtual absl::Status Release(uint64_t id, wire::UniqueFd& fd,
                               std::string unread_data,
                               ReleaseReason reason) = 0;

  // True when the worker has drained: it owns no connection and has said
  // Goodbye (or lost the broker for good). The application should exit
  // (supervised) or destroy the Worker. Never true while reconnecting, even
  // with no connection left.
  virtual bool finished() const = 0;
  // Connections delivered and not yet reported closed.
  virtual size_t active_connections() const = 0;

  // --- Thread-per-connection mode ------------------------------------------

  // Serves until the worker has finished draining: each new connection runs
  // `handler` on its own thread, Closed is reported when it returns. Broker
  // loss and reconnection work as in event-loop mode (handlers keep running).
  // Handlers should poll draining() between requests and return when it is
  // true and the connection is idle. Returns after every handler thread
  // has been joined. Ignores options.on_connection (on_drain still fires).
  // Releasing is not supported in this mode: FailedPrecondition if
  // options.on_release_request is set (so such a worker never tells the
  // broker it supports_release).
  virtual absl::Status ServeThreadPerConnection(ConnectionHandler handler) = 0;
};

}  // namespace fdbroker::worker

#endif  // FDBROKER_WORKER_INCLUDE_FDBROKER_WORKER_H_
