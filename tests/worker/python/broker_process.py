"""The real fdbroker binary with Python example workers, for integration
tests: 127.0.0.1 port 0, a private hand-off socket, readiness by polling its
--ready_file. Only processes the test started are killed, by pid."""

import http.client
import json
import os
import pathlib
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import Callable, Optional

REPO = pathlib.Path(__file__).resolve().parents[3]
PYTHON = "/usr/bin/python3"  # Debian's, which has python3-protobuf
EXAMPLE = REPO / "worker" / "python" / "examples" / "http_worker.py"
WORKER_CMD = f"{PYTHON} {EXAMPLE}"


def bin_dir() -> pathlib.Path:
    configured = os.environ.get("FDBROKER_BIN_DIR")
    if not configured:
        raise RuntimeError("set FDBROKER_BIN_DIR to the build's bin/ "
                           "(ctest does)")
    return pathlib.Path(configured)


def wait_for(condition: Callable[[], object], timeout: float,
             what: str) -> object:
    """Polls `condition` every 20 ms until it is truthy; AssertionError
    naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_key_values(path: str) -> Optional[dict[str, str]]:
    try:
        with open(path) as lines:
            return dict(line.rstrip("\n").split("=", 1) for line in lines)
    except FileNotFoundError:
        return None


def child_pids(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return {int(p) for p in children.read().split()}
    except FileNotFoundError:
        return set()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def get(port: int, path: str = "/", timeout: float = 5.0
        ) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port,
                                            timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


class Broker:
    """A running fdbroker; stop() (or the test's cleanup) ends it."""

    # In the command line of this broker's workers (see is_our_worker).
    worker_marker = EXAMPLE.name.encode()

    def __init__(self, workers: int, socket_path: Optional[str] = None,
                 extra_flags: tuple[str, ...] = (),
                 worker_args: str = "", *, worker_cmd: Optional[str] = None,
                 env: Optional[dict] = None, metrics: bool = False) -> None:
        """worker_cmd: instead of the example (with worker_args); env: added
        to the broker's environment, which its workers inherit; metrics: a
        Prometheus endpoint on a free port (self.metrics)."""
        self.dir = tempfile.mkdtemp(prefix="fdbroker-pyit-")
        self.socket_path = socket_path or os.path.join(self.dir, "h.sock")
        ready = os.path.join(self.dir, "ready")
        self.log_path = os.path.join(self.dir, "broker.log")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [str(bin_dir() / "fdbroker"),
                 # --listen may be repeated: the default only if none given.
                 *([] if any(f.startswith("--listen=") for f in extra_flags)
                   else ["--listen=127.0.0.1:0"]),
                 "--control=127.0.0.1:0",
                 "--metrics=" + ("127.0.0.1:0" if metrics else ""),
                 f"--workers={workers}", f"--socket={self.socket_path}",
                 f"--ready_file={ready}",
                 "--worker_cmd=" + (worker_cmd or
                                    f"{WORKER_CMD} {worker_args}".rstrip()),
                 *extra_flags],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                env={**os.environ, **(env or {})})
        self.pid = self.process.pid
        # Workers seen (to kill them if the test fails half-way, even once
        # they are no longer the broker's children).
        self.known_workers: set[int] = set()
        # Worker processes the test started itself (external workers).
        self.externals: list[subprocess.Popen] = []
        values = wait_for(
            lambda: read_key_values(ready) or self.process.poll() is not None,
            20, "the broker's ready file")
        if self.process.poll() is not None:
            raise AssertionError(f"broker exited: {self.log()}")
        self.port = int(values["listen"].rsplit(":", 1)[1])
        self.control = values["control"]
        self.metrics = values.get("metrics")

    def log(self) -> str:
        with open(self.log_path) as log:
            return log.read()

    def worker_pids(self) -> set[int]:
        pids = child_pids(self.pid)
        self.known_workers |= pids
        return pids

    def serving_pids(self, connections: int) -> set[int]:
        """Worker pids that answer `connections` concurrent keep-alive
        connections (least_conn spreads them over every worker)."""
        clients = [http.client.HTTPConnection("127.0.0.1", self.port,
                                              timeout=5)
                   for _ in range(connections)]
        try:
            for client in clients:
                client.connect()
            pids = set()
            for client in clients:
                client.request("GET", "/")
                response = client.getresponse()
                response.read()
                if response.status == 200:
                    pids.add(int(response.getheader("X-Worker-Pid")))
            return pids
        finally:
            for client in clients:
                client.close()

    def wait_for_workers(self, count: int, timeout: float = 30) -> set[int]:
        """Waits until `count` workers run and each answers; their pids."""
        def ready() -> Optional[set[int]]:
            pids = self.worker_pids()
            if len(pids) != count:
                return None
            try:
                return pids if self.serving_pids(3 * count) == pids else None
            except OSError:
                return None
        return wait_for(ready, timeout, f"{count} serving workers")

    def wait_for_fds(self, baseline: int, timeout: float = 10) -> None:
        wait_for(lambda: open_fds(self.pid) == baseline, timeout,
                 f"broker fd count back to {baseline} "
                 f"(now {open_fds(self.pid)})")

    def rpc(self, method: str, request: Optional[dict] = None) -> str:
        """Calls BrokerService.`method` with `buf curl` (gRPC, server
        reflection); the JSON answer."""
        done = subprocess.run(
            ["buf", "curl", "--protocol", "grpc", "--http2-prior-knowledge",
             "-d", json.dumps(request or {}),
             f"http://{self.control}/fdbroker.v1.BrokerService/{method}"],
            capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"{method}: {done.stderr}")
        return done.stdout

    def metric(self, series: str) -> float:
        """A series' value on the broker's /metrics (needs metrics=True);
        -1 if it is not there."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics",
                                    timeout=5) as response:
            for line in response.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == series:
                    return float(value)
        return -1

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signals the broker and waits for it; its exit code."""
        if self.process.poll() is None:
            self.known_workers |= child_pids(self.pid)
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def is_our_worker(self, pid: int) -> bool:
        """Whether `pid` still runs this broker's worker command (and is
        not a reused pid)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                return self.worker_marker in cmdline.read()
        except FileNotFoundError:
            return False

    def cleanup(self) -> None:
        """Kills whatever the test left running: the broker, the external
        workers it started, and every worker seen."""
        if self.process.poll() is None:
            self.known_workers |= child_pids(self.pid)
            self.process.kill()
            self.process.wait()
        for process in self.externals:
            if process.poll() is None:
                process.kill()
                process.wait()
        for pid in self.known_workers:
            if self.is_our_worker(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
