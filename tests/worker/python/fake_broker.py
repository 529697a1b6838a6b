"""The broker side of the hand-off protocol, driven step by step by a test:
a real SOCK_SEQPACKET listener in a private temp directory. Every wait is
bounded."""

import asyncio
import os
import select
import socket
import tempfile
from typing import Any, Awaitable, Optional

from fdbroker_worker._proto import pb

WAIT = 5.0  # seconds; generous bound for every wait


class FakeBroker:
    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fdbroker-pytest-")
        self.socket_path = os.path.join(self._dir.name, "handoff.sock")
        self.listening_socket: Optional[socket.socket] = None
        self.channel: Optional[socket.socket] = None
        self._sent = 0
        self._received = 0
        self.listen()

    def listen(self) -> None:
        """(Again) listens on socket_path: a new broker on the same path."""
        self.listening_socket = socket.socket(socket.AF_UNIX,
                                              socket.SOCK_SEQPACKET)
        self.listening_socket.bind(self.socket_path)
        self.listening_socket.listen(8)

    def stop_listening(self) -> None:
        self.listening_socket.close()
        os.unlink(self.socket_path)

    def accept(self, timeout: float = WAIT) -> None:
        self.listening_socket.settimeout(timeout)
        if self.channel is not None:
            self.channel.close()
        self.channel, _ = self.listening_socket.accept()
        self._sent = self._received = 0

    def receive(self, timeout: float = WAIT) -> "pb.HandoffMessage":
        """The next message (its fds closed); TimeoutError if none, EOFError
        on close."""
        message, fds = self.receive_with_fds(timeout)
        for fd in fds:
            os.close(fd)
        return message

    def receive_with_fds(self, timeout: float = WAIT
                         ) -> tuple["pb.HandoffMessage", list[int]]:
        """The next message and the fds it carried (the caller's)."""
        if not select.select([self.channel], [], [], timeout)[0]:
            raise TimeoutError("no message from the worker")
        data, fds, _, _ = socket.recv_fds(self.channel, 65537, 253)
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError("the worker closed the channel")
        message = pb.HandoffMessage.FromString(data)
        self._received += 1
        assert message.sequence == self._received, message
        return message, fds

    def receive_release(self, timeout: float = WAIT
                        ) -> tuple["pb.Release", socket.socket]:
        """The next message that is not a Heartbeat must be a Release with
        one fd: (the Release, the released connection as a socket)."""
        while True:
            message, fds = self.receive_with_fds(timeout)
            kind = message.WhichOneof("body")
            if kind != "heartbeat":
                break
        try:
            assert kind == "release", f"expected release, got {message}"
            assert len(fds) == 1, f"release with {len(fds)} fds"
        except AssertionError:
            for fd in fds:
                os.close(fd)
            raise
        return message.release, socket.socket(fileno=fds[0])

    def receive_body(self, body: str, timeout: float = WAIT):
        """The next message that is not a Heartbeat; asserts its body."""
        while True:
            message = self.receive(timeout)
            kind = message.WhichOneof("body")
            if kind != "heartbeat":
                assert kind == body, f"expected {body}, got {message}"
                return getattr(message, body)

    def wait_for_close(self, timeout: float = WAIT) -> bool:
        try:
            while True:
                self.receive(timeout)
        except EOFError:
            return True
        except TimeoutError:
            return False

    def send(self, fd: Optional[int] = None, fds: tuple[int, ...] = (),
             **body) -> None:
        self._sent += 1
        message = pb.HandoffMessage(sequence=self._sent, **body)
        socket.send_fds(self.channel, [message.SerializeToString()],
                        [fd] if fd is not None else list(fds))

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        socket.send_fds(self.channel, [data], list(fds))

    def welcome(self, interval_ms: int = 10000, timeout_ms: int = 60000,
                worker_id: int = 7, supervised: bool = False,
                worker_timeout_ms: int = 0,
                listener_load_interval_ms: int = 0,
                listener_kept: bool = False) -> None:
        self.send(welcome=pb.Welcome(
            version=pb.ProtocolVersion(major=1), worker_id=worker_id,
            heartbeat_interval_ms=interval_ms,
            heartbeat_timeout_ms=timeout_ms, supervised=supervised,
            worker_timeout_ms=worker_timeout_ms,
            listener_load_interval_ms=listener_load_interval_ms,
            listener_kept=listener_kept))

    def offer(self, connection_id: int, sock: socket.socket,
              initial_data: bytes = b"") -> None:
        self.send(fd=sock.fileno(), connection=pb.Connection(
            connection_id=connection_id, peer_address="127.0.0.1:1",
            local_address="127.0.0.1:2", initial_data=initial_data))

    def close_channel(self) -> None:
        self.channel.close()
        self.channel = None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.listening_socket.close()
        self._dir.cleanup()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def same_socket(a: socket.socket, b: socket.socket) -> bool:
    """Both fds refer to the same open socket (same inode)."""
    return os.fstat(a.fileno()).st_ino == os.fstat(b.fileno()).st_ino


async def registered(broker: FakeBroker,
                     starting: Awaitable[Any], **welcome: Any
                     ) -> tuple[Any, Any]:
    """Awaits `starting` (start_server() or create_server()) while `broker`
    accepts the worker, reads its Hello and welcomes it (`welcome`: the
    Welcome's fields, as FakeBroker.welcome() takes them); returns what
    `starting` returned and the Hello."""
    async def broker_side() -> Any:
        await asyncio.to_thread(broker.accept)
        hello = await asyncio.to_thread(broker.receive_body, "hello")
        broker.welcome(**welcome)
        return hello

    welcomed = asyncio.create_task(broker_side())
    server = await starting
    return server, await welcomed


async def end_server(server: Any) -> None:
    """Ends a server (start_server()'s or create_server()'s) that a test
    left serving, and its connections."""
    for live in list(server._live.values()):
        if live.transport is not None:
            live.transport.abort()
    if not server._finished.done():
        server._finished.set_result(None)
        server._shut_down()
    await asyncio.sleep(0)  # connection_lost callbacks


class OnUvloop:
    """Mixed into an IsolatedAsyncioTestCase subclass: its tests run on
    uvloop. The policy is set before each test's loop is made
    (IsolatedAsyncioTestCase asks the policy before setUp)."""

    @classmethod
    def setUpClass(cls) -> None:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    @classmethod
    def tearDownClass(cls) -> None:
        asyncio.set_event_loop_policy(None)

    async def test_runs_on_uvloop(self) -> None:
        import uvloop
        self.assertIsInstance(asyncio.get_running_loop(), uvloop.Loop)
