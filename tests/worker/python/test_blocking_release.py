"""Release with the blocking API against a fake broker."""

import unittest

import test_blocking
from fake_broker import FakeBroker
from fdbroker_worker._proto import pb


class BlockingReleaseTest(unittest.TestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)

    # BlockingWorkerTest's helpers, not its tests.
    connect = test_blocking.BlockingWorkerTest.connect
    hand_over = test_blocking.BlockingWorkerTest.hand_over

    def test_release_request_wakes_the_idle_handler(self) -> None:
        worker = self.connect(release=True)
        self.assertTrue(self.hello.supports_release)
        client = self.hand_over(1)
        client.settimeout(5)
        sock = next(iter(worker))
        client.sendall(b"req")
        self.assertTrue(sock.wait_for_request(5))
        self.assertEqual(sock.recv(3), b"req")
        sock.sendall(b"resp")
        self.assertEqual(client.recv(4), b"resp")
        self.broker.send(release_request=pb.ReleaseRequest(
            max_connections=1, reason=pb.RELEASE_REASON_REBALANCE))
        self.assertFalse(sock.wait_for_request(5))  # asked to release
        self.assertTrue(sock.release_requested)
        self.assertTrue(sock.release(b""))
        self.assertEqual(sock.fileno(), -1)
        release, moved = self.broker.receive_release()
        self.addCleanup(moved.close)
        self.assertEqual(release.connection_id, 1)
        self.assertEqual(moved.getpeername(), client.getsockname())
        client.sendall(b"next")
        moved.settimeout(5)
        self.assertEqual(moved.recv(4), b"next")
        self.assertEqual(worker.active_connections, 0)
        worker.start_drain()
        self.broker.receive_body("goodbye")  # no Closed for it

    def test_release_fails_without_opting_in(self) -> None:
        worker = self.connect()
        self.assertFalse(self.hello.supports_release)
        client = self.hand_over(2)
        sock = next(iter(worker))
        self.assertFalse(sock.release())
        sock.sendall(b"kept")
        self.assertEqual(client.recv(4), b"kept")
        sock.close()
        self.assertEqual(
            list(self.broker.receive_body("closed").connection_ids), [2])


if __name__ == "__main__":
    unittest.main()
