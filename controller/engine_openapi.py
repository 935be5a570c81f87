"""The engine proxy's part of the OpenAPI document (controller/openapi.py merges it): the engine's
status (exact), and the pass-through (loose: what an engine answers is the engine's business)."""

from __future__ import annotations

from typing import Any

from controller.engine_proxy import PROXY_METHODS, PROXY_ROUTE, STATUS_ROUTE
from desired.model import GAME_ID_PATTERN, Status
from observed.engine import MAX_TURN, PHASES

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_NOT_RUNNING = {"description": "the game's engine does not run (the body's status says what the game is)",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["error", "status"],
                    "properties": {"error": {"type": "string"},
                                   "status": {"type": "string", "enum": [s.value for s in Status]}}}}}}

_PASS_THROUGH = """The platform gateway's pass-through to one game's engine: the request goes to the engine at
`/{path}` (with the query string), its answer comes back as the engine gave it, both streamed.

Only a `gateway` token reaches it, and no other. The path is normalised from the raw request target
(a percent-encoded slash, backslash or NUL, a double encoding, `..`, spaces or control characters:
400) and anything at or under the engine's admin path (RTMANAGER_ENGINE_ADMIN_PATH), compared
without regard to case or `;parameters`, is refused (403). `Authorization` and the hop-by-hop headers
are not forwarded. Bodies are bounded by RTMANAGER_ENGINE_PROXY_MAX_BODY (a larger request: 413; an
answer announced larger: 502; one that grows past it is cut off), the exchange by
RTMANAGER_ENGINE_PROXY_TIMEOUT (no answer by then: 504). Unknown game: 404; a game whose engine does
not run (any status but running, generation_in_progress, generation_failed, finished): 409."""


def engine_paths() -> dict[str, Any]:
    game_id = {"name": "game_id", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": GAME_ID_PATTERN.pattern, "maxLength": 51}}
    path = {"name": "path", "in": "path", "required": True, "description": "the engine's path, without its first /",
            "schema": {"type": "string"}}
    turn = {"type": "integer", "minimum": 0, "maximum": MAX_TURN}
    status = {"get": {
        "operationId": "getEngineStatus",
        "summary": "What the game's engine says of itself now (its admin API, asked with the game's admin token)",
        "description": "The engine's admin status, validated; the admin token never leaves rtmanager. "
                       "501: the engine has no admin API; 502: it refused rtmanager or answered garbage; "
                       "504: it did not answer in time; 409: the game's engine does not run.",
        "parameters": [game_id],
        "responses": {
            "200": {"description": "the engine's status", "content": {"application/json": {"schema": {
                "type": "object", "required": ["game_id", "turn", "phase", "last_generation"],
                "properties": {
                    "game_id": {"type": "string"}, "turn": turn,
                    "phase": {"type": "string", "enum": list(PHASES)},
                    "last_generation": {"type": "object", "nullable": True, "required": ["turn", "ok", "error"],
                                        "properties": {"turn": turn, "ok": {"type": "boolean"},
                                                       "error": {"type": "string"}}}}}}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "404": {"$ref": "#/components/responses/NotFound"},
            "409": _NOT_RUNNING,
            "501": {"description": "the engine has no admin API", "content": _ERROR},
            "502": {"description": "the engine refused rtmanager's admin token, or answered garbage",
                    "content": _ERROR},
            "503": {"$ref": "#/components/responses/Unavailable"},
            "504": {"description": "the engine did not answer in time", "content": _ERROR},
        }}}
    proxy: dict[str, Any] = {}
    for method in PROXY_METHODS:
        if method == "HEAD":
            continue
        operation: dict[str, Any] = {
            "operationId": f"engineProxy{method.capitalize()}",
            "summary": "Pass-through to the game's engine (gateway tokens only)",
            "description": _PASS_THROUGH,
            "parameters": [game_id, path],
            "responses": {
                "default": {"description": "the engine's answer, as it gave it", "content": {"*/*": {}}},
                "400": {"$ref": "#/components/responses/BadRequest"},
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "404": {"$ref": "#/components/responses/NotFound"},
                "409": _NOT_RUNNING,
                "413": {"description": "the request body is larger than RTMANAGER_ENGINE_PROXY_MAX_BODY",
                        "content": _ERROR},
                "502": {"description": "the engine could not be reached, or its answer is too large",
                        "content": _ERROR},
                "503": {"$ref": "#/components/responses/Unavailable"},
                "504": {"description": "the engine did not answer in time", "content": _ERROR},
            }}
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            operation["requestBody"] = {"required": False, "description": "anything the engine takes",
                                        "content": {"*/*": {"schema": {}}}}
        proxy[method.lower()] = operation
    return {STATUS_ROUTE: status, PROXY_ROUTE: proxy}
