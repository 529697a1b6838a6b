"""asyncio API: start_server() shaped like asyncio.start_server().

Each connection the broker hands over is adopted with
loop.connect_accepted_socket() and served by the application's
client_connected_cb(reader, writer), exactly as asyncio.start_server()
would call it for an accepted socket. The hand-off protocol runs on the same
loop: the WorkerCore's epoll fd is watched with loop.add_reader(), its
deadlines with loop.call_at().
"""

import asyncio
import socket
from typing import Awaitable, Callable, Optional

from .core import (FIRST_REQUEST_GRACE, Connection, Drain, DrainCause,
                   Options, RegistrationError, WorkerCore)

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Optional[Awaitable[None]]]
DrainCallback = Callable[[DrainCause, Optional[float]], None]


class _BrokeredProtocol(asyncio.StreamReaderProtocol):
    """StreamReaderProtocol that tells the Server when its socket closes."""

    def __init__(self, server: "Server", connection: Connection,
                 reader: asyncio.StreamReader,
                 client_connected_cb: ClientConnectedCallback) -> None:
        super().__init__(reader, client_connected_cb)
        self.connection_id = connection.id
        self.delivered_at = server.loop.time()
        self.transport: Optional[asyncio.Transport] = None
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        self._server._connection_lost(self.connection_id)

    def stop_reading(self) -> None:
        """Half-closes the read side: a handler waiting for the next request
        reads EOF at once, one answering a request finishes it first (what
        is already queued is still read; writing is untouched)."""
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.transport.get_extra_info("socket").shutdown(socket.SHUT_RD)
        except OSError:
            pass  # the client reset it already


class Server:
    """A registered worker serving the broker's connections; the analogue
    of asyncio.Server. Use start_server() to create one."""

    def __init__(self, core: WorkerCore,
                 client_connected_cb: ClientConnectedCallback, limit: int,
                 on_drain: Optional[DrainCallback]) -> None:
        self.loop = asyncio.get_running_loop()
        self._core = core
        self._callback = client_connected_cb
        self._limit = limit
        self._on_drain = on_drain
        self._live: dict[int, _BrokeredProtocol] = {}
        self._timer: Optional[asyncio.TimerHandle] = None
        self._process_scheduled = False
        self._registered = self.loop.create_future()
        self._finished = self.loop.create_future()
        self._tasks: set[asyncio.Task] = set()
        self.loop.add_reader(core.fileno(), self._process)

    # --- Public API -------------------------------------------------------

    @property
    def worker_id(self) -> int:
        """The broker's id for this worker (changes on re-registration)."""
        return self._core.worker_id

    @property
    def draining(self) -> bool:
        return self._core.draining

    @property
    def registered(self) -> bool:
        """False while reconnecting after losing the broker."""
        return self._core.registered

    @property
    def active_connections(self) -> int:
        return self._core.active_connections

    def is_serving(self) -> bool:
        """True until the worker starts draining."""
        return not self._core.draining and not self._finished.done()

    def close(self) -> None:
        """Starts draining: no new connections, idle ones are closed,
        handlers finish; then Goodbye. Unlike asyncio.Server.close(), the
        connections in progress are part of it (see wait_closed())."""
        if not self._finished.done():
            self._core.start_drain()
            self._process_soon()

    async def wait_closed(self) -> None:
        """Waits until the worker has drained: every connection closed,
        Goodbye said."""
        await asyncio.shield(self._finished)

    async def serve_forever(self) -> None:
        """Serves until the worker has drained (after a Drain from the
        broker, close(), or losing the broker for good). Cancelling it
        starts a drain."""
        try:
            await asyncio.shield(self._finished)
        except asyncio.CancelledError:
            self.close()
            raise

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # --- Protocol driving -------------------------------------------------

    def _process_soon(self) -> None:
        if not self._process_scheduled:
            self._process_scheduled = True
            self.loop.call_soon(self._process)

    def _process(self) -> None:
        self._process_scheduled = False
        if self._finished.done():
            return
        events = self._core.process_events()
        # Connections first, so that a drain in the same batch sees them.
        for connection in events.connections:
            self._adopt(connection)
        if events.drain is not None:
            self._drain_started(events.drain)
        if not self._registered.done():
            if self._core.error is not None:
                self._registered.set_exception(self._core.error)
                return self._shut_down()
            if self._core.registered:
                self._registered.set_result(None)
        if self._core.finished:
            self._finished.set_result(None)
            return self._shut_down()
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self._core.deadline()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._process)

    def _shut_down(self) -> None:
        self.loop.remove_reader(self._core.fileno())
        if self._timer is not None:
            self._timer.cancel()
        self._core.close()

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
        if self._live.pop(connection_id, None) is not None:
            self._core.connection_closed(connection_id)
            self._process_soon()

    def _drain_started(self, drain: Drain) -> None:
        if self._on_drain is not None:
            self._on_drain(drain.cause, drain.deadline)
        for protocol in list(self._live.values()):
            self._schedule_stop_reading(protocol)

    def _schedule_stop_reading(self, protocol: _BrokeredProtocol) -> None:
        self.loop.call_at(protocol.delivered_at + FIRST_REQUEST_GRACE,
                          protocol.stop_reading)


async def start_server(
        client_connected_cb: ClientConnectedCallback, *,
        socket_path: Optional[str] = None, capacity: int = 0,
        labels: Optional[dict[str, str]] = None,
        connect_timeout: float = 10.0, reconnect_timeout: float = 30.0,
        limit: int = 2**16,
        on_drain: Optional[DrainCallback] = None) -> Server:
    """Registers with the broker and serves the connections it hands over
    with client_connected_cb(reader, writer), like asyncio.start_server().

    socket_path defaults to $FDBROKER_SOCKET (set for supervised workers).
    Returns once the broker has welcomed the worker; RegistrationError
    (a ConnectionError) if nobody listens, the broker refuses, or no
    Welcome comes within connect_timeout seconds. on_drain(cause,
    deadline) is called once when draining starts (deadline: Unix time the
    broker ends the worker, or None).
    """
    loop = asyncio.get_running_loop()
    core = WorkerCore(Options(socket_path, capacity, dict(labels or {}),
                              connect_timeout, reconnect_timeout),
                      clock=loop.time)
    try:
        core.start()
    except RegistrationError:
        core.close()
        raise
    server = Server(core, client_connected_cb, limit, on_drain)
    server._arm_timer()
    await server._registered
    return server

