"""Connection migration with the real fdbroker and Python example workers:
Rebalance after a scale-up, DrainWorker moving hundreds of idle clients,
and a busy connection moved once its response is out. Every client keeps
its TCP connection; its next request is answered (by another worker where
it moved)."""

import json
import re
import shutil
import signal
import socket
import time
import unittest
from typing import Optional

from broker_process import Broker, wait_for

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def read_response(client: socket.socket) -> bytes:
    """One whole response ("hello" or "slept" body) from `client`."""
    data = b""
    while not re.search(rb"\r\n\r\n\w+\n$", data):
        chunk = client.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def pid_of(response: bytes) -> int:
    return int(re.search(rb"X-Worker-Pid: (\d+)", response).group(1))


@unittest.skipUnless(shutil.which("buf"), "needs buf (deploy/setup.sh "
                     "--test-tools installs it)")
class BrokerReleaseTest(unittest.TestCase):
    def start_broker(self, workers: int, *flags: str) -> Broker:
        broker = Broker(workers, extra_flags=flags)
        self.addCleanup(broker.cleanup)
        broker.wait_for_workers(workers)
        # Registered (a worker still starting is listed without it).
        wait_for(lambda: all(w.get("supportsRelease")
                             for w in self.workers(broker)), 30,
                 "every worker registered with supportsRelease")
        return broker

    def workers(self, broker: Broker) -> list[dict]:
        return json.loads(broker.rpc("ListWorkers")).get("workers", [])

    def loads(self, broker: Broker) -> dict[int, int]:
        """pid -> active connections, of the workers that serve."""
        return {w["pid"]: int(w.get("activeConnections", 0))
                for w in self.workers(broker)
                if w.get("state", "") in ("", "WORKER_STATE_READY")}

    def connect_clients(self, broker: Broker, count: int
                        ) -> list[tuple[socket.socket, int]]:
        """`count` keep-alive clients, each after one request: (socket,
        the pid that answered)."""
        clients = []
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", broker.port),
                                              timeout=10)
            self.addCleanup(client.close)
            client.sendall(REQUEST)
            clients.append((client, pid_of(read_response(client))))
        return clients

    def next_requests(self, clients: list[tuple[socket.socket, int]]
                      ) -> list[int]:
        """Each client's next request on its same connection; the pids that
        answered (a failure raises)."""
        pids = []
        for client, _ in clients:
            client.sendall(REQUEST)
            response = read_response(client)
            self.assertIn(b"200 OK", response)
            self.assertNotIn(b"Connection: close", response)
            pids.append(pid_of(response))
        return pids

    def scale_up_and_balance(self, rebalance_rpc: bool) -> None:
        """200 keep-alive clients on 2 workers, scale to 4, then Rebalance
        (or the broker's own after-scale rebalance): every worker ends within
        one connection of the mean, and every client's next request on its
        connection is answered, by a new worker where it moved."""
        broker = self.start_broker(
            2, *(() if rebalance_rpc else ("--rebalance_after_scale",)))
        clients = self.connect_clients(broker, 200)
        broker.rpc("ScaleWorkers", {"count": 4})
        # (Not wait_for_workers(): least_conn sends every new connection to
        # the two new workers while the old ones hold the 200.)
        wait_for(lambda: len(self.loads(broker)) == 4, 30,
                 "4 ready workers")
        if rebalance_rpc:
            broker.rpc("Rebalance")

        def balanced() -> Optional[dict[int, int]]:
            loads = self.loads(broker)
            if len(loads) != 4 or sum(loads.values()) != 200:
                return None
            mean = sum(loads.values()) / len(loads)
            return loads if all(abs(n - mean) <= 1
                                for n in loads.values()) else None

        loads = wait_for(balanced, 20, "every worker within one connection "
                         "of the mean")
        before = [pid for _, pid in clients]
        after = self.next_requests(clients)
        moved = sum(1 for b, a in zip(before, after) if a != b)
        self.assertGreater(moved, 0)
        # Each client is now answered by the worker that holds it.
        self.assertEqual(sorted(loads), sorted(set(after)))
        print(f"\nrebalance ({'RPC' if rebalance_rpc else 'after scale'}): "
              f"loads {sorted(loads.values())}, {moved} of 200 clients "
              "moved, all next requests answered", flush=True)

    def test_rebalance_rpc_after_scale_up(self) -> None:
        self.scale_up_and_balance(rebalance_rpc=True)

    def test_automatic_rebalance_after_scale_up(self) -> None:
        self.scale_up_and_balance(rebalance_rpc=False)

    def test_drain_worker_moves_hundreds_of_idle_clients(self) -> None:
        broker = self.start_broker(2)
        clients = self.connect_clients(broker, 300)
        workers = self.workers(broker)
        victim = max(workers,
                     key=lambda w: int(w.get("activeConnections", 0)))
        victim_pid = victim["pid"]
        held = sum(1 for _, pid in clients if pid == victim_pid)
        start = time.monotonic()
        broker.rpc("DrainWorker", {"worker_id": victim["id"]})
        wait_for(lambda: victim_pid not in broker.worker_pids(), 10,
                 "the drained worker's exit")
        drained_in = time.monotonic() - start
        pids = self.next_requests(clients)
        self.assertNotIn(victim_pid, pids)
        self.assertIn(f"(pid {victim_pid}) exited: exit code 0",
                      broker.log())
        print(f"\ndrain: {held} idle clients moved, worker exited "
              f"{drained_in * 1000:.0f} ms after DrainWorker (RPC included)"
              ", 300/300 next requests answered", flush=True)
        self.assertLess(drained_in, 1.0)

    def test_busy_connection_moves_after_its_response(self) -> None:
        broker = self.start_broker(2)
        busy = socket.create_connection(("127.0.0.1", broker.port),
                                        timeout=10)
        self.addCleanup(busy.close)
        busy.sendall(REQUEST)
        owner = pid_of(read_response(busy))
        busy.sendall(b"GET /sleep?ms=800 HTTP/1.1\r\nHost: x\r\n\r\n")
        worker_id = next(w["id"] for w in self.workers(broker)
                         if w["pid"] == owner)
        broker.rpc("DrainWorker", {"worker_id": worker_id})
        response = read_response(busy)
        self.assertIn(b"slept", response)
        self.assertNotIn(b"Connection: close", response)
        busy.sendall(REQUEST)
        self.assertNotEqual(pid_of(read_response(busy)), owner)

    def rolling_restart(self, trigger) -> None:
        """200 keep-alive clients on 3 Python workers, then a rolling
        restart (`trigger`): every worker is replaced, the ready pool never
        shrinks, and every client's next request on its connection is
        answered by a new worker."""
        broker = self.start_broker(3)
        clients = self.connect_clients(broker, 200)
        before = set(self.loads(broker))
        start = time.monotonic()
        trigger(broker)
        smallest = 3

        def replaced() -> bool:
            nonlocal smallest
            loads = self.loads(broker)
            smallest = min(smallest, len(loads))
            return (len(loads) == 3 and not before & set(loads)
                    and not before & broker.worker_pids())
        wait_for(replaced, 60, "every worker replaced and gone")
        took = time.monotonic() - start
        self.assertEqual(smallest, 3, "the ready pool shrank")
        after = set(self.loads(broker))
        pids = self.next_requests(clients)
        self.assertTrue(set(pids) <= after, f"{set(pids)} not in {after}")
        print(f"\nrolling restart of 3 Python workers with 200 keep-alive "
              f"clients: {took * 1000:.0f} ms to every old worker gone, "
              "200/200 next requests answered by new workers", flush=True)

    def test_rolling_restart_keeps_every_keep_alive_client(self) -> None:
        def restart(broker: Broker) -> None:
            answer = json.loads(broker.rpc("RestartWorkers",
                                           {"max_surge": 1}))
            self.assertEqual(len(answer.get("replacing", [])), 3)
        self.rolling_restart(restart)

    def test_sighup_restarts_the_python_workers(self) -> None:
        self.rolling_restart(lambda broker: broker.process.send_signal(
            signal.SIGHUP))

    def test_recycling_by_connection_count_moves_every_client(self) -> None:
        """--max_connections_per_worker with Python workers: each worker
        past 25 new connections is replaced surge-first and its keep-alive
        clients move to the others on their connections, none cut. 80
        clients is more than three times the limit: moved clients must not
        count, or the recycles would go on without end."""
        broker = self.start_broker(2, "--max_connections_per_worker=25")
        first = set(self.loads(broker))
        clients = self.connect_clients(broker, 80)
        wait_for(lambda: len(self.loads(broker)) == 2
                 and not first & broker.worker_pids(), 60,
                 "both first workers recycled and gone")
        after = set(self.loads(broker))
        pids = self.next_requests(clients)
        self.assertTrue(set(pids) <= after, f"{set(pids)} not in {after}")
        # It settles: the new workers got at most 80 - 50 new connections
        # between them, and the clients moved to them do not count, so
        # none of them is being recycled after those 80 requests.
        self.assertEqual(set(self.loads(broker)), after)
        self.assertEqual(after, broker.worker_pids())
        print(f"\nrecycling: 2 Python workers past 25 connections replaced, "
              f"80/80 keep-alive clients answered on their connections by "
              f"{len(after)} new workers", flush=True)


if __name__ == "__main__":
    unittest.main()
