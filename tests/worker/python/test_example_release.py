"""examples/http_worker.py releasing connections, driven by the fake broker:
idle keep-alive connections go back on ReleaseRequest, a half-read
pipelined request keeps its connection, and Drain.release_idle moves idle
and then busy connections without the client seeing a close."""

import os
import re
import subprocess
import unittest

from broker_process import EXAMPLE, PYTHON
from fake_broker import FakeBroker
from fdbroker_worker._proto import pb
from test_aio import tcp_pair

START_TIMEOUT = 30.0  # a loaded machine imports protobuf slowly


class ExampleReleaseTest(unittest.TestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)
        self.worker = subprocess.Popen(
            [PYTHON, str(EXAMPLE), f"--socket={self.broker.socket_path}"],
            env=dict(os.environ), stderr=subprocess.PIPE)
        self.addCleanup(self.stop_worker)
        self.broker.accept(START_TIMEOUT)
        hello = self.broker.receive_body("hello", START_TIMEOUT)
        self.assertTrue(hello.supports_release)
        self.broker.welcome()
        self.next_id = 1

    def stop_worker(self) -> None:
        if self.worker.poll() is None:
            self.worker.kill()
        self.worker.wait()
        self.worker.stderr.close()

    def hand_over(self):
        """A new keep-alive client served by the worker: (client, id)."""
        server_end, client = tcp_pair()
        self.addCleanup(client.close)
        client.settimeout(5)
        cid, self.next_id = self.next_id, self.next_id + 1
        self.broker.offer(cid, server_end)
        server_end.close()
        self.assertEqual(list(self.broker.receive_body("ack")
                              .connection_ids), [cid])
        return client, cid

    def response(self, client) -> bytes:
        data = b""
        while not re.search(rb"\r\n\r\n\w+\n$", data):
            chunk = client.recv(4096)
            self.assertTrue(chunk, f"closed after {data!r}")
            data += chunk
        return data

    def get(self, client, path: str = "/") -> bytes:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return self.response(client)

    def released(self, cid: int):
        release, moved = self.broker.receive_release()
        self.addCleanup(moved.close)
        self.assertEqual(release.connection_id, cid)
        return release, moved

    def assert_undisturbed(self, client) -> None:
        client.setblocking(False)
        with self.assertRaises(BlockingIOError):
            client.recv(100)  # no FIN (b"") and no RST (an error)
        client.settimeout(5)

    def test_idle_connection_is_released_and_the_next_request_moves(self
                                                                    ) -> None:
        client, cid = self.hand_over()
        self.assertIn(b"200 OK", self.get(client))
        self.broker.send(release_request=pb.ReleaseRequest(
            max_connections=1, reason=pb.RELEASE_REASON_REBALANCE))
        release, moved = self.released(cid)
        self.assertEqual(release.unread_data, b"")
        self.assert_undisturbed(client)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        moved.settimeout(5)
        self.assertEqual(moved.recv(4096),
                         b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    def test_half_read_pipelined_request_is_not_released(self) -> None:
        client, _ = self.hand_over()
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")
        self.assertIn(b"200 OK", self.response(client))
        self.broker.send(release_request=pb.ReleaseRequest(
            max_connections=1))
        with self.assertRaises(TimeoutError):
            self.broker.receive(0.5)
        client.sendall(b"Host: x\r\n\r\n")
        self.assertIn(b"200 OK", self.response(client))

    def test_drain_release_idle_moves_idle_then_busy(self) -> None:
        idle, idle_id = self.hand_over()
        busy, busy_id = self.hand_over()
        self.assertIn(b"200 OK", self.get(idle))
        busy.sendall(b"GET /sleep?ms=500 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.broker.send(drain=pb.Drain(release_idle=True))
        release, _ = self.released(idle_id)
        self.assertEqual(release.reason, pb.RELEASE_REASON_DRAIN)
        answer = self.response(busy)
        self.assertIn(b"slept", answer)
        self.assertNotIn(b"Connection: close", answer)  # kept alive
        release, _ = self.released(busy_id)
        self.assertEqual(release.reason, pb.RELEASE_REASON_DRAIN)
        self.broker.receive_body("goodbye")
        self.assertEqual(self.worker.wait(10), 0)
        self.assert_undisturbed(idle)
        self.assert_undisturbed(busy)


if __name__ == "__main__":
    unittest.main()
