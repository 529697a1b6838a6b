"""create_server() and start_server() with a granted listener (protocol
1.4, §7.10) against a fake broker, on asyncio and on uvloop: real TCP
clients connect to a real listening socket the fake broker grants; the
worker accepts them with the loop's own accept loop, reports ListenerLoad
(no Ack, no Closed), releases one with its bit-63 id, closes its copy on
Drain and says Goodbye only after `active: 0`, returns it with a
re-registering Hello (one fd) and closes it unless the Welcome says
listener_kept, and a bad grant is a protocol error (the channel is lost)."""

import asyncio
import gc
import os
import socket
import unittest
import weakref
from typing import Optional

import fdbroker_worker
from fake_broker import FakeBroker, OnUvloop, end_server, registered
from fdbroker_worker import core, protocol_server
from fdbroker_worker._proto import pb
from test_protocol_server import Upper

INTERVAL_MS = 20
WAIT = 5.0


class ListenerGrantTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)
        Upper.instances = []
        # The broker's listening socket; its copy stays open, as the
        # broker's does.
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(self.listener.close)

    def starting(self, **kwargs):
        """The API under test, starting (create_server() here)."""
        return fdbroker_worker.create_server(
            Upper, socket_path=self.broker.socket_path, **kwargs)

    async def start(self, **kwargs) -> protocol_server.ProtocolServer:
        server, self.hello = await registered(
            self.broker, self.starting(**kwargs),
            listener_load_interval_ms=INTERVAL_MS)
        self.addAsyncCleanup(end_server, server)
        return server

    async def expect(self, body: str):
        return await asyncio.to_thread(self.broker.receive_body, body)

    def grant(self, sock: Optional[socket.socket] = None) -> None:
        sock = sock or self.listener
        self.broker.send(fd=sock.fileno(), listener_grant=pb.ListenerGrant(
            listener="%s:%d" % sock.getsockname()[:2]))

    async def connect(self) -> socket.socket:
        client = await asyncio.to_thread(socket.create_connection,
                                         self.listener.getsockname(), WAIT)
        self.addCleanup(client.close)
        return client

    async def ask(self, client: socket.socket, data: bytes) -> bytes:
        await asyncio.to_thread(client.sendall, data)
        return await asyncio.to_thread(client.recv, 100)

    async def load_until(self, accepted: int,
                         active: int) -> "pb.ListenerLoad":
        """ListenerLoad reports until one says these figures."""
        while True:
            load = await self.expect("listener_load")
            if (load.accepted_total, load.active) == (accepted, active):
                return load
            self.assertLessEqual(load.accepted_total, accepted)

    async def granted_client(self) -> socket.socket:
        """Starts a worker, grants it the listener, and connects a client
        that it serves."""
        await self.start()
        self.grant()
        client = await self.connect()
        self.assertEqual(await self.ask(client, b"a"), b"A")
        return client

    async def assert_left_to_the_broker(self) -> None:
        """A client that connects to the first listener now waits in its
        queue for the broker's copy: the worker no longer accepts there."""
        late = await self.connect()
        self.listener.settimeout(WAIT)
        accepted, _ = await asyncio.to_thread(self.listener.accept)
        accepted.close()
        late.close()

    async def test_hello_asks_for_a_listener_unless_told_not_to(self) -> None:
        await self.start()
        self.assertTrue(self.hello.supports_listener_grant)

    async def test_not_asked_for(self) -> None:
        await self.start(accept_listener=False)
        self.assertFalse(self.hello.supports_listener_grant)
        self.grant()
        self.assertTrue(await asyncio.to_thread(self.broker.wait_for_close))

    async def test_accepts_itself_and_reports_listener_load(self) -> None:
        server = await self.start()
        self.grant()
        client = await self.connect()
        self.assertEqual(await self.ask(client, b"hi"), b"HI")
        load = await self.load_until(1, 1)
        self.assertEqual(server.active_connections, 1)
        second = await self.connect()
        self.assertEqual(await self.ask(second, b"yo"), b"YO")
        await self.load_until(2, 2)
        client.close()
        second.close()
        # No Closed (and no Ack) for them: the figures only.
        load = await self.load_until(2, 0)
        self.assertEqual(load.accepted_total, 2)
        self.assertEqual(server.active_connections, 0)

    async def test_release_of_an_accepted_connection(self) -> None:
        await self.start(release=True, is_idle=lambda p: not p.busy)
        self.grant()
        client = await self.connect()
        self.assertEqual(await self.ask(client, b"hi"), b"HI")
        self.broker.send(release_request=pb.ReleaseRequest(
            max_connections=1))
        # Counted before it goes (the broker checks that it has one).
        await self.load_until(1, 1)
        release, moved = await asyncio.to_thread(
            self.broker.receive_release)
        self.addCleanup(moved.close)
        self.assertTrue(release.connection_id & core.LISTENER_ID_BIT)
        self.assertEqual(moved.getpeername(), client.getsockname())
        # The broker took it off: no report counts it again.
        with self.assertRaises(TimeoutError):
            while True:
                load = await asyncio.to_thread(self.broker.receive_body,
                                               "listener_load", 0.3)
                self.assertEqual(load.active, 0)
        # The client is served by the new owner, untouched by this one.
        await asyncio.to_thread(client.sendall, b"x")
        moved.settimeout(WAIT)
        self.assertEqual(await asyncio.to_thread(moved.recv, 10), b"x")

    async def test_drain_closes_the_copy_and_reports_zero_before_goodbye(
            self) -> None:
        server = await self.start()
        self.grant()
        client = await self.connect()
        self.assertEqual(await self.ask(client, b"hi"), b"HI")
        await self.load_until(1, 1)
        self.broker.send(drain=pb.Drain())
        # The idle client reads EOF (its read side half-closed) once the
        # first-request grace is over; Upper closes it.
        client.settimeout(WAIT)
        self.assertEqual(await asyncio.to_thread(client.recv, 10), b"")
        await self.load_until(1, 0)
        await self.expect("goodbye")
        await asyncio.wait_for(server.wait_closed(), WAIT)
        # The worker's copy is closed.
        await self.assert_left_to_the_broker()

    async def test_a_new_grant_replaces_the_earlier(self) -> None:
        client = await self.granted_client()
        other = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(other.close)
        self.grant(other)
        second = await asyncio.to_thread(socket.create_connection,
                                         other.getsockname(), WAIT)
        self.addCleanup(second.close)
        self.assertEqual(await self.ask(second, b"b"), b"B")
        # The first listener is no longer served; its connection still is.
        self.assertEqual(await self.ask(client, b"c"), b"C")
        await self.load_until(2, 2)
        await self.assert_left_to_the_broker()

    async def test_keeps_accepting_while_reconnecting(self) -> None:
        client = await self.granted_client()
        await self.load_until(1, 1)
        self.broker.close_channel()  # the broker is gone
        second = await self.connect()
        self.assertEqual(await self.ask(second, b"b"), b"B")
        # A new broker on the same path: the re-registration lists no
        # accepted connection (they are the worker's own), and the figures
        # follow the Welcome.
        await asyncio.to_thread(self.broker.accept)
        hello = await self.expect("hello")
        self.assertEqual(list(hello.owned_connections), [])
        self.broker.welcome(listener_load_interval_ms=INTERVAL_MS)
        await self.load_until(2, 2)

    async def reregistered(self, kept: bool,
                           granted: Optional[socket.socket] = None) -> None:
        """The broker goes; the worker's re-registering Hello returns the
        granted listener (`granted`, else the first: that very socket, one
        fd) and the Welcome says `kept`; the worker reports its figures on
        the new channel at once."""
        self.broker.close_channel()
        await asyncio.to_thread(self.broker.accept)
        message, fds = await asyncio.to_thread(self.broker.receive_with_fds)
        for fd in fds:
            self.addCleanup(os.close, fd)
        self.assertEqual(message.WhichOneof("body"), "hello")
        self.assertTrue(message.hello.returns_listener)
        self.assertEqual(len(fds), 1)
        self.assertEqual(os.fstat(fds[0]).st_ino,
                         os.fstat((granted or self.listener).fileno()).st_ino)
        self.broker.welcome(listener_load_interval_ms=INTERVAL_MS,
                            listener_kept=kept)
        await self.load_until(1, 1)

    async def test_reregistration_returns_the_listener_kept(self) -> None:
        client = await self.granted_client()
        await self.load_until(1, 1)
        await self.reregistered(kept=True)
        # Kept: it goes on accepting from it.
        second = await self.connect()
        self.assertEqual(await self.ask(second, b"b"), b"B")
        self.assertEqual(await self.ask(client, b"c"), b"C")
        await self.load_until(2, 2)

    async def test_reregistration_returns_the_listener_not_kept(self) -> None:
        client = await self.granted_client()
        await self.load_until(1, 1)
        await self.reregistered(kept=False)
        # Not kept: closed (the broker accepts what is queued there); the
        # connection accepted from it is still served.
        await self.assert_left_to_the_broker()
        self.assertEqual(await self.ask(client, b"c"), b"C")

    async def test_reregistration_returns_the_latest_grant(self) -> None:
        client = await self.granted_client()
        other = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(other.close)
        self.grant(other)
        await self.load_until(1, 1)
        # The first is closed once the second is served: only the second
        # goes back.
        await self.assert_left_to_the_broker()
        await self.reregistered(kept=True, granted=other)
        second = await asyncio.to_thread(socket.create_connection,
                                         other.getsockname(), WAIT)
        self.addCleanup(second.close)
        self.assertEqual(await self.ask(second, b"b"), b"B")
        self.assertEqual(await self.ask(client, b"c"), b"C")

    async def test_first_hello_returns_no_listener(self) -> None:
        await self.start()
        self.assertFalse(self.hello.returns_listener)

    async def bad_grant(self, fds: tuple[int, ...]) -> None:
        await self.start()
        before = len(os.listdir("/proc/self/fd"))
        self.broker.send(fds=fds, listener_grant=pb.ListenerGrant(
            listener="127.0.0.1:1"))
        self.assertTrue(await asyncio.to_thread(self.broker.wait_for_close),
                        "a bad ListenerGrant must end the channel")
        # Every fd that came with it is closed (the channel too).
        self.assertLess(len(os.listdir("/proc/self/fd")), before + 1)

    async def test_grant_without_an_fd(self) -> None:
        await self.bad_grant(())

    async def test_grant_with_two_fds(self) -> None:
        other = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(other.close)
        await self.bad_grant((self.listener.fileno(), other.fileno()))

    async def test_grant_of_a_connected_socket(self) -> None:
        client = socket.create_connection(self.listener.getsockname())
        self.addCleanup(client.close)
        await self.bad_grant((client.fileno(),))

    async def test_grant_of_a_datagram_socket(self) -> None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp.close)
        await self.bad_grant((udp.fileno(),))

    async def test_grant_of_a_pipe(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        await self.bad_grant((read,))


class ListenerGrantOnUvloopTest(OnUvloop, ListenerGrantTest):
    pass


class _Echo(asyncio.Protocol):
    """Echoes; its instances are known only weakly (Upper keeps them)."""

    alive: "weakref.WeakSet[_Echo]" = weakref.WeakSet()
    made = 0

    def __init__(self) -> None:
        _Echo.made += 1
        _Echo.alive.add(self)
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # (a cycle, as in most protocols)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class AcceptedConnectionsAreFreedTest(unittest.IsolatedAsyncioTestCase):
    """A connection accepted from the granted listener is freed when it
    ends, as under the loop's own server, not at the next ListenerLoad:
    held until then, every connection's objects outlived collections and
    were promoted to older generations (5 % of a FastAPI worker's
    throughput, docs/benchmarks.md)."""

    async def test_freed_before_the_next_listener_load(self) -> None:
        _Echo.made = 0
        broker = FakeBroker()
        self.addCleanup(broker.close)
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        server, _ = await registered(
            broker, fdbroker_worker.create_server(
                _Echo, socket_path=broker.socket_path),
            listener_load_interval_ms=3_600_000)  # none in this test
        self.addAsyncCleanup(end_server, server)
        broker.send(fd=listener.fileno(), listener_grant=pb.ListenerGrant(
            listener="%s:%d" % listener.getsockname()[:2]))
        for _ in range(3):
            client = await asyncio.to_thread(
                socket.create_connection, listener.getsockname(), WAIT)
            with client:
                await asyncio.to_thread(client.sendall, b"x")
                self.assertEqual(await asyncio.to_thread(client.recv, 10),
                                 b"x")
        self.assertEqual(_Echo.made, 3)
        deadline = asyncio.get_running_loop().time() + WAIT
        while _Echo.alive and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # the worker sees each close
            gc.collect()
        self.assertEqual(len(_Echo.alive), 0)


class AcceptedConnectionsAreFreedOnUvloopTest(
        OnUvloop, AcceptedConnectionsAreFreedTest):
    pass


async def upper_chunks(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    """start_server()'s Upper: each chunk in upper case, read as an idle
    point (releasable); EOF closes."""
    handle = fdbroker_worker.connection(writer)
    try:
        while data := await handle.between_requests(reader.read(100)):
            writer.write(data.upper())
            await writer.drain()
    except fdbroker_worker.ConnectionReleased:
        return
    writer.close()


class StreamsListenerGrantTest(ListenerGrantTest):
    """The same cases with start_server() (the streams API)."""

    def starting(self, **kwargs):
        kwargs.pop("is_idle", None)  # between_requests() says it
        return fdbroker_worker.start_server(
            upper_chunks, socket_path=self.broker.socket_path, **kwargs)


class StreamsListenerGrantOnUvloopTest(OnUvloop, StreamsListenerGrantTest):
    pass


if __name__ == "__main__":
    unittest.main()
