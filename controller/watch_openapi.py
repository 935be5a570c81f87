"""The watch API's part of the OpenAPI document (controller/openapi.py merges it), from the same
limits the request is checked with (controller/watch_http.py)."""

from __future__ import annotations

from typing import Any

from desired.model import GAME_ID_PATTERN, Status
from desired.watch import MAX_POSITION

MAX_FILTER = 100  # controller/watch_http.py checks the same

_DESCRIPTION = """Server-Sent Events: every snapshot of every game, in commit order.

Events: `ready` (`id`: the position the stream starts after; `data`: `{"position", "head"}`), then
`snapshot` per snapshot (`id`: its position; `data`: the snapshot as on the snapshot stream), and a
`: keepalive` comment every 15 s (with an `id` line when a filter skipped snapshots). `reset`
(`data`: `{"reason": "expired"|"unknown", "since", "position", "oldest"}`, `id`: where the stream
goes on from): the position asked for is older than retention kept, or was never given; the
snapshots between are gone, re-read `GET /api/v1/runtimes`.

Resume with the last `id` seen (`Last-Event-ID`, which a browser's EventSource sends by itself, or
`since`): nothing committed after it is missed, on any replica. Without either the stream starts at
the newest position. A reader whose writes stall for 10 s is cut off; a replica serves at most 64
readers (503 beyond)."""


def watch_paths() -> dict[str, Any]:
    position = {"type": "integer", "minimum": 0, "maximum": MAX_POSITION}
    game = {"type": "string", "pattern": GAME_ID_PATTERN.pattern, "maxLength": 51}
    return {"/api/v1/events": {"get": {
        "operationId": "watchEvents", "summary": "Watch every change of every game (Server-Sent Events)",
        "description": _DESCRIPTION,
        "parameters": [
            {"name": "since", "in": "query", "required": False, "schema": position,
             "description": "resume after this position (0: everything retention kept)"},
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
             "description": "the same as since, and wins over it (what EventSource sends on reconnect)"},
            {"name": "game_id", "in": "query", "required": False, "style": "form", "explode": True,
             "description": "only these games (repeat the parameter)",
             "schema": {"type": "array", "items": game, "maxItems": MAX_FILTER}},
            {"name": "status", "in": "query", "required": False, "style": "form", "explode": True,
             "description": "only snapshots with one of these statuses (repeat the parameter)",
             "schema": {"type": "array", "items": {"type": "string", "enum": [s.value for s in Status]},
                        "maxItems": MAX_FILTER}},
            {"name": "follow", "in": "query", "required": False,
             "description": "0: send what is there and end (default 1: stay and send what comes)",
             "schema": {"type": "string", "enum": ["0", "1"]}},
        ],
        "responses": {
            "200": {"description": "the event stream; the schema describes one event", "content": {
                "text/event-stream": {"schema": {
                    "type": "object", "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["ready", "snapshot", "reset"]},
                        "id": {"type": "string", "pattern": "^[0-9]+$",
                               "description": "the position (resume with it)"},
                        "data": {"type": "string", "description": "compact JSON: a snapshot for `snapshot`"}}}}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "503": {"$ref": "#/components/responses/Unavailable"},
        }}}}
