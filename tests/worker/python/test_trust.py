"""What the SDK does not take on trust: the broker's uid (SO_PEERCRED after
connecting) and the fds of Connection messages (a client's stream socket,
nothing else), against a fake broker with real fds and a real process of
another uid."""

import asyncio
import os
import select
import signal
import socket
import tempfile
import threading
import unittest

from fake_broker import WAIT, FakeBroker, end_server, open_fds, registered
import fdbroker_worker
from fdbroker_worker import BlockingWorker, DrainCause
from fdbroker_worker import core as core_lib
from fdbroker_worker._proto import pb
from fdbroker_worker.channel import Channel, ProtocolError
from fdbroker_worker.core import Options, WorkerCore
from test_aio import tcp_pair, upper_lines
from test_core import Driver

FOREIGN_UID = 65534  # nobody


class ForeignListener:
    """A hand-off socket served by a process of another uid (a socket
    planted under a shared directory by another user): a forked child binds
    it as root, drops to FOREIGN_UID, then listens, so SO_PEERCRED names
    FOREIGN_UID. It never answers."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fdbroker-foreign-")
        self.path = os.path.join(self._dir.name, "foreign.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.path)
        ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.setgid(FOREIGN_UID)
                os.setuid(FOREIGN_UID)
                listener.listen(8)
                os.write(ready_w, b"r")
                while True:
                    signal.pause()
            finally:
                os._exit(1)
        listener.close()
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.read(1) == b"r", "the foreign listener failed"

    def close(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self._dir.cleanup()


@unittest.skipUnless(os.geteuid() == 0, "needs root to serve as another uid")
class BrokerUidTest(unittest.TestCase):
    def setUp(self) -> None:
        self.foreign = ForeignListener()
        self.addCleanup(self.foreign.close)

    def assert_names_the_foreign_uid(self, error: Exception) -> None:
        self.assertIn(f"uid {FOREIGN_UID}", str(error))
        self.assertIn(self.foreign.path, str(error))

    def test_core_refuses_a_broker_of_another_uid(self) -> None:
        core = WorkerCore(Options(self.foreign.path, connect_timeout=2))
        self.addCleanup(core.close)
        with self.assertRaises(core_lib.RegistrationError) as raised:
            core.start()
        self.assert_names_the_foreign_uid(raised.exception)

    def test_blocking_worker_refuses_a_broker_of_another_uid(self) -> None:
        with self.assertRaises(core_lib.RegistrationError) as raised:
            BlockingWorker.connect(self.foreign.path, connect_timeout=2)
        self.assert_names_the_foreign_uid(raised.exception)

    def test_gives_up_reconnecting_to_a_broker_of_another_uid(self) -> None:
        broker = FakeBroker()
        self.addCleanup(broker.close)
        core = WorkerCore(Options(broker.socket_path, reconnect_timeout=30))
        self.addCleanup(core.close)
        core.start()
        broker.accept()
        broker.receive_body("hello")
        broker.welcome()
        driver = Driver(core)
        driver.run_until(lambda: core.registered)
        # The broker goes; another user's process takes the path. Not a
        # retry a second for 30 s: a drain at once.
        broker.stop_listening()
        broker.close_channel()
        os.rename(self.foreign.path, broker.socket_path)
        driver.run_until(lambda: driver.drains, timeout=3)
        self.assertEqual([d.cause for d in driver.drains],
                         [DrainCause.BROKER_LOST])


def _pipe_end() -> tuple[int, list[int]]:
    read_end, write_end = os.pipe()
    return read_end, [read_end, write_end]


def _file() -> tuple[int, list[int]]:
    fd = os.open("/dev/null", os.O_RDONLY)
    return fd, [fd]


def _listening_socket() -> tuple[int, list[int]]:
    listener = socket.create_server(("127.0.0.1", 0))
    return listener.fileno(), [listener.detach()]


def _datagram_socket() -> tuple[int, list[int]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return a.fileno(), [a.detach(), b.detach()]


NOT_A_CLIENT_SOCKET = {"pipe": _pipe_end, "file": _file,
                       "listening socket": _listening_socket,
                       "datagram socket": _datagram_socket}


def lowest_free_fd() -> int:
    fd = 0
    while True:
        try:
            os.fstat(fd)
        except OSError:
            return fd
        fd += 1


class OutOfFdsTest(unittest.TestCase):
    """§3.1 (minor 4): a Connection that arrives while the worker has no
    free fd slot comes with MSG_CTRUNC and no fd; the worker Rejects it and
    keeps its channel (before: a ProtocolError, the channel closed, and the
    worker re-registered, which the broker refused for a supervised one)."""

    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(lambda: self.broker.close())

    def test_a_truncated_connection_is_rejected_and_the_channel_stays(
            self) -> None:
        driver = ConnectionFdTest.start(self)
        core = driver.core
        worker_end, client = socket.socketpair()
        self.addCleanup(client.close)
        self.broker.offer(7, worker_end)
        worker_end.close()
        import resource
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (lowest_free_fd(), before[1]))
        try:
            core.process_events()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, before)
        reject = self.broker.receive_body("reject")
        self.assertEqual(list(reject.connection_ids), [7])
        self.assertIn("out of file descriptors", reject.reason)
        self.assertTrue(core.registered)
        self.assertEqual(driver.connections, [])
        # The channel goes on: the next one is acked.
        worker_end, client = socket.socketpair()
        self.addCleanup(client.close)
        self.broker.offer(8, worker_end)
        worker_end.close()
        driver.run_until(lambda: driver.connections)
        self.assertEqual(list(self.broker.receive_body("ack").connection_ids),
                         [8])


class ConnectionFdTest(unittest.TestCase):
    """§3: the fd of a Connection (or of a ConnectionBatch entry) is a
    client's stream socket. Anything else is the broker's protocol error
    (§7.5): the fds of the packet are closed, nothing is delivered or
    acked, the channel is closed, and the worker re-registers with what
    it owns (§7.8)."""

    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(lambda: self.broker.close())

    def start(self, **options) -> Driver:
        core = WorkerCore(Options(self.broker.socket_path, **options))
        self.addCleanup(core.close)
        core.start()
        self.broker.accept()
        self.broker.receive_body("hello")
        self.broker.welcome()
        driver = Driver(core)
        self.addCleanup(lambda: [c.socket.close() for c in driver.connections])
        driver.run_until(lambda: core.registered)
        return driver

    def offer_owned(self, driver: Driver) -> socket.socket:
        """Connection 1, acked: the worker owns it. Returns the client."""
        worker_end, client = socket.socketpair()
        self.addCleanup(client.close)
        self.broker.offer(1, worker_end)
        worker_end.close()
        driver.run_until(lambda: driver.connections)
        self.assertEqual(list(self.broker.receive_body("ack").connection_ids),
                         [1])
        return client

    def expect_protocol_error_then_reconnect(self, driver: Driver,
                                             fds_before: int) -> None:
        driver.run_until(lambda: not driver.core.registered)
        self.assertTrue(self.broker.wait_for_close())
        self.broker.channel.close()
        self.broker.channel = None
        self.assertEqual(open_fds(), fds_before)  # every fd sent is closed
        self.assertEqual([c.id for c in driver.connections], [1])
        driver.run_until(lambda: select.select(
            [self.broker.listening_socket], [], [], 0)[0])
        self.broker.accept()
        hello = self.broker.receive_body("hello")
        self.assertEqual([c.connection_id for c in hello.owned_connections],
                         [1])
        self.assertEqual(driver.drains, [])

    def test_connection_with_anything_but_a_stream_socket(self) -> None:
        for kind, make in NOT_A_CLIENT_SOCKET.items():
            with self.subTest(kind):
                self.broker.close()
                self.broker = FakeBroker()
                driver = self.start()
                client = self.offer_owned(driver)
                fds_before = open_fds()
                fd, own = make()
                self.broker.offer(9, _FdHolder(fd))
                for each in own:
                    os.close(each)
                self.expect_protocol_error_then_reconnect(
                    driver, fds_before - 2)  # less both ends of the channel
                # The owned connection is still served.
                driver.connections[0].socket.sendall(b"still here")
                self.assertEqual(client.recv(10), b"still here")
                driver.core.close()

    def test_pipe_at_capacity_is_not_rejected_on(self) -> None:
        # Full, a socket would be Rejected; a pipe is still the broker's
        # protocol error (a Reject would pass it on to the next worker).
        driver = self.start(capacity=1)
        self.offer_owned(driver)
        fds_before = open_fds()
        read_end, write_end = os.pipe()
        self.broker.offer(9, _FdHolder(read_end))
        os.close(read_end)
        os.close(write_end)
        self.expect_protocol_error_then_reconnect(driver, fds_before - 2)

    def test_batch_entry_that_is_a_pipe(self) -> None:
        driver = self.start()
        self.offer_owned(driver)
        fds_before = open_fds()
        worker_end, client = socket.socketpair()
        self.addCleanup(client.close)
        read_end, write_end = os.pipe()
        self.broker.send(fds=(worker_end.fileno(), read_end),
                         connection_batch=pb.ConnectionBatch(connections=[
                             pb.Connection(connection_id=9),
                             pb.Connection(connection_id=10)]))
        worker_end.close()
        os.close(read_end)
        os.close(write_end)
        # The socket of the first entry closed with the packet, unacked.
        # Less both ends of the channel, plus the client's end.
        self.expect_protocol_error_then_reconnect(driver, fds_before - 1)
        client.settimeout(WAIT)
        self.assertEqual(client.recv(1), b"")


class _FdHolder:
    """What FakeBroker.offer() needs of a socket: its fd."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class BlockingWorkerConnectionFdTest(unittest.TestCase):
    """The threaded driver survives a pipe in a Connection: it closes the
    pipe, registers again and serves the next connection."""

    def test_pipe_in_a_connection(self) -> None:
        broker = FakeBroker()
        self.addCleanup(broker.close)

        def welcome() -> None:
            broker.accept()
            broker.receive_body("hello")
            broker.welcome()

        welcomer = threading.Thread(target=welcome)
        welcomer.start()
        worker = BlockingWorker.connect(broker.socket_path)
        welcomer.join()
        self.addCleanup(worker.close)
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        broker.send(fd=read_end, connection=pb.Connection(connection_id=9))
        os.close(read_end)
        self.assertTrue(broker.wait_for_close())
        # Nobody holds the pipe's read end any more.
        with self.assertRaises(BrokenPipeError):
            os.write(write_end, b"x")
        broker.accept()
        self.assertEqual(len(broker.receive_body("hello").owned_connections),
                         0)
        broker.welcome()
        worker_end, client = socket.socketpair()
        self.addCleanup(client.close)
        broker.offer(2, worker_end)
        worker_end.close()
        self.assertEqual(list(broker.receive_body("ack").connection_ids), [2])
        sock = next(iter(worker))
        self.addCleanup(sock.close)
        sock.sendall(b"served")
        client.settimeout(WAIT)
        self.assertEqual(client.recv(6), b"served")


class AioConnectionFdTest(unittest.IsolatedAsyncioTestCase):
    """The asyncio driver survives a pipe in a Connection: the pipe closes,
    the worker registers again and serves the next connection."""

    async def test_pipe_in_a_connection(self) -> None:
        broker = FakeBroker()
        self.addCleanup(broker.close)
        server, _ = await registered(broker, fdbroker_worker.start_server(
            upper_lines, socket_path=broker.socket_path))
        self.addAsyncCleanup(end_server, server)
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        broker.send(fd=read_end, connection=pb.Connection(connection_id=9))
        os.close(read_end)
        self.assertTrue(await asyncio.to_thread(broker.wait_for_close))
        with self.assertRaises(BrokenPipeError):
            os.write(write_end, b"x")
        await asyncio.to_thread(broker.accept)
        hello = await asyncio.to_thread(broker.receive_body, "hello")
        self.assertEqual(len(hello.owned_connections), 0)
        broker.welcome()
        server_end, client = tcp_pair()
        self.addCleanup(client.close)
        broker.offer(2, server_end)
        server_end.close()
        ack = await asyncio.to_thread(broker.receive_body, "ack")
        self.assertEqual(list(ack.connection_ids), [2])
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"served\n")
        answer = b""
        while answer != b"SERVED\n":
            answer += await asyncio.wait_for(loop.sock_recv(client, 100), WAIT)


class FdCountTest(unittest.TestCase):
    """§3: exactly one fd per Connection, one per batch entry; anything else
    is a ProtocolError and every fd of the packet is closed."""

    def assert_rejected(self, message: "pb.HandoffMessage", fds: int) -> None:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel = Channel(ours)
        self.addCleanup(channel.close)
        self.addCleanup(peer.close)
        pairs = [socket.socketpair() for _ in range(fds)]
        before = open_fds()
        socket.send_fds(peer, [message.SerializeToString()],
                        [a.fileno() for a, _ in pairs])
        with self.assertRaises(ProtocolError):
            channel.receive()
        self.assertEqual(open_fds(), before)
        for a, b in pairs:
            a.close()
            b.close()

    def test_connection_without_its_fd(self) -> None:
        self.assert_rejected(pb.HandoffMessage(
            sequence=1, connection=pb.Connection(connection_id=1)), 0)

    def test_batch_with_more_fds_than_entries(self) -> None:
        self.assert_rejected(pb.HandoffMessage(
            sequence=1, connection_batch=pb.ConnectionBatch(connections=[
                pb.Connection(connection_id=i) for i in (1, 2)])), 3)


if __name__ == "__main__":
    unittest.main()
