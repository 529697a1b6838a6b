"""A raw ASGI app for the watchdog tests: GET /hang blocks the event loop
(time.sleep in a coroutine: a hung application); any other path answers
200 with X-Worker-Pid."""

import os
import time


def hang_forever() -> None:
    time.sleep(1000)


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/hang":
        hang_forever()
    pid = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-worker-pid", pid),
                            (b"content-length", str(len(pid)).encode())]})
    await send({"type": "http.response.body", "body": pid})
