#!/usr/bin/env python3
"""Example asyncio HTTP/1.1 keep-alive server, behind fdbroker or standalone.

    python3 worker/python/examples/http_worker.py                 # supervised
    python3 worker/python/examples/http_worker.py --socket=PATH   # external
    python3 worker/python/examples/http_worker.py --listen=HOST:PORT

The same handle_client() serves both ways: under the broker through
fdbroker_worker.start_server(), standalone (the benchmark's baseline)
through asyncio.start_server() with SO_REUSEPORT.

HTTP: GET / answers 200 "hello"; GET /sleep?ms=N (0 <= N <= 60000) answers
after N ms; other paths 404, methods other than GET/HEAD 405. Every response
carries X-Worker-Pid and Date. Keep-alive and pipelining (in order);
"Connection: close" and HTTP/1.0 without keep-alive close after the
response; request bodies (Content-Length) are skipped.

Connection migration (on unless --no_release): when the broker asks
(ReleaseRequest, when rebalancing), connections idle between requests are
given back to it, and another worker serves their next request on the same
TCP connection. Only a connection with nothing of its next request read and
nothing left to write is released; pipelined requests already read are
answered first.

Drain (from the broker, or SIGTERM/SIGINT): idle keep-alive connections are
closed, a request in progress is answered ("Connection: close"), then the
worker says Goodbye and exits 0. When the broker's Drain says release_idle
(other workers remain), idle connections are released instead, and busy
ones once their response is sent: no client sees a close. A second signal
exits at once. Standalone, SIGTERM/SIGINT just stop the server. Exit codes:
0 clean, 1 registration failed, 2 bad command line.
"""

import argparse
import asyncio
import email.utils
import os
import pathlib
import signal
import sys
import time
from typing import Optional
from urllib.parse import parse_qs, urlsplit

PID = os.getpid()
MAX_HEAD_BYTES = 16 * 1024
MAX_SLEEP_MS = 60000


class App:
    """Per-process HTTP state shared by every connection."""

    def __init__(self) -> None:
        # Set when the worker drains: responses close their connection
        # (unless it is to be released instead).
        self.draining = False
        # writer -> its fdbroker_worker.BrokeredConnection, or None
        # (standalone, or release disabled).
        self.connection_of = lambda writer: None
        self._date_second = -1
        self._date = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    def response(self, status: str, body: bytes, keep_alive: bool,
                 head_only: bool = False, extra: bytes = b"") -> bytes:
        return b"".join((
            b"HTTP/1.1 ", status.encode(), b"\r\nContent-Type: text/plain"
            b"\r\nContent-Length: ", str(len(body)).encode(),
            b"\r\nX-Worker-Pid: ", str(PID).encode(), b"\r\nDate: ",
            self.date(), b"\r\n", extra,
            b"" if keep_alive else b"Connection: close\r\n", b"\r\n",
            b"" if head_only else body))

    async def handle_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        conn = self.connection_of(writer)
        try:
            while await self._serve_one(reader, writer, conn):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            # The client went away mid-request, or the connection was given
            # back to the broker (fdbroker_worker.ConnectionReleased).
            pass
        finally:
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, conn) -> bool:
        """Serves one request; False when the connection should close."""
        read = reader.readuntil(b"\r\n\r\n")
        try:
            # Between requests: the SDK may release the connection here
            # (then ConnectionReleased), only while nothing of the next
            # request has been read.
            head = await (read if conn is None else
                          conn.between_requests(read))
        except asyncio.IncompleteReadError as eof:
            if eof.partial:
                writer.write(self.response("400 Bad Request", b"truncated\n",
                                           False))
            return False
        except asyncio.LimitOverrunError:
            writer.write(self.response("431 Request Header Fields Too Large",
                                       b"header too large\n", False))
            return False
        if len(head) > MAX_HEAD_BYTES:
            writer.write(self.response("431 Request Header Fields Too Large",
                                       b"header too large\n", False))
            return False
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            writer.write(self.response("400 Bad Request", b"bad request\n",
                                       False))
            return False
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                writer.write(self.response("400 Bad Request",
                                           b"bad header\n", False))
                return False
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        keep_alive = (connection != b"close" if version == b"HTTP/1.1"
                      else connection == b"keep-alive")
        if b"transfer-encoding" in headers:
            writer.write(self.response("501 Not Implemented",
                                       b"no chunked bodies\n", False))
            return False
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            writer.write(self.response("400 Bad Request",
                                       b"bad content-length\n", False))
            return False
        if int(length):
            await reader.readexactly(int(length))
        status, body, extra = await self._route(method, target)
        # A draining worker closes the connection after the response,
        # unless it moves it to another worker (release_idle).
        keep_alive = keep_alive and not (
            self.draining and not (conn is not None and
                                   conn.release_requested))
        writer.write(self.response(status, body, keep_alive,
                                   head_only=method == b"HEAD", extra=extra))
        await writer.drain()
        return keep_alive

    async def _route(self, method: bytes,
                     target: bytes) -> tuple[str, bytes, bytes]:
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET or HEAD\n", (
                b"Allow: GET, HEAD\r\n")
        url = urlsplit(target.decode("latin-1"))
        if url.path == "/":
            return "200 OK", b"hello\n", b""
        if url.path == "/sleep":
            values = parse_qs(url.query).get("ms", [""])
            if not values[0].isdigit() or int(values[0]) > MAX_SLEEP_MS:
                return "400 Bad Request", b"ms must be 0..60000\n", b""
            await asyncio.sleep(int(values[0]) / 1000)
            return "200 OK", b"slept\n", b""
        return "404 Not Found", b"not found\n", b""


def write_ready_file(path: Optional[str], lines: dict[str, object]) -> None:
    """Atomically writes key=value lines (for tests and scripts)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        out.writelines(f"{key}={value}\n" for key, value in lines.items())
    os.replace(tmp, path)


async def serve_standalone(app: App, listen: str,
                           ready_file: Optional[str]) -> int:
    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(app.handle_client, host.strip("[]"),
                                        int(port), reuse_port=True,
                                        backlog=1024)
    bound = server.sockets[0].getsockname()
    write_ready_file(ready_file, {"pid": PID, "mode": "standalone",
                                  "listen": f"{bound[0]}:{bound[1]}"})
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    return 0


async def serve_brokered(app: App, args: argparse.Namespace) -> int:
    # Imported here so that standalone mode needs no protobuf.
    try:
        import fdbroker_worker
    except ImportError as error:  # fdbroker_worker.SetupError among them
        print(f"http_worker.py: {error}", file=sys.stderr)
        return 1

    def on_drain(cause: "fdbroker_worker.DrainCause",
                 deadline: Optional[float]) -> None:
        app.draining = True

    if not args.no_release:
        app.connection_of = fdbroker_worker.connection
    try:
        server = await fdbroker_worker.start_server(
            app.handle_client, socket_path=args.socket,
            capacity=args.capacity, labels={"program": "http_worker.py",
                                            "lang": "python"},
            reconnect_timeout=args.reconnect_timeout, on_drain=on_drain,
            release=not args.no_release)
    except fdbroker_worker.RegistrationError as error:
        print(f"http_worker.py: {error}", file=sys.stderr)
        return 1
    write_ready_file(args.ready_file, {
        "pid": PID, "mode": "broker", "worker_id": server.worker_id,
        "socket": args.socket or os.environ.get(
            fdbroker_worker.SOCKET_ENV_VAR, "")})
    signals = 0
    serving = asyncio.ensure_future(server.serve_forever())

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            server.close()  # drain
        else:
            serving.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, on_signal)
    try:
        await serving
    except asyncio.CancelledError:
        return 1
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Example HTTP/1.1 worker for fdbroker (asyncio).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--listen", metavar="HOST:PORT",
                      help="standalone: own SO_REUSEPORT listener, no broker")
    mode.add_argument("--socket", metavar="PATH",
                      help="the broker's socket (default $FDBROKER_SOCKET)")
    parser.add_argument("--capacity", type=int, default=0,
                        help="most connections at once (0: no limit)")
    parser.add_argument("--reconnect_timeout", type=float, default=30.0,
                        metavar="SECONDS",
                        help="after losing the broker, try this long to "
                        "re-register (0: drain at once)")
    parser.add_argument("--no_release", action="store_true",
                        help="never give idle connections back to the "
                        "broker (no migration; drain closes them)")
    parser.add_argument("--ready_file", metavar="PATH",
                        help="once serving, write pid, mode and address here")
    args = parser.parse_args(argv)
    if args.listen is not None and ":" not in args.listen:
        parser.error("--listen must be HOST:PORT")
    if args.capacity < 0:
        parser.error("--capacity must be >= 0")
    return args


def main() -> int:
    args = parse_args(sys.argv[1:])
    # The SDK sits next to this directory; importable from any cwd.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    app = App()
    if args.listen is not None:
        return asyncio.run(serve_standalone(app, args.listen,
                                            args.ready_file))
    return asyncio.run(serve_brokered(app, args))


if __name__ == "__main__":
    sys.exit(main())
