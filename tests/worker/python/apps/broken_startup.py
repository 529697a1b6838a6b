"""A fixture FastAPI app whose lifespan startup raises (after
$BROKEN_STARTUP_DELAY seconds, default 0: longer than the broker's 1 s
"died right after start" for a slow failure)."""

import asyncio
import os

from fastapi import FastAPI

app = FastAPI()


@app.on_event("startup")
async def startup() -> None:
    await asyncio.sleep(float(os.environ.get("BROKEN_STARTUP_DELAY", "0")))
    raise RuntimeError("cannot open the model file /nonexistent/model.bin")


@app.get("/")
async def root() -> dict:
    return {"never": "served"}
