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

    # server.idle_point(protocol) is set by the runner once it has a server.
    idle_point: Callable[[asyncio.BaseProtocol], None] = staticmethod(
        lambda protocol: None)

    async def startup(self) -> None:
        """Runs before the worker registers (no connection comes earlier)."""

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
        self.config = uvicorn.Config(
            app, interface="asgi3" if wsgi else "auto", http=http, ws=ws,
            lifespan="off", root_path=root_path, access_log=access_log,
            log_level=log_level, timeout_keep_alive=timeout_keep_alive)
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
        await self._lifespan.startup()

    async def shutdown(self) -> None:
        # Background tasks the app started from requests, as uvicorn does.
        if self.state.tasks:
            await asyncio.wait(list(self.state.tasks), timeout=30)
        await self._lifespan.shutdown()
        if self._clock is not None:
            self._clock.cancel()

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

    async def startup(self) -> None:
        try:
            await self._runner.setup()  # on_startup
        except Exception as error:
            raise StartupError("on_startup raised " + _one_line(
                "".join(traceback.format_exception_only(type(error),
                                                        error)))) from None

    async def shutdown(self) -> None:
        await self._runner.cleanup()  # on_shutdown, on_cleanup

    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        from aiohttp.web_protocol import RequestHandler
        server = self._runner.server
        application = self

        class Brokered(RequestHandler):
            """Knows whether bytes of a request are held by the parser
            (partial), which aiohttp's C parser does not tell."""
            __slots__ = ("_partial",)

            def data_received(self, data: bytes) -> None:
                before = self._request_count
                super().data_received(data)
                # Complete requests end the chunk they came in: a chunk that
                # made no request, or ends mid-line, holds part of one.
                self._partial = (self._request_count == before or
                                 not data.endswith(b"\n"))

            async def finish_response(self, *args: Any) -> Any:
                result = await super().finish_response(*args)
                # Idle once start() waits for the next request: later in
                # this same step of its task.
                self._loop.call_soon(application.idle_point, self)
                return result

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
    try:
        from aiohttp import web
        if isinstance(app, web.Application):
            return "aiohttp"
    except ImportError:
        pass
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
