"""A stock FastAPI app, unchanged for fdbroker:

    fdbroker --workers=4 \\
        --worker_cmd="python3 -m fdbroker_worker.run --app-dir=examples fastapi_app:app"

Also runs as is under `uvicorn fastapi_app:app` or gunicorn with uvicorn
workers (the benchmark does exactly that).
"""

import hashlib
import os
import time

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()
# Filled by the lifespan startup, which runs before the worker registers.
state = {"started": False, "startups": 0}


@app.on_event("startup")
async def startup() -> None:
    state["started"] = True
    state["startups"] += 1


@app.get("/")
async def root() -> dict:
    return {"hello": "world", "pid": os.getpid(),
            "started": state["started"], "startups": state["startups"]}


@app.get("/cpu")
def cpu(ms: int = 20) -> dict:
    """Burns about `ms` milliseconds of CPU (in the thread pool)."""
    deadline = time.process_time() + ms / 1000
    digest = b""
    while time.process_time() < deadline:
        digest = hashlib.sha256(digest).digest()
    return {"pid": os.getpid(), "ms": ms}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
