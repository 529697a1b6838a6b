"""python3 -m fdbroker_worker.run [options] MODULE:ATTR

Serves an existing ASGI (FastAPI, Starlette), WSGI (Flask, Django) or
aiohttp application as one fdbroker worker, unchanged:

    fdbroker --workers=4 --worker_cmd="python3 -m fdbroker_worker.run app:app"

is the counterpart of `gunicorn -w 4 -k uvicorn.workers.UvicornWorker
app:app`. ASGI and WSGI apps run on uvicorn's own HTTP protocols (h11 or
httptools, WebSocket upgrades included), aiohttp apps on aiohttp's server.
Under `fdbroker --placement=kernel` the worker takes the listening socket
the broker grants it and serves it with the loop's own accept loop
(loop.create_server(sock=...)), as uvicorn or aiohttp serve their own: the
kernel places the connections, the broker sees their figures only
(--no-listener-grant: hand-offs only).

Order of events: import the app; startup (ASGI lifespan, aiohttp
on_startup) before the worker registers, so no connection comes before the
app is ready; serve; on SIGTERM/SIGINT or a Drain from the broker, take no
new connections, let requests in progress finish and close (or, when the
broker asks, hand back) idle keep-alive connections, close WebSockets (1012;
aiohttp's on_shutdown, where apps close theirs, runs as the drain starts);
then shutdown (lifespan shutdown, aiohttp's on_cleanup). A second signal
exits at once. A signal during the startup lets it finish, then the
app shuts down and the worker exits without registering.

Exit codes: 0 drained; 1 the app failed to import or load, or the worker
could not register; 2 bad command line; 3 the app's startup failed; 4 a
second signal cut the drain short. A failure is one line on stderr.
"""

import argparse
import asyncio
import gc
import importlib
import logging
import os
import signal
import sys
from typing import Any, NoReturn, Optional

from . import _apps
from .core import SOCKET_ENV_VAR, RegistrationError

EXIT_LOAD_FAILED = 1
EXIT_USAGE = 2
EXIT_STARTUP_FAILED = 3
EXIT_INTERRUPTED = 4

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class LoadError(Exception):
    """The app could not be imported or built; one line."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of options that take a value only: not
    "(default: True)" for --no-release or "(default: )"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default in (None, ""):
            return action.help or ""
        return super()._get_help_string(action)


class _ArgumentParser(argparse.ArgumentParser):
    """A bad command line is one line on stderr (not the whole usage, which
    --help shows), and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE,
                  f"fdbroker_worker.run: {message} (see --help)\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog="python3 -m fdbroker_worker.run",
        description="Serve an ASGI, WSGI or aiohttp app as an fdbroker "
        "worker: fdbroker --workers=4 --worker_cmd=\"python3 -m "
        "fdbroker_worker.run app:app\"",
        formatter_class=_HelpFormatter)
    parser.add_argument(
        "app", metavar="MODULE:ATTR",
        help="the application, as uvicorn and gunicorn name it: "
        "module.path:attribute (attribute default 'app'; a dotted "
        "attribute is followed)")
    parser.add_argument(
        "--interface", choices=("auto", "asgi", "wsgi", "aiohttp"),
        default="auto",
        help="what the app is; auto: aiohttp for a web.Application, wsgi "
        "for app(environ, start_response), else asgi")
    parser.add_argument(
        "--factory", action="store_true",
        help="MODULE:ATTR is a factory: call it (no arguments; awaited if "
        "it is a coroutine function) to get the app")
    parser.add_argument(
        "--app-dir", default=".",
        help="directory put first on sys.path to import the app from")
    parser.add_argument(
        "--root-path", default="",
        help="ASGI root_path (WSGI SCRIPT_NAME) for an app mounted below /")
    parser.add_argument(
        "--threads", type=int, default=10, metavar="N",
        help="WSGI: the thread pool that runs requests (bounded: at most "
        "N requests in the app at once)")
    parser.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
        help="event loop; auto: uvloop when installed, as uvicorn does")
    parser.add_argument(
        "--http", choices=("auto", "h11", "httptools"), default="auto",
        help="ASGI/WSGI HTTP protocol; auto: httptools when installed")
    parser.add_argument(
        "--ws", choices=("auto", "none", "websockets", "wsproto"),
        default="auto", help="ASGI WebSocket protocol")
    parser.add_argument(
        "--lifespan", choices=("auto", "on", "off"), default="auto",
        help="ASGI lifespan; auto: used if the app supports it; on: an app "
        "that does not is an error")
    parser.add_argument(
        "--timeout-keep-alive", type=int, default=5, metavar="SECONDS",
        help="close a keep-alive connection idle this long")
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info",
        help="log level of the runner, uvicorn and the app's loggers")
    access = parser.add_mutually_exclusive_group()
    access.add_argument(
        "--access-log", dest="access_log", action="store_true",
        help="log each request (off by default, as in gunicorn)")
    access.add_argument("--no-access-log", dest="access_log",
                        action="store_false", help=argparse.SUPPRESS)
    parser.set_defaults(access_log=False)
    parser.add_argument(
        "--capacity", type=int, default=0, metavar="N",
        help="most connections this worker takes at once (0: no limit); "
        "the broker places the rest on other workers")
    parser.add_argument(
        "--socket", metavar="PATH", default=None,
        help=f"the broker's hand-off socket (default ${SOCKET_ENV_VAR}, "
        "which a supervising broker sets)")
    parser.add_argument(
        "--reconnect-timeout", type=float, default=30.0, metavar="SECONDS",
        help="after losing the broker, try this long to re-register")
    parser.add_argument(
        "--no-release", dest="release", action="store_false",
        help="never hand idle keep-alive connections back to the broker "
        "(Rebalance and drains then close them instead of moving them)")
    parser.add_argument(
        "--no-gc-freeze", dest="gc_freeze", action="store_false",
        help="leave what the app made at start-up (modules, routes, "
        "models) in the garbage collector's view; by default it is "
        "frozen out once the app has started, so that each full "
        "collection scans only what requests made")
    parser.add_argument(
        "--no-listener-grant", dest="listener_grant", action="store_false",
        help="under fdbroker --placement=kernel, take every connection by "
        "hand-off instead of accepting from a listening socket of the "
        "broker's with the server's own accept loop")
    args = parser.parse_args(argv)
    if ":" not in args.app and "." not in args.app:
        args.app += ":app"
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.capacity < 0:
        parser.error("--capacity must be >= 0")
    if args.timeout_keep_alive < 1:
        parser.error("--timeout-keep-alive must be >= 1")
    if args.reconnect_timeout < 0:
        parser.error("--reconnect-timeout must be >= 0")
    return args


def import_app(spec: str, app_dir: str) -> Any:
    """MODULE:ATTR (uvicorn's import_from_string, with one-line errors)."""
    module_name, _, attrs = spec.partition(":")
    if not module_name or (":" in spec and not attrs):
        raise LoadError(f"app '{spec}' must be in the form MODULE:ATTR")
    sys.path.insert(0, os.path.abspath(app_dir))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise LoadError(f"cannot import module '{module_name}' (from "
                            f"{os.path.abspath(app_dir)})") from None
        raise LoadError(f"importing '{module_name}' failed: "
                        f"{type(error).__name__}: {error}") from None
    except Exception as error:  # the app's own import-time error
        raise LoadError(f"importing '{module_name}' failed: "
                        f"{type(error).__name__}: {error}") from None
    value = module
    for attr in (attrs or "app").split("."):
        try:
            value = getattr(value, attr)
        except AttributeError:
            raise LoadError(f"attribute '{attrs or 'app'}' not found in "
                            f"module '{module_name}'") from None
    return value


async def build_app(args: argparse.Namespace) -> _apps.Application:
    app = import_app(args.app, args.app_dir)
    if args.factory:
        try:
            app = app()
            if asyncio.iscoroutine(app):
                app = await app
        except Exception as error:
            raise LoadError(f"factory '{args.app}' raised "
                            f"{type(error).__name__}: {error}") from None
    interface = args.interface
    if interface == "auto":
        try:
            interface = _apps.detect_interface(app)
        except TypeError as error:
            raise LoadError(f"'{args.app}' is not an application: "
                            f"{error}") from None
    if interface == "aiohttp":
        return _apps.AiohttpApplication(
            app, access_log=args.access_log,
            timeout_keep_alive=args.timeout_keep_alive)
    try:
        return _apps.UvicornApplication(
            app, wsgi=interface == "wsgi", threads=args.threads,
            http=args.http, ws=args.ws, lifespan=args.lifespan,
            root_path=args.root_path, access_log=args.access_log,
            log_level=args.log_level,
            timeout_keep_alive=args.timeout_keep_alive)
    except ImportError as error:
        raise LoadError(f"serving {interface} needs {error.name or error}: "
                        "install it (Debian: python3-uvicorn, "
                        "python3-httptools)") from None


async def serve(args: argparse.Namespace) -> int:
    """Runs the worker; its exit code. SIGTERM, SIGINT and SIGQUIT drain
    (before registration: the app starts, then shuts down, and the worker
    never registers); a second one exits at once (EXIT_INTERRUPTED), in
    whatever phase."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    phase = _Phase()

    def on_signal(signum: int) -> None:
        phase.signals += 1
        if phase.signals == 1:
            log.info("%s: draining (a second signal exits at once)",
                     signal.Signals(signum).name)
            if phase.server is not None:
                phase.server.close()
        else:
            main_task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await _serve(args, phase)
    except asyncio.CancelledError:
        if phase.signals < 2:
            raise
        log.warning("second signal: exiting with %d connection(s) open",
                    phase.server.active_connections
                    if phase.server is not None else 0)
        return EXIT_INTERRUPTED


class _Phase:
    """What the signal handler needs to know."""

    def __init__(self) -> None:
        self.signals = 0
        self.server: Optional[Any] = None  # once registered


async def _serve(args: argparse.Namespace, phase: _Phase) -> int:
    from .protocol_server import create_server
    application = await build_app(args)
    await application.startup()
    if args.gc_freeze:
        # What exists now lives as long as the worker does: kept out of
        # every later collection (gc.freeze), the full ones no longer scan
        # the app's tens of thousands of start-up objects. Garbage first.
        gc.collect()
        gc.freeze()
    if phase.signals:
        # Stopped while starting: no registration, no connection.
        await application.shutdown()
        log.info("stopped before registering; exiting")
        return 0

    def on_drain(cause: Any, deadline: Optional[float]) -> None:
        application.drain_started()

    try:
        server = await create_server(
            application.protocol_factory(), socket_path=args.socket,
            capacity=args.capacity,
            labels={"app": args.app, "pid": str(os.getpid())},
            reconnect_timeout=args.reconnect_timeout, release=args.release,
            is_idle=application.is_idle,
            close_gracefully=application.close_gracefully,
            on_drain=on_drain, accept_listener=args.listener_grant)
    except BaseException:
        # Not registered: the app started, so it shuts down (its lifespan
        # shutdown, aiohttp's on_cleanup) before the error is reported.
        await application.shutdown()
        raise
    application.idle_point = server.idle_point
    application.releasing = lambda: server.drain_releases
    phase.server = server
    log.info("serving %s as worker %d (pid %d)", args.app, server.worker_id,
             os.getpid())
    if phase.signals:
        server.close()  # (a signal during the registration)
    await server.serve_forever()
    await application.shutdown()
    log.info("drained; exiting")
    return 0


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                raise LoadError("--loop=uvloop: uvloop is not installed "
                                "(Debian: python3-uvloop)") from None
    return asyncio.new_event_loop()


log = logging.getLogger("fdbroker_worker.run")


def configure_logging(level: str) -> None:
    numeric = 5 if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(
        level=numeric, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s fdbroker_worker[{os.getpid()}] "
        "%(message)s")
    logging.getLogger("fdbroker_worker").setLevel(numeric)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.log_level)
    try:
        loop = new_event_loop(args.loop)
    except LoadError as error:
        print(f"fdbroker_worker.run: {error}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(serve(args))
    except LoadError as error:
        print(f"fdbroker_worker.run: {error}", file=sys.stderr)
        code = EXIT_LOAD_FAILED
    except _apps.StartupError as error:
        print(f"fdbroker_worker.run: {args.app}: {error}", file=sys.stderr)
        code = EXIT_STARTUP_FAILED
    except RegistrationError as error:
        print(f"fdbroker_worker.run: {error}", file=sys.stderr)
        code = EXIT_LOAD_FAILED
    if code == EXIT_INTERRUPTED:
        # At once: neither the requests in progress (their tasks, their
        # transports) nor the app's threads are waited for. A WSGI request
        # holds a pool thread, which the interpreter would join at exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    try:
        _cancel_leftover_tasks(loop)
    finally:
        loop.close()
    return code


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run() does before closing its loop (bounded): tasks
    still pending (say, an app's lifespan task after a failed startup) are
    cancelled instead of being reported as destroyed."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=5))
    loop.run_until_complete(loop.shutdown_asyncgens())


if __name__ == "__main__":
    sys.exit(main())
