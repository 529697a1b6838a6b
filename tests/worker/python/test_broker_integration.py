"""The Python example worker (worker/python/examples/http_worker.py) under
the real fdbroker: load, crashes, drain and a broker restart."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import unittest
from typing import Optional

from broker_process import Broker, child_pids, open_fds, wait_for

WRK_SECONDS = 3


class BrokerIntegrationTest(unittest.TestCase):
    def start_broker(self, workers: int, **kwargs) -> Broker:
        broker = Broker(workers, **kwargs)
        self.addCleanup(broker.cleanup)
        return broker

    def assert_last_response_then_closed(self, busy: socket.socket) -> None:
        """The /sleep request in flight on `busy` is answered, as the last
        one on its connection, which the draining worker then closes."""
        response = b""
        while b"slept\n" not in response:
            chunk = busy.recv(4096)
            self.assertTrue(chunk, f"connection closed after {response!r}")
            response += chunk
        self.assertIn(b"HTTP/1.1 200 OK", response)
        self.assertIn(b"Connection: close", response)
        self.assertEqual(busy.recv(4096), b"")
        busy.close()

    def test_three_workers_serve_keep_alive_load(self) -> None:
        broker = self.start_broker(3)
        pids = broker.wait_for_workers(3)
        baseline = open_fds(broker.pid)
        wrk = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{WRK_SECONDS}s",
             f"http://127.0.0.1:{broker.port}/"],
            capture_output=True, text=True, timeout=WRK_SECONDS + 30)
        self.assertEqual(wrk.returncode, 0, wrk.stderr)
        self.assertNotIn("Non-2xx", wrk.stdout)
        self.assertNotIn("Socket errors", wrk.stdout)
        requests = int(re.search(r"(\d+) requests in", wrk.stdout).group(1))
        self.assertGreater(requests, 1000, wrk.stdout)
        # Every process answers: concurrent connections go to each worker
        # (once the workers' Closed for wrk's connections are in, least_conn
        # spreads new ones evenly again).
        wait_for(lambda: broker.serving_pids(9) == pids, 10,
                 "all three workers answering")
        broker.wait_for_fds(baseline)
        self.assertEqual(broker.stop(), 0, broker.log())

    def test_sigkilled_worker_is_respawned_without_fd_leak(self) -> None:
        broker = self.start_broker(3)
        pids = broker.wait_for_workers(3)
        baseline = open_fds(broker.pid)
        victim = min(pids)
        # A keep-alive connection to every worker, so one is open on the
        # victim when it dies.
        clients = [socket.create_connection(("127.0.0.1", broker.port))
                   for _ in range(6)]
        for client in clients:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"200 OK", client.recv(4096))
        os.kill(victim, signal.SIGKILL)
        def replaced() -> Optional[set[int]]:
            current = broker.worker_pids()
            if len(current) == 3 and victim not in current:
                return current
            return None

        new_pids = wait_for(replaced, 20, "a replacement worker")
        self.assertEqual(broker.wait_for_workers(3), new_pids)
        for client in clients:
            client.close()
        broker.wait_for_fds(baseline)
        self.assertEqual(broker.stop(), 0, broker.log())

    def test_drain_lets_the_request_in_flight_finish(self) -> None:
        broker = self.start_broker(1)
        broker.wait_for_workers(1)
        idle = http.client.HTTPConnection("127.0.0.1", broker.port,
                                          timeout=10)
        idle.request("GET", "/")
        self.assertEqual(idle.getresponse().read(), b"hello\n")
        busy = socket.create_connection(("127.0.0.1", broker.port),
                                        timeout=10)
        busy.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", busy.recv(4096))
        busy.sendall(b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        # SIGTERM drains the broker and its workers.
        broker.process.send_signal(signal.SIGTERM)
        self.assert_last_response_then_closed(busy)
        # The idle keep-alive connection was closed by the drain.
        idle.sock.settimeout(10)
        self.assertEqual(idle.sock.recv(4096), b"")
        idle.close()
        self.assertEqual(broker.process.wait(30), 0, broker.log())
        self.assertRegex(broker.log(), r"exited: exit code 0")

    @unittest.skipUnless(shutil.which("buf"), "needs buf (deploy/setup.sh "
                         "--test-tools installs it)")
    def test_drain_worker_rpc_replaces_a_worker_after_its_request(self
                                                                  ) -> None:
        # Workers that do not release: the drain closes the connection
        # (test_broker_release_integration has the releasing ones).
        broker = self.start_broker(2, worker_args="--no_release")
        pids = broker.wait_for_workers(2)
        busy = socket.create_connection(("127.0.0.1", broker.port),
                                        timeout=10)
        busy.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        owner = int(re.search(rb"X-Worker-Pid: (\d+)",
                              busy.recv(4096)).group(1))
        busy.sendall(b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        workers = json.loads(broker.rpc("ListWorkers"))["workers"]
        worker_id = next(w["id"] for w in workers if w["pid"] == owner)
        broker.rpc("DrainWorker", {"worker_id": worker_id, "replace": True})
        self.assert_last_response_then_closed(busy)

        def replaced() -> Optional[set[int]]:
            current = broker.worker_pids()
            return None if owner in current else current

        wait_for(replaced, 20, "the drained worker's exit")
        after = broker.wait_for_workers(2)
        self.assertEqual(len(after - pids), 1)  # one replacement
        self.assertNotIn(owner, after)
        self.assertIn(f"(pid {owner}) exited: exit code 0", broker.log())

    def test_workers_re_register_with_a_restarted_broker(self) -> None:
        first = self.start_broker(2)
        pids = first.wait_for_workers(2)
        client = http.client.HTTPConnection("127.0.0.1", first.port,
                                            timeout=10)
        client.request("GET", "/")
        response = client.getresponse()
        response.read()
        owner = int(response.getheader("X-Worker-Pid"))
        first.stop(signal.SIGKILL)  # a broker crash
        # The worker keeps serving its client without the broker.
        client.request("GET", "/")
        response = client.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"hello\n"))
        second = self.start_broker(2, socket_path=first.socket_path)
        second.known_workers |= pids
        # The new broker adopts both workers instead of starting its own.
        wait_for(lambda: second.serving_pids(6) == pids, 20,
                 "the old workers serving through the new broker")
        self.assertEqual(child_pids(second.pid), set())
        self.assertEqual(second.log().count("registered"), 2, second.log())
        client.request("GET", "/")
        response = client.getresponse()
        self.assertEqual(int(response.getheader("X-Worker-Pid")), owner)
        response.read()
        client.close()
        self.assertEqual(second.stop(), 0, second.log())
        wait_for(lambda: all(not pid_alive(pid) for pid in pids), 10,
                 "adopted workers to exit after the drain")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    unittest.main()
