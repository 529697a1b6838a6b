"""A FastAPI fixture app for the runner tests.

Lifespan: startup appends "starting <pid>" to the file $RUNNER_TEST_EVENTS
(if set), sleeps $RUNNER_TEST_STARTUP_DELAY seconds (default 0), then
appends "startup <pid>";
shutdown appends "shutdown <pid>". GET / says whether startup ran,
which event loop runs it and how many objects the collector leaves out
(gc.freeze); GET /sleep?ms=N appends "sleeping <pid>" and
answers after N ms; POST /echo answers with the body; /ws echoes text as
"<pid> <text>".
"""

import asyncio
import gc
import os
from typing import Optional

from fastapi import (FastAPI, Request, Response, WebSocket,
                     WebSocketDisconnect)

app = FastAPI()
state = {"started": False}


def record(event: str) -> None:
    path: Optional[str] = os.environ.get("RUNNER_TEST_EVENTS")
    if path:
        with open(path, "a") as events:
            events.write(f"{event} {os.getpid()}\n")


@app.on_event("startup")
async def startup() -> None:
    record("starting")
    await asyncio.sleep(float(os.environ.get("RUNNER_TEST_STARTUP_DELAY",
                                             "0")))
    state["started"] = True
    record("startup")


@app.on_event("shutdown")
async def shutdown() -> None:
    record("shutdown")


@app.get("/")
async def root() -> dict:
    return {"pid": os.getpid(), "started": state["started"],
            "loop": type(asyncio.get_running_loop()).__module__,
            "gc_frozen": gc.get_freeze_count()}


@app.get("/sleep")
async def sleep(ms: int = 0) -> dict:
    record("sleeping")
    await asyncio.sleep(ms / 1000)
    return {"pid": os.getpid(), "slept_ms": ms}


@app.post("/echo")
async def echo_body(request: Request) -> Response:
    return Response(await request.body(),
                    media_type=request.headers.get("content-type"))


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{os.getpid()} {text}")
    except WebSocketDisconnect:
        pass
