"""An operator's engine questions never take the health probes' connections (red-team, stop 44).

``GET /api/v1/runtimes/{id}/engine/status`` (a read token) asked the engine through the same client as the
health round, whose pool holds 64 connections. Against engines that do not answer (a frozen process, a node
that drops packets; an engine_unreachable game is still asked), 64 such calls in flight made every probe that
needed a new connection wait for a slot, and time out: healthy engines counted unreachable, starts delayed.
The HTTP surface has a client of its own, with a small pool."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestServer

from controller.app import Controller
from controller.config import Settings
from observed.engine import OPERATOR_LIMIT
from tests.fakes import FakeBackend


async def test_operators_status_calls_to_frozen_engines_leave_the_probes_their_connections() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"turn": 1, "phase": "idle"})

    app = web.Application()
    app.router.add_get("/healthz", ok)
    healthy = TestServer(app, host="127.0.0.1")
    await healthy.start_server()
    frozen = await asyncio.start_server(lambda r, w: asyncio.sleep(3600), "127.0.0.1", 0)
    frozen_at = f"127.0.0.1:{frozen.sockets[0].getsockname()[1]}"
    backend = FakeBackend()
    c = Controller(Settings.from_env({}), backend_factory=lambda s, **kw: backend)
    asked = c.operator_engine
    assert asked is not c.engine
    hanging = [asyncio.create_task(asked.status(frozen_at)) for _ in range(100)]
    try:
        await asyncio.sleep(0.3)  # every slot of the operators' client is taken, the rest wait for one
        assert len(asked._http().connector._acquired) == OPERATOR_LIMIT  # type: ignore[union-attr]
        ok_, detail = await asyncio.wait_for(c.engine.check(f"127.0.0.1:{healthy.port}"), 5)
        assert ok_, detail
    finally:
        for t in hanging:
            t.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
        await asked.close()
        await c.engine.close()
        await healthy.close()
        frozen.close()
