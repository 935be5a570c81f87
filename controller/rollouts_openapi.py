"""The rollouts' part of the OpenAPI document (controller/openapi.py merges it), built from the
same enums and limits the request is checked with (desired/rollouts.py)."""

from __future__ import annotations

from typing import Any

from desired.model import GAME_ID_PATTERN
from desired.rollouts import MAX_GAMES, MAX_HOLD, MAX_PARALLEL, Action, GameState, OnFailure, RolloutState
from desired.versions import VERSION_PATTERN


def _enum(values: Any) -> dict[str, Any]:
    return {"type": "string", "enum": [v.value for v in values]}


_TIME = {"type": "string", "format": "date-time"}
_NULL_TIME = {**_TIME, "nullable": True}
_VERSION = {"type": "string", "pattern": VERSION_PATTERN.pattern}


def rollout_paths() -> dict[str, Any]:
    bad, auth, busy, missing, conflict = ({"$ref": f"#/components/responses/{n}"} for n in
                                          ("BadRequest", "Unauthorized", "Unavailable", "NotFound", "Conflict"))
    one = {"application/json": {"schema": {"$ref": "#/components/schemas/RolloutDetail"}}}
    rollout_id = {"name": "rollout_id", "in": "path", "required": True,
                  "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}
    paths: dict[str, Any] = {
        "/api/v1/rollouts": {
            "get": {"operationId": "listRollouts", "summary": "Rollouts, newest first, with their games per state",
                    "parameters": [{"name": "state", "in": "query", "required": False,
                                    "schema": _enum(RolloutState)}],
                    "responses": {"200": {"description": "rollouts", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["rollouts"], "properties": {"rollouts": {
                            "type": "array", "items": {"$ref": "#/components/schemas/Rollout"}}}}}}},
                        "400": bad, "401": auth, "503": busy}},
            "post": {"operationId": "createRollout",
                     "summary": "Move games to an engine version, max_parallel at a time, each by a patch at a turn "
                                "boundary (409 names the games another active rollout holds)",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "$ref": "#/components/schemas/RolloutRequest"}}}},
                     "responses": {"201": {"description": "the rollout", "content": one}, "400": bad, "401": auth,
                                   "409": conflict, "503": busy}},
        },
        "/api/v1/rollouts/{rollout_id}": {"get": {
            "operationId": "getRollout", "summary": "A rollout with every game's state and why",
            "parameters": [rollout_id],
            "responses": {"200": {"description": "the rollout", "content": one}, "400": bad, "401": auth,
                          "404": missing, "503": busy}}},
    }
    for action in Action:
        paths[f"/api/v1/rollouts/{{rollout_id}}/{action.value}"] = {"post": {
            "operationId": f"{action.value}Rollout",
            "summary": {Action.PAUSE: "Start no new patch; those in flight finish",
                        Action.RESUME: "Go on (failures before now no longer count against the budget)",
                        Action.ABORT: "End the rollout: no new patch, those in flight finish"}[action],
            "parameters": [rollout_id],
            "responses": {"200": {"description": "the rollout", "content": one}, "400": bad, "401": auth,
                          "404": missing, "409": conflict, "503": busy}}}
    return paths


def rollout_schemas() -> dict[str, Any]:
    counts = {"type": "object", "properties": {s.value: {"type": "integer"} for s in GameState}}
    rollout = {"type": "object", "required": ["id", "target_version", "state", "games_by_state"], "properties": {
        "id": {"type": "integer"}, "target_version": {"type": "string"}, "target_image_ref": {"type": "string"},
        "source_version": {"type": "string", "nullable": True}, "state": _enum(RolloutState),
        "max_parallel": {"type": "integer"}, "canary": {"type": "integer"}, "canary_hold": {"type": "number"},
        "failure_budget": {"type": "integer"}, "on_failure": _enum(OnFailure), "force": {"type": "boolean"},
        "state_reason": {"type": "string"}, "created_at": _TIME, "updated_at": _TIME, "resumed_at": _NULL_TIME,
        "finished_at": _NULL_TIME, "games_by_state": counts}}
    game = {"type": "object", "required": ["game_id", "state", "reason"], "properties": {
        "game_id": {"type": "string"}, "position": {"type": "integer"}, "state": _enum(GameState),
        "canary": {"type": "boolean"}, "from_image_ref": {"type": "string", "nullable": True},
        "operation_id": {"type": "integer", "nullable": True},
        "back_operation_id": {"type": "integer", "nullable": True}, "reason": {"type": "string"},
        "started_at": _NULL_TIME, "finished_at": _NULL_TIME}}
    request = {"type": "object", "required": ["target_version"], "additionalProperties": False, "properties": {
        "target_version": _VERSION,
        "source_version": {**_VERSION, "description": "every live game on this version (or game_ids)"},
        "game_ids": {"type": "array", "minItems": 1, "maxItems": MAX_GAMES, "uniqueItems": True,
                     "items": {"type": "string", "pattern": GAME_ID_PATTERN.pattern, "maxLength": 51}},
        "max_parallel": {"type": "integer", "minimum": 1, "maximum": MAX_PARALLEL, "default": 1},
        "canary": {"type": "integer", "minimum": 0, "maximum": MAX_GAMES, "default": 0},
        "canary_hold": {"type": "number", "minimum": 0, "maximum": MAX_HOLD, "default": 60},
        "failure_budget": {"type": "integer", "minimum": 1, "maximum": MAX_GAMES, "default": 1},
        "on_failure": {**_enum(OnFailure), "default": "rollback"},
        "force": {"type": "boolean", "default": False,
                  "description": "each patch replaces the engine at once, even while it generates a turn"}}}
    return {"Rollout": rollout, "RolloutGame": game, "RolloutRequest": request,
            "RolloutDetail": {"allOf": [{"$ref": "#/components/schemas/Rollout"}, {"type": "object", "properties": {
                "games": {"type": "array", "items": {"$ref": "#/components/schemas/RolloutGame"}}}}]}}
