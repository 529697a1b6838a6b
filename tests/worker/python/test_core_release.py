"""WorkerCore.release() (protocol 1.2) against a fake broker: Release packets
carry the client's own socket, no Closed follows, and a Release that cannot
be sent leaves the connection with the application."""

import os
import socket
import unittest
from unittest import mock

import test_core
from fake_broker import same_socket
from fdbroker_worker import channel as channel_lib
from fdbroker_worker._proto import pb
from test_core import Driver


class ReleaseTest(unittest.TestCase):
    # CoreTest's helpers, not its tests (a subclass would rerun them).
    setUp = test_core.CoreTest.setUp
    start = test_core.CoreTest.start
    expect = test_core.CoreTest.expect
    accept_again = test_core.CoreTest.accept_again
    client_pair = test_core.CoreTest.client_pair
    offer = test_core.CoreTest.offer
    def take(self, driver: Driver, connection_id: int) -> socket.socket:
        """Offers a connection and runs the worker until it is acked and
        delivered; returns the client's end."""
        client = self.offer(connection_id)
        self.expect(driver, "ack")
        driver.run_until(lambda: any(c.id == connection_id
                                     for c in driver.connections))
        return client

    def release(self, driver: Driver, connection_id: int,
                unread: bytes = b"", reason: int = pb.RELEASE_REASON_REBALANCE
                ) -> list[bool]:
        """core.release() with a dup of the connection's socket, as the
        drivers do; the list gets the result."""
        connection = next(c for c in driver.connections
                          if c.id == connection_id)
        results: list[bool] = []
        copy = socket.socket(fileno=os.dup(connection.socket.fileno()))
        driver.core.release(connection_id, copy, unread, reason,
                            results.append)
        return results

    def test_hello_announces_release_only_when_opted_in(self) -> None:
        self.start()
        self.assertFalse(self.hello.supports_release)
        self.assertEqual(self.hello.version.minor, 4)
        self.broker.close()
        self.broker = type(self.broker)()
        self.addCleanup(self.broker.close)
        self.start(supports_release=True)
        self.assertTrue(self.hello.supports_release)

    def test_release_request_then_release_carries_the_same_socket(self
                                                                  ) -> None:
        driver = self.start(supports_release=True)
        client = self.take(driver, 3)
        self.take(driver, 4)
        self.broker.send(release_request=pb.ReleaseRequest(
            max_connections=1, reason=pb.RELEASE_REASON_REBALANCE))
        driver.run_until(lambda: driver.release_requests)
        requests = driver.release_requests
        self.assertEqual((requests[0].max_connections, requests[0].reason),
                         (1, pb.RELEASE_REASON_REBALANCE))
        fds = os.listdir("/proc/self/fd")
        results = self.release(driver, 3, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(results, [True])  # sent at once
        self.assertEqual(len(os.listdir("/proc/self/fd")), len(fds))
        release, moved = self.broker.receive_release()
        self.addCleanup(moved.close)
        self.assertEqual((release.connection_id, release.unread_data,
                          release.reason),
                         (3, b"GET / HTTP/1.1\r\n\r\n",
                          pb.RELEASE_REASON_REBALANCE))
        # The fd is the connection itself: the client talks to it, and the
        # worker closing its copy ended nothing.
        own = next(c for c in driver.connections if c.id == 3).socket
        self.assertTrue(same_socket(moved, own))
        own.close()
        client.sendall(b"next")
        self.assertEqual(moved.recv(4), b"next")
        moved.sendall(b"answer")
        self.assertEqual(client.recv(6), b"answer")
        self.assertEqual(driver.core.active_connections, 1)
        # No Closed for it: a close reported for it now is ignored.
        driver.core.connection_closed(3)
        driver.core.start_drain()
        next(c for c in driver.connections if c.id == 4).socket.close()
        driver.core.connection_closed(4)
        driver.run_until(lambda: driver.core.finished)
        self.assertEqual(list(self.expect(driver, "closed").connection_ids),
                         [4])
        self.expect(driver, "goodbye")

    def test_drain_release_idle_then_goodbye(self) -> None:
        driver = self.start(supports_release=True)
        self.take(driver, 1)
        self.broker.send(drain=pb.Drain(release_idle=True))
        driver.run_until(lambda: driver.drains)
        self.assertTrue(driver.drains[0].release_idle)
        self.assertEqual(self.release(driver, 1,
                                      reason=pb.RELEASE_REASON_DRAIN),
                         [True])
        driver.run_until(lambda: driver.core.finished)
        release, moved = self.broker.receive_release()
        moved.close()
        self.assertEqual(release.reason, pb.RELEASE_REASON_DRAIN)
        self.expect(driver, "goodbye")  # no Closed in between

    def test_release_idle_ignored_without_opting_in(self) -> None:
        driver = self.start()
        self.broker.send(drain=pb.Drain(release_idle=True))
        driver.run_until(lambda: driver.drains)
        self.assertFalse(driver.drains[0].release_idle)

    def test_no_channel_keeps_the_connection(self) -> None:
        driver = self.start(supports_release=True)
        client = self.take(driver, 2)
        self.broker.stop_listening()
        self.broker.close_channel()
        driver.run_until(lambda: not driver.core.registered)
        fds = len(os.listdir("/proc/self/fd"))
        self.assertEqual(self.release(driver, 2), [False])
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds)  # copy closed
        self.assertEqual(driver.core.active_connections, 1)
        own = driver.connections[0].socket
        own.sendall(b"kept")
        self.assertEqual(client.recv(4), b"kept")
        # The next broker hears of it as owned.
        self.broker.listen()
        hello = self.accept_again(driver)
        self.assertEqual([c.connection_id for c in hello.owned_connections],
                         [2])

    def test_channel_dying_with_the_release_queued_keeps_it(self) -> None:
        driver = self.start(supports_release=True)
        client = self.take(driver, 5)
        # The channel's buffer is full: the Release waits in the outbox.
        with mock.patch.object(channel_lib.Channel, "send",
                               return_value=False):
            results = self.release(driver, 5)
            self.assertEqual(results, [])
            self.assertEqual(driver.core.active_connections, 0)
            self.broker.stop_listening()
            self.broker.close_channel()
            driver.run_until(lambda: results)
        self.assertEqual(results, [False])
        self.assertEqual(driver.core.active_connections, 1)
        driver.connections[0].socket.sendall(b"still mine")
        self.assertEqual(client.recv(10), b"still mine")

    def test_refuses_oversized_unread_data_and_unknown_ids(self) -> None:
        driver = self.start(supports_release=True)
        self.take(driver, 6)
        # protocol.md §5 Release: at most 65024 bytes (the C++ SDK's limit
        # too); more would be a protocol error at the broker.
        big = b"x" * 65025
        self.assertEqual(self.release(driver, 6, big), [False])
        results = []
        copy = socket.socket()
        driver.core.release(99, copy, b"", 1, results.append)
        self.assertEqual(results, [False])
        self.assertEqual(copy.fileno(), -1)  # closed by the core
        self.assertEqual(driver.core.active_connections, 1)

    def test_releases_unread_data_up_to_the_protocol_limit(self) -> None:
        driver = self.start(supports_release=True)
        self.take(driver, 7)
        self.assertEqual(self.release(driver, 7, b"x" * 65024), [True])


if __name__ == "__main__":
    unittest.main()
