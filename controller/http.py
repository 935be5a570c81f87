"""HTTP surface in the controller's own event loop: probes, metrics and the internal REST API.

``/healthz`` says the process is alive; ``/readyz`` that Postgres, Redis and
Docker answer; ``/metrics`` is the Prometheus text format. Everything under
``/api/v1/`` needs ``Authorization: Bearer <RTMANAGER_API_TOKEN>`` (compared in
constant time); with no token configured the REST API answers 503.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from desired.errors import NotFound
from desired.model import GAME_ID_PATTERN, Status

if TYPE_CHECKING:
    from controller.app import Controller

log = logging.getLogger("rtmanager.http")


def _json_value(v: Any) -> Any:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def record_json(record) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in dataclasses.asdict(record).items()}


class HttpServer:
    def __init__(self, controller: "Controller") -> None:
        self.c = controller
        self._runner: web.AppRunner | None = None
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/v1/runtimes", self.list_runtimes)
        app.router.add_get("/api/v1/runtimes/{game_id}", self.get_runtime)
        app.router.add_get("/api/v1/runtimes/{game_id}/operations", self.get_operations)
        self.app = app

    async def start(self) -> None:
        s = self.c.settings
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http_host, s.http_port)
        await site.start()
        log.info("http listening on %s:%d", s.http_host, s.http_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path.startswith("/api/"):
            token = self.c.settings.api_token
            if not token:
                return _error(503, "the REST API is disabled: set RTMANAGER_API_TOKEN")
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return _error(401, "missing or wrong bearer token")
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = await self.c.readiness()
        ok = all(v == "ok" for v in checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.c.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_runtimes(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        if status:
            try:
                records = await self.c.store.list_by_status(Status(status))
            except ValueError:
                return _error(400, f"status must be one of {', '.join(s.value for s in Status)}")
        else:
            records = await self.c.store.list()
        return web.json_response({"runtimes": [record_json(r) for r in records]})

    async def get_runtime(self, request: web.Request) -> web.Response:
        game_id = request.match_info["game_id"]
        if not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        try:
            record = await self.c.store.get(game_id)
        except NotFound:
            return _error(404, f"no runtime for game {game_id}")
        return web.json_response(record_json(record))

    async def get_operations(self, request: web.Request) -> web.Response:
        game_id = request.match_info["game_id"]
        if not GAME_ID_PATTERN.fullmatch(game_id):
            return _error(400, "game_id does not match the pattern")
        ops = await self.c.store.operations(game_id)
        return web.json_response({"operations": [
            {k: _json_value(v) for k, v in dataclasses.asdict(op).items()} for op in ops]})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
