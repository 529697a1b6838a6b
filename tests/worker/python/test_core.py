"""WorkerCore (the protocol state machine) against a fake broker over a real
SOCK_SEQPACKET socket, with real fds."""

import os
import select
import socket
import time
import unittest
from unittest import mock
from typing import Callable

from fake_broker import WAIT, FakeBroker, open_fds
from fdbroker_worker import core as core_lib
from fdbroker_worker._proto import pb
from fdbroker_worker.core import DrainCause, Options, WorkerCore


class Driver:
    """Runs a WorkerCore's process_events() like a driver would, collecting
    what it hands to the application."""

    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self.connections: list[core_lib.Connection] = []
        self.drains: list[core_lib.Drain] = []
        self.release_requests: list[core_lib.ReleaseRequest] = []

    def run_until(self, done: Callable[[], bool], timeout: float = WAIT
                  ) -> None:
        end = time.monotonic() + timeout
        while True:
            events = self.core.process_events()
            self.connections += events.connections
            if events.drain is not None:
                self.drains.append(events.drain)
            self.release_requests += events.release_requests
            if done():
                return
            if time.monotonic() > end:
                raise AssertionError("condition not reached in time")
            select.select([self.core], [], [], 0.01)

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.run_until(lambda: time.monotonic() > end, seconds + WAIT)


class CoreTest(unittest.TestCase):
    def setUp(self) -> None:
        self.fds_before = open_fds()
        self.broker = FakeBroker()
        self.addCleanup(self.broker.close)

    def start(self, welcome: bool = True, **options) -> Driver:
        core = WorkerCore(Options(self.broker.socket_path, **options))
        self.addCleanup(core.close)
        core.start()
        self.broker.accept()
        self.hello = self.broker.receive_body("hello")
        driver = Driver(core)
        self.addCleanup(lambda: [c.socket.close() for c in driver.connections])
        if welcome:
            self.broker.welcome(**getattr(self, "welcome_args", {}))
            driver.run_until(lambda: core.registered)
        return driver

    def expect(self, driver: Driver, body: str):
        """Runs the worker until it sends a message other than a Heartbeat;
        asserts its body and returns it."""
        while True:
            driver.run_until(lambda: select.select(
                [self.broker.channel], [], [], 0)[0])
            message = self.broker.receive(0)
            if message.WhichOneof("body") != "heartbeat":
                self.assertEqual(message.WhichOneof("body"), body)
                return getattr(message, body)

    def accept_again(self, driver: Driver) -> "pb.Hello":
        """Runs the worker until it reconnects; returns its Hello."""
        driver.run_until(lambda: select.select(
            [self.broker.listening_socket], [], [], 0)[0])
        self.broker.accept()
        return self.broker.receive_body("hello")

    def client_pair(self) -> tuple[socket.socket, socket.socket]:
        """(the worker's end to hand over, the client's end)."""
        worker_end, client_end = socket.socketpair()
        self.addCleanup(client_end.close)
        return worker_end, client_end

    def offer(self, connection_id: int) -> socket.socket:
        """Offers a new connection; the broker's copy is closed right away
        (as after an Ack). Returns the client's end."""
        worker_end, client_end = self.client_pair()
        self.broker.offer(connection_id, worker_end)
        worker_end.close()
        return client_end

    def test_hello_says_who_the_worker_is(self) -> None:
        driver = self.start(capacity=3, labels={"lang": "python"})
        self.assertEqual(self.hello.version.major, 1)
        self.assertEqual(self.hello.pid, os.getpid())
        self.assertEqual(self.hello.capacity, 3)
        self.assertEqual(dict(self.hello.labels), {"lang": "python"})
        self.assertEqual(len(self.hello.owned_connections), 0)
        self.assertEqual(driver.core.worker_id, 7)

    def busy_heartbeats(self, driver: Driver, seconds: float) -> list:
        """Offers a connection every 10 ms for `seconds` (the worker's Acks
        keep its channel busy); the Heartbeats it sent meanwhile."""
        heartbeats = []
        end = time.monotonic() + seconds
        connection_id = 1
        while time.monotonic() < end:
            self.offer(connection_id)
            connection_id += 1
            driver.run_for(0.01)
            while select.select([self.broker.channel], [], [], 0)[0]:
                message = self.broker.receive(0)
                if message.WhichOneof("body") == "heartbeat":
                    heartbeats.append(message.heartbeat)
        return heartbeats

    def test_with_the_watchdog_heartbeats_carry_liveness_even_when_busy(
            self) -> None:
        self.welcome_args = {"interval_ms": 50, "worker_timeout_ms": 1000}
        driver = self.start()
        self.assertTrue(self.hello.reports_liveness)
        driver.core.app_silent = lambda: 2.5
        heartbeats = self.busy_heartbeats(driver, 0.5)
        # About 10 at one per 50 ms; a loaded machine runs fewer turns.
        self.assertGreaterEqual(len(heartbeats), 3)
        self.assertTrue(all(h.app_silent_ms == 2500 for h in heartbeats))

    def test_refusal_is_a_registration_error(self) -> None:
        driver = self.start(welcome=False)
        self.broker.send(refusal=pb.Refusal(
            reason=pb.REFUSAL_REASON_TOO_MANY_WORKERS, message="full"))
        driver.run_until(lambda: driver.core.error is not None)
        self.assertEqual(driver.core.error.reason,
                         "REFUSAL_REASON_TOO_MANY_WORKERS")
        self.assertIn("full", str(driver.core.error))

    def test_no_broker_fails_at_once(self) -> None:
        core = WorkerCore(Options(self.broker.socket_path + ".none"))
        self.addCleanup(core.close)
        with self.assertRaises(core_lib.RegistrationError):
            core.start()

    def test_connection_is_acked_delivered_and_reported_closed(self) -> None:
        driver = self.start()
        client = self.offer(11)
        self.assertEqual(list(self.expect(driver, "ack").connection_ids),
                         [11])
        driver.run_until(lambda: driver.connections)
        connection = driver.connections[0]
        self.assertEqual((connection.id, connection.peer_address),
                         (11, "127.0.0.1:1"))
        connection.socket.sendall(b"hi")  # the same socket the client holds
        self.assertEqual(client.recv(2), b"hi")
        connection.socket.close()
        driver.core.connection_closed(11)
        driver.run_until(lambda: True)
        self.assertEqual(
            list(self.expect(driver, "closed").connection_ids), [11])

    def test_hello_offers_batches(self) -> None:
        self.start()
        self.assertEqual(self.hello.max_connections_per_message, 32)

    def test_batch_is_acked_in_one_ack(self) -> None:
        driver = self.start()
        ends = [self.client_pair() for _ in range(3)]
        self.broker.send(fds=[w.fileno() for w, _ in ends],
                         connection_batch=pb.ConnectionBatch(connections=[
                             pb.Connection(connection_id=i,
                                           local_address="127.0.0.1:2")
                             for i in (21, 22, 23)]))
        for worker_end, _ in ends:
            worker_end.close()
        self.assertEqual(list(self.expect(driver, "ack").connection_ids),
                         [21, 22, 23])
        driver.run_until(lambda: len(driver.connections) == 3)
        for connection, (_, client) in zip(driver.connections, ends):
            connection.socket.sendall(b"x")
            self.assertEqual(client.recv(1), b"x")

    def test_closed_reports_wait_for_the_next_ack(self) -> None:
        # Long enough that only the Ack can bring them within the test.
        patch = mock.patch.object(core_lib, "CLOSED_REPORT_DELAY", 3600)
        patch.start()
        self.addCleanup(patch.stop)
        driver = self.start()
        self.offer(31)
        self.offer(32)
        driver.run_until(lambda: len(driver.connections) == 2)
        self.expect(driver, "ack")
        for connection in driver.connections:
            connection.socket.close()
            self.assertFalse(driver.core.connection_closed(connection.id))
        driver.run_for(0.05)
        self.assertFalse(select.select([self.broker.channel], [], [], 0)[0],
                         "Closed sent on its own")
        self.offer(33)
        # One packet with both closes, then the Ack it rode with.
        self.assertEqual(
            list(self.expect(driver, "closed").connection_ids), [31, 32])
        self.assertEqual(list(self.expect(driver, "ack").connection_ids),
                         [33])

    def test_closed_reports_go_within_the_delay_without_an_ack(self) -> None:
        driver = self.start()
        self.offer(41)
        driver.run_until(lambda: driver.connections)
        self.expect(driver, "ack")
        driver.connections[0].socket.close()
        closed_at = time.monotonic()
        driver.core.connection_closed(41)
        self.assertEqual(
            list(self.expect(driver, "closed").connection_ids), [41])
        # The core's deadline() brought it: not before the delay.
        self.assertGreaterEqual(time.monotonic() - closed_at,
                                core_lib.CLOSED_REPORT_DELAY)

    def test_connections_cut_unfinished_are_reported_as_cut(self) -> None:
        # Minor 4: what the application cuts at its drain deadline goes in
        # Closed.cut_connection_ids (the broker counts it lost), the rest
        # in connection_ids, in one report.
        driver = self.start()
        self.offer(61)
        self.offer(62)
        driver.run_until(lambda: len(driver.connections) == 2)
        self.expect(driver, "ack")
        for connection in driver.connections:
            connection.socket.close()
        driver.core.connection_closed(61)
        driver.core.connection_closed(62, cut=True)
        closed = self.expect(driver, "closed")
        self.assertEqual(list(closed.connection_ids), [61])
        self.assertEqual(list(closed.cut_connection_ids), [62])

    def test_closed_reports_are_urgent_with_a_capacity(self) -> None:
        driver = self.start(capacity=4)
        self.offer(51)
        driver.run_until(lambda: driver.connections)
        self.expect(driver, "ack")
        driver.connections[0].socket.close()
        self.assertTrue(driver.core.connection_closed(51))

    def test_beyond_capacity_is_rejected(self) -> None:
        driver = self.start(capacity=1)
        self.offer(1)
        self.expect(driver, "ack")
        self.offer(2)
        driver.run_until(lambda: driver.connections)
        reject = self.expect(driver, "reject")
        self.assertEqual(list(reject.connection_ids), [2])
        self.assertIn("capacity", reject.reason)
        self.assertEqual(len(driver.connections), 1)

    def test_drain_rejects_new_connections_then_says_goodbye(self) -> None:
        driver = self.start()
        self.offer(1)
        self.expect(driver, "ack")
        driver.run_until(lambda: driver.connections)
        self.broker.send(drain=pb.Drain(deadline_unix_nanos=5 * 10**18))
        self.offer(2)  # crossed the Drain on the wire
        reject = self.expect(driver, "reject")
        self.assertEqual(list(reject.connection_ids), [2])
        self.assertEqual(reject.reason, "worker is draining")
        self.assertEqual(len(driver.drains), 1)
        self.assertEqual(driver.drains[0].cause, DrainCause.BROKER_REQUEST)
        self.assertEqual(driver.drains[0].deadline, 5e9)
        self.assertFalse(driver.core.finished)
        driver.connections[0].socket.close()
        driver.core.connection_closed(1)
        driver.run_until(lambda: driver.core.finished)
        self.assertEqual(list(self.expect(driver, "closed").connection_ids),
                         [1])
        self.assertIn("drained", self.expect(driver, "goodbye").reason)
        self.assertTrue(self.broker.wait_for_close())

    def test_connection_in_the_batch_of_a_drain_is_rejected(self) -> None:
        driver = self.start()
        self.offer(1)
        self.broker.send(drain=pb.Drain())
        driver.run_until(lambda: driver.core.finished)
        self.assertEqual(list(self.expect(driver, "reject").connection_ids),
                         [1])
        self.expect(driver, "goodbye")
        self.assertEqual(driver.connections, [])
        self.assertIsNone(driver.drains[0].deadline)

    def test_silent_broker_is_lost_then_worker_re_registers(self) -> None:
        self.welcome_args = {"timeout_ms": 200, "supervised": True}
        driver = self.start()
        self.offer(5)
        self.expect(driver, "ack")
        driver.run_until(lambda: not driver.core.registered)
        # Reconnects to the same path with what it still owns.
        hello = self.accept_again(driver)
        self.assertEqual([(c.connection_id, c.peer_address)
                          for c in hello.owned_connections],
                         [(5, "127.0.0.1:1")])
        self.assertTrue(hello.was_supervised)
        self.broker.welcome(worker_id=9)
        driver.run_until(lambda: driver.core.registered)
        self.assertEqual(driver.core.worker_id, 9)
        self.assertFalse(driver.core.draining)
        driver.connections[0].socket.close()
        driver.core.connection_closed(5)
        driver.run_until(lambda: True)
        self.assertEqual(list(self.expect(driver, "closed").connection_ids),
                         [5])

    def test_broker_restart_keeps_connections_and_drops_unacked(self) -> None:
        driver = self.start()
        client = self.offer(1)
        self.expect(driver, "ack")
        driver.run_until(lambda: driver.connections)
        self.broker.stop_listening()
        self.broker.close_channel()
        driver.run_until(lambda: not driver.core.registered)
        driver.run_for(0.3)  # attempts fail: nobody listens
        self.broker.listen()
        self.assertEqual([c.connection_id for c in
                          self.accept_again(driver).owned_connections], [1])
        self.broker.welcome(worker_id=8)
        # A connection right behind the Welcome is taken too.
        self.offer(2)
        driver.run_until(lambda: len(driver.connections) == 2)
        self.assertEqual(list(self.expect(driver, "ack").connection_ids),
                         [2])
        driver.connections[0].socket.sendall(b"still served")
        self.assertEqual(client.recv(12), b"still served")

    def test_gave_up_reconnecting_drains(self) -> None:
        driver = self.start(reconnect_timeout=0.3)
        self.broker.stop_listening()
        self.broker.close_channel()
        driver.run_until(lambda: driver.core.finished)
        self.assertEqual([d.cause for d in driver.drains],
                         [DrainCause.BROKER_LOST])

    def test_protocol_error_closes_unacked_fds(self) -> None:
        driver = self.start(reconnect_timeout=0)
        fds = open_fds()
        worker_end, _ = self.client_pair()
        self.broker.send_raw(pb.HandoffMessage(
            sequence=5, heartbeat=pb.Heartbeat()).SerializeToString(),
            (worker_end.fileno(),))
        worker_end.close()
        driver.run_until(lambda: driver.core.finished)
        # The fd that came with the bad packet is closed, and the channel:
        # only the client's end is left.
        self.assertEqual(open_fds(), fds - 1 + 1)

    def test_hello_that_would_not_fit_drops_lowest_ids(self) -> None:
        driver = self.start()
        core = driver.core
        core._owned = {i: "[2001:db8::1]:65535" for i in range(1, 5001)}
        hello = pb.HandoffMessage(hello=pb.Hello())
        core._list_owned(hello.hello)
        self.assertLessEqual(len(hello.SerializeToString()), 65536 - 1024)
        listed = [c.connection_id for c in hello.hello.owned_connections]
        self.assertEqual(listed[-1], 5000)
        self.assertEqual(len(listed) + len(core._unlisted), 5000)
        self.assertFalse(hello.hello.owned_connections[0].peer_address)
        core._owned = {}
        core._unlisted.clear()

    def test_no_fd_leaks(self) -> None:
        driver = self.start()
        for i in range(1, 4):
            self.offer(i)
        driver.run_until(lambda: len(driver.connections) == 3)
        for connection in driver.connections:
            connection.socket.close()
            driver.core.connection_closed(connection.id)
        driver.core.start_drain()
        driver.run_until(lambda: driver.core.finished)
        driver.core.close()
        self.broker.close()
        self.assertEqual(open_fds(), self.fds_before + 3)  # client ends


class FirstRequestGraceTest(unittest.TestCase):
    """§7.7: a drain waits for the first request only on a connection on
    which the client has sent nothing yet."""

    def test_grace_until_the_client_sends_anything(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            with client, server:
                self.assertFalse(core_lib.has_received_bytes(server))
                self.assertEqual(
                    core_lib.first_request_grace_end(server, 10.0, 11.0),
                    10.0 + core_lib.FIRST_REQUEST_GRACE)
                self.assertEqual(  # past the grace: now
                    core_lib.first_request_grace_end(server, 10.0, 13.0),
                    13.0)
                client.sendall(b"x")
                self.assertEqual(server.recv(1), b"x")  # read: still counts
                self.assertTrue(core_lib.has_received_bytes(server))
                self.assertEqual(
                    core_lib.first_request_grace_end(server, 10.0, 11.0),
                    11.0)

    def test_unknown_socket_gets_the_grace(self) -> None:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(b"x")
            self.assertFalse(core_lib.has_received_bytes(b))  # not TCP
        self.assertEqual(core_lib.first_request_grace_end(None, 10.0, 11.0),
                         10.0 + core_lib.FIRST_REQUEST_GRACE)


if __name__ == "__main__":
    unittest.main()
