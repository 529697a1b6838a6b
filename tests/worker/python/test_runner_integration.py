"""The runner (python3 -m fdbroker_worker.run MODULE:ATTR) under the real
fdbroker, with real frameworks: the example apps (FastAPI, Flask, aiohttp)
and the fixtures in apps/ (a single-file Django app, a FastAPI app that
records its lifespan, broken apps).

Each test starts its own broker on 127.0.0.1 port 0 with a private hand-off
socket, waits by polling (every wait is bounded), and kills only the
processes it started, by pid."""

import asyncio
import calendar
import concurrent.futures
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request
from typing import Any, Callable, Optional

from broker_process import PYTHON, REPO, Broker, wait_for

EXAMPLES = REPO / "worker" / "python" / "examples"
APPS = pathlib.Path(__file__).resolve().parent / "apps"
RUNNER = f"{PYTHON} -m fdbroker_worker.run"
RUNNER_MODULE = b"fdbroker_worker.run"
HAS_BUF = shutil.which("buf") is not None


def runner_cmd(app: str, app_dir: pathlib.Path, *args: str) -> str:
    return " ".join([RUNNER, f"--app-dir={app_dir}", *args, app])


def uvloop_loaded(pid: int) -> bool:
    """Whether uvloop's extension is mapped into the process."""
    with open(f"/proc/{pid}/maps") as maps:
        return "uvloop/loop." in maps.read()


def get_json(port: int, path: str = "/", timeout: float = 10.0
             ) -> tuple[int, Any]:
    """One request on a fresh connection: (status, JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port,
                                            timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        connection.close()


def get_json_proxied(port: int, client: tuple[str, int], path: str = "/",
                     timeout: float = 10.0) -> Optional[tuple[int, Any]]:
    """One request on a fresh connection that starts with a PROXY v1 header
    naming `client`, as a balancer in front of a ,proxy_protocol listener
    sends it: (status, JSON body); None if the connection failed."""
    request = (f"PROXY TCP4 {client[0]} 127.0.0.1 {client[1]} 80\r\n"
               f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
               "\r\n").encode()
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port),
                                      timeout=timeout) as sock:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return None
    return int(head.split()[1]), json.loads(body) if body else None


class KeepAlive:
    """A persistent HTTP/1.1 client connection that never reconnects: each
    get() goes over the same TCP connection (or fails)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", port,
                                               timeout=timeout)
        self.http.connect()
        self.http.auto_open = 0  # a closed connection is an error
        self.sock = self.http.sock
        self.local = self.sock.getsockname()
        self.pid: Optional[int] = None

    def get(self, path: str = "/") -> tuple[int, Any]:
        """(status, JSON body); the connection stays open (asserted)."""
        self.http.request("GET", path)
        response = self.http.getresponse()
        body = json.loads(response.read())
        if response.will_close or self.http.sock is not self.sock:
            raise AssertionError(f"{path}: the server closes the connection")
        self.pid = body.get("pid")
        return response.status, body

    def closed_by_server(self, timeout: float) -> bool:
        """Whether the server closes the (idle) connection within
        `timeout` seconds: EOF or a reset."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.http.close()


class WebSocketClient:
    """The websockets library's client on a private event loop, driven one
    call at a time from the test's thread."""

    def __init__(self, url: str) -> None:
        import websockets

        async def connect() -> Any:  # (the client binds the running loop)
            return await websockets.connect(url, ping_interval=None,
                                            close_timeout=2)
        self.loop = asyncio.new_event_loop()
        self.ws = self._run(connect())

    def _run(self, awaitable: Any, timeout: float = 10.0) -> Any:
        return self.loop.run_until_complete(
            asyncio.wait_for(awaitable, timeout))

    def echo(self, text: str) -> str:
        self._run(self.ws.send(text))
        return self._run(self.ws.recv())

    def wait_closed(self, timeout: float) -> Optional[int]:
        """Waits for the server's close; the close code."""
        self._run(self.ws.wait_closed(), timeout)
        return self.ws.close_code

    def close(self) -> None:
        if not self.loop.is_closed():
            try:
                self._run(self.ws.close(), 5)
            except Exception:  # already gone
                pass
            self.loop.close()


class EventWatch:
    """BrokerService/WatchEvents streamed by `buf curl` in the background;
    events() is what arrived so far."""

    def __init__(self, control: str) -> None:
        if not HAS_BUF:
            raise unittest.SkipTest("needs buf")
        self.process = subprocess.Popen(
            ["buf", "curl", "--protocol", "grpc", "--http2-prior-knowledge",
             "-d", "{}",
             f"http://{control}/fdbroker.v1.BrokerService/WatchEvents"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            # buf is a node wrapper around the real binary: stop() ends
            # both, by process group.
            start_new_session=True)
        self._events: list[dict] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        lines: list[str] = []
        for line in self.process.stdout:
            lines.append(line)
            if line.rstrip() == "}":  # one whole JSON object
                event = json.loads("".join(lines))
                lines = []
                with self._lock:
                    self._events.append(event)

    def events(self, kind: Optional[str] = None) -> list[dict]:
        with self._lock:
            return [event for event in self._events
                    if kind is None or event.get("type") == kind]

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._reader.join(10)
        self.process.stdout.close()


class RunnerBroker(Broker):
    """fdbroker whose workers are the runner with `worker_cmd`; `env` is
    added to the broker's environment, which its workers inherit."""

    worker_marker = RUNNER_MODULE

    def __init__(self, test: unittest.TestCase, workers: int,
                 worker_cmd: str, *flags: str, env: Optional[dict] = None,
                 metrics: bool = False,
                 socket_path: Optional[str] = None) -> None:
        super().__init__(workers, socket_path, extra_flags=flags,
                         worker_cmd=worker_cmd, env=env, metrics=metrics)
        test.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        test.addCleanup(self.cleanup)

    def serving_pids(self, connections: int) -> tuple[set[int], list[Any]]:
        """Pids answering `connections` concurrent connections (least_conn
        spreads them over every worker), and the bodies."""
        clients = [http.client.HTTPConnection("127.0.0.1", self.port,
                                              timeout=10)
                   for _ in range(connections)]
        try:
            for client in clients:
                client.connect()
            bodies = []
            for client in clients:
                client.request("GET", "/")
                response = client.getresponse()
                body = response.read()
                if response.status != 200:
                    raise AssertionError(f"{response.status}: {body!r}")
                bodies.append(json.loads(body))
            return {body["pid"] for body in bodies}, bodies
        finally:
            for client in clients:
                client.close()

    def wait_for_workers(self, count: int, timeout: float = 30
                         ) -> tuple[set[int], list[Any]]:
        """Waits until `count` workers run and each answers."""
        def ready() -> Optional[tuple[set[int], list[Any]]]:
            pids = self.worker_pids()
            if len(pids) != count:
                return None
            try:
                answered, bodies = self.serving_pids(2 * count)
            except OSError:
                return None
            return (pids, bodies) if answered == pids else None
        return wait_for(ready, timeout,
                        f"{count} serving workers\n{self.log()}")

    def rpc(self, method: str, request: Optional[dict] = None,
            service: str = "fdbroker.v1.BrokerService") -> dict:
        """Calls `method` with `buf curl` (gRPC, server reflection); the
        JSON answer. Without buf the test is skipped."""
        if not HAS_BUF:
            raise unittest.SkipTest("needs buf (deploy/setup.sh "
                                    "--test-tools installs it)")
        done = subprocess.run(
            ["buf", "curl", "--protocol", "grpc", "--http2-prior-knowledge",
             "-d", json.dumps(request or {}),
             f"http://{self.control}/{service}/{method}"],
            capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"{method}: {done.stderr}")
        return json.loads(done.stdout or "{}")

    def workers(self) -> list[dict]:
        return self.rpc("ListWorkers").get("workers", [])

    def loads(self) -> dict[int, int]:
        """pid -> active connections, of the ready workers."""
        return {w["pid"]: int(w.get("activeConnections", 0))
                for w in self.workers()
                if w.get("state") == "WORKER_STATE_READY"}

    def start_external(self, app: str, app_dir: pathlib.Path, *args: str,
                       env: Optional[dict] = None
                       ) -> tuple[subprocess.Popen, str]:
        """A runner started by the test (not the broker), registered; the
        process and the path of its stderr."""
        stderr_path = os.path.join(self.dir,
                                   f"external-{len(self.externals)}.err")
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen(
                [PYTHON, "-m", "fdbroker_worker.run",
                 f"--socket={self.socket_path}", f"--app-dir={app_dir}",
                 *args, app],
                stdout=subprocess.DEVNULL, stderr=stderr, cwd=self.dir,
                env={**os.environ, **(env or {})})
        self.externals.append(process)
        wait_for(lambda: "serving " in read_text(stderr_path) or
                 process.poll() is not None, 20,
                 "the external runner's registration")
        if process.poll() is not None:
            raise AssertionError(f"runner exited {process.returncode}: "
                                 f"{read_text(stderr_path)}")
        return process, stderr_path


def read_text(path: str) -> str:
    try:
        with open(path) as text:
            return text.read()
    except FileNotFoundError:
        return ""


def worker_exit_codes(log: str) -> dict[int, str]:
    """pid -> how the broker saw each worker end ("exit code 0", ...)."""
    return {int(pid): how for pid, how in re.findall(
        r"\(pid (\d+)\) (?:exited|crashed): (.+)", log)}


class RunnerFrameworkTest(unittest.TestCase):
    """Every framework under the real broker, 2 workers each, on both event
    loops; WebSockets; the WSGI thread pool; a SIGKILLed worker."""

    def serve(self, app: str, app_dir: pathlib.Path, loop: str,
              *args: str, check: Optional[Callable[[Any], None]] = None
              ) -> tuple[RunnerBroker, set[int]]:
        """A broker with 2 runner workers for `app`; each worker answers
        (`check(body)` on every answer), on the event loop asked for."""
        broker = RunnerBroker(
            self, 2, runner_cmd(app, app_dir, f"--loop={loop}",
                                "--timeout-keep-alive=60", *args))
        pids, bodies = broker.wait_for_workers(2)
        for body in bodies:
            if check is not None:
                check(body)
        for pid in pids:
            self.assertEqual(uvloop_loaded(pid), loop == "uvloop",
                             f"pid {pid} event loop")
        return broker, pids

    def stop(self, broker: RunnerBroker, pids: set[int]) -> None:
        """The broker drains its workers; each exits 0. Their log lines are
        the runner's, once each (not uvicorn's own "INFO:     ..." too)."""
        self.assertEqual(broker.stop(), 0, broker.log())
        codes = worker_exit_codes(broker.log())
        for pid in pids:
            self.assertEqual(codes.get(pid), "exit code 0", broker.log())
        self.assertNotIn("Traceback", broker.log())
        self.assertNotRegex(broker.log(), r"(?m)^[A-Z]+: ")

    def stop_with_open_websocket(self, broker: RunnerBroker,
                                 pids: set[int]) -> None:
        """The broker's drain closes an open WebSocket with 1012 (service
        restart) and each worker exits 0."""
        client = WebSocketClient(f"ws://127.0.0.1:{broker.port}/ws")
        self.addCleanup(client.close)
        self.assertTrue(client.echo("open").endswith("open"))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stopped = pool.submit(self.stop, broker, pids)
            self.assertEqual(client.wait_closed(15), 1012)
            stopped.result(30)

    def drain_worker_closes_websocket(self, broker: RunnerBroker,
                                      codes: tuple[int, ...]) -> None:
        """DrainWorker on the worker holding a WebSocket (which is never
        handed back): it is closed (one of `codes`) at once, and the worker
        exits 0 without waiting for its drain deadline."""
        wait_for(lambda: sum(broker.loads().values()) == 0, 10,
                 "no connection left")
        client = WebSocketClient(f"ws://127.0.0.1:{broker.port}/ws")
        self.addCleanup(client.close)
        self.assertTrue(client.echo("open").endswith("open"))
        holder = next(w for w in broker.workers()
                      if int(w.get("activeConnections", 0)) == 1)
        start = time.monotonic()
        broker.rpc("DrainWorker", {"worker_id": holder["id"]})
        self.assertIn(client.wait_closed(10), codes)
        wait_for(lambda: holder["pid"] not in broker.worker_pids(), 10,
                 "the drained worker's exit")
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(worker_exit_codes(broker.log()).get(holder["pid"]),
                         "exit code 0", broker.log())

    def websocket_echo(self, broker: RunnerBroker, path: str = "/ws"
                       ) -> None:
        client = WebSocketClient(f"ws://127.0.0.1:{broker.port}{path}")
        try:
            for text in ("hello", "fdbroker " * 100):
                self.assertTrue(client.echo(text).endswith(text))
        finally:
            client.close()

    def test_fastapi_asyncio_httptools_websockets(self) -> None:
        broker, pids = self.serve(
            "fastapi_app:app", EXAMPLES, "asyncio", "--http=httptools",
            "--ws=websockets",
            check=lambda body: self.assertEqual(
                (body["started"], body["startups"]), (True, 1)))
        status, body = get_json(broker.port, "/cpu?ms=20")
        self.assertEqual((status, body["ms"]), (200, 20))
        self.assertIn(body["pid"], pids)
        self.websocket_echo(broker)
        self.stop_with_open_websocket(broker, pids)
        self.assertNotIn('"GET /', broker.log())  # no --access-log

    def test_asgi_h11_drain_worker_moves_idle_clients(self) -> None:
        broker, pids = self.serve(
            "asgi_app:app", APPS, "asyncio", "--http=h11",
            check=lambda body: self.assertIs(body["started"], True))
        self.drain_worker_moves_idle_clients(broker)
        self.stop(broker, pids - {self.drained})

    def test_fastapi_uvloop_h11_wsproto(self) -> None:
        broker, pids = self.serve(
            "fastapi_app:app", EXAMPLES, "uvloop", "--http=h11",
            "--ws=wsproto", "--access-log",
            check=lambda body: self.assertEqual(
                (body["started"], body["startups"]), (True, 1)))
        self.websocket_echo(broker)
        self.stop_with_open_websocket(broker, pids)
        # One line per request, in the runner's format.
        self.assertRegex(broker.log(),
                         r"(?m)^\S+ \S+ INFO fdbroker_worker\[\d+\] "
                         r"127\.0\.0\.1:\d+ - \"GET / HTTP/1\.1\" 200$")

    def test_flask_asyncio_bounded_thread_pool(self) -> None:
        broker, pids = self.serve(
            "flask_app:app", EXAMPLES, "asyncio", "--threads=2",
            check=lambda body: self.assertEqual(body["hello"], "world"))
        # 8 concurrent 600 ms requests on 2 workers of 2 threads: about 4
        # per worker, so 2 rounds (the pool is bounded), not 1 (unbounded)
        # nor 4 (one thread).
        sleep_ms, count = 600, 8
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            start = time.monotonic()
            answers = list(pool.map(
                lambda _: get_json(broker.port, f"/sleep?ms={sleep_ms}"),
                range(count)))
            elapsed = time.monotonic() - start
        self.assertEqual({status for status, _ in answers}, {200})
        per_worker = [sum(1 for _, body in answers if body["pid"] == pid)
                      for pid in pids]
        rounds = max((n + 1) // 2 for n in per_worker)
        self.assertGreaterEqual(rounds, 2, per_worker)
        self.assertGreaterEqual(elapsed, rounds * sleep_ms / 1000 * 0.95,
                                f"{per_worker}: {elapsed:.2f} s")
        self.assertLess(elapsed, (rounds + 1) * sleep_ms / 1000,
                        f"{per_worker}: {elapsed:.2f} s")
        self.stop(broker, pids)

    def test_flask_uvloop_drain_worker_moves_idle_clients(self) -> None:
        broker, pids = self.serve(
            "flask_app:app", EXAMPLES, "uvloop",
            check=lambda body: self.assertEqual(body["hello"], "world"))
        self.drain_worker_moves_idle_clients(broker)
        self.stop(broker, pids - {self.drained})

    def drain_worker_moves_idle_clients(self, broker: RunnerBroker) -> None:
        """DrainWorker on a worker holding keep-alive clients (needs POST
        /echo and GET /sleep?ms=N): it exits 0 and each client's next
        request, on its same connection, is answered by the other worker.
        An idle one moves at once, even after a request with a body; one
        with a request in progress after its response (no Connection:
        close); one with half a request sent only once that request is
        whole and answered (by the draining worker)."""
        # (The broker places by its count, exact once the probes' Closed
        # are in: 5 clients each.)
        wait_for(lambda: sum(broker.loads().values()) == 0, 10,
                 "the probe connections' Closed")
        clients = [KeepAlive(broker.port) for _ in range(10)]
        for client in clients:
            self.addCleanup(client.close)
            self.assertEqual(client.get()[0], 200)
        victim = clients[0].pid
        held = [client for client in clients if client.pid == victim]
        self.assertGreaterEqual(len(held), 3)
        poster, busy, half = held[:3]
        body = b'{"no": "newline at the end"}'
        poster.http.request("POST", "/echo", body,
                            {"Content-Type": "application/json"})
        response = poster.http.getresponse()
        self.assertEqual((response.status, response.read()), (200, body))
        busy.http.request("GET", "/sleep?ms=600")
        half.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        worker_id = next(w["id"] for w in broker.workers()
                         if w["pid"] == victim)
        broker.rpc("DrainWorker", {"worker_id": worker_id})
        response = busy.http.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read())["pid"], victim)
        self.assertFalse(response.will_close)
        # The half-read request holds the worker: it is answered there.
        self.assertIn(victim, broker.worker_pids())
        half.sock.sendall(b"\r\n")
        response = http.client.HTTPResponse(half.sock, method="GET")
        response.begin()
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read())["pid"], victim)
        self.assertFalse(response.will_close)
        wait_for(lambda: victim not in broker.worker_pids(), 10,
                 "the drained worker's exit")
        for client in clients:
            before = client.pid
            self.assertEqual(client.get()[0], 200)
            self.assertNotEqual(client.pid, victim)
            if before != victim:
                self.assertEqual(client.pid, before)
        self.assertEqual(worker_exit_codes(broker.log()).get(victim),
                         "exit code 0", broker.log())
        for client in clients:
            client.close()
        self.drained = victim

    def test_aiohttp_asyncio_websocket_sigkill(self) -> None:
        broker, pids = self.serve(
            "aiohttp_app:app", EXAMPLES, "asyncio",
            check=lambda body: self.assertIs(body["started"], True))
        self.websocket_echo(broker)
        # A SIGKILLed worker is replaced; requests keep being answered.
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in broker.worker_pids(), 10,
                 "the killed worker to be reaped")
        new_pids, _ = broker.wait_for_workers(2)
        self.assertNotIn(victim, new_pids)
        self.assertEqual(len(new_pids & pids), 1)
        self.assertRegex(broker.log(), rf"\(pid {victim}\) crashed: killed "
                         r"by signal 9")
        # The example closes its WebSockets in on_shutdown, which runs when
        # a drain starts. (With 1001, GOING_AWAY; aiohttp 3.8 may send
        # 1000 instead, as the handler's end closes it first.)
        self.drain_worker_closes_websocket(broker, (1000, 1001))
        self.stop(broker, self.assert_one_left(broker, new_pids))

    def assert_one_left(self, broker: RunnerBroker, pids: set[int]
                        ) -> set[int]:
        left = broker.worker_pids()
        self.assertEqual(len(left), 1)
        self.assertLessEqual(left, pids)
        return left

    def test_aiohttp_factory_uvloop_drain_worker_moves_idle_clients(
            self) -> None:
        broker, pids = self.serve(
            "aiohttp_app:create_app", EXAMPLES, "uvloop", "--factory",
            check=lambda body: self.assertIs(body["started"], True))
        self.websocket_echo(broker)
        self.drain_worker_moves_idle_clients(broker)
        self.stop(broker, pids - {self.drained})

    def test_django_asyncio_and_uvloop(self) -> None:
        for loop in ("asyncio", "uvloop"):
            with self.subTest(loop=loop):
                broker, pids = self.serve(
                    "django_app:application", APPS, loop, "--capacity=64",
                    check=lambda body: self.assertEqual(body["framework"],
                                                        "django"))
                status, body = get_json(broker.port, "/sleep?ms=10")
                self.assertEqual((status, body["slept_ms"]), (200, 10))
                self.assertEqual(broker.log().count("capacity 64"), 2,
                                 broker.log())
                self.stop(broker, pids)


def read_events(path: str) -> list[tuple[str, int]]:
    """The fixture app's "<event> <pid>" lines."""
    return [(event, int(pid)) for event, pid in
            (line.split() for line in read_text(path).splitlines())]


class RunnerLifecycleTest(unittest.TestCase):
    """Lifespan, migration of idle connections (never a WebSocket), SIGTERM
    drain, on the fixture FastAPI app (apps/asgi_app.py)."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fdbroker-runner-test-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.events = os.path.join(self.dir, "events")

    def test_lifespan_runs_once_per_worker_and_before_registration(
            self) -> None:
        delay = 1.0
        broker = RunnerBroker(
            self, 2, runner_cmd("asgi_app:app", APPS, "--loop=asyncio"),
            env={"RUNNER_TEST_EVENTS": self.events,
                 "RUNNER_TEST_STARTUP_DELAY": str(delay)})
        start = time.monotonic()
        # Requests made while both workers are in their startup wait in the
        # broker: none fails, and each is answered once startup is done.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: get_json(broker.port, "/"),
                                    range(6)))
            first_answer = time.monotonic() - start
        self.assertEqual([status for status, _ in answers], [200] * 6)
        self.assertTrue(all(body["started"] for _, body in answers))
        self.assertEqual({body["loop"].split(".")[0] for _, body in answers},
                         {"asyncio"})  # --loop=asyncio: not uvloop
        self.assertGreater(first_answer, delay * 0.8)
        pids, bodies = broker.wait_for_workers(2)
        self.assertTrue(all(body["started"] for body in bodies))
        self.assertEqual(broker.stop(), 0, broker.log())
        # Exactly one startup and, after the drain, one shutdown per worker.
        events = read_events(self.events)
        for pid in pids:
            self.assertEqual([event for event, p in events if p == pid],
                             ["starting", "startup", "shutdown"], events)
        self.assertEqual(len(events), 6, events)
        codes = worker_exit_codes(broker.log())
        self.assertEqual({codes.get(pid) for pid in pids}, {"exit code 0"},
                         broker.log())

    def test_start_up_objects_are_frozen_out_of_the_collector(
            self) -> None:
        """What the app made at start-up is left out of later collections
        (gc.freeze, about 5 % of a FastAPI worker's throughput in
        docs/benchmarks.md), unless --no-gc-freeze."""
        for flags, frozen in (((), True), (("--no-gc-freeze",), False)):
            broker = RunnerBroker(
                self, 1, runner_cmd("asgi_app:app", APPS, *flags))
            status, body = get_json(broker.port, "/")
            self.assertEqual(status, 200)
            # FastAPI, pydantic and uvicorn alone make tens of thousands.
            self.assertEqual(body["gc_frozen"] > 10000, frozen, body)
            self.assertEqual(broker.stop(), 0, broker.log())

    def test_rebalance_drain_worker_scale_down_move_idle_clients(
            self) -> None:
        """Idle keep-alive clients move on Rebalance, DrainWorker and a
        scale-down, each keeping its TCP connection; a WebSocket never
        moves (closed with 1012 when its own worker is drained)."""
        broker = RunnerBroker(
            self, 2, runner_cmd("asgi_app:app", APPS,
                                "--timeout-keep-alive=60"))
        broker.wait_for_workers(2)
        # (The broker places by its count, which the probes' Closed make
        # exact again.)
        wait_for(lambda: sum(broker.loads().values()) == 0, 10,
                 "the probe connections' Closed")
        websocket = WebSocketClient(f"ws://127.0.0.1:{broker.port}/ws")
        self.addCleanup(websocket.close)
        ws_pid = int(websocket.echo("before").split()[0])
        clients = [KeepAlive(broker.port) for _ in range(15)]
        for client in clients:
            self.addCleanup(client.close)
            self.assertEqual(client.get()[0], 200)
        self.assertEqual(sorted(broker.loads().values()), [8, 8])

        broker.rpc("ScaleWorkers", {"count": 4})
        wait_for(lambda: len(broker.loads()) == 4, 30, "4 ready workers")
        broker.rpc("Rebalance")

        def balanced() -> Optional[dict[int, int]]:
            loads = broker.loads()
            return (loads if len(loads) == 4 and
                    sorted(loads.values()) == [4, 4, 4, 4] else None)

        wait_for(balanced, 10, "16 connections spread 4 by 4")
        before = [client.pid for client in clients]
        for client in clients:
            self.assertEqual(client.get()[0], 200)  # same TCP connection
        moved = sum(1 for b, client in zip(before, clients)
                    if client.pid != b)
        self.assertEqual(moved, 8)  # 4 from each old worker
        # The WebSocket stayed where it was, and works.
        self.assertEqual(websocket.echo("after rebalance"),
                         f"{ws_pid} after rebalance")

        # DrainWorker on a worker without the WebSocket: its idle clients
        # move, the others stay, the WebSocket is untouched.
        victim = next(client.pid for client in clients
                      if client.pid != ws_pid)
        worker_id = next(w["id"] for w in broker.workers()
                         if w["pid"] == victim)
        broker.rpc("DrainWorker", {"worker_id": worker_id})
        wait_for(lambda: victim not in broker.worker_pids(), 10,
                 "the drained worker's exit")
        for client in clients:
            was = client.pid
            self.assertEqual(client.get()[0], 200)
            if was == victim:
                self.assertNotEqual(client.pid, victim)
            else:
                self.assertEqual(client.pid, was)
        self.assertEqual(websocket.echo("after drain"),
                         f"{ws_pid} after drain")
        self.assertEqual(worker_exit_codes(broker.log()).get(victim),
                         "exit code 0", broker.log())
        # DrainWorker on the WebSocket's worker: the idle clients move, the
        # WebSocket (never handed back) is closed with 1012 at once, and
        # the worker exits 0 without waiting for its deadline.
        worker_id = next(w["id"] for w in broker.workers()
                         if w["pid"] == ws_pid)
        start = time.monotonic()
        broker.rpc("DrainWorker", {"worker_id": worker_id})
        self.assertEqual(websocket.wait_closed(10), 1012)
        wait_for(lambda: ws_pid not in broker.worker_pids(), 10,
                 "the drained worker's exit")
        self.assertLess(time.monotonic() - start, 5)
        for client in clients:
            self.assertEqual(client.get()[0], 200)
            self.assertNotIn(client.pid, (victim, ws_pid))
        self.assertEqual(worker_exit_codes(broker.log()).get(ws_pid),
                         "exit code 0", broker.log())
        # Scale-down to one worker: the other's clients move to it.
        remaining = broker.worker_pids()
        self.assertEqual(len(remaining), 2)
        broker.rpc("ScaleWorkers", {"count": 1})
        wait_for(lambda: len(broker.worker_pids()) == 1, 10,
                 "a worker drained by the scale-down to exit")
        (last,) = broker.worker_pids()
        for client in clients:
            status, body = client.get()
            self.assertEqual((status, client.pid), (200, last))
            self.assertTrue(body["loop"].startswith("uvloop"))  # auto
        for client in clients:
            client.close()
        self.assertEqual(broker.stop(), 0, broker.log())
        codes = worker_exit_codes(broker.log())
        self.assertEqual({codes.get(pid) for pid in remaining},
                         {"exit code 0"}, broker.log())
        self.assertNotIn("Traceback", broker.log())

    def wait_sleeping(self, pid: int) -> None:
        wait_for(lambda: ("sleeping", pid) in read_events(self.events), 10,
                 f"a request in /sleep on pid {pid}")

    def test_sigterm_drains_and_a_second_signal_exits_at_once(self) -> None:
        broker = RunnerBroker(self, 0, "/bin/false")
        env = {"RUNNER_TEST_EVENTS": self.events}
        for app, app_dir, args in (
                ("asgi_app:app", APPS, ("--loop=asyncio",)),
                ("django_app:application", APPS, ("--loop=uvloop",))):
            with self.subTest(app=app):
                self.drain_on_sigterm(broker, app, app_dir, args, env)
                self.second_signal_exits_at_once(broker, app, app_dir, args,
                                                 env)

    def test_sigterm_during_startup(self) -> None:
        """A signal while the app starts: the startup completes, the app
        shuts down, the worker never registers, exit 0. A second one exits
        at once (4)."""
        broker = RunnerBroker(self, 0, "/bin/false")
        env = {**os.environ, "RUNNER_TEST_EVENTS": self.events,
               "RUNNER_TEST_STARTUP_DELAY": "1.5"}
        for signals, code in ((1, 0), (2, 4)):
            with self.subTest(signals=signals):
                stderr = os.path.join(self.dir, f"runner-{signals}.err")
                with open(stderr, "w") as err_file:
                    runner = subprocess.Popen(
                        [PYTHON, "-m", "fdbroker_worker.run",
                         f"--socket={broker.socket_path}",
                         f"--app-dir={APPS}", "asgi_app:app"],
                        stdout=subprocess.DEVNULL, stderr=err_file, env=env)
                broker.externals.append(runner)
                wait_for(lambda: ("starting", runner.pid) in
                         read_events(self.events), 10, "the app's startup")
                runner.send_signal(signal.SIGTERM)
                if signals == 2:
                    wait_for(lambda: "SIGTERM: draining" in read_text(stderr),
                             10, "the first signal to be seen")
                    runner.send_signal(signal.SIGTERM)
                runner.wait(10)
                err = read_text(stderr)
                self.assertEqual(runner.returncode, code, err)
                events = [event for event, pid in read_events(self.events)
                          if pid == runner.pid]
                if signals == 1:
                    self.assertEqual(events,
                                     ["starting", "startup", "shutdown"])
                    self.assertIn("stopped before registering", err)
                else:  # (before the startup's 1.5 s were over)
                    self.assertEqual(events, ["starting"])
                self.assertNotIn("Traceback", err)
                self.assertNotIn("Task was destroyed", err)
        self.assertNotIn("registered", broker.log())

    def drain_on_sigterm(self, broker: RunnerBroker, app: str,
                         app_dir: pathlib.Path, args: tuple[str, ...],
                         env: dict) -> None:
        """SIGTERM: the request in flight is answered, the idle keep-alive
        connection closed, then lifespan shutdown and exit 0."""
        runner, stderr = broker.start_external(app, app_dir, *args, env=env)
        idle = KeepAlive(broker.port)
        self.addCleanup(idle.close)
        self.assertEqual(idle.get()[0], 200)
        busy = http.client.HTTPConnection("127.0.0.1", broker.port,
                                          timeout=10)
        self.addCleanup(busy.close)
        busy.request("GET", "/sleep?ms=1000")
        self.wait_sleeping(runner.pid)
        start = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        response = busy.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read())["slept_ms"], 1000)
        # Then both connections are closed by the worker: the busy one
        # after its response (or with it: Connection: close), the idle one
        # at once (once its first request's grace is over).
        if not response.will_close:
            busy.sock.settimeout(10)
            self.assertEqual(busy.sock.recv(4096), b"")
        self.assertTrue(idle.closed_by_server(10))
        self.assertEqual(runner.wait(10), 0, read_text(stderr))
        self.assertLess(time.monotonic() - start, 5)
        self.assertIn("SIGTERM: draining", read_text(stderr))
        self.assertNotIn("Traceback", read_text(stderr))
        if app.startswith("asgi_app"):
            self.assertEqual(
                [event for event, pid in read_events(self.events)
                 if pid == runner.pid],
                ["starting", "startup", "sleeping", "shutdown"])

    def second_signal_exits_at_once(self, broker: RunnerBroker, app: str,
                                    app_dir: pathlib.Path,
                                    args: tuple[str, ...], env: dict
                                    ) -> None:
        """A second SIGTERM during the drain exits at once with 4, even
        with a request in the app (a WSGI one holds a pool thread)."""
        runner, stderr = broker.start_external(app, app_dir, *args, env=env)
        busy = http.client.HTTPConnection("127.0.0.1", broker.port,
                                          timeout=10)
        self.addCleanup(busy.close)
        busy.request("GET", "/sleep?ms=20000")
        self.wait_sleeping(runner.pid)
        runner.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM: draining" in read_text(stderr), 10,
                 "the drain to start")
        start = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        self.assertEqual(runner.wait(10), 4, read_text(stderr))
        self.assertLess(time.monotonic() - start, 2.0, read_text(stderr))
        with self.assertRaises((http.client.HTTPException, OSError)):
            busy.getresponse()
        self.assertNotIn("Traceback", read_text(stderr))
        self.assertNotIn("Task was destroyed", read_text(stderr))


class RunnerClientAddressTest(unittest.TestCase):
    """Behind a ,proxy_protocol listener the socket's peer is the balancer
    (here the test itself, on 127.0.0.1), the broker's peer_address the
    client the header names: the apps see the latter, through ASGI's
    scope["client"], WSGI's REMOTE_ADDR and aiohttp's request.remote, on
    both event loops."""

    CLIENT = ("192.0.2.77", 4321)

    def check(self, app: str, with_port: bool, *args: str) -> None:
        for loop in ("asyncio", "uvloop"):
            with self.subTest(app=app, loop=loop):
                broker = RunnerBroker(
                    self, 1, runner_cmd(app, APPS, f"--loop={loop}", *args),
                    "--listen=127.0.0.1:0,proxy_protocol")
                status, body = wait_for(
                    lambda: get_json_proxied(broker.port, self.CLIENT), 30,
                    f"an answer from {app}\n{broker.log()}")
                self.assertEqual(status, 200)
                expected = list(self.CLIENT) if with_port else [
                    self.CLIENT[0], None]
                self.assertEqual(body["client"], expected)
                self.assertEqual(broker.stop(), 0, broker.log())

    def test_asgi_scope_client(self) -> None:
        self.check("client_address_apps:asgi", True, "--interface=asgi")

    def test_wsgi_remote_addr(self) -> None:
        self.check("client_address_apps:wsgi", False, "--interface=wsgi")

    def test_aiohttp_request_remote(self) -> None:
        self.check("client_address_apps:aiohttp_app", False,
                   "--interface=aiohttp")


class BrokenAppTest(unittest.TestCase):
    """An app that cannot start: exit code and one line on stderr; under
    the broker a restart loop, reported and backed off."""

    CASES = (
        # app, app dir, exit code, the line on stderr
        ("broken_import:app", APPS, 1,
         "fdbroker_worker.run: importing 'broken_import' failed: "
         "RuntimeError: the database at db.invalid is unreachable"),
        ("broken_startup:app", APPS, 3,
         "fdbroker_worker.run: broken_startup:app: lifespan startup failed: "
         "RuntimeError: cannot open the model file /nonexistent/model.bin"),
        ("broken_aiohttp:app", APPS, 3,
         "fdbroker_worker.run: broken_aiohttp:app: on_startup raised "
         "ConnectionRefusedError: cache at 127.0.0.1:1 refused the "
         "connection"),
        ("no_such_module:app", APPS, 1,
         "fdbroker_worker.run: cannot import module 'no_such_module' (from "
         f"{APPS})"),
        ("asgi_app:nothere", APPS, 1,
         "fdbroker_worker.run: attribute 'nothere' not found in module "
         "'asgi_app'"),
    )

    def test_exit_code_and_one_line(self) -> None:
        # Run directly (no broker: each fails before registering).
        with tempfile.TemporaryDirectory() as scratch:
            runs = [subprocess.Popen(
                [PYTHON, "-m", "fdbroker_worker.run",
                 f"--socket={scratch}/none.sock", f"--app-dir={app_dir}",
                 app], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True) for app, app_dir, _, _ in self.CASES]
            for run, (app, _, code, line) in zip(runs, self.CASES):
                with self.subTest(app=app):
                    out, err = run.communicate(timeout=30)
                    self.assertEqual(run.returncode, code, err)
                    self.assertEqual(err.splitlines(), [line])
                    self.assertEqual(out, "")

    def test_help_and_a_bad_command_line(self) -> None:
        runner = [PYTHON, "-m", "fdbroker_worker.run"]
        done = subprocess.run([*runner, "--help"], capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        for option in ("--interface", "--factory", "--app-dir",
                       "--root-path", "--threads", "--loop", "--http", "--ws",
                       "--lifespan", "--log-level", "--access-log",
                       "--capacity", "--socket", "--no-release"):
            self.assertRegex(done.stdout, rf"\n  {option}\b.*\s+\w",
                             option)
        for argv, message in (
                ([], "the following arguments are required: MODULE:ATTR"),
                (["--threads=0", "app:app"], "--threads must be >= 1"),
                (["--loop=tokio", "app:app"], "argument --loop: invalid")):
            with self.subTest(argv=argv):
                done = subprocess.run([*runner, *argv], capture_output=True,
                                      text=True, timeout=30)
                self.assertEqual(done.returncode, 2)
                self.assertEqual(len(done.stderr.splitlines()), 1,
                                 done.stderr)
                self.assertIn(message, done.stderr)

    @unittest.skipUnless(HAS_BUF, "needs buf (deploy/setup.sh --test-tools "
                         "installs it)")
    def test_under_the_broker_a_reported_backed_off_restart_loop(self
                                                               ) -> None:
        # The slow one fails 1.5 s after it starts, later than the broker's
        # 1 s "died right after start": it never registered, so it is a
        # failed start all the same.
        for (app, _, code, line), workers, delay in zip(
                self.CASES[:2] + self.CASES[1:2], (2, 2, 2), (0, 0, 1.5)):
            with self.subTest(app=app, delay=delay):
                self.restart_loop(app, workers, code, line, delay)

    def restart_loop(self, app: str, workers: int, code: int, line: str,
                     delay: float) -> None:
        os.environ["BROKEN_STARTUP_DELAY"] = str(delay)
        self.addCleanup(os.environ.pop, "BROKEN_STARTUP_DELAY", None)
        broker = RunnerBroker(self, 0, runner_cmd(app, APPS), metrics=True)
        watch = EventWatch(broker.control)
        self.addCleanup(watch.stop)
        # The stream is up once it sees an event: Resume makes one.
        wait_for(lambda: broker.rpc("Resume") is not None and
                 watch.events("EVENT_TYPE_RESUME_REQUESTED"), 10,
                 "the WatchEvents stream")
        broker.rpc("ScaleWorkers", {"count": workers})
        loop = wait_for(lambda: watch.events("EVENT_TYPE_RESTART_LOOP"), 20,
                        f"a restart loop\n{broker.log()}")[0]
        self.assertIn("in a row failed to register or died within",
                      loop["detail"])
        wait_for(lambda: broker.rpc("Check", service="grpc.health.v1.Health"
                                    ).get("status") == "NOT_SERVING", 10,
                 "health NOT_SERVING")

        def metric() -> Optional[str]:
            with urllib.request.urlopen(f"http://{broker.metrics}/metrics",
                                        timeout=10) as metrics:
                found = re.search(r"(?m)^fdbroker_worker_restart_loop (\d+)$",
                                  metrics.read().decode())
            return found and found.group(1) == "1"

        wait_for(metric, 10, "fdbroker_worker_restart_loop 1")  # (refreshed
        # periodically)
        # Backed off: once the loop is reported, restarts come at least
        # 400 ms apart (100 ms doubling per failure in a row), not hundreds
        # a second.
        def starts() -> list[float]:
            return sorted(
                parse_time(event["time"]) for event in watch.events()
                if event["type"] in ("EVENT_TYPE_WORKER_STARTED",
                                     "EVENT_TYPE_WORKER_RESTARTED"))

        loop_time = parse_time(loop["time"])
        wait_for(lambda: len([t for t in starts() if t > loop_time]) >= 3,
                 20, "three restarts after the loop")
        after = [t for t in starts() if t > loop_time]
        gaps = [b - a for a, b in zip(after, after[1:])]
        self.assertTrue(all(gap >= 0.35 for gap in gaps), gaps)
        self.assertLess(len(starts()), 12, starts())
        crashes = watch.events("EVENT_TYPE_WORKER_CRASHED")
        self.assertTrue(crashes)
        self.assertEqual({event["exitStatus"] for event in crashes},
                         {f"exit code {code}"})
        # Each worker said why, in one line.
        log = broker.log()
        self.assertGreaterEqual(log.count(line + "\n"), 3, log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Task was destroyed", log)


def parse_time(text: str) -> float:
    """An RFC 3339 time of buf curl's JSON (nanoseconds, Z) as Unix time."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return seconds + float("0." + (fraction or "0"))

if __name__ == "__main__":
    unittest.main()
