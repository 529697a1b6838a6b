"""asyncio API: start_server() shaped like asyncio.start_server().

Each connection the broker hands over is adopted with
loop.connect_accepted_socket() and served by the application's
client_connected_cb(reader, writer), exactly as asyncio.start_server()
would call it for an accepted socket. The hand-off protocol runs on the same
loop: the WorkerCore's epoll fd is watched with loop.add_reader(), its
deadlines with loop.call_at().

Release (start_server(release=True)): only the handler knows when its
connection is idle, so giving one back is cooperative. connection(writer)
returns the handler's BrokeredConnection; the handler wraps its read of the
next request in `await conn.between_requests(read)`, and checks
`conn.release_requested` after each response. A connection waiting in
between_requests() with nothing buffered is released by the SDK when the
broker asks (ReleaseRequest, Drain.release_idle), and the read raises
ConnectionReleased; after a response, `await conn.release()` gives it back
(True) or keeps it (False: serve on). Releasing pauses the transport's
reading, sends a dup of the fd with the reader's buffered bytes, and once
the Release is sent aborts the transport: that closes only this process's
fd (asyncio never calls shutdown()), so the client sees nothing.

Granted listener (accept_listener=True, the default; `fdbroker
--placement=kernel`, docs/protocol.md §7.10): the listener is served by
loop.create_server(sock=...) with the same protocol a handed connection
gets, so client_connected_cb cannot tell them apart; their figures go to
the broker in ListenerLoad (see _driver.py).
"""

import asyncio
from typing import Awaitable, Callable, Optional, TypeVar

from ._proto import pb
from ._driver import (DrainCallback, Driver, flushed, releasable,
                      shut_read_side)
from .core import (LISTENER_ID_BIT, Connection, Drain, Options,
                   RegistrationError, ReleaseRequest, WorkerCore,
                   first_request_grace_end)

T = TypeVar("T")

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Optional[Awaitable[None]]]


class ConnectionReleased(ConnectionError):
    """The connection was given back to the broker: another worker serves
    the client now. Raised by between_requests(); a handler just returns
    (closing the writer is harmless: the transport is closed already)."""


class BrokeredConnection:
    """A handler's view of its brokered connection: connection(writer)."""

    def __init__(self, server: "Server", protocol: "_BrokeredProtocol"
                 ) -> None:
        self._server = server
        self._protocol = protocol
        self.id = protocol.connection_id
        self.peer_address = protocol.peer_address
        # Waiting in between_requests() (the next byte starts a request).
        self._idle = False
        self._releasing = False
        self.released = False
        self._reason = pb.RELEASE_REASON_REBALANCE
        self._requested = False

    @property
    def release_requested(self) -> bool:
        """The broker wants this connection back (a draining worker with
        release_idle): call release() as soon as it is idle."""
        return self._requested and not self.released

    def _request(self, reason: int) -> None:
        self._requested, self._reason = True, reason

    def _idle_now(self) -> bool:
        """Waiting for the next request, with nothing of it read."""
        protocol = self._protocol
        return (self._idle and not self._releasing and not self.released
                and not protocol.reader._buffer and
                protocol.transport is not None and
                not protocol.transport.is_closing() and
                not protocol.transport.get_write_buffer_size())

    async def between_requests(self, read: Awaitable[T]) -> T:
        """Awaits `read`, the read of the next request (e.g.
        reader.readuntil(b"\\r\\n\\r\\n")), as an idle point: while nothing
        of the request has arrived the SDK may release the connection, and
        `read` then raises ConnectionReleased. A release already requested
        (drain) happens first, if nothing is buffered."""
        if self.release_requested and not self._protocol.reader._buffer:
            if await self.release(b""):
                if asyncio.iscoroutine(read):
                    read.close()
                raise ConnectionReleased(f"connection {self.id} released")
        self._idle = True
        try:
            return await read
        finally:
            self._idle = False

    async def release(self, unread: Optional[bytes] = None) -> bool:
        """Gives the connection back to the broker, which places it on
        another worker; call it between requests, with nothing half-written.
        `unread`: bytes read but not consumed, passed to the next owner
        (default: whatever the reader has buffered, which must then be
        whole requests not started; never release with a request half-read).
        True: released, the transport is closed, stop using reader and
        writer. False: not released (no broker now, not opted in, bytes
        still being written...): the connection is still yours."""
        return await self._server._release(self, unread)


class _BrokeredProtocol(asyncio.StreamReaderProtocol):
    """StreamReaderProtocol that tells the Server when its socket closes."""

    def __init__(self, server: "Server", connection: Connection,
                 reader: asyncio.StreamReader,
                 client_connected_cb: ClientConnectedCallback) -> None:
        super().__init__(reader, client_connected_cb)
        self.connection_id = connection.id
        self.peer_address = connection.peer_address
        self.delivered_at = server.loop.time()
        self.transport: Optional[asyncio.Transport] = None
        self.reader = reader
        self._server = server
        self.handle = BrokeredConnection(server, self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.peer_address:  # accepted from the granted listener
            peer = transport.get_extra_info("peername")
            if peer:
                host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
                self.peer_address = self.handle.peer_address = (
                    f"{host}:{peer[1]}")
        super().connection_made(transport)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        self._server._connection_lost(self.connection_id)

    def stop_reading(self) -> None:
        """Half-closes the read side: a handler waiting for the next request
        reads EOF at once, one answering a request finishes it first (what
        is already queued is still read; writing is untouched). Never on a
        connection being released: shutdown() would end it for its next
        owner too."""
        if (self.transport is None or self.transport.is_closing() or
                self.handle._releasing or self.handle.released):
            return
        shut_read_side(self.transport)


class Server(Driver):
    """A registered worker serving the broker's connections; the analogue
    of asyncio.Server. Use start_server() to create one."""

    def __init__(self, core: WorkerCore,
                 client_connected_cb: ClientConnectedCallback, limit: int,
                 on_drain: Optional[DrainCallback]) -> None:
        super().__init__(core, on_drain)
        self._callback = client_connected_cb
        self._limit = limit
        self._live: dict[int, _BrokeredProtocol] = {}
        self._tasks: set[asyncio.Task] = set()

    def _broker_gone_while_releasing(self) -> None:
        for protocol in list(self._live.values()):
            protocol.handle._requested = False
            self._schedule_stop_reading(protocol)

    def _adopt(self, connection: Connection) -> None:
        reader = asyncio.StreamReader(limit=self._limit, loop=self.loop)
        if connection.initial_data:
            # Before anything the socket brings.
            reader.feed_data(connection.initial_data)
        protocol = _BrokeredProtocol(self, connection, reader, self._callback)
        self._live[connection.id] = protocol
        task = self.loop.create_task(self._connect(connection, protocol))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._core.draining:
            self._schedule_stop_reading(protocol)

    async def _connect(self, connection: Connection,
                       protocol: _BrokeredProtocol) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: protocol,
                                                    connection.socket)
        except OSError:
            # No transport took the socket: close it ourselves.
            if protocol.transport is None:
                connection.socket.close()
                self._connection_lost(connection.id)

    def _connection_lost(self, connection_id: int) -> None:
        protocol = self._live.pop(connection_id, None)
        # One accepted from the listener counts in the next ListenerLoad.
        if (protocol is not None and not protocol.handle.released and
                not connection_id & LISTENER_ID_BIT):
            self._connection_closed(connection_id)

    # --- The granted listener (§7.10) -------------------------------------

    def _accept_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        return self._accepted_protocol

    def _accepted_protocol(self) -> _BrokeredProtocol:
        connection = Connection(self._next_accepted_id(), None, "", "", 0,
                                b"")
        reader = asyncio.StreamReader(limit=self._limit, loop=self.loop)
        protocol = _BrokeredProtocol(self, connection, reader, self._callback)
        self._live[connection.id] = protocol
        return protocol

    def _accepted_active(self) -> int:
        return sum(1 for connection_id, protocol in self._live.items()
                   if connection_id & LISTENER_ID_BIT and
                   not (protocol.handle._releasing or
                        protocol.handle.released))

    def _holds_accepted(self) -> bool:
        return any(connection_id & LISTENER_ID_BIT
                   for connection_id in self._live)

    def _drain_started(self, drain: Drain) -> None:
        self._stop_accepting()
        if drain.release_idle:
            # Busy connections are released by their handlers once idle.
            for protocol in self._live.values():
                protocol.handle._request(pb.RELEASE_REASON_DRAIN)
        for protocol in list(self._live.values()):
            if drain.release_idle:
                if protocol.handle._idle_now():
                    self._release_idle(protocol.handle)
            else:
                self._schedule_stop_reading(protocol)

    def _release_requested(self, request: ReleaseRequest) -> None:
        """Releases up to max_connections connections idle right now (the
        broker does not wait for the others)."""
        left = request.max_connections
        for protocol in list(self._live.values()):
            if left <= 0:
                break
            if protocol.handle._idle_now():
                protocol.handle._reason = request.reason
                self._release_idle(protocol.handle)
                left -= 1

    def _schedule_stop_reading(self, protocol: _BrokeredProtocol) -> None:
        """Ends the connection for a drain: now if the client has sent
        anything, else once its first-request grace is over (§7.7)."""
        transport = protocol.transport
        sock = transport.get_extra_info("socket") if transport else None
        self.loop.call_at(first_request_grace_end(sock, protocol.delivered_at,
                                                  self.loop.time()),
                          protocol.stop_reading)

    def _release_idle(self, handle: BrokeredConnection) -> None:
        """Releases a connection waiting in between_requests(); its read
        raises ConnectionReleased once the Release is sent."""
        self._start_release(handle, b"")

    async def _release(self, handle: BrokeredConnection,
                       unread: Optional[bytes]) -> bool:
        protocol = handle._protocol
        if not await flushed(protocol.transport):
            return False
        if unread == b"" and protocol.reader._buffer:
            return False  # the next request started meanwhile: serve it
        return await self._start_release(handle, unread)

    def _start_release(self, handle: BrokeredConnection,
                       unread: Optional[bytes]) -> "asyncio.Future[bool]":
        """Pauses reading and hands a dup of the fd to the core; the future
        gets the outcome. Synchronous up to the core's send, so that two
        requests in one turn never pick the same connection."""
        result = self.loop.create_future()
        protocol = handle._protocol
        transport = protocol.transport
        if handle._releasing or handle.released or not releasable(transport):
            result.set_result(False)
            return result
        self._report_before_release(handle.id)
        handle._releasing = True
        # Nothing more is read from the socket from here on: what the
        # reader holds is all this process has taken from it.
        was_reading = transport.is_reading()
        transport.pause_reading()
        if unread is None:
            unread = bytes(protocol.reader._buffer)

        def finish(released: bool) -> None:
            handle._releasing = False
            if released:
                handle.released = True
                # Wakes a handler waiting in between_requests(). The abort
                # closes this process's fd only: no shutdown(), and the
                # broker holds another copy, so no FIN and no RST.
                protocol.reader.set_exception(
                    ConnectionReleased(f"connection {handle.id} released"))
            elif was_reading and not transport.is_closing():
                transport.resume_reading()
            result.set_result(released)

        self._release_transport(handle.id, transport, unread, handle._reason,
                                finish)
        return result


async def start_server(
        client_connected_cb: ClientConnectedCallback, *,
        socket_path: Optional[str] = None, capacity: int = 0,
        labels: Optional[dict[str, str]] = None,
        connect_timeout: float = 10.0, reconnect_timeout: float = 30.0,
        limit: int = 2**16,
        on_drain: Optional[DrainCallback] = None,
        release: bool = False, accept_listener: bool = True) -> Server:
    """Registers with the broker and serves the connections it hands over
    with client_connected_cb(reader, writer), like asyncio.start_server().

    socket_path defaults to $FDBROKER_SOCKET (set for supervised workers).
    Returns once the broker has welcomed the worker; RegistrationError
    (a ConnectionError) if nobody listens, the broker refuses, or no
    Welcome comes within connect_timeout seconds. on_drain(cause,
    deadline) is called once when draining starts (deadline: Unix time the
    broker ends the worker, or None). release=True tells the broker the
    handlers give idle connections back (see connection()): it may then ask
    for them (rebalancing) and drains by moving them to other workers.
    accept_listener: take a listening socket when the broker grants one
    (`--placement=kernel`) and accept from it with the loop's own accept
    loop; False: every connection comes by hand-off.
    """
    loop = asyncio.get_running_loop()
    core = WorkerCore(Options(socket_path, capacity, dict(labels or {}),
                              connect_timeout, reconnect_timeout, release,
                              accepts_listener=accept_listener),
                      clock=loop.time)
    try:
        core.start()
    except RegistrationError:
        core.close()
        raise
    server = Server(core, client_connected_cb, limit, on_drain)
    await server._wait_registered()
    return server


def connection(writer: asyncio.StreamWriter) -> Optional[BrokeredConnection]:
    """The BrokeredConnection behind a handler's writer; None if the
    connection did not come from fdbroker_worker (e.g. asyncio's own
    start_server), so the same handler serves both."""
    protocol = writer.transport.get_protocol()
    return protocol.handle if isinstance(protocol, _BrokeredProtocol) else None
