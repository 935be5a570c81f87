"""The OpenAPI 3.0 document of the internal REST API, served at /api/v1/openapi.json.

Built from the same enums and patterns the code validates with, so the
document cannot drift from the behaviour; schemathesis checks the server
against it (tests/integration/test_http.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum
from typing import Any

from controller.access import required_role
from controller.drains_api import openapi_parts
from controller.engine_openapi import engine_paths
from controller.rollouts_openapi import rollout_paths, rollout_schemas
from controller.tokens import Role
from controller.watch_openapi import watch_paths
from desired.jobs import MAX_IMAGE_REF, MAX_REQUESTED_BY, MAX_TURN_INTERVAL
from desired.model import (
    GAME_ID_PATTERN,
    DesiredStatus,
    ErrorCode,
    Health,
    JobKind,
    OpSource,
    OpStatus,
    Outcome,
    Status,
    StopReason,
)
from desired.paging import MAX_PAGE
from desired.values import FLEET_OPS
from desired.versions import MAX_NOTES, MAX_STOP_GRACE, VERSION_PATTERN, VersionStatus

# The jobs the REST API takes, by their path (``turn`` is the turn clock's own).
REST_JOBS: dict[str, JobKind] = {
    "start": JobKind.START, "stop": JobKind.STOP, "restart": JobKind.RESTART, "patch": JobKind.PATCH,
    "cleanup": JobKind.CLEANUP, "pause": JobKind.PAUSE, "resume": JobKind.RESUME,
    "force-next-turn": JobKind.FORCE_NEXT_TURN, "reconcile": JobKind.RECONCILE,
}
# The jobs that take ``force``: their disruption of the engine does not wait for a turn generation.
FORCEABLE = (JobKind.STOP, JobKind.RESTART, JobKind.PATCH, JobKind.CLEANUP)
_FORCE = {"type": "boolean", "description": "true: stop or replace the engine at once, even while it generates "
                                           "a turn (no wait of RTMANAGER_DISRUPTION_WAIT)"}
_STOP_GRACE = {"type": "integer", "minimum": 0, "maximum": MAX_STOP_GRACE, "nullable": True,
               "description": "seconds between SIGTERM and SIGKILL when an engine of this version is stopped "
                              "(null: RTMANAGER_STOP_GRACE)"}
_NULLABLE_STR = {"type": "string", "nullable": True}
# the operation log's ops: a job's, and the engine-version registry's changes (no game)
LOG_OPS = [k.value for k in JobKind] + list(FLEET_OPS)
MAX_ACTOR = 200  # runtime_operations.actor (migration 0020)
ACTOR_PATTERN = re.compile(f"[!-~]{{1,{MAX_ACTOR}}}")  # token:NAME, stream:STREAM, cli:USER
_REQUESTED_BY = {"type": "string", "minLength": 1, "maxLength": MAX_REQUESTED_BY,
                 "description": "on whose behalf (a user, a service): printable text written to the operation "
                                "log with the token's name; it grants nothing"}
_ACTOR = {"type": "string", "nullable": True,
          "description": "who asked: token:NAME (a REST call, the API token's name), stream:STREAM (a job entry), "
                         "null (rtmanager on its own: see source)"}
_NULLABLE_TIME = {"type": "string", "format": "date-time", "nullable": True}


def _enum(values: Iterable[Enum]) -> dict[str, Any]:
    return {"type": "string", "enum": [v.value for v in values]}


def openapi_document() -> dict[str, Any]:
    game_id = {"name": "game_id", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": GAME_ID_PATTERN.pattern, "maxLength": 51}}
    wait = {"name": "wait", "in": "query", "required": False,
            "description": "seconds to wait for the job's result (default 30)",
            "schema": {"type": "number", "minimum": 0, "maximum": 300}}
    key = {"name": "Idempotency-Key", "in": "header", "required": False,
           "description": "a key of the caller's choosing: the same key sent again by the same token (a retry "
                          "after a lost answer) is the same job; its first operation is answered, with the "
                          "header Idempotent-Replayed: true, and nothing is asked twice. Another request under a "
                          "key the token used already is refused (422). Kept as long as the operation log keeps "
                          "the operation",
           "schema": {"type": "string", "pattern": "^\"?[A-Za-z0-9._:~+/=-]{1,128}\"?$"}}
    errors = {
        "400": {"description": "invalid request", "content": {"application/json": {
            "schema": {"oneOf": [{"$ref": "#/components/schemas/JobResult"},
                                 {"$ref": "#/components/schemas/Error"}]}}}},
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "503": {"$ref": "#/components/responses/Unavailable"},
    }
    image_body = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["image_ref"],
        "properties": {"image_ref": {"type": "string", "minLength": 1, "maxLength": MAX_IMAGE_REF},
                       "force": _FORCE, "requested_by": _REQUESTED_BY}}}}}
    interval = {"type": "integer", "minimum": 0, "maximum": MAX_TURN_INTERVAL,
                "description": "seconds between scheduled turns (0: no schedule)"}
    start_body = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["image_ref"],
        "properties": {"image_ref": {"type": "string", "minLength": 1, "maxLength": MAX_IMAGE_REF},
                       "turn_interval": interval, "requested_by": _REQUESTED_BY}}}}}
    stop_body = {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"reason": _enum(StopReason), "force": _FORCE,
                                         "requested_by": _REQUESTED_BY}}}}}
    empty_body = {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"requested_by": _REQUESTED_BY}}}}}
    force_body = {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"force": _FORCE, "requested_by": _REQUESTED_BY}}}}}
    bodies = {kind: force_body if kind in FORCEABLE else empty_body for kind in REST_JOBS.values()}
    bodies.update({JobKind.START: start_body, JobKind.PATCH: image_body, JobKind.STOP: stop_body})

    paths: dict[str, Any] = {
        "/api/v1/runtimes": {"get": {
            "operationId": "listRuntimes",
            "summary": "List runtime records by game_id, a page at a time (pass next back as cursor)",
            "parameters": [
                {"name": "status", "in": "query", "required": False, "schema": _enum(Status)},
                {"name": "engine_version", "in": "query", "required": False,
                 "description": "only games on this registered engine version",
                 "schema": {"type": "string", "pattern": VERSION_PATTERN.pattern}},
                {"name": "node", "in": "query", "required": False,
                 "description": "only games whose state lives on this Swarm node (its id)",
                 "schema": {"type": "string", "minLength": 1, "maxLength": 128}},
                {"name": "limit", "in": "query", "required": False,
                 "description": f"records per page (default and maximum {MAX_PAGE})",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
                {"name": "cursor", "in": "query", "required": False,
                 "description": "the next of the previous page (opaque); absent: the first page",
                 "schema": {"type": "string", "minLength": 1}}],
            "responses": {"200": {"description": "a page of runtime records", "content": {"application/json": {
                "schema": {"type": "object", "required": ["runtimes", "next"], "properties": {
                    "runtimes": {"type": "array", "items": {"$ref": "#/components/schemas/Runtime"}},
                    "next": {"type": "string", "nullable": True,
                             "description": "the cursor of the next page; null on the last page"}}}}}},
                "400": {"$ref": "#/components/responses/BadRequest"},
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "503": {"$ref": "#/components/responses/Unavailable"}}}},
        "/api/v1/runtimes/{game_id}": {"get": {
            "operationId": "getRuntime", "summary": "One runtime record, with its current health",
            "parameters": [game_id],
            "responses": {"200": {"description": "the record", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Runtime"}}}},
                "400": {"$ref": "#/components/responses/BadRequest"},
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "404": {"$ref": "#/components/responses/NotFound"},
                "503": {"$ref": "#/components/responses/Unavailable"}}}},
        "/api/v1/runtimes/{game_id}/operations": {"get": {
            "operationId": "listOperations", "summary": "The operation log of a game, newest first",
            "parameters": [game_id],
            "responses": {"200": {"description": "operations", "content": {"application/json": {"schema": {
                "type": "object", "required": ["operations"], "properties": {
                    "operations": {"type": "array", "items": {"$ref": "#/components/schemas/Operation"}}}}}}},
                "400": {"$ref": "#/components/responses/BadRequest"},
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "503": {"$ref": "#/components/responses/Unavailable"}}}},
    }
    paths["/api/v1/operations"] = {"get": {
        "operationId": "operationLog",
        "summary": "The operation log of every game and of the engine-version registry, newest first, with who "
                   "asked",
        "parameters": [
            {"name": "before", "in": "query", "required": False, "description": "ids below this (the answer's next)",
             "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}},
            {"name": "limit", "in": "query", "required": False, "description": "at most this many (default 100)",
             "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
            {"name": "game_id", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": GAME_ID_PATTERN.pattern, "maxLength": 51}},
            {"name": "actor", "in": "query", "required": False, "description": "token:NAME or stream:STREAM",
             "schema": {"type": "string", "pattern": f"^{ACTOR_PATTERN.pattern}$"}},
            {"name": "op", "in": "query", "required": False, "schema": {"type": "string", "enum": LOG_OPS}}],
        "responses": {"200": {"description": "operations", "content": {"application/json": {"schema": {
            "type": "object", "required": ["operations", "next"], "properties": {
                "operations": {"type": "array", "items": {"$ref": "#/components/schemas/LogEntry"}},
                "next": {"type": "integer", "nullable": True,
                         "description": "before= of the next page; null: this is the last"}}}}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "503": {"$ref": "#/components/responses/Unavailable"}}}}
    paths["/api/v1/whoami"] = {"get": {
        "operationId": "whoami",
        "summary": "The request's token: its name, its role and the calls that role may make (the console "
                   "shows an action only to a token allowed to take it)",
        "responses": {"200": {"description": "the token", "content": {"application/json": {"schema": {
            "type": "object", "required": ["name", "role", "operate", "admin", "allowed"], "properties": {
                "name": {"type": "string"},
                "role": {"type": "string", "enum": ["read", "operate", "admin"]},
                "operate": {"type": "boolean", "description": "the role may act on games (jobs, schedules)"},
                "admin": {"type": "boolean", "description": "the role may change versions, rollouts, drains"},
                "allowed": {"type": "array", "items": {"type": "object", "required": ["method", "path"],
                                                       "properties": {"method": {"type": "string"},
                                                                      "path": {"type": "string"}}}}}}}}},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "503": {"$ref": "#/components/responses/Unavailable"}}}}
    paths["/api/v1/snapshots/resync"] = {"post": {
        "operationId": "resyncSnapshots",
        "summary": "Publish a snapshot (reason resync, a new revision) of every live game, or of one",
        "parameters": [{"name": "game_id", "in": "query", "required": False,
                        "schema": {"type": "string", "pattern": GAME_ID_PATTERN.pattern, "maxLength": 51}}],
        "responses": {"200": {"description": "how many snapshots were written", "content": {"application/json": {
            "schema": {"type": "object", "required": ["snapshots"],
                       "properties": {"snapshots": {"type": "integer"}}}}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "404": {"$ref": "#/components/responses/NotFound"},
            "503": {"$ref": "#/components/responses/Unavailable"}}}}
    paths["/api/v1/runtimes/{game_id}/schedule"] = {"put": {
        "operationId": "setSchedule", "summary": "Set the turn clock's interval of a game (0: no schedule)",
        "parameters": [game_id],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["turn_interval"], "properties": {"turn_interval": interval}}}}},
        "responses": {"200": {"description": "the record", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Runtime"}}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "404": {"$ref": "#/components/responses/NotFound"},
            "409": {"$ref": "#/components/responses/BadRequest"},
            "503": {"$ref": "#/components/responses/Unavailable"}}}}
    version = {"name": "version", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": VERSION_PATTERN.pattern}}
    v_status = _enum(VersionStatus)
    v_ref = {"$ref": "#/components/schemas/EngineVersion"}
    bad, auth, busy, missing, conflict = ({"$ref": f"#/components/responses/{n}"} for n in
                                          ("BadRequest", "Unauthorized", "Unavailable", "NotFound", "Conflict"))
    paths["/api/v1/admin/engine-versions"] = {
        "get": {"operationId": "listEngineVersions", "summary": "The engine-version registry",
                "parameters": [{"name": "status", "in": "query", "required": False, "schema": v_status}],
                "responses": {"200": {"description": "entries", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["engine_versions"],
                    "properties": {"engine_versions": {"type": "array", "items": v_ref}}}}}},
                    "400": bad, "401": auth, "503": busy}},
        "post": {"operationId": "createEngineVersion",
                 "summary": "Register an engine version (409 names the unique constraint that was violated)",
                 "parameters": [{"name": "pull", "in": "query", "required": False,
                                 "description": "1: pull the image before registering it",
                                 "schema": {"type": "string", "enum": ["0", "1"]}}],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["version", "image_ref"], "additionalProperties": False,
                     "properties": {"version": {"type": "string", "pattern": VERSION_PATTERN.pattern},
                                    "image_ref": {"type": "string", "minLength": 1, "maxLength": MAX_IMAGE_REF},
                                    "status": v_status, "notes": {"type": "string", "maxLength": MAX_NOTES},
                                    "stop_grace": _STOP_GRACE}}}}},
                 "responses": {"201": {"description": "registered", "content": {"application/json": {
                     "schema": v_ref}}}, "400": bad, "401": auth, "409": conflict, "503": busy}},
    }
    paths["/api/v1/admin/engine-versions/{version}"] = {
        "get": {"operationId": "getEngineVersion", "summary": "One entry, with the number of live games on it",
                "parameters": [version],
                "responses": {"200": {"description": "the entry", "content": {"application/json": {
                    "schema": v_ref}}}, "400": bad, "401": auth, "404": missing, "503": busy}},
        "patch": {"operationId": "updateEngineVersion",
                  "summary": "Change status, notes or stop_grace (image_ref is immutable)",
                  "parameters": [version],
                  "requestBody": {"required": True, "content": {"application/json": {"schema": {
                      "type": "object", "additionalProperties": False,
                      "properties": {"status": v_status, "notes": {"type": "string", "maxLength": MAX_NOTES},
                                     "stop_grace": _STOP_GRACE}}}}},
                  "responses": {"200": {"description": "the entry", "content": {"application/json": {
                      "schema": v_ref}}}, "400": bad, "401": auth, "404": missing, "503": busy}},
        "delete": {"operationId": "deleteEngineVersion",
                   "summary": "Remove an entry (409 while a game that is not removed uses it)",
                   "parameters": [version],
                   "responses": {"204": {"description": "removed"}, "400": bad, "401": auth, "404": missing,
                                 "409": conflict, "503": busy}},
    }
    for path, kind in REST_JOBS.items():
        paths[f"/api/v1/runtimes/{{game_id}}/{path}"] = {"post": {
            "operationId": f"{path.replace('-', '_')}Runtime",
            "summary": f"A {kind.value} job: changes desired state like a stream job, waits for its result",
            "parameters": [game_id, wait, key],
            "requestBody": bodies[kind],
            "responses": {
                "200": {"description": "the job's result (outcome success or failure)", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/JobResultWithOperation"}}}},
                "202": {"description": "accepted; the wait ran out before the result", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                "422": {"description": "the Idempotency-Key was used by this token for another request",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                **errors}}}

    drain_paths, drain_schemas = openapi_parts()
    paths.update(drain_paths)
    paths.update(rollout_paths())
    paths.update(watch_paths())
    paths.update(engine_paths())

    result_props = {
        "game_id": {"type": "string"}, "outcome": _enum(Outcome), "container_id": {"type": "string"},
        "engine_endpoint": {"type": "string"},
        "error_code": {"type": "string", "enum": [""] + [c.value for c in ErrorCode]},
        "error_message": {"type": "string"}, "job": _enum(JobKind), "job_entry_id": {"type": "string"},
        "result_id": {"type": "string"},
    }
    for path, methods in paths.items():  # every route: its role, and 403 for a token without it
        for method, operation in methods.items():
            role = required_role(method.upper(), path)
            needs = ("No token may call this." if role is None else
                     f"Only a token with the role {role.label} may call this." if role is Role.GATEWAY else
                     f"Needs a token with the role {role.label} or above.")
            operation["description"] = f"{operation['description']} {needs}" if "description" in operation else needs
            operation["responses"].setdefault("403", {"$ref": "#/components/responses/Forbidden"})
    return {
        "openapi": "3.0.3",
        "info": {"title": "rtmanager internal API", "version": "1",
                 "description": "Runtime Manager of the Galaxy platform. Every /api/v1 call needs "
                                "`Authorization: Bearer <token>`: RTMANAGER_API_TOKEN (admin) or a named token of "
                                "RTMANAGER_API_TOKENS_FILE whose role (read, operate, admin; gateway for the engine "
                                "pass-through only) the route allows "
                                "(403 otherwise). Each route's role is in its description."},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "BadRequest": {"description": "invalid request", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
                "Unauthorized": {"description": "missing or wrong bearer token", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
                "Forbidden": {"description": "the token's role does not allow this route", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "NotFound": {"description": "no such runtime", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
                "Conflict": {"description": "conflicts with what exists", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
                "Unavailable": {"description": "REST API disabled, or this replica is a standby",
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "JobResult": {"type": "object", "required": list(result_props), "properties": result_props},
                "JobResultWithOperation": {"allOf": [
                    {"$ref": "#/components/schemas/JobResult"},
                    {"type": "object", "required": ["operation_id"],
                     "properties": {"operation_id": {"type": "integer"}}}]},
                "Accepted": {"type": "object", "required": ["operation_id", "status", "game_id", "job"],
                             "properties": {"operation_id": {"type": "integer"}, "status": _enum(OpStatus),
                                            "game_id": {"type": "string"}, "job": _enum(JobKind)}},
                "Runtime": {"type": "object", "required": ["game_id", "status", "desired_status", "generation",
                                                           "observed_generation", "health"],
                            "properties": {
                                "game_id": {"type": "string"}, "status": _enum(Status),
                                "current_container_id": _NULLABLE_STR, "current_image_ref": _NULLABLE_STR,
                                "engine_endpoint": {"type": "string"}, "state_path": {"type": "string"},
                                "docker_network": {"type": "string"}, "started_at": _NULLABLE_TIME,
                                "stopped_at": _NULLABLE_TIME, "removed_at": _NULLABLE_TIME,
                                "last_op_at": {"type": "string", "format": "date-time"},
                                "created_at": {"type": "string", "format": "date-time"},
                                "desired_status": _enum(DesiredStatus), "desired_image_ref": _NULLABLE_STR,
                                "generation": {"type": "integer"}, "observed_generation": {"type": "integer"},
                                "spec_revision": {"type": "integer"},
                                "stop_reason": {**_enum(StopReason), "nullable": True},
                                "health": _enum(Health),
                                "last_error_code": {**_enum(ErrorCode), "nullable": True},
                                "last_error_message": _NULLABLE_STR, "crash_count": {"type": "integer"},
                                "last_exit_code": {"type": "integer", "nullable": True},
                                "last_oom_killed": {"type": "boolean"}, "last_crash_at": _NULLABLE_TIME,
                                "restart_not_before": _NULLABLE_TIME, "health_checked_at": _NULLABLE_TIME,
                                "rollback_image_ref": _NULLABLE_STR, "rolling_back": {"type": "boolean"},
                                "state_bytes": {"type": "integer", "nullable": True,
                                                "description": "bytes the state directory uses on disk, as "
                                                "last measured (GET /api/v1/runtimes/{game_id} only)"},
                                "state_measured_at": _NULLABLE_TIME,
                                "turn": {"type": "integer", "nullable": True},
                                "phase": {"type": "string", "enum": ["idle", "generating", "finished"],
                                          "nullable": True},
                                "admin_api": {"type": "boolean", "nullable": True},
                                "probe_failures": {"type": "integer"}, "unreachable_since": _NULLABLE_TIME,
                                "generation_started_at": _NULLABLE_TIME, "last_turn_at": _NULLABLE_TIME,
                                "snapshot_revision": {"type": "integer"}, "paused": {"type": "boolean"},
                                "turn_interval": {"type": "integer"},
                                "desired_turn": {"type": "integer", "nullable": True},
                                "clock_from": _NULLABLE_TIME, "engine_version": {"type": "string"},
                                "node_id": _NULLABLE_STR, "disruption_wait_since": _NULLABLE_TIME,
                                "force_generation": {"type": "integer", "nullable": True},
                                "disruption_until": _NULLABLE_TIME,
                                "disruption_generation": {"type": "integer", "nullable": True},
                                "node_lost_since": _NULLABLE_TIME, "stopping_since": _NULLABLE_TIME,
                                "stopping_unit": _NULLABLE_STR,
                                "disruption_wait_turn": {"type": "integer", "nullable": True},
                                "avoid_nodes": {"type": "array", "items": {"type": "string"}}}},
                "EngineVersion": {"type": "object",
                                  "required": ["version", "image_ref", "status", "notes", "created_at", "updated_at",
                                               "image_present"],
                                  "properties": {
                                      "version": {"type": "string"}, "image_ref": {"type": "string"},
                                      "status": _enum(VersionStatus), "notes": {"type": "string"},
                                      "created_at": {"type": "string", "format": "date-time"},
                                      "updated_at": {"type": "string", "format": "date-time"},
                                      "image_present": {"type": "boolean", "nullable": True},
                                      "stop_grace": _STOP_GRACE,
                                      "live_games": {"type": "integer"}}},
                **drain_schemas,
                "Operation": {"type": "object", "required": ["id", "game_id", "op", "source", "status"],
                              "properties": {
                                  "id": {"type": "integer"}, "game_id": {"type": "string"}, "op": _enum(JobKind),
                                  "source": _enum(OpSource), "status": _enum(OpStatus),
                                  "generation": {"type": "integer"}, "stream": _NULLABLE_STR,
                                  "entry_id": _NULLABLE_STR, "params": {"type": "object"},
                                  "error_code": _NULLABLE_STR, "error_message": _NULLABLE_STR,
                                  "created_at": {"type": "string", "format": "date-time"},
                                  "finished_at": _NULLABLE_TIME, "actor": _ACTOR,
                                  "requested_by": _NULLABLE_STR}},
                "LogEntry": {"type": "object", "required": ["id", "game_id", "op", "source", "status", "actor"],
                             "properties": {
                                 "id": {"type": "integer"},
                                 "game_id": {"type": "string", "nullable": True,
                                             "description": "null for a change of the version registry, "
                                                            "a drain or a rollout"},
                                 "op": {"type": "string", "enum": LOG_OPS},
                                 "source": _enum(OpSource), "status": _enum(OpStatus),
                                 "generation": {"type": "integer"}, "stream": _NULLABLE_STR,
                                 "entry_id": _NULLABLE_STR,
                                 "params": {"type": "object", "description": "a registry change: its version, and "
                                            "what changed"},
                                 "error_code": _NULLABLE_STR, "error_message": _NULLABLE_STR,
                                 "created_at": {"type": "string", "format": "date-time"},
                                 "finished_at": _NULLABLE_TIME, "actor": _ACTOR,
                                 "requested_by": _NULLABLE_STR}},
                **rollout_schemas(),
            },
        },
    }
