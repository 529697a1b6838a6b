"""Blocking API for threaded or socketserver-style code.

    with fdbroker_worker.BlockingWorker.connect() as worker:
        for sock in worker:           # ends once the worker has drained
            threading.Thread(target=handle, args=(sock,)).start()

The protocol runs on a background thread, so heartbeats and acks keep
flowing however long the application takes between two iterations. Each
connection comes as a BrokeredSocket (a socket.socket, blocking) whose
close() tells the broker (Closed): close every socket you get, e.g. with
`with sock:`.
"""

import queue
import select
import socket
import threading
import time
from typing import Callable, Iterator, Optional

from .core import (FIRST_REQUEST_GRACE, Connection, Drain, DrainCause,
                   Options, WorkerCore)

DrainCallback = Callable[[DrainCause, Optional[float]], None]


class BrokeredSocket(socket.socket):
    """A client socket handed over by the broker. Closing (or detaching) it
    reports the connection closed to the broker, once."""

    connection_id: int
    peer_address: str
    # Bytes a previous owner already read: process them before recv().
    initial_data: bytes
    delivered_at: float  # time.monotonic()
    _worker: "BlockingWorker"

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
        self._drain_requested = False
        # Sockets still to be half-closed for a drain: (when, socket).
        self._stop_reading_at: list[tuple[float, BrokeredSocket]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sockets: queue.SimpleQueue[Optional[BrokeredSocket]] = (
            queue.SimpleQueue())
        self._registered = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run,
                                        name="fdbroker-worker", daemon=True)

    @classmethod
    def connect(cls, socket_path: Optional[str] = None, *,
                capacity: int = 0, labels: Optional[dict[str, str]] = None,
                connect_timeout: float = 10.0,
                reconnect_timeout: float = 30.0,
                on_drain: Optional[DrainCallback] = None
                ) -> "BlockingWorker":
        """Registers with the broker (socket_path: default
        $FDBROKER_SOCKET); RegistrationError if that fails. on_drain(cause,
        deadline) runs on the background thread when draining starts."""
        core = WorkerCore(Options(socket_path, capacity, dict(labels or {}),
                                  connect_timeout, reconnect_timeout))
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
        while (sock := self._sockets.get()) is not None:
            yield sock

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
            core.close()
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
        for connection_id in closed:
            self._core.connection_closed(connection_id)
        if drain:
            self._core.start_drain()

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
        self._stop_reading_at.append(
            (sock.delivered_at + FIRST_REQUEST_GRACE, sock))

    def _drain_started(self, drain: Drain) -> None:
        if self._on_drain is not None:
            self._on_drain(drain.cause, drain.deadline)
        with self._lock:
            live = list(self._live.values())
        for sock in live:
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
                if sock.connection_id in self._live:
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
