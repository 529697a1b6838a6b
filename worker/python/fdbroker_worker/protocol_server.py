"""create_server(): the counterpart of loop.create_server(protocol_factory).

Each connection the broker hands over is adopted with
loop.connect_accepted_socket(protocol_factory, sock), so any asyncio.Protocol
server runs on it unchanged: uvicorn's HTTP protocols, aiohttp's request
handler, hypercorn, your own. Works on asyncio and on uvloop.

Closes are learnt from the socket, not the protocol: each client socket is a
_TrackedSocket, whose close() (asyncio's transports) or detach() (uvloop's,
which close the fd themselves) reports Closed. A protocol may hand its
transport to another protocol (a WebSocket upgrade calls
transport.set_protocol()) and the close is still seen.

Drain: no new connections (the core rejects them); each live connection is
asked to finish with close_gracefully(protocol) (default: its read side is
half-closed, as start_server() does): at once if the client has sent
anything, else FIRST_REQUEST_GRACE after it arrived, since its first
request may still be on the way (docs/protocol.md §7.7).

Release (release=True): only the application knows when a connection is
between requests, so it passes is_idle(protocol) and calls
server.idle_point(protocol) whenever one becomes idle (after a response).
An idle connection is released when the broker asks (ReleaseRequest, or
Drain.release_idle, for which busy ones go at their next idle point, and a
sweep every SWEEP_INTERVAL catches the rest; one handed to another
protocol, a WebSocket, can never go and is ended as in a plain drain): its
reading is paused, a dup of its fd is sent with Release, and once that is
out the transport is aborted, which closes only this process's copy.

Granted listener (accept_listener=True, the default; `fdbroker
--placement=kernel`, docs/protocol.md §7.10): the broker grants a listening
socket of its SO_REUSEPORT group and the kernel places connections on it.
It is served by the loop's own accept loop, loop.create_server(sock=...),
as uvicorn or aiohttp would serve their own socket: per connection the SDK
only numbers it (bit 63 set), notes it and hands the transport to
protocol_factory()'s protocol (_Accepted steps out in connection_made), so
no byte of it passes through Python code of the SDK and no message goes to
the broker. They are held by weak reference (_FromListener), so that their
objects die with the connection; closes are found by looking at those
still alive once per listener_load_interval (is_closing()), when the
figures go to the broker in ListenerLoad. Drains and releases treat these
connections as handed ones; a drain first closes the listener (the broker
serves what the kernel still queued there); a later grant replaces an
earlier one; while reconnecting to a broker the listener keeps accepting.
"""

import asyncio
import asyncio.selector_events
import functools
import logging
import socket
import time
import weakref
from typing import Callable, Coroutine, Optional

from ._driver import (FLUSH_TURNS, DrainCallback, Driver, releasable,
                      shut_read_side)
from ._proto import pb
from .core import (LISTENER_ID_BIT, Connection, Drain, Options,
                   RegistrationError, ReleaseRequest, WorkerCore,
                   first_request_grace_end)

log = logging.getLogger("fdbroker_worker")

# How often a release_idle drain looks at every connection again.
SWEEP_INTERVAL = 0.05

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
ProtocolPredicate = Callable[[asyncio.BaseProtocol], bool]
ProtocolAction = Callable[[asyncio.BaseProtocol], None]


class _TrackedSocket(socket.socket):
    """A client socket that calls on_close() once when its fd is closed
    through it (close(), or detach() by a transport that closes the fd
    itself), and whose getpeername() is the broker's peer_address: the real
    client even behind a PROXY-protocol balancer, where the socket's own
    peer is the balancer. Transports read it (get_extra_info("peername"),
    and "socket"), so ASGI's scope["client"], WSGI's REMOTE_ADDR and
    aiohttp's request.remote name the client."""

    __slots__ = ("on_close", "peer")

    def getpeername(self):
        peer = getattr(self, "peer", None)
        return peer if peer is not None else super().getpeername()

    def close(self) -> None:
        super().close()
        self._closed_now()

    def detach(self) -> int:
        fd = super().detach()
        self._closed_now()
        return fd

    def _closed_now(self) -> None:
        callback = getattr(self, "on_close", None)
        if callback is not None:
            self.on_close = None
            callback()


def _peer_tuple(address: str) -> Optional[tuple]:
    """The broker's "ip:port" or "[v6]:port" as getpeername() would say it
    (None if empty or unparsable: the socket's own peer then stands)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    if host.startswith("["):
        return (host[1:-1], int(port), 0, 0)
    return (host, int(port))


class _PeerSocket:
    """The transport's "socket" extra, with the broker's peer."""

    def __init__(self, sock, peer: tuple) -> None:
        self._sock = sock
        self._peer = peer

    def getpeername(self) -> tuple:
        return self._peer

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _PeerTransport:
    """A transport whose peer is the broker's peer_address, for event loops
    (uvloop) whose transports ask the fd rather than the socket object; all
    else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, peer: tuple) -> None:
        self._transport = transport
        self._peer = peer

    def get_extra_info(self, name: str, default=None):
        if name == "peername":
            return self._peer
        info = self._transport.get_extra_info(name, default)
        if name == "socket" and info is not None:
            return _PeerSocket(info, self._peer)
        return info

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class _Adopting(asyncio.Protocol):
    """Steps in for the first callback only: gives the protocol a transport
    that names the broker's peer if the loop's own does not (a PROXY-protocol
    listener: the socket's peer is the balancer), feeds a migrated
    connection's initial_data (bytes its previous owner had read) before
    anything the socket brings, then steps out of the way."""

    def __init__(self, protocol: asyncio.Protocol, data: bytes,
                 peer: Optional[tuple]) -> None:
        self._protocol = protocol
        self._data = data
        self._peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_protocol(self._protocol)
        seen = transport.get_extra_info("peername")
        if (self._peer is not None and
                (seen is None or tuple(seen[:2]) != self._peer[:2])):
            transport = _PeerTransport(transport, self._peer)
        self._protocol.connection_made(transport)
        if self._data:
            self._protocol.data_received(self._data)


class _Accepted(asyncio.Protocol):
    """What the granted listener's server makes per connection: in its one
    callback it registers the connection and hands the transport over to
    the application's protocol, which gets every later callback itself."""

    __slots__ = ("_server",)

    def __init__(self, server: "ProtocolServer") -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server._accepted(transport)


# How long before the broker's drain deadline what is still served is cut
# (reported as cut: the broker counts those connections lost).
CUT_BEFORE_DEADLINE = 0.1


class _Live:
    """A connection being served: _Handed or _FromListener."""

    __slots__ = ("id", "socket", "delivered_at", "key", "releasing",
                 "drain_pending", "ending")

    # Set by the subclasses: None while a handed connection is connecting,
    # and once one from the listener is gone.
    transport: Optional[asyncio.Transport]
    protocol: Optional[asyncio.BaseProtocol]

    def __init__(self, connection_id: int, sock: Optional[socket.socket],
                 delivered_at: float) -> None:
        self.id = connection_id
        # The handed connection's _TrackedSocket; None for one accepted
        # from the granted listener.
        self.socket = sock
        self.delivered_at = delivered_at
        self.key = 0  # its key in _by_protocol, once it has one
        self.releasing = False
        self.drain_pending = False
        self.ending = False  # close_gracefully is scheduled


class _Handed(_Live):
    """A connection the broker handed over: held until its socket reports
    the close."""

    __slots__ = ("transport", "protocol")

    def __init__(self, connection: Connection, delivered_at: float) -> None:
        super().__init__(connection.id, connection.socket, delivered_at)
        self.transport = None
        self.protocol = None


class _FromListener(_Live):
    """A connection accepted from the granted listener, held weakly: its
    transport and protocol die when the connection ends, as under the
    loop's own server, and mostly in the collector's youngest generation.
    (Held strongly until the next ListenerLoad, every connection's objects
    outlived several collections and were promoted: 5 % of a FastAPI
    worker's throughput, docs/benchmarks.md.)
    Until the next ListenerLoad prunes it, a gone one stays with transport
    None."""

    __slots__ = ("_transport", "_protocol")

    def __init__(self, connection_id: int, delivered_at: float,
                 transport: asyncio.BaseTransport,
                 protocol: asyncio.BaseProtocol) -> None:
        super().__init__(connection_id, None, delivered_at)
        self._transport = weakref.ref(transport)
        try:
            self._protocol = weakref.ref(protocol)
        except TypeError:  # __slots__ without __weakref__: held
            self._protocol = lambda: protocol

    @property
    def transport(self) -> Optional[asyncio.Transport]:
        return self._transport()  # type: ignore[return-value]

    @property
    def protocol(self) -> Optional[asyncio.BaseProtocol]:
        return self._protocol()


class ProtocolServer(Driver):
    """A registered worker serving the broker's connections with an
    asyncio.Protocol per connection; the analogue of asyncio.Server. Use
    create_server() to create one."""

    def __init__(self, core: WorkerCore, protocol_factory: ProtocolFactory,
                 on_drain: Optional[DrainCallback],
                 is_idle: Optional[ProtocolPredicate],
                 close_gracefully: Optional[ProtocolAction]) -> None:
        super().__init__(core, on_drain)
        self._factory = protocol_factory
        self._is_idle = is_idle
        self._close_gracefully = close_gracefully
        self._live: dict[int, _Live] = {}
        # By protocol object, for idle_point(); a protocol that hands its
        # transport over keeps the entry under the first protocol.
        self._by_protocol: dict[int, _Live] = {}
        self._sweep: Optional[asyncio.TimerHandle] = None
        self._cut_timer: Optional[asyncio.TimerHandle] = None
        # Whether transports ask the socket object for their peer.
        self._peer_from_socket = isinstance(
            self.loop, asyncio.selector_events.BaseSelectorEventLoop)
        # The connections accepted from the granted listener (also in
        # _live).
        self._accepted_live: dict[int, _Live] = {}

    def protocols(self) -> list[asyncio.BaseProtocol]:
        """The protocols of the connections being served now."""
        protocols = []
        for live in self._live.values():
            # (Each read once: a collection may end a gone one's objects.)
            protocol, transport = live.protocol, live.transport
            if protocol is not None and transport is not None:
                protocols.append(protocol)
        return protocols

    def idle_point(self, protocol: asyncio.BaseProtocol) -> None:
        """Tells the server that `protocol`'s connection is between two
        requests now: if the worker drains with release_idle it is released
        here (if is_idle(protocol) agrees)."""
        if not self._drain_releases:
            return  # (once per response: the cheap test first)
        live = self._by_protocol.get(id(protocol))
        # (A gone protocol's id may be another's now.)
        if live is not None and live.protocol is protocol:
            self._release_when_flushed(live)

    # --- Driver hooks -----------------------------------------------------

    def _adopt(self, connection: Connection) -> None:
        live = _Handed(connection, self.loop.time())
        self._live[live.id] = live
        connection.socket.on_close = functools.partial(self._lost, live)
        peer = connection.socket.peer = _peer_tuple(connection.peer_address)
        protocol = live.protocol = self._factory()
        # asyncio's transports take the peer from the socket object (see
        # _TrackedSocket); uvloop's from the fd.
        outer = (_Adopting(protocol, connection.initial_data, peer)
                 if connection.initial_data or
                 (peer is not None and not self._peer_from_socket) else
                 protocol)
        self._step(live, self.loop.connect_accepted_socket(
            lambda: outer, connection.socket))

    def _step(self, live: _Live, adopting: Coroutine) -> None:
        """Runs the loop's connect_accepted_socket() coroutine without a
        Task of its own, which would cost every connection a task object
        and a turn of the loop: the first step now, in this turn (the
        transport is made and starts reading), the rest when the future it
        waits for (connection_made) is done."""
        try:
            future = adopting.send(None)
        except StopIteration as done:
            return self._connected(live, done.value, None)
        except (OSError, RuntimeError, asyncio.CancelledError) as error:
            return self._connected(live, None, error)
        future._asyncio_future_blocking = False  # what a Task does
        future.add_done_callback(
            lambda _: self._step(live, adopting))

    def _connected(self, live: _Live, result: Optional[tuple],
                   error: Optional[BaseException]) -> None:
        if error is None:
            transport, _ = result
        else:
            # No transport took the socket: closing it reports Closed.
            log.warning("connection %d could not be served: %r", live.id,
                        error)
            live.socket.close()
            self._lost(live)
            return
        if live.id not in self._live:
            return  # closed while connecting
        live.transport = transport
        live.key = id(live.protocol)
        self._by_protocol[live.key] = live
        if live.drain_pending:
            self._drain_one(live)

    def _forget(self, live: _Live) -> bool:
        """Drops `live` from the tables; False if it was not there."""
        if self._live.pop(live.id, None) is None:
            return False
        if self._by_protocol.get(live.key) is live:
            del self._by_protocol[live.key]
        if live.id & LISTENER_ID_BIT:
            del self._accepted_live[live.id]
        return True

    def _lost(self, live: _Live) -> None:
        # One accepted from the listener counts in the next ListenerLoad.
        if self._forget(live) and not live.id & LISTENER_ID_BIT:
            self._connection_closed(live.id)

    # --- The granted listener (§7.10) -------------------------------------

    def _accept_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        return functools.partial(_Accepted, self)

    def _accepted(self, transport: asyncio.BaseTransport) -> None:
        protocol = self._factory()
        live = _FromListener(self._next_accepted_id(), self.loop.time(),
                             transport, protocol)
        self._live[live.id] = self._accepted_live[live.id] = live
        live.key = id(protocol)
        self._by_protocol[live.key] = live
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._core.draining:  # accepted in the turn the drain began
            self._drain_one(live)

    def _prune_accepted(self) -> None:
        """Forgets the accepted connections that are gone or closed: a
        protocol may hand its transport on (a WebSocket), so the transport
        tells."""
        for live in list(self._accepted_live.values()):
            transport = live.transport
            if transport is None or (not live.releasing and
                                     transport.is_closing()):
                self._forget(live)

    def _accepted_active(self) -> int:
        return sum(1 for live in self._accepted_live.values()
                   if not live.releasing)

    def _holds_accepted(self) -> bool:
        return bool(self._accepted_live)

    def _drain_started(self, drain: Drain) -> None:
        self._stop_accepting()
        if drain.deadline is not None and self._cut_timer is None:
            # A little before the broker's deadline, so that the Closed
            # saying so reaches it before it ends this process.
            self._cut_timer = self.loop.call_at(
                self.loop.time() + max(
                    0.0, drain.deadline - time.time() - CUT_BEFORE_DEADLINE),
                self._cut_at_deadline)
        for live in list(self._live.values()):
            self._drain_one(live)
        if self._drain_releases:
            self._sweep = self.loop.call_later(SWEEP_INTERVAL,
                                               self._sweep_releasing)

    def _cut_at_deadline(self) -> None:
        """The drain deadline passed: what is still served is cut, and
        reported so (Closed.cut_connection_ids: the broker counts it lost)
        rather than left for the broker to end with the process."""
        self._cut_timer = None
        for live in list(self._live.values()):
            if live.releasing:
                continue  # the broker owns it once the Release is out
            self._forget(live)
            transport = live.transport
            if transport is not None:
                transport.abort()
            elif live.socket is not None:  # (else gone already)
                live.socket.close()
            if not live.id & LISTENER_ID_BIT:
                self._connection_closed(live.id, cut=True)

    def _drain_one(self, live: _Live) -> None:
        if live.transport is None:
            if live.socket is not None:
                live.drain_pending = True  # still connecting
            return  # (else gone)
        if self._drain_releases:
            self._release_or_end(live)
            return
        self._end_gracefully(live)

    def _end_gracefully(self, live: _Live) -> None:
        if live.ending:
            return
        transport = live.transport
        if transport is None:
            return  # gone
        live.ending = True
        # Now if the client has sent anything, else once its first-request
        # grace is over (§7.7).
        when = first_request_grace_end(
            transport.get_extra_info("socket"), live.delivered_at,
            self.loop.time())
        self.loop.call_at(when, self._finish_gracefully, live)

    def _finish_gracefully(self, live: _Live) -> None:
        transport = live.transport
        if (self._live.get(live.id) is live and not live.releasing and
                transport is not None and not transport.is_closing()):
            if self._close_gracefully is None:
                shut_read_side(transport)  # the protocol reads EOF
            else:
                self._close_gracefully(transport.get_protocol())

    def _broker_gone_while_releasing(self) -> None:
        for live in list(self._live.values()):
            if live.transport is not None:
                self._drain_one(live)

    def _release_requested(self, request: ReleaseRequest) -> None:
        """Releases up to max_connections connections idle right now."""
        left = request.max_connections
        for live in list(self._live.values()):
            if left <= 0:
                break
            if self._try_release(live, request.reason):
                left -= 1

    # --- Release ----------------------------------------------------------

    def _sweep_releasing(self) -> None:
        """While a release_idle drain lasts: every connection is looked at
        again, for those an idle point missed (a response still leaving to
        a slow reader) and those that can never be released."""
        self._sweep = None
        if not self._drain_releases or not self._live:
            return
        for live in list(self._live.values()):
            if live.transport is not None:
                self._release_or_end(live)
        self._sweep = self.loop.call_later(SWEEP_INTERVAL,
                                           self._sweep_releasing)

    def _release_or_end(self, live: _Live) -> None:
        """Drain with release_idle: releases `live` if it is idle; one whose
        transport was handed to another protocol (a WebSocket) can never be
        released, so it ends as in a drain that closes."""
        transport = live.transport
        if (self._live.get(live.id) is not live or live.releasing or
                transport is None or transport.is_closing()):
            return
        if transport.get_protocol() is not live.protocol:
            self._end_gracefully(live)
        else:
            self._try_release(live, pb.RELEASE_REASON_DRAIN)

    def _release_when_flushed(self, live: _Live, turns: int = 0) -> None:
        """An idle point during a release_idle drain: releases `live` once
        what it wrote has left (uvloop sends at the end of the loop's turn);
        a slower reader is left to the sweep."""
        transport = live.transport
        if (not self._drain_releases or transport is None or
                transport.is_closing()):
            return
        if transport.get_write_buffer_size():
            if turns < FLUSH_TURNS:
                self.loop.call_soon(self._release_when_flushed, live,
                                    turns + 1)
            return
        self._release_or_end(live)

    def _try_release(self, live: _Live, reason: int) -> bool:
        """Starts releasing `live` if it is idle; True if started."""
        transport, protocol = live.transport, live.protocol
        if (self._is_idle is None or live.releasing or transport is None or
                not releasable(transport) or
                # Handed to another protocol (e.g. a WebSocket): never.
                protocol is None or transport.get_protocol() is not protocol
                or not self._is_idle(protocol)):
            return False
        self._report_before_release(live.id)
        live.releasing = True
        transport.pause_reading()

        def finish(released: bool) -> None:
            live.releasing = False
            if released:
                # Closing our copy below is no close of the connection.
                if live.socket is not None:
                    live.socket.on_close = None
                self._forget(live)
            elif not transport.is_closing():
                transport.resume_reading()
                if self._core.draining and not self._drain_releases:
                    self._drain_one(live)

        self._release_transport(live.id, transport, b"", reason, finish)
        return True




async def create_server(
        protocol_factory: ProtocolFactory, *,
        socket_path: Optional[str] = None, capacity: int = 0,
        labels: Optional[dict[str, str]] = None,
        connect_timeout: float = 10.0, reconnect_timeout: float = 30.0,
        on_drain: Optional[DrainCallback] = None,
        release: bool = False,
        is_idle: Optional[ProtocolPredicate] = None,
        close_gracefully: Optional[ProtocolAction] = None,
        accept_listener: bool = True
) -> ProtocolServer:
    """Registers with the broker and serves each connection it hands over
    with protocol_factory(), like loop.create_server(protocol_factory).

    socket_path defaults to $FDBROKER_SOCKET. Returns once the broker has
    welcomed the worker; RegistrationError if nobody listens, the broker
    refuses, or no Welcome comes within connect_timeout seconds.
    close_gracefully(protocol) ends a connection when the worker drains
    (finish the request in progress, close if idle; default: half-close
    the read side). release=True (needs is_idle) lets the broker take idle
    connections back: is_idle(protocol) says whether one is between
    requests with nothing read of the next, and the application calls
    server.idle_point(protocol) when one becomes so. accept_listener: take
    a listening socket when the broker grants one (`--placement=kernel`)
    and accept from it with the loop's own accept loop; False: every
    connection comes by hand-off.
    """
    if release and is_idle is None:
        raise ValueError("release=True needs is_idle(protocol)")
    loop = asyncio.get_running_loop()
    core = WorkerCore(Options(socket_path, capacity, dict(labels or {}),
                              connect_timeout, reconnect_timeout, release,
                              accepts_listener=accept_listener),
                      clock=loop.time, socket_class=_TrackedSocket)
    try:
        core.start()
    except RegistrationError:
        core.close()
        raise
    server = ProtocolServer(core, protocol_factory, on_drain, is_idle,
                            close_gracefully)
    await server._wait_registered()
    return server
