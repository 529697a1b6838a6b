"""The broker's hung-worker watchdog (--worker_timeout) with Python workers
under the real fdbroker: an asyncio app that blocks its event loop, and a
BlockingWorker whose consumer loop hangs while the SDK's background thread
keeps heartbeating. Each must be dumped (faulthandler's traceback on
stderr), killed and replaced, its loss counted."""

import json
import pathlib
import shutil
import socket
import time
import unittest

from broker_process import PYTHON, Broker, get, wait_for

APPS = pathlib.Path(__file__).resolve().parent / "apps"
FLAGS = ("--heartbeat_interval=100ms", "--heartbeat_timeout=30s",
         "--worker_timeout=1s")


class _Broker(Broker):
    def __init__(self, test: unittest.TestCase, worker_cmd: str,
                 marker: bytes) -> None:
        self.worker_marker = marker
        super().__init__(1, extra_flags=FLAGS, worker_cmd=worker_cmd,
                         metrics=True)
        test.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        test.addCleanup(self.cleanup)


class WatchdogTest(unittest.TestCase):
    def check_hung_worker_is_replaced(self, broker: _Broker) -> None:
        (hung,) = broker.wait_for_workers(1)
        if shutil.which("buf"):
            (worker,) = json.loads(broker.rpc("ListWorkers"))["workers"]
            self.assertTrue(worker.get("reportsLiveness"), worker)
            self.assertIn("appSilent", worker)
        blocker = socket.create_connection(("127.0.0.1", broker.port))
        self.addCleanup(blocker.close)
        blocker.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        blocked_at = time.monotonic()

        def replacement() -> int:
            try:
                status, headers, _ = get(broker.port, "/", timeout=0.5)
            except OSError:
                return 0
            pid = int(headers.get("X-Worker-Pid", headers.get(
                "x-worker-pid", "0")))
            return pid if status == 200 and pid != hung else 0

        new = wait_for(replacement, 20, "a replacement serving")
        took = time.monotonic() - blocked_at
        print(f"\nhung worker {hung} replaced by {new}, serving after "
              f"{took:.2f} s")
        # worker_timeout 1 s + grace 1 s + start-up on a busy machine.
        self.assertLess(took, 15)
        log = wait_for(lambda: (lambda text: text if "in hang_forever" in
                                text else None)(broker.log()),
                       10, "the stack dump in the log")
        self.assertIn("Fatal Python error: Aborted", log)
        self.assertIn("most recent call first", log)
        self.assertIn(f"worker 1 (pid {hung}) hung: application thread "
                      "silent", log)
        wait_for(lambda: broker.metric(
            'fdbroker_workers_declared_dead_total{reason="worker_timeout"}')
            == 1, 10, "declared_dead{worker_timeout} == 1")
        wait_for(lambda: broker.metric(
            'fdbroker_connections_lost_total{reason="worker_timeout"}')
            >= 1, 10, "connections_lost{worker_timeout} >= 1")
        # The client of the hung request was cut, not left hanging.
        blocker.settimeout(10)
        try:
            self.assertEqual(blocker.recv(100), b"")
        except ConnectionResetError:
            pass

    def test_asyncio_app_blocking_its_loop_is_dumped_and_replaced(self):
        broker = _Broker(self, f"{PYTHON} -m fdbroker_worker.run "
                         f"--app-dir={APPS} --interface=asgi hang_asgi:app",
                         b"fdbroker_worker.run")
        self.check_hung_worker_is_replaced(broker)

    def test_blocking_consumer_loop_hang_is_dumped_and_replaced(self):
        # Before the watchdog, the background thread's heartbeats kept this
        # worker (and its clients) forever.
        broker = _Broker(self, f"{PYTHON} {APPS / 'blocking_hang_worker.py'}",
                         b"blocking_hang_worker")
        self.check_hung_worker_is_replaced(broker)


if __name__ == "__main__":
    unittest.main()
