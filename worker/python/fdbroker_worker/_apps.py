"""How the runner (run.py) serves each kind of application: what the
protocol factory is, when a connection is idle, how it finishes on drain,
and what runs before registration and after the drain.

ASGI (and WSGI, through uvicorn's WSGIMiddleware on a bounded thread pool)
is served by uvicorn's own HTTP protocol classes (h11 or httptools, with its
WebSocket protocols for upgrades); aiohttp by aiohttp's own RequestHandler.
No HTTP is parsed here.
"""

import asyncio
import email.utils
import inspect
import logging
import sys
import traceback
from typing import Any, Callable, Optional

log = logging.getLogger("fdbroker_worker.run")


class StartupError(Exception):
    """The application could not start (lifespan startup, aiohttp's
    on_startup); the message is one line naming the cause."""


def _one_line(text: str) -> str:
    """The last non-empty line of a traceback or message."""
    lines = [line.strip() for line in text.strip().splitlines()
             if line.strip()]
    return lines[-1] if lines else "no reason given"


class Application:
    """One kind of application, served by one worker process."""

    # server.idle_point(protocol), set by the runner once it has a server:
    # called when a connection is between requests (the server releases it
    # then if it drains with release_idle).
    idle_point: Callable[[asyncio.BaseProtocol], None] = staticmethod(
        lambda protocol: None)
    # Whether the server drains by releasing (only then do idle points
    # matter): lets a protocol skip scheduling one per request.
    releasing: Callable[[], bool] = staticmethod(lambda: False)

    async def startup(self) -> None:
        """Runs before the worker registers (no connection comes earlier)."""

    def drain_started(self) -> None:
        """The worker has begun to drain (any cause)."""

    async def shutdown(self) -> None:
        """Runs after the worker has drained."""

    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        raise NotImplementedError

    def is_idle(self, protocol: asyncio.BaseProtocol) -> bool:
        """Between two requests with nothing of the next one read."""
        raise NotImplementedError

    def close_gracefully(self, protocol: asyncio.BaseProtocol) -> None:
        """Drain: close if idle, else after the response in progress."""
        raise NotImplementedError


# --- ASGI and WSGI: uvicorn's protocols ----------------------------------


class _Lifespan:
    """The ASGI lifespan protocol (startup before serving, shutdown after),
    reporting a failure as one line."""

    def __init__(self, app: Any, mode: str, state: dict) -> None:
        self._app = app
        self._mode = mode  # "auto", "on" or "off"
        self._state = state
        self._received: asyncio.Queue = asyncio.Queue()
        self._answers: asyncio.Queue = asyncio.Queue()
        self._task: Optional[asyncio.Task] = None
        self._supported = mode != "off"

    async def _run(self) -> None:
        scope = {"type": "lifespan",
                 "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self._state}
        try:
            await self._app(scope, self._received.get, self._answers.put)
        except BaseException as error:  # noqa: B902 (the app's own)
            await self._answers.put({"type": "_error", "error": error})
        else:
            await self._answers.put({"type": "_returned"})

    async def _exchange(self, event: str) -> None:
        await self._received.put({"type": f"lifespan.{event}"})
        answer = await self._answers.get()
        kind = answer["type"]
        if kind == f"lifespan.{event}.complete":
            return
        if kind == f"lifespan.{event}.failed":
            raise StartupError(f"lifespan {event} failed: " +
                               _one_line(answer.get("message", "")))
        if kind == "_error" and self._mode == "on":
            error = answer["error"]
            raise StartupError(f"lifespan {event} raised " + _one_line(
                "".join(traceback.format_exception_only(type(error),
                                                        error))))
        # The app does not speak lifespan (auto): serve without it.
        if event == "startup":
            log.info("ASGI 'lifespan' protocol appears unsupported")
        self._supported = False

    async def startup(self) -> None:
        if not self._supported:
            return
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._exchange("startup")

    async def shutdown(self) -> None:
        if not self._supported:
            return
        try:
            await self._exchange("shutdown")
        except StartupError as error:
            log.error("%s", error)


class UvicornApplication(Application):
    """An ASGI app (or a WSGI app on a thread pool) on uvicorn's protocols."""

    def __init__(self, app: Any, *, wsgi: bool, threads: int, http: str,
                 ws: str, lifespan: str, root_path: str, access_log: bool,
                 log_level: str, timeout_keep_alive: int) -> None:
        import uvicorn
        import uvicorn.server
        if wsgi:
            from uvicorn.middleware.wsgi import WSGIMiddleware
            app = WSGIMiddleware(app, workers=threads)
            lifespan = "off"
        # log_config=None: uvicorn's loggers (uvicorn.error, .access) go
        # through the runner's handler, in its format; uvicorn's own
        # handlers would print each line a second time.
        self.config = uvicorn.Config(
            app, interface="asgi3" if wsgi else "auto", http=http, ws=ws,
            lifespan="off", root_path=root_path, access_log=access_log,
            log_level=log_level, log_config=None,
            timeout_keep_alive=timeout_keep_alive)
        self.config.load()
        self.state = uvicorn.server.ServerState()
        self._lifespan = _Lifespan(self.config.loaded_app, lifespan, {})
        self._clock: Optional[asyncio.Task] = None
        self._protocol_class = self._with_idle_points(
            self.config.http_protocol_class)

    def _with_idle_points(self, base: type) -> type:
        """uvicorn's protocol class, telling the server when a response is
        complete (an idle point) and counting requests begun (httptools
        reports the first byte of a request through on_message_begin)."""
        application = self

        class Brokered(base):  # type: ignore[misc, valid-type]
            _begun = 0
            _done = 0

            def on_message_begin(self) -> None:
                self._begun += 1
                super().on_message_begin()

            def on_response_complete(self) -> None:
                self._done += 1
                super().on_response_complete()
                application.idle_point(self)

        if not hasattr(base, "on_message_begin"):
            del Brokered.on_message_begin  # h11: state is in self.conn
        return Brokered

    def _refresh_default_headers(self) -> None:
        # What uvicorn's Server.on_tick does: a Date header, once a second.
        date = email.utils.formatdate(usegmt=True).encode()
        self.state.default_headers = (
            ([(b"date", date)] if self.config.date_header else []) +
            self.config.encoded_headers)

    async def _tick(self) -> None:
        while True:
            self._refresh_default_headers()
            await asyncio.sleep(1.0)

    async def startup(self) -> None:
        self._refresh_default_headers()
        self._clock = asyncio.get_running_loop().create_task(self._tick())
        try:
            await self._lifespan.startup()
        except BaseException:
            await self._stop_clock()
            raise

    async def shutdown(self) -> None:
        # Background tasks the app started from requests, as uvicorn does.
        if self.state.tasks:
            await asyncio.wait(list(self.state.tasks), timeout=30)
        await self._lifespan.shutdown()
        await self._stop_clock()

    async def _stop_clock(self) -> None:
        clock, self._clock = self._clock, None
        if clock is not None:
            clock.cancel()
            await asyncio.wait([clock])  # (no "Task was destroyed" at exit)

    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        cls, config, state = self._protocol_class, self.config, self.state
        return lambda: cls(config=config, server_state=state)

    def is_idle(self, protocol: Any) -> bool:
        cycle = protocol.cycle
        if cycle is not None and not cycle.response_complete:
            return False
        conn = getattr(protocol, "conn", None)
        if conn is not None:  # h11
            import h11
            return (conn.their_state is h11.IDLE and
                    conn.our_state is h11.IDLE and
                    not conn.trailing_data[0])
        return protocol._begun == protocol._done and not protocol.pipeline

    def close_gracefully(self, protocol: Any) -> None:
        websockets_impl = sys.modules.get(
            "uvicorn.protocols.websockets.websockets_impl")
        if (websockets_impl is not None and
                isinstance(protocol, websockets_impl.WebSocketProtocol) and
                protocol.handshake_completed_event.is_set()):
            # An open WebSocket (--ws=websockets): close it with 1012
            # (service restart), as uvicorn's wsproto protocol and newer
            # uvicorns do; uvicorn 0.17's shutdown() only drops the TCP
            # connection, which the client sees as 1006 (abnormal closure).
            protocol.ws_server.closing = True
            protocol.fail_connection(1012)
            protocol.transport.close()
            return
        protocol.shutdown()  # uvicorn's HTTP and WebSocket protocols


# --- aiohttp: its own server --------------------------------------------


class AiohttpApplication(Application):
    """An aiohttp web.Application on aiohttp's own RequestHandler."""

    def __init__(self, app: Any, *, access_log: bool,
                 timeout_keep_alive: int) -> None:
        from aiohttp import web
        self._runner = web.AppRunner(
            app, handle_signals=False,
            access_log=logging.getLogger("aiohttp.access")
            if access_log else None,
            keepalive_timeout=timeout_keep_alive)
        self._on_shutdown: Optional[asyncio.Task] = None

    async def startup(self) -> None:
        try:
            await self._runner.setup()  # on_startup
        except Exception as error:
            raise StartupError("on_startup raised " + _one_line(
                "".join(traceback.format_exception_only(type(error),
                                                        error)))) from None

    def drain_started(self) -> None:
        # As aiohttp's own server does when it stops listening: on_shutdown
        # (where apps close their WebSockets) runs before the connections
        # are waited for, not after.
        self._on_shutdown = asyncio.get_running_loop().create_task(
            self._runner.shutdown())

    async def shutdown(self) -> None:
        if self._on_shutdown is None:  # (no drain: registration failed)
            self.drain_started()
        try:
            await self._on_shutdown
        except Exception:  # the app's own
            log.exception("on_shutdown raised")
        await self._runner.cleanup()  # on_cleanup

    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        from aiohttp.streams import EmptyStreamReader
        from aiohttp.web_protocol import RequestHandler
        server = self._runner.server
        application = self

        class Brokered(RequestHandler):
            """Knows whether bytes of a request are held by the parser
            (partial), which aiohttp's C parser does not tell, and when
            start() waits for the next request (an idle point)."""
            __slots__ = ("_partial", "_last_payload", "_next_request",
                         "_stream_end")

            # start() sets _waiter (then awaits it) when it has answered
            # every request read. (finish_response() is too early: it runs
            # in the request's own task, before start() goes on.)
            @property  # type: ignore[override]
            def _waiter(self) -> Optional[asyncio.Future]:
                return self._next_request

            @_waiter.setter
            def _waiter(self, waiter: Optional[asyncio.Future]) -> None:
                self._next_request = waiter
                if waiter is not None and application.releasing():
                    # Once start() awaits it (later in this step).
                    self._loop.call_soon(application.idle_point, self)

            def data_received(self, data: bytes) -> None:
                last = getattr(self, "_last_payload", None)
                body_done_before = last is None or last.is_eof()
                # The last bytes received (a head may come in pieces).
                end = self._stream_end = (
                    getattr(self, "_stream_end", b"") + data)[-4:]
                before = self._request_count
                super().data_received(data)
                if self._request_count != before:
                    # A new head, given to the handler with its payload,
                    # which the parser ends (eof) with the last body byte.
                    _, payload = self._messages[-1]
                    self._last_payload = payload
                    if not payload.is_eof():
                        self._partial = True  # its body is on the way
                    elif isinstance(payload, EmptyStreamReader):
                        # No body: what came ends with the head, unless it
                        # brought part of the next request too.
                        self._partial = not end.endswith(
                            (b"\r\n\r\n", b"\n\n"))
                    else:
                        # The body ended in this chunk. (Bytes after it, a
                        # pipelined request cut short, cannot be seen.)
                        self._partial = False
                elif not body_done_before:
                    # More of the last request's body.
                    self._partial = not last.is_eof()
                else:
                    self._partial = True  # the start of a new head

        return lambda: Brokered(server, loop=server._loop, **server._kwargs)

    def is_idle(self, protocol: Any) -> bool:
        waiter = protocol._waiter
        return (waiter is not None and not waiter.done() and
                not protocol._messages and protocol._payload_parser is None
                and not protocol._upgrade and not protocol._message_tail and
                not getattr(protocol, "_partial", False))

    def close_gracefully(self, protocol: Any) -> None:
        close = getattr(protocol, "close", None)
        if close is not None:
            close()  # aiohttp: after the request in progress


# --- Detection -----------------------------------------------------------


def detect_interface(app: Any) -> str:
    """asgi, wsgi or aiohttp, from the object itself."""
    # An aiohttp Application's module is loaded already; importing aiohttp
    # for other apps would cost every worker start ~0.2 s (aiohttp.web
    # pulls in gunicorn and pkg_resources when they are installed).
    web = sys.modules.get("aiohttp.web")
    if web is not None and isinstance(app, web.Application):
        return "aiohttp"
    if inspect.isclass(app):
        return "asgi"
    call = app if inspect.isfunction(app) else getattr(app, "__call__", None)
    if call is None:
        raise TypeError(f"{type(app).__name__} object is not callable")
    if inspect.iscoroutinefunction(call):
        return "asgi"
    try:
        positional = [
            parameter for parameter in
            inspect.signature(call).parameters.values()
            if parameter.kind in (parameter.POSITIONAL_ONLY,
                                  parameter.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return "asgi"
    # WSGI: app(environ, start_response); ASGI 2: app(scope) -> coroutine
    # function; ASGI 3 wrappers (middleware objects) are async already.
    return "wsgi" if len(positional) == 2 else "asgi"
