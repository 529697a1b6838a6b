"""The asyncio APIs (start_server, release) on uvloop: what uvicorn and
gunicorn pick when it is installed, and what the runner uses by default.
The same tests as test_aio and test_aio_release, on uvloop's loop; plus what
differs on uvloop."""

import asyncio
import unittest

import uvloop

import test_aio
import test_aio_release


def setUpModule() -> None:
    # IsolatedAsyncioTestCase makes its loop through the policy.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tearDownModule() -> None:
    asyncio.set_event_loop_policy(None)


class StartServerOnUvloopTest(test_aio.StartServerTest):
    async def test_runs_on_uvloop(self) -> None:
        self.assertIsInstance(asyncio.get_running_loop(), uvloop.Loop)

    async def test_deadline_already_past_arms_a_timer(self) -> None:
        # uvloop's call_at() returns a Handle without when() for a time
        # already past (a Closed report due, a heartbeat late): the driver
        # must not ask the handle for it.
        server = await self.start()
        past = server.loop.time() - 1
        server._core.deadline = lambda: past
        server._arm_timer()
        server._arm_timer()
        self.assertIsNotNone(server._timer)


class ReleaseOnUvloopTest(test_aio_release.ReleaseTest):
    pass


if __name__ == "__main__":
    unittest.main()
