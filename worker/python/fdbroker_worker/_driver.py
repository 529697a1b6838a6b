"""Drives a WorkerCore from an asyncio (or uvloop) event loop: the part that
start_server() (streams) and create_server() (protocols) share.

The core's epoll fd is watched with loop.add_reader(), its deadlines with
loop.call_at(); each turn hands new connections, a drain and release
requests to the subclass. Nothing here depends on the loop implementation
beyond the public AbstractEventLoop API, so uvloop drives it as asyncio does.
"""

import asyncio
import logging
import os
import socket
import sys
from typing import Callable, Optional

from .core import (LISTENER_ID_BIT, Connection, Drain, DrainCause, Listener,
                   ReleaseRequest, WorkerCore)

log = logging.getLogger("fdbroker_worker")

DrainCallback = Callable[[DrainCause, Optional[float]], None]

# Timers are armed this late: uvloop rounds a delay to whole milliseconds,
# so a timer armed for the deadline may fire up to 0.5 ms before it, and
# the core (nothing due yet) would ask for the same deadline again and
# again, a busy loop until the clock gets there.
TIMER_SLACK = 0.001


def _backlog_of(sock: socket.socket) -> int:
    """The accept queue bound the broker gave the listener (struct tcp_info
    of a listening socket: tcpi_sacked at offset 28 is sk_max_ack_backlog),
    so that create_server()'s listen(backlog) keeps it."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        backlog = int.from_bytes(info[28:32], sys.byteorder)
    except (OSError, ValueError):
        backlog = 0
    return backlog or socket.SOMAXCONN


class Driver:
    """A registered worker on the running loop; subclasses serve the
    connections (_adopt) and react to drains and release requests."""

    def __init__(self, core: WorkerCore,
                 on_drain: Optional[DrainCallback]) -> None:
        self.loop = asyncio.get_running_loop()
        self._core = core
        self._on_drain = on_drain
        self._timer: Optional[asyncio.Handle] = None
        self._timer_when: Optional[float] = None
        self._process_scheduled = False
        self._registered = self.loop.create_future()
        self._finished = self.loop.create_future()
        # Draining by releasing idle connections (Drain.release_idle).
        self._drain_releases = False
        # The granted listener (§7.10): its socket, the loop's server on it
        # (None while it starts), how many connections it ever gave, and
        # the timer that reports their figures (and lets the subclass find
        # closes).
        self._listener: Optional[socket.socket] = None
        self._listening: Optional[asyncio.AbstractServer] = None
        self._accepted_total = 0
        self._load_timer: Optional[asyncio.TimerHandle] = None
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

    @property
    def drain_releases(self) -> bool:
        """The current drain gives idle connections back to the broker
        instead of closing them."""
        return self._drain_releases

    def is_serving(self) -> bool:
        """True until the worker starts draining."""
        return not self._core.draining and not self._finished.done()

    def close(self) -> None:
        """Starts draining: no new connections, idle ones are closed,
        connections in progress finish; then Goodbye. Unlike
        asyncio.Server.close(), the connections in progress are part of it
        (see wait_closed())."""
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

    async def __aenter__(self) -> "Driver":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # --- What subclasses provide -----------------------------------------

    def _adopt(self, connection: Connection) -> None:
        raise NotImplementedError

    def _drain_started(self, drain: Drain) -> None:
        raise NotImplementedError

    def _release_requested(self, request: ReleaseRequest) -> None:
        raise NotImplementedError

    def _accept_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        """The protocol factory the granted listener's server calls per
        connection; it calls _next_accepted_id() and keeps the connection
        among those _accepted_active() counts."""
        raise NotImplementedError

    def _prune_accepted(self) -> None:
        """Once per report: forget accepted connections that closed unseen
        (nothing to do if closes are seen as they happen)."""

    def _accepted_active(self) -> int:
        """Accepted connections owned now, not those being released (the
        broker counts them off when their Release arrives)."""
        raise NotImplementedError

    def _holds_accepted(self) -> bool:
        """Whether any accepted connection is still held (being released
        included)."""
        raise NotImplementedError

    # --- The granted listener (§7.10) -------------------------------------

    def _listener_granted(self, listener: Listener) -> None:
        self._close_listener()  # a new grant replaces an earlier one
        self._listener = listener.socket
        self.loop.create_task(self._serve_listener(listener.socket))

    async def _serve_listener(self, sock: socket.socket) -> None:
        try:
            server = await self.loop.create_server(
                self._accept_factory(), sock=sock, backlog=_backlog_of(sock))
        except (OSError, ValueError) as error:
            # The broker accepts from its own copy: nothing is lost.
            log.error("cannot serve the granted listener: %s", error)
            sock.close()
            return
        if self._listener is not sock:  # drained or replaced meanwhile
            server.close()
            sock.close()
            return
        self._listening = server
        if self._load_timer is None:
            self._arm_load_timer()

    def _close_listener(self) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _stop_accepting(self) -> None:
        """A drain: closes the listener (the broker serves what the kernel
        queued on its own copy) and reports at the draining pace."""
        self._close_listener()
        if self._load_timer is not None:
            self._load_timer.cancel()
            self._arm_load_timer()

    def _next_accepted_id(self) -> int:
        self._accepted_total += 1
        return LISTENER_ID_BIT | self._accepted_total

    def _arm_load_timer(self) -> None:
        interval = self._core.listener_load_interval or 0.05
        if self._core.draining:
            interval /= 5  # the Goodbye waits for `active: 0`
        self._load_timer = self.loop.call_later(interval, self._load_tick)

    def _load_tick(self) -> None:
        self._load_timer = None
        self._prune_accepted()
        active = self._accepted_active()
        if self._core.listener_load(self._accepted_total, active):
            self._process_soon()
        if self._listening is not None or self._holds_accepted():
            self._arm_load_timer()

    def _report_before_release(self, connection_id: int) -> None:
        """The broker must count an accepted connection before it sees it
        released."""
        if connection_id & LISTENER_ID_BIT:
            self._core.listener_load(self._accepted_total,
                                     self._accepted_active())

    def _broker_gone_while_releasing(self) -> None:
        """A release_idle drain lost its broker: close idle connections."""
        raise NotImplementedError

    # --- Protocol driving -------------------------------------------------

    async def _wait_registered(self) -> None:
        self._arm_timer()
        await self._registered

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
        if (events.unkept_listener is not None and
                events.unkept_listener is self._listener):
            self._close_listener()  # the new broker did not keep it
        if events.listener is not None:
            self._listener_granted(events.listener)
        if events.drain is not None:
            self._drain_releases = events.drain.release_idle
            self._drain_started(events.drain)
            if self._on_drain is not None:
                self._on_drain(events.drain.cause, events.drain.deadline)
        for request in events.release_requests:
            self._release_requested(request)
        if self._drain_releases and not self._core.registered:
            # No broker to release to: close idle connections instead.
            self._drain_releases = False
            self._broker_gone_while_releasing()
        if not self._registered.done():
            if self._core.error is not None:
                self._registered.set_exception(self._core.error)
                return self._shut_down()
            # A Drain read in the same turn as the Welcome can finish the
            # worker (Goodbye, channel closed) before `registered` is ever
            # seen true: registration succeeded all the same.
            if self._core.registered or self._core.finished:
                self._registered.set_result(None)
        if self._core.finished:
            self._finished.set_result(None)
            return self._shut_down()
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self._core.deadline()
        if self._timer is not None:
            if deadline == self._timer_when:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            # Not the handle's when(): uvloop returns a plain Handle (no
            # when()) for a time already past.
            self._timer_when = deadline
            self._timer = self.loop.call_at(deadline + TIMER_SLACK,
                                            self._timer_fired)

    def _timer_fired(self) -> None:
        # The handle is spent: should the core report the same deadline
        # again (nothing due yet by its clock), a new timer is armed.
        self._timer = self._timer_when = None
        self._process()

    def _shut_down(self) -> None:
        self._close_listener()
        if self._load_timer is not None:
            self._load_timer.cancel()
            self._load_timer = None
        self.loop.remove_reader(self._core.fileno())
        if self._timer is not None:
            self._timer.cancel()
        self._core.close()

    def _connection_closed(self, connection_id: int,
                           cut: bool = False) -> None:
        """Reports a brokered connection's close (Closed, batched: with the
        next Ack or within a few ms); `cut`: closed unfinished."""
        if self._core.connection_closed(connection_id, cut):
            self._process_soon()
        elif not self._process_scheduled:
            self._arm_timer()

    def _release_transport(self, connection_id: int,
                           transport: asyncio.Transport, unread: bytes,
                           reason: int,
                           on_result: Callable[[bool], None]) -> None:
        """Hands a dup of the transport's socket to the core (Release with
        `unread`, read but not consumed). Reading must be paused by the
        caller. on_result(True) once the Release is sent, after which the
        transport is aborted: that closes this process's fd only (no
        shutdown(); the broker holds another copy), so the client notices
        nothing. on_result(False): the connection is still the caller's."""
        def finish(released: bool) -> None:
            on_result(released)
            if released:
                transport.abort()

        try:
            copy = socket.socket(fileno=os.dup(
                transport.get_extra_info("socket").fileno()))
        except OSError:
            return on_result(False)
        self._core.release(connection_id, copy, unread, reason, finish)
        self._process_soon()  # a queued Release goes out when writable


def shut_read_side(transport: Optional[asyncio.BaseTransport]) -> None:
    """Half-closes a connection's read side (shutdown(SHUT_RD)): its reader
    gets EOF once it has read what was sent; writing is untouched. Through a
    dup of the fd, since uvloop's transport socket refuses shutdown(); the
    shutdown applies to the connection, the dup's close does not."""
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None:
        return
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as copy:
            copy.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # closed meanwhile, or the client reset it already


# How many turns of the loop a release waits for the response just written
# to leave (uvloop sends writes at the end of the turn, asyncio at once).
FLUSH_TURNS = 8


async def flushed(transport: Optional[asyncio.BaseTransport]) -> bool:
    """Waits a few turns of the loop for the transport's write buffer to
    empty; False if it does not (a slow reader: not releasable now)."""
    for _ in range(FLUSH_TURNS):
        if transport is None or transport.is_closing():
            return False
        if not transport.get_write_buffer_size():
            return True
        await asyncio.sleep(0)
    return False


def releasable(transport: Optional[asyncio.BaseTransport]) -> bool:
    """A transport whose socket may be given back now: open, nothing left to
    write, not TLS (the session state cannot move with the fd)."""
    return (transport is not None and not transport.is_closing() and
            not transport.get_write_buffer_size() and
            transport.get_extra_info("sslcontext") is None)
