"""A fixture aiohttp app whose on_startup raises."""

from aiohttp import web


async def connect_cache(app: web.Application) -> None:
    raise ConnectionRefusedError("cache at 127.0.0.1:1 refused the connection")


app = web.Application()
app.on_startup.append(connect_cache)
