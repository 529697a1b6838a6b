"""create_server(protocol_factory) against a fake broker, with real TCP
clients handed over as fds, on asyncio and on uvloop: a plain
asyncio.Protocol serves them, closes are reported (also after the protocol
hands its transport to another, as a WebSocket upgrade does), initial_data
comes first, drain half-closes idle connections, release moves idle ones."""

import asyncio
import socket
import time
import unittest
from unittest import mock
from typing import Optional

import fdbroker_worker
from fake_broker import FakeBroker, OnUvloop, end_server, registered
from fdbroker_worker import core, protocol_server
from fdbroker_worker._proto import pb
from test_aio import tcp_pair


class Upper(asyncio.Protocol):
    """Answers each chunk in upper case; "switch" hands the transport to a
    Reverse protocol (like an upgrade); EOF closes."""

    instances: list["Upper"] = []

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.busy = False
        Upper.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data == b"switch":
            reverse = Reverse()
            reverse.connection_made(self.transport)
            self.transport.set_protocol(reverse)
            self.transport.write(b"switched")
            return
        if data == b"hold":
            self.busy = True  # a request in progress: not idle
            return
        self.transport.write(data.upper())

    def eof_received(self) -> bool:
        return False  # close


class Reverse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data[::-1])


class ProtocolServerTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)
        Upper.instances = []

    async def start(self, **kwargs) -> protocol_server.ProtocolServer:
        server, self.hello = await registered(
            self.broker, fdbroker_worker.create_server(
                Upper, socket_path=self.broker.socket_path, **kwargs))
        self.addAsyncCleanup(end_server, server)
        return server

    async def expect(self, body: str):
        return await asyncio.to_thread(self.broker.receive_body, body)

    async def hand_over(self, connection_id: int,
                        initial_data: bytes = b"") -> socket.socket:
        server_end, client = tcp_pair()
        self.addCleanup(client.close)
        self.broker.offer(connection_id, server_end, initial_data)
        server_end.close()
        ack = await self.expect("ack")
        self.assertEqual(list(ack.connection_ids), [connection_id])
        client.settimeout(5)
        return client

    async def ask(self, client: socket.socket, data: bytes,
                  size: int) -> bytes:
        await asyncio.to_thread(client.sendall, data)
        answer = b""
        while len(answer) < size:
            chunk = await asyncio.to_thread(client.recv, 100)
            self.assertTrue(chunk, "connection closed")
            answer += chunk
        return answer

    async def test_serves_with_the_protocol_and_reports_closed(self) -> None:
        server = await self.start()
        client = await self.hand_over(5)
        self.assertEqual(await self.ask(client, b"hi", 2), b"HI")
        self.assertEqual(server.active_connections, 1)
        client.close()  # EOF: the protocol closes its transport
        closed = await self.expect("closed")
        self.assertEqual(list(closed.connection_ids), [5])
        self.assertEqual(server.active_connections, 0)
        self.assertEqual(server.protocols(), [])

    async def test_close_after_set_protocol_is_reported(self) -> None:
        await self.start()
        client = await self.hand_over(6)
        self.assertEqual(await self.ask(client, b"switch", 8), b"switched")
        self.assertEqual(await self.ask(client, b"abc", 3), b"cba")
        client.close()  # Reverse has no eof_received: the transport closes
        closed = await self.expect("closed")
        self.assertEqual(list(closed.connection_ids), [6])

    async def test_initial_data_comes_first(self) -> None:
        await self.start()
        client = await self.hand_over(7, initial_data=b"first")
        self.assertEqual(await self.ask(client, b"", 5), b"FIRST")
        self.assertEqual(await self.ask(client, b"next", 4), b"NEXT")

    async def test_drain_half_closes_then_goodbye(self) -> None:
        server = await self.start()
        with mock.patch.object(core, "FIRST_REQUEST_GRACE", 0):
            client = await self.hand_over(8)
            self.broker.send(drain=pb.Drain())
            # The idle connection reads EOF; Upper closes it.
            self.assertEqual(await asyncio.to_thread(client.recv, 10), b"")
            self.assertEqual(list((await self.expect("closed"))
                                  .connection_ids), [8])
            await self.expect("goodbye")
            await asyncio.wait_for(server.wait_closed(), 5)

    async def test_what_is_still_served_at_the_drain_deadline_is_cut(
            self) -> None:
        # A connection that does not end on drain (close_gracefully does
        # nothing) is aborted just before the broker's deadline and reported
        # as cut (protocol 1.4): the broker counts it lost.
        await self.start(close_gracefully=lambda protocol: None)
        client = await self.hand_over(9)
        self.assertEqual(await self.ask(client, b"hi", 2), b"HI")
        deadline = time.time() + 0.5
        self.broker.send(drain=pb.Drain(
            deadline_unix_nanos=int(deadline * 1e9)))
        closed = await self.expect("closed")
        self.assertEqual(list(closed.cut_connection_ids), [9])
        self.assertEqual(list(closed.connection_ids), [])
        # Served until shortly before the deadline, not cut at the Drain.
        # (That the cut comes before the deadline is not asserted: a loaded
        # machine may deliver the report after it.)
        self.assertGreater(
            time.time(),
            deadline - protocol_server.CUT_BEFORE_DEADLINE - 0.05)
        await self.expect("goodbye")

    async def test_release_needs_is_idle(self) -> None:
        with self.assertRaises(ValueError):
            await fdbroker_worker.create_server(
                Upper, socket_path=self.broker.socket_path, release=True)

    async def test_release_request_moves_only_idle_connections(self) -> None:
        server = await self.start(
            release=True, is_idle=lambda protocol: not protocol.busy)
        self.assertTrue(self.hello.supports_release)
        idle = await self.hand_over(9)
        busy = await self.hand_over(10)
        self.assertEqual(await self.ask(idle, b"a", 1), b"A")
        await asyncio.to_thread(busy.sendall, b"hold")
        while not any(p.busy for p in Upper.instances):
            await asyncio.sleep(0.01)
        self.broker.send(release_request=pb.ReleaseRequest(max_connections=2))
        release, moved = await asyncio.to_thread(self.broker.receive_release)
        self.addCleanup(moved.close)
        self.assertEqual(release.connection_id, 9)
        # The client's own connection, and it noticed nothing.
        self.assertEqual(moved.getpeername(), idle.getsockname())
        moved.sendall(b"from the next worker")
        self.assertEqual(idle.recv(100), b"from the next worker")
        # No Closed for it; the busy one stays.
        with self.assertRaises(TimeoutError):
            await asyncio.to_thread(self.broker.receive, 0.3)
        self.assertEqual(server.active_connections, 1)

    async def test_drain_with_release_moves_a_connection_at_its_idle_point(
            self) -> None:
        server = await self.start(
            release=True, is_idle=lambda protocol: not protocol.busy)
        client = await self.hand_over(11)
        await asyncio.to_thread(client.sendall, b"hold")
        while not any(p.busy for p in Upper.instances):
            await asyncio.sleep(0.01)
        self.broker.send(drain=pb.Drain(release_idle=True))
        with self.assertRaises(TimeoutError):  # busy: not yet
            await asyncio.to_thread(self.broker.receive, 0.3)
        protocol = Upper.instances[0]
        protocol.busy = False
        protocol.transport.write(b"DONE")
        server.idle_point(protocol)
        release, moved = await asyncio.to_thread(self.broker.receive_release)
        self.addCleanup(moved.close)
        self.assertEqual(release.connection_id, 11)
        self.assertEqual(release.reason, pb.RELEASE_REASON_DRAIN)
        self.assertEqual(await asyncio.to_thread(client.recv, 10), b"DONE")
        await self.expect("goodbye")
        await asyncio.wait_for(server.wait_closed(), 5)


class ProtocolServerOnUvloopTest(OnUvloop, ProtocolServerTest):
    pass


if __name__ == "__main__":
    unittest.main()
