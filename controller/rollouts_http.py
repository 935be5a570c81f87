"""The REST API of rollouts (``/api/v1/rollouts``), behind the API token like everything under
``/api/v1/`` (controller/http.py checks it before any handler here runs).

    GET  /api/v1/rollouts[?state=S]            newest first, each with its games per state
    POST /api/v1/rollouts                      201 the new rollout; 400 a bad field; 409 a game
                                               another active rollout holds (named)
    GET  /api/v1/rollouts/{id}                 the rollout, its counts and every game with its reason
    POST /api/v1/rollouts/{id}/pause|resume|abort   the rollout as it is now; 409 when its state refuses

Writes are the leader's (a standby answers 503, as for every write): the rollout loop runs there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controller.bodies import json_body
from desired.errors import NotFound
from desired.rollouts import (
    Action,
    InvalidRollout,
    RolloutConflict,
    RolloutState,
    counts,
    parse_request,
    rollout_json,
)

if TYPE_CHECKING:
    from controller.http import HttpDeps

MAX_ID = 2**63 - 1


def _error(status: int, message: str, retry_after: bool = False) -> web.Response:
    return web.json_response({"error": message}, status=status,
                             headers={"Retry-After": "2"} if retry_after else None)


def _rollout_id(request: web.Request) -> int | None:
    raw = request.match_info["rollout_id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 20 or not 0 < int(raw) <= MAX_ID:
        return None
    return int(raw)


class RolloutRoutes:
    def __init__(self, deps: HttpDeps, actor: Callable[[web.Request], str] = lambda request: "") -> None:
        self.deps = deps
        self.actor = actor  # who asks: the request's token (controller/http.py), for the operation log

    def add(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/rollouts", self.list)
        router.add_post("/api/v1/rollouts", self.create)
        router.add_get("/api/v1/rollouts/{rollout_id}", self.get)
        for action in Action:
            router.add_post(f"/api/v1/rollouts/{{rollout_id}}/{action.value}", self._steer(action))

    def _standby(self) -> web.Response | None:
        if self.deps.rollouts is None:
            return _error(503, "rollouts are not available in this process")
        if not self.deps.is_leader():
            return _error(503, "this replica is a standby; send this to the leader", retry_after=True)
        return None

    async def list(self, request: web.Request) -> web.Response:
        if self.deps.rollouts is None:
            return _error(503, "rollouts are not available in this process")
        raw = request.query.get("state")
        try:
            state = RolloutState(raw) if raw is not None else None
        except ValueError:
            return _error(400, f"state must be one of {', '.join(s.value for s in RolloutState)}")
        found = await self.deps.rollouts.list_rollouts(state)
        return web.json_response({"rollouts": [rollout_json(r, c) for r, c in found]})

    async def get(self, request: web.Request) -> web.Response:
        if self.deps.rollouts is None:
            return _error(503, "rollouts are not available in this process")
        rollout_id = _rollout_id(request)
        if rollout_id is None:
            return _error(400, "the rollout id must be a positive integer")
        try:
            rollout, games = await self.deps.rollouts.get_rollout(rollout_id)
        except NotFound:
            return _error(404, f"no rollout {rollout_id}")
        return web.json_response(rollout_json(rollout, counts(games), games))

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON object")
        try:
            req = parse_request(body)
        except InvalidRollout as exc:
            return _error(400, str(exc))
        refused = self._standby()
        if refused is not None:
            return refused
        assert self.deps.rollouts is not None
        try:
            rollout, games = await self.deps.rollouts.create_rollout(req, self.deps.allowlist,
                                                                    self.deps.version_registry,
                                                                    actor=self.actor(request) or None)
        except InvalidRollout as exc:
            return _error(400, str(exc))
        except RolloutConflict as exc:
            return _error(409, str(exc))
        self.deps.rollout_wake()
        return web.json_response(rollout_json(rollout, counts(games), games), status=201)

    def _steer(self, action: Action) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            rollout_id = _rollout_id(request)
            if rollout_id is None:
                return _error(400, "the rollout id must be a positive integer")
            refused = self._standby()
            if refused is not None:
                return refused
            assert self.deps.rollouts is not None
            try:
                await self.deps.rollouts.steer_rollout(rollout_id, action, actor=self.actor(request) or None)
                rollout, games = await self.deps.rollouts.get_rollout(rollout_id)
            except NotFound:
                return _error(404, f"no rollout {rollout_id}")
            except RolloutConflict as exc:
                return _error(409, str(exc))
            self.deps.rollout_wake()
            return web.json_response(rollout_json(rollout, counts(games), games))
        handler.__name__ = f"post_rollout_{action.value}"
        return handler
