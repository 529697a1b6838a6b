"""Release with the asyncio API against a fake broker: real TCP clients, the
released fd checked to be the client's own connection, and the client
noticing nothing."""

import asyncio
import socket
import unittest
from typing import Optional

import fdbroker_worker
from fake_broker import FakeBroker, end_server, registered
from fdbroker_worker import aio
from fdbroker_worker._proto import pb
from test_aio import tcp_pair


async def released_lines(reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
    """Answers each line in upper case ("slow" ones after 300 ms); between
    lines the connection may be released."""
    conn = fdbroker_worker.connection(writer)
    try:
        while line := await conn.between_requests(reader.readline()):
            if line.startswith(b"slow"):
                await asyncio.sleep(0.3)
            writer.write(line.upper())
            await writer.drain()
    except fdbroker_worker.ConnectionReleased:
        return
    writer.close()


class ReleaseTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)

    async def start(self, handler: aio.ClientConnectedCallback =
                    released_lines, **kwargs) -> aio.Server:
        """start_server(handler, release=True, **kwargs) with the fake
        broker's welcome; the Hello in self.hello."""
        server, self.hello = await registered(
            self.broker, fdbroker_worker.start_server(
                handler, socket_path=self.broker.socket_path,
                **{"release": True, **kwargs}))
        self.addAsyncCleanup(end_server, server)
        return server

    async def hand_over(self, connection_id: int) -> socket.socket:
        server_end, client = tcp_pair()
        self.addCleanup(client.close)
        self.broker.offer(connection_id, server_end)
        server_end.close()
        ack = await asyncio.to_thread(self.broker.receive_body, "ack")
        self.assertEqual(list(ack.connection_ids), [connection_id])
        client.settimeout(5)
        return client

    async def round_trip(self, client: socket.socket, line: bytes) -> bytes:
        await asyncio.to_thread(client.sendall, line)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = await asyncio.to_thread(client.recv, 100)
            self.assertTrue(chunk, "the worker closed the connection")
            answer += chunk
        return answer

    async def release_of(self, connection_id: int
                         ) -> tuple["pb.Release", socket.socket]:
        release, moved = await asyncio.to_thread(self.broker.receive_release)
        self.addCleanup(moved.close)
        self.assertEqual(release.connection_id, connection_id)
        return release, moved

    async def until_idle(self, server: aio.Server, connection_id: int
                         ) -> None:
        """Waits until the handler of `connection_id` waits between
        requests (its task starts a turn or two after the Ack)."""
        for _ in range(500):
            protocol = server._live.get(connection_id)
            if protocol is not None and protocol.handle._idle_now():
                return
            await asyncio.sleep(0.01)
        self.fail(f"connection {connection_id} never became idle")

    async def silent_broker(self, seconds: float = 0.5) -> None:
        """Asserts that the worker sends nothing for `seconds`."""
        with self.assertRaises(TimeoutError):
            await asyncio.to_thread(self.broker.receive, seconds)

    def assert_client_undisturbed(self, client: socket.socket) -> None:
        """No FIN or RST reached the client: nothing to read, no error."""
        client.setblocking(False)
        with self.assertRaises(BlockingIOError):
            client.recv(100)
        client.settimeout(5)

    async def test_hello_says_supports_release_only_if_asked(self) -> None:
        server = await self.start(release=False)
        self.assertFalse(self.hello.supports_release)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
        self.broker.close()
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)
        await self.start(release=True)
        self.assertTrue(self.hello.supports_release)

    async def test_release_request_moves_an_idle_connection(self) -> None:
        server = await self.start()
        client = await self.hand_over(1)
        self.assertEqual(await self.round_trip(client, b"one\n"), b"ONE\n")
        self.broker.send(release_request=pb.ReleaseRequest(
            max_connections=5, reason=pb.RELEASE_REASON_REBALANCE))
        release, moved = await self.release_of(1)
        self.assertEqual((release.unread_data, release.reason),
                         (b"", pb.RELEASE_REASON_REBALANCE))
        self.assertEqual(server.active_connections, 0)
        # The client noticed nothing; its next request reaches whoever
        # holds the released fd (the next worker), on the same connection.
        self.assert_client_undisturbed(client)
        await asyncio.to_thread(client.sendall, b"two\n")
        moved.settimeout(5)
        self.assertEqual(moved.recv(100), b"two\n")
        # No Closed followed: the next message is the Goodbye.
        server.close()
        await asyncio.to_thread(self.broker.receive_body, "goodbye")
        await asyncio.wait_for(server.wait_closed(), 5)

    async def test_released_fd_is_the_clients_connection(self) -> None:
        server = await self.start()
        client = await self.hand_over(2)
        await self.until_idle(server, 2)
        self.broker.send(release_request=pb.ReleaseRequest(max_connections=1))
        _, moved = await self.release_of(2)
        # Same TCP connection: its peer is the client's own address.
        self.assertEqual(moved.getpeername(), client.getsockname())
        moved.sendall(b"from the next worker\n")
        self.assertEqual(client.recv(100), b"from the next worker\n")

    async def test_only_up_to_max_connections_are_released(self) -> None:
        server = await self.start()
        clients = [await self.hand_over(i) for i in (1, 2, 3)]
        for client in clients:  # each handler now waits between requests
            await self.round_trip(client, b"x\n")
        self.broker.send(release_request=pb.ReleaseRequest(max_connections=2))
        await self.release_of(1)
        await self.release_of(2)
        await self.silent_broker()
        self.assertEqual(server.active_connections, 1)
        self.assertEqual(await self.round_trip(clients[2], b"kept\n"),
                         b"KEPT\n")

    async def test_half_read_request_is_never_released(self) -> None:
        server = await self.start()
        client = await self.hand_over(3)
        await asyncio.to_thread(client.sendall, b"half a li")
        await asyncio.sleep(0.1)  # let the worker read it
        self.broker.send(release_request=pb.ReleaseRequest(max_connections=1))
        await self.silent_broker()
        self.assertEqual(server.active_connections, 1)
        self.assertEqual(await self.round_trip(client, b"ne\n"),
                         b"HALF A LINE\n")

    async def test_drain_release_idle_moves_idle_then_busy(self) -> None:
        server = await self.start()
        idle = await self.hand_over(1)
        busy = await self.hand_over(2)
        await self.round_trip(idle, b"a\n")
        await asyncio.to_thread(busy.sendall, b"slow\n")
        await asyncio.sleep(0.05)
        self.broker.send(drain=pb.Drain(release_idle=True))
        release, _ = await self.release_of(1)
        self.assertEqual(release.reason, pb.RELEASE_REASON_DRAIN)
        self.assertTrue(server.drain_releases)
        # The busy one answers first, then goes.
        answer = b""
        while not answer.endswith(b"\n"):
            answer += await asyncio.to_thread(busy.recv, 100)
        self.assertEqual(answer, b"SLOW\n")
        release, _ = await self.release_of(2)
        self.assertEqual(release.reason, pb.RELEASE_REASON_DRAIN)
        await asyncio.to_thread(self.broker.receive_body, "goodbye")
        await asyncio.wait_for(server.wait_closed(), 5)
        self.assert_client_undisturbed(idle)
        self.assert_client_undisturbed(busy)

    async def test_explicit_release_with_unread_bytes(self) -> None:
        released: list[bool] = []

        async def handler(reader, writer) -> None:
            conn = fdbroker_worker.connection(writer)
            await reader.readexactly(4)  # "one\n"
            await asyncio.sleep(0.1)  # the pipelined "two\n" arrives
            released.append(await conn.release())

        await self.start(handler)
        client = await self.hand_over(4)
        await asyncio.to_thread(client.sendall, b"one\ntwo\n")
        release, _ = await self.release_of(4)
        self.assertEqual(release.unread_data, b"two\n")
        self.assertEqual(released, [True])

    async def test_release_without_a_broker_keeps_the_connection(self
                                                                 ) -> None:
        server = await self.start()
        client = await self.hand_over(5)
        self.assertEqual(await self.round_trip(client, b"a\n"), b"A\n")
        conn: Optional[aio.BrokeredConnection] = next(
            p.handle for p in server._live.values())
        self.broker.stop_listening()
        self.broker.close_channel()
        while server.registered:
            await asyncio.sleep(0.01)
        self.assertFalse(await conn.release())
        # Still served, on the same connection.
        self.assertEqual(await self.round_trip(client, b"b\n"), b"B\n")
        self.assertEqual(server.active_connections, 1)

    async def test_not_brokered_writer_has_no_connection(self) -> None:
        seen = asyncio.get_running_loop().create_future()

        async def handler(reader, writer) -> None:
            seen.set_result(fdbroker_worker.connection(writer))
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        async with server:
            _, writer = await asyncio.open_connection(
                *server.sockets[0].getsockname())
            self.assertIsNone(await asyncio.wait_for(seen, 5))
            writer.close()


if __name__ == "__main__":
    unittest.main()
