"""A stock aiohttp app, unchanged for fdbroker:

    fdbroker --workers=4 \\
        --worker_cmd="python3 -m fdbroker_worker.run --app-dir=examples aiohttp_app:app"

The runner serves the web.Application with aiohttp's own server (its
RequestHandler per connection); on_startup runs before the worker
registers, on_shutdown when it starts to drain (here: open WebSockets are
closed), on_cleanup after it has drained. `aiohttp_app:create_app
--factory` builds a fresh one instead. Also runs as is under
`python3 -m aiohttp.web aiohttp_app:create_app` or gunicorn's
aiohttp.GunicornWebWorker.
"""

import asyncio
import os
import weakref
from typing import Optional

from aiohttp import WSCloseCode, WSMsgType, web


def _key(name: str, kind: type):  # web.AppKey from aiohttp 3.9 on
    return web.AppKey(name, kind) if hasattr(web, "AppKey") else name


STARTED = _key("started", bool)
WEBSOCKETS = _key("websockets", weakref.WeakSet)


async def root(request: web.Request) -> web.Response:
    return web.json_response({"hello": "world", "pid": os.getpid(),
                              "started": request.app[STARTED]})


async def sleep(request: web.Request) -> web.Response:
    """Answers after `ms` milliseconds (0-60000)."""
    try:
        ms = min(max(int(request.query.get("ms", "0")), 0), 60000)
    except ValueError:
        raise web.HTTPBadRequest(text="ms must be an integer\n")
    await asyncio.sleep(ms / 1000)
    return web.json_response({"pid": os.getpid(), "slept_ms": ms})


async def echo_body(request: web.Request) -> web.Response:
    """Answers with the request's body."""
    return web.Response(body=await request.read(),
                        content_type=request.content_type)


async def echo(request: web.Request) -> web.WebSocketResponse:
    """WebSocket echo of text messages."""
    websocket = web.WebSocketResponse()
    await websocket.prepare(request)
    request.app[WEBSOCKETS].add(websocket)
    try:
        async for message in websocket:
            if message.type == WSMsgType.TEXT:
                await websocket.send_str(message.data)
    finally:
        request.app[WEBSOCKETS].discard(websocket)
    return websocket


async def on_startup(app: web.Application) -> None:
    app[STARTED] = True


async def on_shutdown(app: web.Application) -> None:
    """aiohttp's graceful shutdown: open WebSockets are closed (1001) when
    the worker starts to drain, so that the drain does not wait for them."""
    for websocket in set(app[WEBSOCKETS]):
        await websocket.close(code=WSCloseCode.GOING_AWAY,
                              message=b"server shutdown")


def create_app(argv: Optional[list[str]] = None) -> web.Application:
    """(argv: what `python3 -m aiohttp.web` passes; unused.)"""
    app = web.Application()
    app[STARTED] = False
    app[WEBSOCKETS] = weakref.WeakSet()
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.add_routes([web.get("/", root), web.get("/sleep", sleep),
                    web.post("/echo", echo_body), web.get("/ws", echo)])
    return app


app = create_app()
