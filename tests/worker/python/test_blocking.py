"""BlockingWorker: the threaded API against a fake broker, with real TCP
client connections handed over as fds."""

import socket
import threading
import unittest
from unittest import mock

from fake_broker import FakeBroker
from fdbroker_worker import BlockingWorker, BrokeredSocket, DrainCause
from fdbroker_worker import core
from test_aio import tcp_pair


class BlockingWorkerTest(unittest.TestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)

    def connect(self, **kwargs) -> BlockingWorker:
        def broker_side() -> None:
            self.broker.accept()
            self.hello = self.broker.receive_body("hello")
            self.broker.welcome()

        welcomer = threading.Thread(target=broker_side)
        welcomer.start()
        worker = BlockingWorker.connect(self.broker.socket_path, **kwargs)
        welcomer.join()
        self.addCleanup(worker.close)
        return worker

    def hand_over(self, connection_id: int) -> socket.socket:
        server_end, client = tcp_pair()
        self.addCleanup(client.close)
        self.broker.offer(connection_id, server_end)
        server_end.close()
        self.assertEqual(
            list(self.broker.receive_body("ack").connection_ids),
            [connection_id])
        return client

    def test_yields_sockets_and_reports_their_close(self) -> None:
        worker = self.connect()
        client = self.hand_over(3)
        sockets = iter(worker)
        sock = next(sockets)
        self.assertIsInstance(sock, BrokeredSocket)
        self.assertEqual((sock.connection_id, sock.initial_data), (3, b""))
        self.assertTrue(sock.getblocking())
        with sock:
            client.sendall(b"ping")
            self.assertEqual(sock.recv(4), b"ping")
        self.assertEqual(
            list(self.broker.receive_body("closed").connection_ids), [3])
        worker.start_drain()
        self.assertTrue(worker.draining)
        self.broker.receive_body("goodbye")
        self.assertEqual(list(sockets), [])  # iteration ends when drained

    def test_drain_half_closes_idle_sockets(self) -> None:
        drains = []
        worker = self.connect(
            on_drain=lambda cause, deadline: drains.append(cause))
        with mock.patch.object(core, "FIRST_REQUEST_GRACE", 0):
            client = self.hand_over(1)
            sockets = iter(worker)
            sock = next(sockets)
            worker.start_drain()
            sock.settimeout(5)
            self.assertEqual(sock.recv(10), b"")  # idle: reads EOF
            sock.sendall(b"bye")  # writing still works
            self.assertEqual(client.recv(3), b"bye")
            sock.close()
            self.broker.receive_body("closed")
            self.broker.receive_body("goodbye")
            self.assertEqual(list(sockets), [])
        self.assertEqual(drains, [DrainCause.LOCAL])

    def test_drain_ends_a_served_idle_socket_at_once(self) -> None:
        # §7.7: the first-request grace is only for a connection on which
        # the client has sent nothing yet.
        worker = self.connect()
        client = self.hand_over(2)
        sockets = iter(worker)
        sock = next(sockets)
        client.sendall(b"ping")
        self.assertEqual(sock.recv(4), b"ping")
        worker.start_drain()
        sock.settimeout(1.0)  # well within FIRST_REQUEST_GRACE
        self.assertEqual(sock.recv(10), b"")
        sock.close()
        self.broker.receive_body("closed")
        self.broker.receive_body("goodbye")
        self.assertEqual(list(sockets), [])

    def test_drain_gives_a_fresh_socket_its_first_request(self) -> None:
        worker = self.connect()
        client = self.hand_over(3)
        sockets = iter(worker)
        sock = next(sockets)
        worker.start_drain()
        self.assertTrue(worker.draining)
        sock.settimeout(0.5)  # within FIRST_REQUEST_GRACE: no EOF yet
        with self.assertRaises(TimeoutError):
            sock.recv(5)
        client.sendall(b"first")
        sock.settimeout(5)
        self.assertEqual(sock.recv(5), b"first")
        sock.close()
        self.broker.receive_body("closed")
        self.broker.receive_body("goodbye")


if __name__ == "__main__":
    unittest.main()
