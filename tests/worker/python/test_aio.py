"""start_server(): the asyncio API against a fake broker, with real TCP
client connections handed over as fds."""

import asyncio
import socket
import unittest
from unittest import mock

from fake_broker import FakeBroker, registered
import fdbroker_worker
from fdbroker_worker import DrainCause, aio, core
from fdbroker_worker._proto import pb


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the server's end, as the broker would accept it; the client's)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


async def upper_lines(reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """Answers each line in upper case until EOF."""
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()


class StartServerTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)
        self.drains: list[tuple[DrainCause, object]] = []

    async def start(self) -> aio.Server:
        server, _ = await registered(
            self.broker, fdbroker_worker.start_server(
                upper_lines, socket_path=self.broker.socket_path,
                on_drain=lambda cause, deadline: self.drains.append(
                    (cause, deadline))))
        return server

    async def expect(self, body: str):
        return await asyncio.to_thread(self.broker.receive_body, body)

    async def hand_over(self, connection_id: int,
                        initial_data: bytes = b"") -> socket.socket:
        """Offers a client connection; returns the client's end once it is
        acked (the broker's copy closed, as the real broker does)."""
        server_end, client = tcp_pair()
        self.addCleanup(client.close)
        self.broker.offer(connection_id, server_end, initial_data)
        server_end.close()
        ack = await self.expect("ack")
        self.assertEqual(list(ack.connection_ids), [connection_id])
        client.setblocking(False)
        return client

    async def test_serves_with_the_callback_and_reports_closed(self) -> None:
        server = await self.start()
        self.assertEqual(server.worker_id, 7)
        self.assertTrue(server.is_serving())
        client = await self.hand_over(4, initial_data=b"first\n")
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"second\n")
        answer = b""
        while answer != b"FIRST\nSECOND\n":  # initial_data comes first
            answer += await loop.sock_recv(client, 100)
        client.close()
        closed = await self.expect("closed")
        self.assertEqual(list(closed.connection_ids), [4])
        self.assertEqual(server.active_connections, 0)
        server.close()
        await self.expect("goodbye")
        await asyncio.wait_for(server.serve_forever(), 5)

    async def test_drain_closes_idle_connections_then_finishes(self) -> None:
        server = await self.start()
        with mock.patch.object(core, "FIRST_REQUEST_GRACE", 0):
            client = await self.hand_over(1)
            self.broker.send(drain=pb.Drain(deadline_unix_nanos=2 * 10**18))
            loop = asyncio.get_running_loop()
            # The idle connection reads EOF and its handler closes it.
            self.assertEqual(await asyncio.wait_for(
                loop.sock_recv(client, 100), 5), b"")
            await asyncio.wait_for(server.wait_closed(), 5)
        self.assertEqual(self.drains, [(DrainCause.BROKER_REQUEST, 2e9)])
        self.assertFalse(server.is_serving())
        self.assertEqual(list((await self.expect("closed")).connection_ids),
                         [1])
        await self.expect("goodbye")

    async def test_timer_that_fires_early_is_armed_again(self) -> None:
        # A loop timer may fire before the core's own clock reaches the
        # deadline (uvloop rounds to whole milliseconds): the core then has
        # nothing to do and reports the same deadline. The driver must arm
        # the timer again; it once kept the spent handle and never woke up
        # for that deadline again (a Closed report was never sent).
        server = await self.start()
        due = server.loop.time() + 0.01
        server._core.deadline = lambda: due
        calls = []
        process_events = server._core.process_events
        server._core.process_events = lambda: (calls.append(1),
                                               process_events())[1]
        server._arm_timer()
        for _ in range(200):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.005)
        del server._core.deadline, server._core.process_events
        server._arm_timer()
        self.assertGreaterEqual(len(calls), 2)

    async def test_refusal_raises(self) -> None:
        async def refuse() -> None:
            await asyncio.to_thread(self.broker.accept)
            await asyncio.to_thread(self.broker.receive_body, "hello")
            self.broker.send(refusal=pb.Refusal(
                reason=pb.REFUSAL_REASON_SHUTTING_DOWN, message="bye"))

        refused = asyncio.create_task(refuse())
        with self.assertRaises(fdbroker_worker.RegistrationError) as caught:
            await fdbroker_worker.start_server(
                upper_lines, socket_path=self.broker.socket_path)
        await refused
        self.assertEqual(caught.exception.reason,
                         "REFUSAL_REASON_SHUTTING_DOWN")


if __name__ == "__main__":
    unittest.main()
