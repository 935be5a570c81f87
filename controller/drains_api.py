"""The REST surface of drains, without the HTTP server (controller/http.py routes to it and turns each
answer, a status and a JSON body, into a response). Behind the API token, like all of /api/v1, and in
the OpenAPI document:

    POST /api/v1/drains                  {"host": true} | {"node": ID}, max_parallel, deadline, on_deadline,
                                         local_state -> 201 the drain (409: the target has an active drain)
    GET  /api/v1/drains                  the drains, newest first
    GET  /api/v1/drains/{id}             one drain, with its games and counts
    POST /api/v1/drains/{id}/undrain     stop it: the target is in use again, the games it stopped start
                                         again (idempotent: 200 with the drain as it is)

The leader's drain loop (controller/drains.py) carries a drain out; these only write and read rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from controller.drains import drain_json
from desired import drains
from desired.errors import NotFound
from desired.model import OpSource
from desired.ports import DrainStore

MAX_ID = 2**63 - 1
Answer = tuple[int, dict[str, Any]]


def _error(status: int, message: str) -> Answer:
    return status, {"error": message}


def parse_id(raw: str) -> int | None:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or not 0 < int(raw) <= MAX_ID:
        return None
    return int(raw)


NAMES_WAIT = 2.0  # seconds the drains list waits for the Swarm's node names
ACTIVE = frozenset({drains.DrainStatus.DRAINING, drains.DrainStatus.DRAINED, drains.DrainStatus.UNDRAINING})


class DrainApi:
    def __init__(self, store: DrainStore, *, backend: str, state_shared: bool,
                 wake: Callable[[], None] = lambda: None,
                 nodes: Callable[[], Awaitable[Mapping[str, str]]] | None = None) -> None:
        self.store = store
        self.nodes = nodes  # Swarm: the nodes (id -> hostname), read on the leader
        self.backend = backend
        self.state_shared = state_shared
        self.wake = wake  # the leader's drain loop looks at once

    async def list(self) -> Answer:
        found = await self.store.list_drains()
        names: Mapping[str, str] = {}
        if self.nodes is not None and any(d.node and d.status in ACTIVE for d in found):
            # The hostnames of the nodes of active drains only, and never waited for long: the list answers
            # without them when the Swarm API is slow or away.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(NAMES_WAIT):
                    names = await self.nodes()
        return 200, {"drains": [{**drain_json(d), **({"node_name": names[d.node]} if d.node and d.node in names
                                                     and d.status in ACTIVE else {})} for d in found]}

    async def get(self, raw_id: str) -> Answer:
        drain_id = parse_id(raw_id)
        if drain_id is None:
            return _error(400, "the drain id must be a positive whole number")
        try:
            drain, games = await self.store.get_drain(drain_id)
        except NotFound:
            return _error(404, f"no drain {drain_id}")
        return 200, drain_json(drain, games, await self.store.drain_counts(drain))

    def parse(self, body: Any) -> drains.DrainRequest | Answer:
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        try:
            return drains.parse_request(body, backend=self.backend, state_shared=self.state_shared)
        except drains.InvalidDrain as exc:
            return _error(400, exc.message)

    async def create(self, req: drains.DrainRequest, *, actor: str | None = None) -> Answer:
        if req.node is not None and self.nodes is not None:
            # The node's id or its hostname (as docker node update takes either); the id is stored.
            try:
                known = await self.nodes()
            except Exception as exc:  # noqa: BLE001 - the Swarm API away: try again later, never a 5xx body of ours
                return _error(503, f"could not read the Swarm's nodes ({exc.__class__.__name__}); try again")
            node = drains.resolve_node(req.node, known)
            if node is None:
                return _error(400, drains.unknown_node(req.node, known))
            req = dataclasses.replace(req, node=node)
        try:
            drain = await self.store.create_drain(req, OpSource.ADMIN, actor=actor)
        except drains.DrainExists:
            active = await self.store.active_drain(req.node)
            which = f" (drain {active.id}, {active.status.value})" if active is not None else ""
            target = "the host" if req.node is None else f"node {req.node}"
            return _error(409, f"{target} has an active drain{which}; undrain it first")
        self.wake()
        return 201, drain_json(drain, [], {"waiting": 0})

    async def undrain(self, raw_id: str, *, actor: str | None = None) -> Answer:
        drain_id = parse_id(raw_id)
        if drain_id is None:
            return _error(400, "the drain id must be a positive whole number")
        try:
            drain = await self.store.request_undrain(drain_id, actor=actor)
        except NotFound:
            return _error(404, f"no drain {drain_id}")
        self.wake()
        return 200, drain_json(drain)


def openapi_parts() -> tuple[dict[str, Any], dict[str, Any]]:
    """The drains' paths and schemas of the OpenAPI document (controller/openapi.py)."""
    bad, auth, busy, missing, conflict = ({"$ref": f"#/components/responses/{n}"} for n in
                                          ("BadRequest", "Unauthorized", "Unavailable", "NotFound", "Conflict"))
    drain_ref = {"$ref": "#/components/schemas/Drain"}
    drain_id = {"name": "drain_id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}}
    request = {"type": "object", "additionalProperties": False, "properties": {
        "host": {"type": "boolean", "description": "true: drain the Docker host (Docker backend)"},
        "node": {"type": "string", "pattern": drains.NODE_PATTERN.pattern,
                 "description": "the Swarm node id to drain, or its hostname (Swarm backend); a node the "
                                "Swarm does not know is 400"},
        "max_parallel": {"type": "integer", "minimum": 1, "maximum": drains.MAX_PARALLEL,
                         "description": f"games stopped or moved at a time (default {drains.DEFAULT_PARALLEL})"},
        "deadline": {"type": "integer", "minimum": 0, "maximum": drains.MAX_DEADLINE,
                     "description": "seconds from now after which the rest are stopped or moved without waiting "
                                    f"for a turn boundary (default {drains.DEFAULT_DEADLINE})"},
        "on_deadline": {"type": "string", "enum": [v.value for v in drains.OnDeadline],
                        "description": "Swarm: past the deadline the rest are moved anyway (move) or stopped (stop)"},
        "local_state": {"type": "string", "enum": [v.value for v in drains.LocalState],
                        "description": "Swarm with node-local state (RTMANAGER_STATE_SHARED=0), required there: "
                                       "stop (keep the state on the node; undrain starts the game there again) "
                                       "or move_without_state (start fresh on another node)"}}}
    nullable_time = {"type": "string", "format": "date-time", "nullable": True}
    nullable_str = {"type": "string", "nullable": True}
    game = {"type": "object", "required": ["game_id", "action", "state"], "properties": {
        "game_id": {"type": "string"}, "action": {"type": "string", "enum": [a.value for a in drains.DrainAction]},
        "state": {"type": "string", "enum": [s.value for s in drains.GameState]},
        "generation": {"type": "integer"}, "taken_at": {"type": "string", "format": "date-time"},
        "forced": {"type": "boolean"}, "image_ref": nullable_str, "paused": {"type": "boolean"},
        "turn_interval": {"type": "integer"}, "from_node": nullable_str, "to_node": nullable_str,
        "op_id": {"type": "integer", "nullable": True}, "note": nullable_str, "done_at": nullable_time}}
    drain = {"type": "object", "required": ["id", "target", "status", "max_parallel", "deadline_at"], "properties": {
        "id": {"type": "integer"}, "target": {"type": "string", "description": "host, or the node id"},
        "node": nullable_str, "max_parallel": {"type": "integer"},
        "deadline_at": {"type": "string", "format": "date-time"},
        "on_deadline": {"type": "string", "enum": [v.value for v in drains.OnDeadline]},
        "local_state": {"type": "string", "enum": [v.value for v in drains.LocalState], "nullable": True},
        "state_shared": {"type": "boolean"},
        "status": {"type": "string", "enum": [s.value for s in drains.DrainStatus]},
        "source": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
        "drained_at": nullable_time, "undrain_at": nullable_time, "undrained_at": nullable_time,
        "note": {"type": "string", "nullable": True, "description": "why a failed drain failed"},
        "node_name": {"type": "string", "description": "GET /api/v1/drains only: the drained node's hostname "
                                                       "(Swarm), when the Swarm answers"},
        "games": {"type": "array", "items": game, "description": "GET /api/v1/drains/{drain_id} only"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                   "description": "games per state, and waiting: games in scope not taken yet"}}}
    paths = {
        "/api/v1/drains": {
            "get": {"operationId": "listDrains", "summary": "The drains, newest first (the last 100)",
                    "responses": {"200": {"description": "drains", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["drains"],
                        "properties": {"drains": {"type": "array", "items": drain_ref}}}}}},
                        "401": auth, "503": busy}},
            "post": {"operationId": "createDrain",
                     "summary": "Drain the Docker host (stop its games at a turn boundary, refuse new starts) or a "
                                "Swarm node (move its games elsewhere at a turn boundary, place no new game there)",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
                     "responses": {"201": {"description": "the drain", "content": {"application/json": {
                         "schema": drain_ref}}}, "400": bad, "401": auth, "409": conflict, "503": busy}}},
        "/api/v1/drains/{drain_id}": {
            "get": {"operationId": "getDrain", "summary": "One drain, with its games and their progress",
                    "parameters": [drain_id],
                    "responses": {"200": {"description": "the drain", "content": {"application/json": {
                        "schema": drain_ref}}}, "400": bad, "401": auth, "404": missing, "503": busy}}},
        "/api/v1/drains/{drain_id}/undrain": {
            "post": {"operationId": "undrain",
                     "summary": "End a drain: its target is in use again and the games it stopped start again as "
                                "they were (idempotent)",
                     "parameters": [drain_id],
                     "responses": {"200": {"description": "the drain", "content": {"application/json": {
                         "schema": drain_ref}}}, "400": bad, "401": auth, "404": missing, "503": busy}}},
    }
    return paths, {"Drain": drain}
