"""The worker side of the hand-off protocol, independent of any event loop.

WorkerCore is the Python twin of the C++ SDK's WorkerImpl
(worker/src/worker_impl.cc); worker/README.md describes the behaviour both
share. It never blocks and never runs application code: a driver (aio.py,
blocking.py) polls fileno() for readability, calls process_events() when it
is readable or when deadline() has passed, hands the returned connections to
the application, and reports closes with connection_closed().

Threads: every method runs on the driver's thread.

Ownership of a client socket: from recv_fds until its Ack is sent it is in
the batch being received, then in the _Outgoing that acks it; once the Ack
is out it is listed in _owned and returned by process_events(), and the
application owns it. If the channel dies before the Ack is sent the socket is
closed untouched and never delivered: the broker still holds its copy and
places the client elsewhere.

Connection bookkeeping is by broker id only (_owned: id -> peer address).
Giving a connection back (release(), protocol 1.2) is one more way out of
_owned: pop the id, send Release with the fd attached, send no Closed.

The release rule: a connection is either the broker's or the
application's, never lost between them. release() takes a copy of the
connection's fd (a dup) and the id leaves _owned; the Release is sent at
once or queued. Once it is sent, the broker owns the connection: on_result
(True), and the application closes its own copy without shutdown() (other
copies keep the TCP connection open: no FIN, no RST). If it cannot be sent
(no channel, reconnecting, draining to Goodbye, the channel dies with it
queued, close()), the id goes back to _owned and on_result(False): the
connection is still the application's, which keeps serving it. The core
closes the copy it was given in both cases.

Granted listeners (protocol 1.4, §7.10; Options.accepts_listener): the
broker may send a listening socket (ListenerGrant) that the driver serves
with its event loop's own accept loop. Those connections never pass through
the core one by one: the driver numbers them (ids with LISTENER_ID_BIT set),
keeps them, and hands the core their absolute figures (listener_load())
at most every listener_load_interval; the core sends ListenerLoad when they
changed. A Goodbye waits until the broker has heard `active: 0`. A bit-63
connection can be released like an acked one; the broker then takes one off
the figure it has, and so does the core. A re-registering Hello returns the
latest granted listener while the driver still serves it (returns_listener,
its fd attached); a Welcome without listener_kept hands it back to the
driver to close (Events.unkept_listener).
"""

import collections
import dataclasses
import enum
import faulthandler
import logging
import os
import select
import socket
import sys
import time
from typing import Callable, Optional

from . import channel as channel_lib
from ._proto import pb
from .channel import (Channel, ChannelClosed, FdsTruncated, ProtocolError,
                      UntrustedBroker)

log = logging.getLogger("fdbroker_worker")

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 4
# The environment variable a supervised worker finds the broker through.
SOCKET_ENV_VAR = "FDBROKER_SOCKET"

# The Reject reason for connections whose fds this process had no room for
# (the packet's ancillary data truncated, §4.3).
OUT_OF_FDS_REASON = ("out of file descriptors (the kernel truncated the "
                     "passed fds)")

# At most this many broker messages per process_events(), so that a flood of
# connections cannot starve the application. epoll stays readable meanwhile.
_MAX_MESSAGES_PER_TURN = 256
# Reconnect back-off, as in the C++ SDK: short, because a restarted broker
# waits only about 2 s (--adopt_grace) for its old workers.
_FIRST_RETRY_DELAY = 0.05
_MAX_RETRY_DELAY = 1.0
_LOGGED_ATTEMPTS = 3
# Room kept free in a re-registration Hello's packet.
_HELLO_SLACK = 1024
# Closed reports wait up to this long (seconds) for an Ack to travel with, so
# that a busy worker's closes cost the broker no wake-up of their own; at once
# with a capacity (the broker needs the room) or while draining. As in the C++
# SDK (worker_impl.cc), and as many ids per report at most.
CLOSED_REPORT_DELAY = 0.005
MAX_CLOSED_PER_REPORT = 256
# Connections per ConnectionBatch the worker takes (Hello), as the C++ SDK.
MAX_CONNECTIONS_PER_MESSAGE = 32
# Release.unread_data above this many bytes is refused: the protocol's
# limit (protocol.md §5; wire::kMaxUnreadData in the C++ SDK), so that the
# bytes fit in the Connection packet that carries them on.
MAX_UNREAD_BYTES = channel_lib.MAX_PACKET_BYTES - 512
# Drain (protocol.md §7.7): the drivers end idle connections at once by
# half-closing their read side, except one on which the client has sent
# nothing yet: it is left reading until this long (seconds) after it was
# handed over, since its first request may still be on the way.
FIRST_REQUEST_GRACE = 2.0
# Ids of connections the worker accepted itself from a granted listener
# (§7.10): the broker never issues one.
LISTENER_ID_BIT = 1 << 63
# struct tcp_info: tcpi_bytes_received (Linux >= 4.1) is the u64 at this
# offset (the struct only ever grows at its end).
_TCPI_BYTES_RECEIVED = 128


class DrainCause(enum.Enum):
    """Why the worker drains."""
    BROKER_REQUEST = "broker request"  # Drain from the broker
    BROKER_LOST = "broker lost"  # reconnecting gave up, or is disabled
    LOCAL = "local"  # the application asked (start_drain(), e.g. SIGTERM)


class RegistrationError(ConnectionError):
    """The first registration failed: nobody listens, no Welcome in time,
    or a Refusal (`reason` is then the RefusalReason name)."""

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Options:
    # The broker's hand-off socket; None: $FDBROKER_SOCKET.
    socket_path: Optional[str] = None
    # The most connections at once (sent in Hello); 0 means no limit. Beyond
    # it connections are returned to the broker (Reject).
    capacity: int = 0
    # Shown by the broker's control plane (ListWorkers).
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    # Seconds to wait for the Welcome (first registration and each attempt).
    connect_timeout: float = 10.0
    # After losing the broker, seconds to keep trying to re-register before
    # draining (DrainCause.BROKER_LOST); 0 drains at once.
    reconnect_timeout: float = 30.0
    # The application gives idle connections back when asked (release()):
    # Hello.supports_release, so the broker may send ReleaseRequest and
    # Drain.release_idle.
    supports_release: bool = False
    # Hello.max_connections_per_message: connections accepted together come
    # in one ConnectionBatch packet (one recvmsg, one wake-up); 1: never.
    max_connections_per_message: int = MAX_CONNECTIONS_PER_MESSAGE
    # Hello.supports_listener_grant: the driver accepts connections itself
    # from a listening socket the broker grants (--placement=kernel, §7.10),
    # delivered in Events.listener, and reports them with listener_load().
    accepts_listener: bool = False


def _dump_stacks_on_abort() -> None:
    """The broker's watchdog sends SIGABRT to a hung worker before killing
    it: faulthandler then writes every thread's Python traceback to stderr
    (and the process still aborts). Left alone if already enabled."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, RuntimeError, OSError) as error:
        # sys.stderr is None or has no fd (embedded, pythonw).
        log.warning("no stack dump on SIGABRT: %s", error)


@dataclasses.dataclass
class Connection:
    """A client connection the broker handed over (and that was acked)."""
    id: int
    # Connected TCP socket, close-on-exec; its blocking mode is the driver's.
    socket: socket.socket
    peer_address: str
    local_address: str
    accept_time_unix_nanos: int
    # Bytes a previous owner already read: process them before the socket's.
    initial_data: bytes
    # The broker's listening socket the client came through ("0.0.0.0:8080",
    # "unix:/run/app.sock"; empty from an older broker).
    listener: str = ""


@dataclasses.dataclass
class Drain:
    cause: DrainCause
    # Unix time (seconds) at which the broker ends the worker, if it set one.
    deadline: Optional[float]
    # Release idle connections (release(), reason DRAIN) instead of closing
    # them, and busy ones once idle (Drain.release_idle; other workers
    # remain).
    release_idle: bool = False


@dataclasses.dataclass
class ReleaseRequest:
    """The broker asks for up to max_connections idle connections now."""
    max_connections: int
    reason: int  # pb.ReleaseReason


@dataclasses.dataclass
class Listener:
    """A granted listening socket (ListenerGrant): the driver's from now
    on. A later one replaces it (the driver closes the earlier)."""
    socket: socket.socket
    # As Connection.listener ("0.0.0.0:8080").
    name: str


@dataclasses.dataclass
class Events:
    """What process_events() has for the application, in this order."""
    connections: list[Connection]
    drain: Optional[Drain]
    release_requests: list[ReleaseRequest] = dataclasses.field(
        default_factory=list)
    listener: Optional[Listener] = None
    # A listener this worker returned with its re-registering Hello and the
    # Welcome did not keep (listener_kept false): the driver stops accepting
    # from it and closes it (§7.10). Comes before `listener` when both do.
    unkept_listener: Optional[socket.socket] = None


ReleaseCallback = Callable[[bool], None]


@dataclasses.dataclass
class _Release:
    """A Release not yet sent: the core's copy of the connection's fd."""
    connection_id: int
    peer_address: str
    socket: socket.socket
    on_result: ReleaseCallback


@dataclasses.dataclass
class _Outgoing:
    message: "pb.HandoffMessage"
    # The connections this message acks: sockets not yet the application's.
    acked: list[Connection] = dataclasses.field(default_factory=list)
    # The connection this Release gives back (its fd is attached).
    release: Optional[_Release] = None

    def fd(self) -> Optional[int]:
        return self.release.socket.fileno() if self.release else None


def resolve_socket_path(configured: Optional[str]) -> str:
    path = configured or os.environ.get(SOCKET_ENV_VAR)
    if not path:
        raise RegistrationError(
            f"no broker socket: pass socket_path or set ${SOCKET_ENV_VAR}")
    return path


def has_received_bytes(sock: socket.socket) -> bool:
    """Whether the client has sent anything on this TCP connection (the
    kernel's count, whoever read it; a FIN counts too): a drain need not
    wait for its first request. False when the kernel cannot say, the safe
    side: a needless grace only delays the drain, a missing one could cut a
    first request."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, ValueError):
        return False  # closed meanwhile, or not TCP: grace as if fresh
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return False
    return int.from_bytes(
        info[_TCPI_BYTES_RECEIVED:_TCPI_BYTES_RECEIVED + 8],
        sys.byteorder) > 0


def first_request_grace_end(sock: Optional[socket.socket],
                            delivered_at: float, now: float) -> float:
    """When a drain may end this connection (§7.7): now if the client has
    sent anything, else FIRST_REQUEST_GRACE after its hand-over."""
    if sock is not None and has_received_bytes(sock):
        return now
    return max(now, delivered_at + FIRST_REQUEST_GRACE)


def check_listening_socket(fd: int) -> socket.socket:
    """The granted fd as a socket; ProtocolError unless it is a listening
    TCP (SOCK_STREAM) socket (§7.10). Closes `fd` on error."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        os.close(fd)
        raise ProtocolError(f"listener_grant carries no socket: {error}")
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as error:
        sock.close()
        raise ProtocolError(f"listener_grant: {error}")
    if kind != socket.SOCK_STREAM or not listening or sock.family not in (
            socket.AF_INET, socket.AF_INET6):
        sock.close()
        raise ProtocolError(
            "listener_grant carries no listening TCP socket (type "
            f"{kind}, family {sock.family}, listening {bool(listening)})")
    return sock


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _encoded_len(entry: "pb.OwnedConnection") -> int:
    """Bytes `entry` takes in a Hello: tag, length, body."""
    size = entry.ByteSize()
    return 1 + _varint_len(size) + size


class WorkerCore:
    """One worker's registration with the broker, and its connections."""

    def __init__(self, options: Options,
                 clock: Callable[[], float] = time.monotonic,
                 socket_class: type = socket.socket) -> None:
        """socket_class(fileno=fd) wraps each client socket handed over (a
        socket.socket subclass, e.g. one that learns of its own close)."""
        self._options = options
        self._socket_class = socket_class
        self._path = resolve_socket_path(options.socket_path)
        self._clock = clock
        self._epoll = select.epoll()
        self._channel: Optional[Channel] = None
        # The attempt (first or re-registration) waiting for the answer to
        # its Hello; its deadline.
        self._registering: Optional[Channel] = None
        self._attempt_deadline = 0.0
        self._first = True
        self.error: Optional[RegistrationError] = None
        # From the latest Welcome. Heartbeat 0: never send / never expire.
        self.worker_id = 0
        self._supervised = False
        self._heartbeat_interval = 0.0
        self._heartbeat_timeout = 0.0
        # Welcome.worker_timeout_ms (seconds): while > 0, a Heartbeat goes
        # out every interval, busy or not, with app_silent_ms (the broker's
        # hung-worker watchdog, protocol 1.4).
        self._worker_timeout = 0.0
        self._last_sent = self._last_received = clock()
        self._last_heartbeat = self._last_sent
        # Seconds since the thread that runs the application last proved it
        # runs. The default: the driver's thread is that thread (asyncio),
        # so whenever a Heartbeat is sent it runs. A driver with a thread of
        # its own (blocking.py) replaces it.
        self.app_silent: Callable[[], float] = lambda: 0.0
        self._want_writable = False
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        self._unsent_acks = 0  # connections covered by Acks in _outbox
        self._pending_releases = 0  # Releases in _outbox
        # The broker sent Reconnect (an upgrade): re-register at once, once
        # everything owed to it is sent.
        self._reconnect_requested = False
        self._release_requests: list[ReleaseRequest] = []
        # Acked and not reported closed: id -> peer address (what a
        # re-registering Hello lists).
        self._owned: dict[int, str] = {}
        # Owned ids the current broker does not know (left out of a Hello
        # that would not fit in a packet): no Closed is sent for them.
        self._unlisted: set[int] = set()
        self._ready: list[Connection] = []
        self._closed_to_report: list[int] = []
        # Those of _closed_to_report cut unfinished (Closed.cut_connection_ids).
        self._cut_to_report: set[int] = set()
        # When waiting Closed reports go out at the latest (no Ack first).
        self._closed_report_at = 0.0
        self.draining = False
        self._drain: Optional[Drain] = None
        self._drain_to_announce = False
        # Goodbye sent or queued: nothing else is sent after it.
        self._goodbye_sent = False
        # Reconnecting after losing the broker (never while draining).
        self._reconnecting = False
        self._lost_at = 0.0
        self._reconnect_deadline = 0.0
        self._next_attempt_at = 0.0
        self._retry_delay = _FIRST_RETRY_DELAY
        self._attempts = 0
        # Granted listener (§7.10): Welcome.listener_load_interval_ms
        # (seconds; 0: ListenerLoad may not be sent); the driver's latest
        # figures; those the current broker has heard (None: nothing yet).
        self.listener_load_interval = 0.0
        self._granted: Optional[Listener] = None
        # The latest granted listener, the driver's (not closed here): a
        # re-registering Hello returns it while it is open (fileno() is -1
        # once the driver closes it); what the attempt in flight returned;
        # one the Welcome did not keep, for the next Events.
        self._serving: Optional[socket.socket] = None
        self._returning: Optional[socket.socket] = None
        self._unkept: Optional[socket.socket] = None
        self._listener_figures = (0, 0)
        self._reported_figures: Optional[tuple[int, int]] = None

    # --- State ------------------------------------------------------------

    def fileno(self) -> int:
        """Readable whenever process_events() has channel work."""
        return self._epoll.fileno()

    @property
    def registered(self) -> bool:
        return self._channel is not None

    @property
    def finished(self) -> bool:
        """Drained: owns no connection and said Goodbye (or lost the broker
        for good). The application should exit (supervised) or stop."""
        return (self.draining and self._channel is None and
                self._registering is None and not self._owned and
                not self._listener_figures[1])

    @property
    def active_connections(self) -> int:
        return len(self._owned) + self._listener_figures[1]

    def deadline(self) -> Optional[float]:
        """The clock() time by which process_events() must run again."""
        if self._registering is not None:
            limit = self._attempt_deadline
            return min(limit, self._reconnect_deadline) if (
                self._reconnecting) else limit
        if self._reconnecting:
            return min(self._next_attempt_at, self._reconnect_deadline)
        if self._channel is None or self._goodbye_sent:
            return None
        times = []
        if (heartbeat := self._next_heartbeat()) is not None:
            times.append(heartbeat)
        if self._heartbeat_timeout > 0:
            times.append(self._last_received + self._heartbeat_timeout)
        if self._closed_to_report:
            times.append(self._closed_report_at)
        return min(times, default=None)

    # --- Entry points -----------------------------------------------------

    def start(self) -> None:
        """Connects and sends the first Hello; the Welcome is read by
        process_events() (then `registered`; on failure `error`).
        RegistrationError at once if nobody listens."""
        try:
            self._send_hello(self._hello())
        except UntrustedBroker as error:
            raise RegistrationError(str(error)) from None
        except OSError as error:
            raise RegistrationError(
                f"cannot connect to the broker at {self._path}: "
                f"{error.strerror or error}") from None

    def process_events(self) -> Events:
        """Does everything that is ready, without blocking."""
        for fd, mask in self._epoll.poll(0):
            if self._channel is not None and fd == self._channel.fileno():
                if mask & select.EPOLLOUT:
                    self._flush()
                if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._receive()
            elif (self._registering is not None and
                  fd == self._registering.fileno()):
                self._receive_answer()
        self._on_time()
        self._report_closed()
        self._say_goodbye_if_drained()
        ready, self._ready = self._ready, []
        drain = None
        if self._drain_to_announce:
            self._drain_to_announce = False
            drain = self._drain
        requests, self._release_requests = self._release_requests, []
        granted, self._granted = self._granted, None
        unkept, self._unkept = self._unkept, None
        return Events(ready, drain, requests, granted, unkept)

    def listener_load(self, accepted_total: int, active: int) -> bool:
        """The driver's figures of the connections it accepted from granted
        listeners (absolute; ids with LISTENER_ID_BIT; `active` leaves out
        those being released, which the broker counts off itself when their
        Release arrives): sent in ListenerLoad
        now if they changed and the broker asked for them. The driver calls
        it at most every listener_load_interval (at once while draining).
        True if process_events() should run now (a drain may end)."""
        self._listener_figures = (accepted_total, active)
        self._report_listener_load()
        return self.draining and not active

    def _report_listener_load(self) -> None:
        if (self._channel is None or self._goodbye_sent or
                self.listener_load_interval <= 0 or
                self._listener_figures == self._reported_figures or
                (self._reported_figures is None and
                 self._listener_figures == (0, 0))):
            return
        self._reported_figures = self._listener_figures
        accepted_total, active = self._listener_figures
        self._send(_Outgoing(pb.HandoffMessage(listener_load=pb.ListenerLoad(
            accepted_total=accepted_total, active=active))))

    def connection_closed(self, connection_id: int, cut: bool = False) -> bool:
        """The application closed an acked connection; reported (batched)
        by process_events(): with the next Ack, or once deadline() passes.
        With `cut`, it closed it unfinished (its drain deadline passed with
        the client still served): reported in Closed.cut_connection_ids,
        which the broker counts as lost (protocol 1.4). Forgotten while
        there is no broker. True if process_events() should run now (the
        report is urgent); else deadline() may have moved."""
        if self._owned.pop(connection_id, None) is None:
            log.warning("connection_closed(%d): not an active connection",
                        connection_id)
            return False
        known = connection_id not in self._unlisted
        self._unlisted.discard(connection_id)
        # Only a broker that knows the id hears of it: the current one, or
        # the one answering a Hello that listed it.
        if known and (self._channel is not None or
                      self._registering is not None):
            self._closed_to_report.append(connection_id)
            if cut:
                self._cut_to_report.add(connection_id)
            if len(self._closed_to_report) == 1:
                self._closed_report_at = self._clock() + CLOSED_REPORT_DELAY
        return self._closed_reports_urgent() or self.draining

    def release(self, connection_id: int, sock: socket.socket,
                unread_data: bytes, reason: int,
                on_result: ReleaseCallback) -> None:
        """Gives the acked connection `connection_id` back to the broker
        (Release with `sock`'s fd attached, `unread_data`: bytes read from it
        but not consumed). The caller guarantees it is idle: between
        requests, nothing half-written, reading paused. Takes `sock` (a copy
        of the fd, e.g. a dup) and closes it in every case. on_result(True)
        once the Release is sent (the broker owns the connection: close your
        copy without shutdown(), send nothing on it), on_result(False) if it
        cannot be sent (the connection is still yours); either from this
        call or from a later process_events()/close()."""
        why = None
        accepted = bool(connection_id & LISTENER_ID_BIT)
        if accepted and self._channel is not None:
            # The broker must count it before it sees it released.
            self._report_listener_load()
        if not self._options.supports_release:
            why = "the worker did not opt into release"
        elif accepted and not (self._reported_figures or (0, 0))[1]:
            why = "no connection accepted from a granted listener reported"
        elif not accepted and connection_id not in self._owned:
            why = "not an active connection"
        elif connection_id in self._unlisted:
            why = "the broker does not know this connection"
        elif self._channel is None or self._goodbye_sent:
            why = "not registered with a broker"
        elif len(unread_data) > MAX_UNREAD_BYTES:
            why = f"{len(unread_data)} unread bytes (> {MAX_UNREAD_BYTES})"
        if why is not None:
            log.debug("connection %d kept: %s", connection_id, why)
            sock.close()
            return on_result(False)
        if accepted:
            # What the broker will count once it has this Release (it
            # takes one off; anything sent later comes after it), and the
            # driver's figures from now on (a connection being released is
            # not counted).
            total, active = self._reported_figures
            self._reported_figures = (total, active - 1)
            total, active = self._listener_figures
            self._listener_figures = (total, max(active - 1, 0))
        peer = "" if accepted else self._owned.pop(connection_id)
        self._pending_releases += 1
        self._send(_Outgoing(
            pb.HandoffMessage(release=pb.Release(
                connection_id=connection_id, unread_data=unread_data,
                reason=reason)),
            release=_Release(connection_id, peer, sock, on_result)))

    def start_drain(self) -> None:
        """Drain on the worker's own initiative (stops reconnecting)."""
        if self._reconnecting:
            log.info("draining: stopped reconnecting to the broker at %s",
                     self._path)
            self._stop_reconnecting()
        self._begin_drain(DrainCause.LOCAL, None)

    def close(self) -> None:
        """Closes the channel; connections already delivered stay open."""
        if (self._channel is not None and not self._goodbye_sent and
                not self._owned and not self._outbox):
            # Best effort: tells the broker this was an orderly exit.
            try:
                self._channel.send(pb.HandoffMessage(
                    goodbye=pb.Goodbye(reason="worker shut down")))
            except (OSError, ProtocolError):
                pass
        self._close_channel()
        self._stop_reconnecting()
        for outgoing in self._outbox:
            self._discard(outgoing)
        self._outbox.clear()
        for connection in self._ready:
            connection.socket.close()
        self._ready.clear()
        if self._granted is not None:
            self._granted.socket.close()
            self._granted = None
        self._epoll.close()

    # --- Registration -----------------------------------------------------

    def _hello(self) -> "pb.HandoffMessage":
        return pb.HandoffMessage(hello=pb.Hello(
            version=pb.ProtocolVersion(major=PROTOCOL_MAJOR,
                                       minor=PROTOCOL_MINOR),
            pid=os.getpid(), capacity=self._options.capacity,
            labels=self._options.labels, was_supervised=self._supervised,
            supports_release=self._options.supports_release,
            supports_listener_grant=self._options.accepts_listener,
            reports_liveness=True,
            max_connections_per_message=max(
                1, self._options.max_connections_per_message)))

    def _send_hello(self, hello: "pb.HandoffMessage",
                    listener: Optional[socket.socket] = None) -> None:
        """`listener`: returned with the Hello (its fd attached)."""
        attempt = Channel.connect(self._path)
        try:
            fd = listener.fileno() if listener is not None else None
            if not attempt.send(hello, fd):
                raise BlockingIOError("the new channel's buffer is full")
            self._epoll.register(attempt.fileno(), select.EPOLLIN)
        except BaseException:
            attempt.close()
            raise
        self._registering = attempt
        self._returning = listener
        self._attempt_deadline = self._clock() + self._options.connect_timeout

    def _receive_answer(self) -> None:
        try:
            received = self._registering.receive()
        except ChannelClosed:
            return self._fail_attempt(
                "the broker closed the channel before Welcome")
        except (ProtocolError, OSError) as error:
            return self._fail_attempt(f"bad answer to Hello: {error}")
        if received is None:
            return
        message, _ = received  # a valid answer carries no fd
        body = message.WhichOneof("body")
        if body == "refusal":
            reason = pb.RefusalReason.Name(message.refusal.reason)
            return self._give_up(
                f"the broker refused the worker ({reason}): "
                f"{message.refusal.message}", reason)
        if body != "welcome":
            return self._fail_attempt(f"{body} instead of Welcome")
        if message.welcome.version.major != PROTOCOL_MAJOR:
            return self._give_up(
                f"the broker speaks protocol {message.welcome.version.major}"
                f".x, this worker {PROTOCOL_MAJOR}.x")
        self._registered(message.welcome)

    def _registered(self, welcome: "pb.Welcome") -> None:
        old_id = self.worker_id
        self._channel, self._registering = self._registering, None
        self.worker_id = welcome.worker_id
        self._supervised = welcome.supervised
        self._heartbeat_interval = welcome.heartbeat_interval_ms / 1000
        self._heartbeat_timeout = welcome.heartbeat_timeout_ms / 1000
        self._worker_timeout = welcome.worker_timeout_ms / 1000
        self.listener_load_interval = welcome.listener_load_interval_ms / 1000
        # This broker counts the connections we accepted ourselves from our
        # reports only: it hears them now (§7.10: reported again after
        # re-registering), before the driver may stop accepting.
        self._reported_figures = None
        self._report_listener_load()
        returned, self._returning = self._returning, None
        if returned is not None and not welcome.listener_kept:
            log.info("the broker did not keep the returned listener: "
                     "closing it")
            if self._serving is returned:
                self._serving = None
            if self._granted is not None and self._granted.socket is returned:
                self._granted.socket.close()  # the driver never served it
                self._granted = None
            else:
                self._unkept = returned
        if self._worker_timeout > 0:
            _dump_stacks_on_abort()
        self._last_sent = self._last_received = self._clock()
        self._last_heartbeat = self._last_sent
        if self._reconnecting:
            self._reconnecting = False
            log.info("reconnected to the broker at %s as worker %d (was %d) "
                     "with %d owned connections, %.0f ms after losing it "
                     "(attempt %d)", self._path, self.worker_id, old_id,
                     len(self._owned),
                     (self._last_received - self._lost_at) * 1000,
                     self._attempts)
        self._first = False
        # Connections may have come right behind the Welcome.
        self._receive()

    def _fail_attempt(self, reason: str) -> None:
        self._close_registering()
        if self._first:
            self.error = RegistrationError(
                f"cannot register with the broker at {self._path}: {reason}")
            return
        # The ids closed meanwhile were in that Hello only.
        self._closed_to_report.clear()
        self._cut_to_report.clear()
        self._unlisted.clear()
        self._next_attempt_at = self._clock() + self._retry_delay
        if self._attempts <= _LOGGED_ATTEMPTS:
            log.info("reconnect attempt %d failed: %s; next in %.0f ms%s",
                     self._attempts, reason, self._retry_delay * 1000,
                     " (further attempts are not logged)"
                     if self._attempts == _LOGGED_ATTEMPTS else "")
        self._retry_delay = min(2 * self._retry_delay, _MAX_RETRY_DELAY)

    def _give_up(self, reason: str, refusal: Optional[str] = None) -> None:
        """A Refusal, a foreign major version, or the reconnect deadline."""
        if self._first:
            self._close_registering()
            self.error = RegistrationError(
                f"cannot register with the broker at {self._path}: {reason}",
                refusal)
            return
        log.error("gave up reconnecting to the broker at %s: %s; draining %d "
                  "active connections", self._path, reason, len(self._owned))
        self._stop_reconnecting()
        self._begin_drain(DrainCause.BROKER_LOST, None)

    def _close_registering(self) -> None:
        self._returning = None
        if self._registering is not None:
            self._epoll.unregister(self._registering.fileno())
            self._registering.close()
            self._registering = None

    # --- Losing the broker, and reconnecting ------------------------------

    def _lose_channel(self, reason: str, at_once: bool = False) -> None:
        """`at_once`: the broker asked (Reconnect), so the first attempt
        comes without back-off."""
        if self._channel is None:
            return
        self._reconnect_requested = False
        reconnect = (not self.draining and
                     self._options.reconnect_timeout > 0)
        if self._goodbye_sent:
            log.debug("broker channel ended after Goodbye: %s", reason)
        elif reconnect and at_once:
            log.info("%s: re-registering with %d active connections",
                     reason, len(self._owned))
        elif reconnect:
            log.warning("lost the broker channel (worker %d): %s; keeping %d "
                        "active connections, reconnecting to %s for up to "
                        "%g s", self.worker_id, reason, len(self._owned),
                        self._path, self._options.reconnect_timeout)
        else:
            log.warning("lost the broker channel (worker %d): %s; keeping %d "
                        "active connections, taking no new ones",
                        self.worker_id, reason, len(self._owned))
        self._close_channel()
        for outgoing in self._outbox:
            # Not acked: the broker re-places them. Not released: still ours.
            self._discard(outgoing)
        self._outbox.clear()
        self._unsent_acks = 0
        # Closes the old broker was not told about die with it.
        self._closed_to_report.clear()
        self._cut_to_report.clear()
        self._unlisted.clear()
        if reconnect:
            self._reconnecting = True
            self._attempts = 0
            self._lost_at = self._clock()
            self._reconnect_deadline = (self._lost_at +
                                        self._options.reconnect_timeout)
            self._next_attempt_at = self._lost_at + (
                0 if at_once else _FIRST_RETRY_DELAY)
            self._retry_delay = min(2 * _FIRST_RETRY_DELAY, _MAX_RETRY_DELAY)
        else:
            self._begin_drain(DrainCause.BROKER_LOST, None)

    def _try_register(self) -> None:
        self._attempts += 1
        hello = self._hello()
        # §7.10: the listener we still accept from goes back with the Hello,
        # so that the broker can hold it (the kernel's group stays whole).
        returned = self._serving if (
            self._serving is not None and self._serving.fileno() >= 0 and
            not self.draining) else None
        hello.hello.returns_listener = returned is not None
        self._list_owned(hello.hello)
        self._closed_to_report.clear()
        self._cut_to_report.clear()
        try:
            self._send_hello(hello, returned)
        except UntrustedBroker as error:
            return self._give_up(str(error))
        except (OSError, ProtocolError) as error:
            return self._fail_attempt(str(error))
        log.debug("re-registration attempt %d: Hello sent to %s with %d "
                  "owned connections%s", self._attempts, self._path,
                  len(hello.hello.owned_connections),
                  " and the granted listener" if returned else "")

    def _list_owned(self, hello: "pb.Hello") -> None:
        """Fills Hello.owned_connections (and _unlisted). The Hello must fit
        in one packet: the lowest ids give way first, peer addresses before
        entries. The highest id always stays, which keeps the ids the new
        broker hands out (above every adopted one) clear of all owned here."""
        self._unlisted.clear()
        entries = [pb.OwnedConnection(connection_id=cid, peer_address=peer)
                   for cid, peer in sorted(self._owned.items())]
        limit = channel_lib.MAX_PACKET_BYTES - _HELLO_SLACK
        total = hello.ByteSize() + sum(map(_encoded_len, entries))
        stripped = 0
        for entry in entries:
            if total <= limit:
                break
            total -= _encoded_len(entry)
            entry.ClearField("peer_address")
            total += _encoded_len(entry)
            stripped += 1
        kept = entries
        if total > limit:
            kept = []
            for index, entry in enumerate(entries):
                if total > limit and index + 1 < len(entries):
                    total -= _encoded_len(entry)
                    self._unlisted.add(entry.connection_id)
                else:
                    kept.append(entry)
        hello.owned_connections.extend(kept)
        if self._attempts > 1:
            return  # said once per loss
        if self._unlisted:
            log.warning("%d of %d owned connections do not fit in the Hello: "
                        "the broker will not count them", len(self._unlisted),
                        len(entries))
        elif stripped:
            log.warning("the Hello lists %d of %d owned connections without "
                        "their peer addresses, to fit in one packet",
                        stripped, len(entries))

    def _stop_reconnecting(self) -> None:
        self._close_registering()
        self._reconnecting = False
        self._closed_to_report.clear()
        self._cut_to_report.clear()
        self._unlisted.clear()

    def _on_time(self) -> None:
        now = self._clock()
        if self._first:
            if self._registering is not None and now >= self._attempt_deadline:
                self._fail_attempt(
                    f"no Welcome within {self._options.connect_timeout:g} s")
        elif self._reconnecting:
            if now >= self._reconnect_deadline:
                self._give_up(
                    f"no broker took the worker back within "
                    f"{self._options.reconnect_timeout:g} s "
                    f"({self._attempts} attempts)")
            elif self._registering is not None:
                if now >= self._attempt_deadline:
                    self._fail_attempt(
                        f"no Welcome within {self._options.connect_timeout:g}"
                        " s")
            elif now >= self._next_attempt_at:
                self._try_register()
        else:
            self._check_heartbeat(now)

    def _check_heartbeat(self, now: float) -> None:
        if self._channel is None or self._goodbye_sent:
            return
        if (self._heartbeat_timeout > 0 and
                now - self._last_received >= self._heartbeat_timeout):
            return self._lose_channel(
                f"nothing heard from the broker for "
                f"{(now - self._last_received) * 1000:.0f} ms (heartbeat "
                f"timeout {self._heartbeat_timeout * 1000:.0f} ms)")
        heartbeat = self._next_heartbeat()
        if heartbeat is not None and now >= heartbeat:
            self._last_heartbeat = now
            silent_ms = min(int(self.app_silent() * 1000), 0xFFFFFFFF)
            self._send(_Outgoing(pb.HandoffMessage(heartbeat=pb.Heartbeat(
                sent_unix_nanos=time.time_ns(),
                app_silent_ms=max(silent_ms, 0)))))

    def _next_heartbeat(self) -> Optional[float]:
        """When the next Heartbeat is due (None: none). While the outbox is
        blocked we are not silent, just stalled."""
        if self._heartbeat_interval <= 0 or self._outbox:
            return None
        # With the watchdog on, other traffic does not replace it.
        last = (self._last_heartbeat if self._worker_timeout > 0 else
                self._last_sent)
        return last + self._heartbeat_interval

    # --- The registered channel ------------------------------------------

    def _receive(self) -> None:
        taken: list[Connection] = []
        rejected: list[int] = []
        out_of_fds: list[int] = []
        for _ in range(_MAX_MESSAGES_PER_TURN):
            if self._channel is None or self._goodbye_sent:
                break
            try:
                received = self._channel.receive()
            except FdsTruncated as truncated:
                # No room for the sockets here (§4.3): the broker still
                # holds them; a Reject lets it place them elsewhere.
                self._last_received = self._clock()
                offered = truncated.message
                out_of_fds.extend(
                    [offered.connection.connection_id]
                    if offered.WhichOneof("body") == "connection" else
                    [c.connection_id
                     for c in offered.connection_batch.connections])
                continue
            except (ChannelClosed, ProtocolError, OSError) as error:
                self._lose_channel(str(error))
                break
            if received is None:
                break
            message, fd = received
            self._last_received = self._clock()
            body = message.WhichOneof("body")
            if body == "connection":
                if not self._take(message.connection, fd, taken, rejected):
                    break
            elif body == "connection_batch":
                offers = message.connection_batch.connections
                limit = max(1, self._options.max_connections_per_message)
                if len(offers) > limit:
                    for each in fd:
                        os.close(each)
                    self._lose_channel(
                        f"connection_batch of {len(offers)} connections "
                        f"exceeds max_connections_per_message {limit}")
                    break
                fds = iter(fd)
                if not all(self._take(offered, next(fds), taken, rejected)
                           for offered in offers):
                    for each in fds:
                        os.close(each)
                    break
            elif body == "reconnect":
                self._reconnect_requested = True
            elif body == "listener_grant":
                if not self._take_listener(message.listener_grant, fd):
                    break
            elif body == "drain":
                deadline = message.drain.deadline_unix_nanos
                self._begin_drain(DrainCause.BROKER_REQUEST,
                                  deadline / 1e9 if deadline > 0 else None,
                                  message.drain.release_idle and
                                  self._options.supports_release)
            elif (body == "release_request" and
                  self._options.supports_release):
                request = message.release_request
                self._release_requests.append(ReleaseRequest(
                    request.max_connections, request.reason or
                    pb.RELEASE_REASON_REBALANCE))
            elif body != "heartbeat":
                # A protocol error (§7.5), a ReleaseRequest without
                # supports_release among them (§5 ReleaseRequest).
                if fd is not None:
                    os.close(fd)
                self._lose_channel(f"unexpected {body} from the broker")
                break
        if self._channel is None:
            # Nothing can be acked: these close, the broker re-places them.
            self._discard(_Outgoing(pb.HandoffMessage(), taken))
            return
        if self.draining:
            # A Drain in the same batch also returns the connections before it.
            rejected.extend(connection.id for connection in taken)
            self._discard(_Outgoing(pb.HandoffMessage(), taken))
            taken = []
        if taken:
            # Waiting Closed reports go just before the Ack: one wake-up of
            # the broker for both.
            self._report_closed(now=True)
        if out_of_fds:
            log.warning("out of file descriptors; rejected %d connection(s)",
                         len(out_of_fds))
            self._send(_Outgoing(pb.HandoffMessage(reject=pb.Reject(
                connection_ids=out_of_fds, reason=OUT_OF_FDS_REASON))))
        if rejected:
            reason = ("worker is draining" if self.draining else
                      f"worker is at capacity ({self._options.capacity} "
                      "connections)")
            self._send(_Outgoing(pb.HandoffMessage(reject=pb.Reject(
                connection_ids=rejected, reason=reason))))
        if taken:
            self._send(_Outgoing(pb.HandoffMessage(ack=pb.Ack(
                connection_ids=[c.id for c in taken])), taken))
        self._maybe_reconnect_now()

    def _maybe_reconnect_now(self) -> None:
        """Reconnect (§7.9): once the Acks, Rejects and Closed reports owed
        to this broker are out, register again at once with the new one."""
        if not self._reconnect_requested or self._channel is None:
            return
        if self._closed_to_report and not self._outbox:
            self._report_closed(now=True)
        if self._outbox:
            return  # _flush() comes back here.
        self._reconnect_requested = False
        self._lose_channel("the broker asked to re-register (upgrade)",
                           at_once=True)

    def _take(self, offered: "pb.Connection", fd: int,
              taken: list[Connection], rejected: list[int]) -> bool:
        """Takes (or rejects) one offered connection and its fd; False if
        the broker broke the protocol (the channel is lost)."""
        cid = offered.connection_id
        if cid in self._owned or (taken and any(c.id == cid for c in taken)):
            os.close(fd)
            self._lose_channel(f"connection {cid} offered twice by the broker")
            return False
        local = offered.local_address
        # Saying family and type spares the two getsockopt() calls that
        # socket(fileno=) would make to find them out.
        family = (socket.AF_INET6 if local.startswith("[") else
                  socket.AF_INET if local[:1].isdigit() else -1)
        sock = None
        try:
            sock = (self._socket_class(family, socket.SOCK_STREAM,
                                       socket.IPPROTO_TCP, fd) if family != -1
                    else self._socket_class(fileno=fd))
            channel_lib.check_client_socket(sock)
        except (OSError, ProtocolError) as error:
            # §3 broken (a pipe, a file, a listener, ...): the broker's
            # protocol error, even when full or draining (a Reject would
            # pass the fd on). Nothing of the packet is delivered or acked.
            if sock is not None:
                sock.close()
            else:  # socket(fileno=) refused it
                os.close(fd)
            self._lose_channel(
                f"connection {cid} carries no client stream socket: {error}")
            return False
        capacity = self._options.capacity
        full = capacity > 0 and (len(self._owned) + self._unsent_acks +
                                 len(taken)) >= capacity
        if self.draining or full:
            sock.close()  # the broker still holds the socket
            rejected.append(cid)
            return True
        taken.append(Connection(cid, sock, offered.peer_address, local,
                                offered.accept_time_unix_nanos,
                                offered.initial_data, offered.listener))
        return True

    def _take_listener(self, grant: "pb.ListenerGrant", fd: int) -> bool:
        """Keeps a granted listener for the driver; False if the grant
        broke the protocol (the channel is lost)."""
        if not self._options.accepts_listener:
            os.close(fd)
            self._lose_channel("ListenerGrant from the broker, but our Hello "
                               "did not set supports_listener_grant")
            return False
        try:
            sock = check_listening_socket(fd)
        except ProtocolError as error:
            self._lose_channel(str(error))
            return False
        if self.draining:
            sock.close()  # the broker serves its queue from its own copy
            return True
        if self._granted is not None:
            self._granted.socket.close()  # never served: a newer one came
        self._granted = Listener(sock, grant.listener)
        self._serving = sock
        log.info("accepting from the granted listener %s", grant.listener)
        return True

    def _discard(self, outgoing: _Outgoing) -> None:
        """The message will never be sent: the connections it acks close
        untouched (the broker re-places them); the one it releases is the
        application's again."""
        for connection in outgoing.acked:
            connection.socket.close()
        outgoing.acked.clear()
        if outgoing.release is not None:
            release, outgoing.release = outgoing.release, None
            self._pending_releases -= 1
            release.socket.close()
            if not release.connection_id & LISTENER_ID_BIT:
                # A re-registering Hello lists it again, like any owned one.
                self._owned[release.connection_id] = release.peer_address
            release.on_result(False)

    def _send(self, outgoing: _Outgoing) -> None:
        """Sends now if nothing is queued and the socket has room, else
        queues (and waits for writability)."""
        if self._channel is None:
            return self._discard(outgoing)
        if not self._outbox:
            try:
                if self._channel.send(outgoing.message, outgoing.fd()):
                    return self._on_sent(outgoing)
            except (OSError, ProtocolError) as error:
                self._discard(outgoing)
                return self._lose_channel(
                    f"cannot send {outgoing.message.WhichOneof('body')}: "
                    f"{error}")
        self._unsent_acks += len(outgoing.acked)
        self._outbox.append(outgoing)
        self._set_writable_interest(True)

    def _flush(self) -> None:
        while self._channel is not None and self._outbox:
            outgoing = self._outbox[0]
            try:
                if not self._channel.send(outgoing.message, outgoing.fd()):
                    return
            except (OSError, ProtocolError) as error:
                return self._lose_channel(
                    f"cannot send {outgoing.message.WhichOneof('body')}: "
                    f"{error}")
            self._outbox.popleft()
            self._unsent_acks -= len(outgoing.acked)
            self._on_sent(outgoing)
        if self._channel is None:
            return
        self._set_writable_interest(False)
        if self._goodbye_sent:
            self._close_channel()
            return
        self._maybe_reconnect_now()

    def _on_sent(self, outgoing: _Outgoing) -> None:
        self._last_sent = self._clock()
        for connection in outgoing.acked:
            self._owned[connection.id] = connection.peer_address
        self._ready.extend(outgoing.acked)
        outgoing.acked = []
        if outgoing.release is not None:
            release, outgoing.release = outgoing.release, None
            self._pending_releases -= 1
            # The broker holds the connection now (the fd is in its queue):
            # closing this copy leaves the TCP connection untouched.
            release.socket.close()
            release.on_result(True)

    def _closed_reports_urgent(self) -> bool:
        return (self._options.capacity > 0 or self.draining or
                len(self._closed_to_report) >= MAX_CLOSED_PER_REPORT)

    def _report_closed(self, now: bool = False) -> None:
        if (not self._closed_to_report or self._channel is None or
                self._goodbye_sent):
            return
        if (not now and not self._closed_reports_urgent() and
                self._clock() < self._closed_report_at):
            return  # the next Ack or deadline() brings it
        ids, self._closed_to_report = self._closed_to_report, []
        cut, self._cut_to_report = self._cut_to_report, set()
        self._send(_Outgoing(pb.HandoffMessage(closed=pb.Closed(
            connection_ids=[i for i in ids if i not in cut],
            cut_connection_ids=[i for i in ids if i in cut]))))

    def _begin_drain(self, cause: DrainCause, deadline: Optional[float],
                     release_idle: bool = False) -> None:
        if self.draining:
            # A later Drain may bring the deadline closer; announce once.
            if deadline is not None and (self._drain.deadline is None or
                                         deadline < self._drain.deadline):
                self._drain.deadline = deadline
            return
        self.draining = True
        self._serving = None  # the driver closes it
        self._drain = Drain(cause, deadline, release_idle)
        self._drain_to_announce = True

    def _say_goodbye_if_drained(self) -> None:
        if (not self.draining or self._channel is None or
                self._goodbye_sent or self._owned or self._unsent_acks or
                self._pending_releases or self._closed_to_report or
                self._listener_figures[1]):
            return
        # The broker must have heard that we own none (§7.10).
        self._report_listener_load()
        self._goodbye_sent = True
        self._send(_Outgoing(pb.HandoffMessage(goodbye=pb.Goodbye(
            reason=f"drained ({self._drain.cause.value})"))))
        # Once Goodbye is out the channel is closed; if it is still queued,
        # _flush() closes it.
        if self._channel is not None and not self._outbox:
            self._close_channel()

    def _close_channel(self) -> None:
        if self._channel is None:
            return
        self._epoll.unregister(self._channel.fileno())
        self._channel.close()
        self._channel = None
        self._want_writable = False

    def _set_writable_interest(self, want: bool) -> None:
        if self._channel is None or want == self._want_writable:
            return
        mask = select.EPOLLIN | (select.EPOLLOUT if want else 0)
        self._epoll.modify(self._channel.fileno(), mask)
        self._want_writable = want
