"""Blocking API for threaded or socketserver-style code.

    with fdbroker_worker.BlockingWorker.connect() as worker:
        for sock in worker:           # ends once the worker has drained
            threading.Thread(target=handle, args=(sock,)).start()

The protocol runs on a background thread, so heartbeats and acks keep
flowing however long the application takes between two iterations. The
broker's hung-worker watchdog (--worker_timeout) watches the consumer loop
instead: the heartbeats say how long it has been away with a connection
(while it waits in the iterator it is alive), so hand each connection to a
thread and come back; a loop away longer than the timeout gets SIGABRT
(faulthandler dumps every thread's traceback to stderr) and is replaced. Each
connection comes as a BrokeredSocket (a socket.socket, blocking) whose
close() tells the broker (Closed): close every socket you get, e.g. with
`with sock:`.

Release (connect(release=True)): between requests, a handler waits with
sock.wait_for_request() instead of blocking in recv(); it returns False when
the broker wants the connection back (ReleaseRequest, Drain.release_idle),
and sock.release() then gives it back (True: the socket is closed, without
shutdown, and no Closed is sent; False: still yours, serve on).
"""

import concurrent.futures
import os
import queue
import select
import socket
import threading
import time
from typing import Callable, Iterator, Optional

from ._proto import pb
from .core import (Connection, Drain, DrainCause, Options, WorkerCore,
                   first_request_grace_end)

# wait_for_request() looks at release_requested this often (seconds).
_RELEASE_POLL = 0.05

DrainCallback = Callable[[DrainCause, Optional[float]], None]


class BrokeredSocket(socket.socket):
    """A client socket handed over by the broker. Closing (or detaching) it
    reports the connection closed to the broker, once."""

    connection_id: int
    peer_address: str
    # Bytes a previous owner already read: process them before recv().
    initial_data: bytes
    delivered_at: float  # time.monotonic()
    # The broker wants this connection back: release() it when idle.
    release_requested: bool = False
    _release_reason: int = 0
    _releasing: bool = False
    _worker: "BlockingWorker"

    def release(self, unread: bytes = b"") -> bool:
        """worker.release(self, unread)."""
        worker = getattr(self, "_worker", None)
        return worker is not None and worker.release(self, unread)

    def wait_for_request(self, timeout: Optional[float] = None) -> bool:
        """Waits, between requests, until the socket is readable (True: a
        request or EOF is there) or the broker wants the connection back
        (False: call release()), or `timeout` seconds (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()  # not select(): fds above 1023 are common
        poller.register(self, select.POLLIN)
        while not self.release_requested:
            wait = _RELEASE_POLL
            if end is not None:
                wait = min(wait, end - time.monotonic())
                if wait <= 0:
                    return False
            if poller.poll(int(wait * 1000) + 1):
                return True
        return False

    def close(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is None:  # not (or no longer) a brokered connection
            return super().close()
        # Under the lock, so that a drain never shuts down a reused fd.
        with worker._lock:
            super().close()
        worker._closed(self)

    def detach(self) -> int:
        fd = super().detach()
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker._closed(self)
        return fd


class BlockingWorker:
    """A registered worker whose connections are taken by iterating it."""

    def __init__(self, core: WorkerCore,
                 on_drain: Optional[DrainCallback]) -> None:
        self._core = core
        self._on_drain = on_drain
        # Guards _live, _closed_ids, _drain_requested and the sockets'
        # close() against a drain's shutdown().
        self._lock = threading.Lock()
        self._live: dict[int, BrokeredSocket] = {}
        self._closed_ids: list[int] = []
        # release() calls waiting for the background thread: (socket, its
        # fd's copy for the core, unread bytes, result).
        self._releases: list[tuple[BrokeredSocket, socket.socket, bytes,
                                   concurrent.futures.Future]] = []
        self._drain_releases = False
        self._stopped = False  # the background thread is done
        self._drain_requested = False
        # Sockets still to be half-closed for a drain: (when, socket).
        self._stop_reading_at: list[tuple[float, BrokeredSocket]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sockets: queue.SimpleQueue[Optional[BrokeredSocket]] = (
            queue.SimpleQueue())
        self._registered = threading.Event()
        # The application's thread is the one iterating this worker: it
        # proves life by coming back for the next connection. When it took
        # the last one (time.monotonic()); None while it waits in the
        # iterator (alive) or does not iterate.
        self._consumer_busy_since: Optional[float] = None
        core.app_silent = self._consumer_silent
        self._stop = False
        self._thread = threading.Thread(target=self._run,
                                        name="fdbroker-worker", daemon=True)

    @classmethod
    def connect(cls, socket_path: Optional[str] = None, *,
                capacity: int = 0, labels: Optional[dict[str, str]] = None,
                connect_timeout: float = 10.0,
                reconnect_timeout: float = 30.0,
                on_drain: Optional[DrainCallback] = None,
                release: bool = False) -> "BlockingWorker":
        """Registers with the broker (socket_path: default
        $FDBROKER_SOCKET); RegistrationError if that fails. on_drain(cause,
        deadline) runs on the background thread when draining starts.
        release=True: handlers give connections back when asked (module
        docstring)."""
        core = WorkerCore(Options(socket_path, capacity, dict(labels or {}),
                                  connect_timeout, reconnect_timeout,
                                  release))
        try:
            core.start()
        except BaseException:
            core.close()
            raise
        worker = cls(core, on_drain)
        worker._thread.start()
        worker._registered.wait()
        if core.error is not None:
            worker._thread.join()
            raise core.error
        return worker

    @property
    def worker_id(self) -> int:
        return self._core.worker_id

    @property
    def draining(self) -> bool:
        """Handlers check it between requests and close idle connections."""
        return self._core.draining or self._drain_requested

    @property
    def active_connections(self) -> int:
        return self._core.active_connections

    def __iter__(self) -> Iterator[BrokeredSocket]:
        """Yields each new connection; returns once the worker has
        drained (every socket closed, Goodbye said)."""
        try:
            while True:
                self._consumer_busy_since = None
                sock = self._sockets.get()
                if sock is None:
                    return
                self._consumer_busy_since = time.monotonic()
                yield sock
        finally:  # also when the consumer leaves the loop early
            self._consumer_busy_since = None

    def _consumer_silent(self) -> float:
        """WorkerCore.app_silent, on the background thread: how long the
        consumer loop has been away with a connection (0 while it waits)."""
        since = self._consumer_busy_since
        return 0.0 if since is None else time.monotonic() - since

    def release(self, sock: BrokeredSocket, unread: bytes = b"") -> bool:
        """Gives `sock` back to the broker, which places it on another
        worker. Call it from the socket's handler between requests, with
        nothing half-written; `unread`: bytes received but not consumed
        (whole requests not started, never half a request). Blocks until
        the Release is sent (True: the socket is closed, no Closed is
        reported) or cannot be (False: the socket is still yours). Not from
        on_drain (the background thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("release() from the worker's own thread")
        result: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if (sock.connection_id not in self._live or sock._releasing or
                    self._stopped):
                return False
            sock._releasing = True
            copy = socket.socket(fileno=os.dup(sock.fileno()))
            self._releases.append((sock, copy, unread, result))
        self._wake()
        released = result.result()
        if released:
            # The broker holds the connection: close this copy only.
            sock._worker = None
            socket.socket.close(sock)
        else:
            sock._releasing = False
        return released

    def start_drain(self) -> None:
        """Drains on the worker's own initiative; callable from any thread
        and from signal handlers."""
        with self._lock:
            self._drain_requested = True
        self._wake()

    def close(self) -> None:
        """Stops the background thread and closes the channel (connections
        already taken stay open)."""
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "BlockingWorker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- Background thread ------------------------------------------------

    def _run(self) -> None:
        core = self._core
        poller = select.poll()
        poller.register(core.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop:
                self._take_requests()
                events = core.process_events()
                for connection in events.connections:
                    self._deliver(connection)
                if events.drain is not None:
                    self._drain_started(events.drain)
                for request in events.release_requests:
                    self._flag(request.max_connections, request.reason)
                if self._drain_releases and not core.registered:
                    self._drain_releases = False  # nobody to release to
                    self._close_idle()
                self._stop_reading_due()
                if not self._registered.is_set() and (
                        core.registered or core.error is not None):
                    self._registered.set()
                    if core.error is not None:
                        return
                if core.finished:
                    return
                poller.poll(self._timeout_ms())
        finally:
            core.close()  # a queued Release fails: its socket is kept
            with self._lock:
                self._stopped = True  # no release() waits for us any more
                releases, self._releases = self._releases, []
            for sock, copy, _, result in releases:
                copy.close()
                result.set_result(False)
            self._registered.set()
            self._sockets.put(None)

    def _take_requests(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            closed, self._closed_ids = self._closed_ids, []
            drain = self._drain_requested and not self._core.draining
            releases, self._releases = self._releases, []
        for connection_id in closed:
            self._core.connection_closed(connection_id)
        for sock, copy, unread, result in releases:
            self._core.release(sock.connection_id, copy, unread,
                               sock._release_reason or
                               pb.RELEASE_REASON_REBALANCE,
                               self._release_done(sock, result))
        if drain:
            self._core.start_drain()

    def _release_done(self, sock: BrokeredSocket,
                      result: concurrent.futures.Future
                      ) -> Callable[[bool], None]:
        def done(released: bool) -> None:
            if released:
                with self._lock:
                    self._live.pop(sock.connection_id, None)
            result.set_result(released)
        return done

    def _flag(self, count: Optional[int], reason: int) -> None:
        """Asks the handlers of up to `count` connections (all if None) to
        release them at their next idle point."""
        with self._lock:
            for sock in self._live.values():
                if count is not None and count <= 0:
                    break
                if not sock.release_requested:
                    sock._release_reason = reason
                    sock.release_requested = True
                    if count is not None:
                        count -= 1

    def _timeout_ms(self) -> int:
        times = [when for when, _ in self._stop_reading_at]
        deadline = self._core.deadline()
        if deadline is not None:
            times.append(deadline)
        if not times:
            return -1
        return max(0, int((min(times) - time.monotonic()) * 1000) + 1)

    def _deliver(self, connection: Connection) -> None:
        sock = BrokeredSocket(fileno=connection.socket.detach())
        sock.setblocking(True)
        sock.connection_id = connection.id
        sock.peer_address = connection.peer_address
        sock.initial_data = connection.initial_data
        sock.delivered_at = time.monotonic()
        sock._worker = self
        with self._lock:
            self._live[connection.id] = sock
        if self._core.draining:
            self._stop_reading_later(sock)
        self._sockets.put(sock)

    def _stop_reading_later(self, sock: BrokeredSocket) -> None:
        """Ends the connection for a drain: now if the client has sent
        anything, else once its first-request grace is over (§7.7)."""
        with self._lock:  # a handler may be closing it
            if sock.connection_id not in self._live:
                return
            when = first_request_grace_end(sock, sock.delivered_at,
                                           time.monotonic())
        self._stop_reading_at.append((when, sock))

    def _drain_started(self, drain: Drain) -> None:
        if drain.release_idle:
            # Handlers release each connection once idle.
            self._drain_releases = True
            self._flag(None, pb.RELEASE_REASON_DRAIN)
        if self._on_drain is not None:
            self._on_drain(drain.cause, drain.deadline)
        if not drain.release_idle:
            self._close_idle()

    def _close_idle(self) -> None:
        with self._lock:
            live = list(self._live.values())
        for sock in live:
            sock.release_requested = False
            self._stop_reading_later(sock)

    def _stop_reading_due(self) -> None:
        """Half-closes the read side of the sockets whose grace is over: a
        handler waiting for the next request reads EOF, one answering a
        request finishes it first."""
        now = time.monotonic()
        due = [sock for when, sock in self._stop_reading_at if when <= now]
        self._stop_reading_at = [(when, sock) for when, sock in
                                 self._stop_reading_at if when > now]
        with self._lock:
            for sock in due:
                # Never a socket being released: shutdown() would end the
                # connection for its next owner too.
                if sock.connection_id in self._live and not sock._releasing:
                    try:
                        sock.shutdown(socket.SHUT_RD)
                    except OSError:
                        pass  # reset by the client already

    def _closed(self, sock: BrokeredSocket) -> None:
        """A connection was closed, on any thread; reported once."""
        with self._lock:
            if self._live.pop(sock.connection_id, None) is None:
                return
            self._closed_ids.append(sock.connection_id)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already, or we are closing
