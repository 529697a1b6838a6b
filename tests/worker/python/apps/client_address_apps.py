"""Apps that answer with the client address their framework reports, as
JSON {"client": [host, port]} (port null where the framework gives none):
ASGI's scope["client"], WSGI's REMOTE_ADDR, aiohttp's request.remote."""

import json

from aiohttp import web


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    client = scope.get("client")
    body = json.dumps({"client": list(client) if client else None}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def wsgi(environ, start_response):
    body = json.dumps({"client": [environ.get("REMOTE_ADDR"), None]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def _remote(request: web.Request) -> web.Response:
    return web.json_response({"client": [request.remote, None]})


aiohttp_app = web.Application()
aiohttp_app.router.add_get("/", _remote)
