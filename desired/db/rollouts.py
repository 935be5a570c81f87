"""Rollouts in PostgreSQL: the ``rollouts`` row and one ``rollout_games`` row per game (the
decisions are desired/rollouts.py).

Every change of a game's row is written in the transaction of the decision it records: a patch (or
a stop, or a patch back) submitted through admission records its step on the row inside the
admission's own transaction (``record_step``, called by desired/db/submissions.py), so a kill at
any point leaves either the job and the row's new state, or neither. The unique index
``rollout_games_one_active_key`` keeps a game in at most one active rollout, whatever races.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from desired.db.base import StoreBase, log_fleet_change
from desired.db.pool import translating
from desired.db.rows import record_from_row
from desired.errors import Conflict, NotFound
from desired.jobs import Decision, ImageAllowlist, Job
from desired.model import ErrorCode, JobKind, OpStatus, RuntimeRecord
from desired.rollouts import (
    Action,
    GameState,
    InvalidRollout,
    OnFailure,
    OpView,
    Rollout,
    RolloutConflict,
    RolloutGame,
    RolloutRequest,
    RolloutState,
    allowed,
    skip_reason,
    step_outcome,
)
from desired.versions import VersionStatus

ROLLOUT_LOCK = 0x72746D72  # "rtmr": one rollout created at a time (a conflict is then named exactly)
FINAL = [s.value for s in GameState if s.is_final]


def rollout_from_row(row: asyncpg.Record) -> Rollout:
    return Rollout(
        id=row["id"], target_version=row["target_version"], target_image_ref=row["target_image_ref"],
        source_version=row["source_version"], state=RolloutState(row["state"]), max_parallel=row["max_parallel"],
        canary=row["canary"], canary_hold=row["canary_hold"], failure_budget=row["failure_budget"],
        on_failure=OnFailure(row["on_failure"]), force=row["force"], state_reason=row["state_reason"],
        created_at=row["created_at"], updated_at=row["updated_at"], resumed_at=row["resumed_at"],
        finished_at=row["finished_at"])


def game_from_row(row: asyncpg.Record) -> RolloutGame:
    return RolloutGame(
        rollout_id=row["rollout_id"], game_id=row["game_id"], position=row["position"], state=GameState(row["state"]),
        canary=row["canary"], from_image_ref=row["from_image_ref"], operation_id=row["operation_id"],
        back_operation_id=row["back_operation_id"], reason=row["reason"], started_at=row["started_at"],
        finished_at=row["finished_at"])


async def record_step(conn: asyncpg.Connection, job: Job, current: RuntimeRecord | None, decision: Decision,
                      op_id: int, now: Any) -> None:
    """The row of ``job.rollout``'s game takes the job's step, in the job's transaction (which holds
    the game's lock). Conflict (the whole transaction is rolled back: no job, no step) when the row is
    no longer in the state the step expects, a first patch finds its rollout no longer running
    (paused or aborted since) or its game no longer one to patch (another job moved or stopped it
    since the loop looked: the next tick skips it), or a patch back is not to the row's own
    ``from_image_ref``.

    Locks the rollout's row before the game's row, as every other writer of both does (steer,
    finish), so two of them never wait on each other."""
    step = job.rollout
    assert step is not None
    rollout = await conn.fetchrow("SELECT state, target_image_ref FROM rollouts WHERE id = $1 FOR UPDATE",
                                  step.rollout_id)
    row = await conn.fetchrow("SELECT state, from_image_ref FROM rollout_games WHERE rollout_id = $1 AND game_id = $2"
                              " FOR UPDATE", step.rollout_id, job.game_id)
    if rollout is None or row is None or row["state"] != step.expect.value:
        raise Conflict(f"rollout {step.rollout_id}: game {job.game_id} is no longer {step.expect.value}")
    first = step.expect is GameState.WAITING
    if first and rollout["state"] != RolloutState.RUNNING.value:
        raise Conflict(f"rollout {step.rollout_id} is {rollout['state']}: no new patch")
    if first and (why := skip_reason(current, rollout["target_image_ref"], row["from_image_ref"])) is not None:
        raise Conflict(f"rollout {step.rollout_id}: game {job.game_id}: {why}")
    if step.back and (job.kind is not JobKind.PATCH or job.image_ref != row["from_image_ref"]):
        raise Conflict(f"rollout {step.rollout_id}: game {job.game_id}: a patch back must be to "
                       f"{row['from_image_ref']}")
    state, reason = step_outcome(step, decision.action, decision.error_code, decision.message)
    canary = step.canary and first and decision.waits
    source = current.ran_image if current is not None else None
    await conn.execute(
        "UPDATE rollout_games SET state = $3, reason = $4, canary = canary OR $5,"
        " operation_id = CASE WHEN $6 THEN $7 ELSE operation_id END,"
        " from_image_ref = CASE WHEN $6 THEN coalesce(from_image_ref, $8) ELSE from_image_ref END,"
        " back_operation_id = CASE WHEN $11 THEN $7 ELSE back_operation_id END,"
        " started_at = coalesce(started_at, $9), finished_at = CASE WHEN $10 THEN $9 ELSE NULL END"
        " WHERE rollout_id = $1 AND game_id = $2",
        step.rollout_id, job.game_id, state.value, reason[:2000], canary, first, op_id, source, now, state.is_final,
        step.back and decision.waits)
    if job.kind is JobKind.PATCH and first:
        await conn.execute("UPDATE rollouts SET updated_at = $2 WHERE id = $1", step.rollout_id, now)


@translating
class Rollouts(StoreBase):
    """Create, read and steer rollouts; the loop's reads and writes."""

    async def create_rollout(self, req: RolloutRequest, allowlist: ImageAllowlist,
                             registry: bool, *, actor: str | None = None) -> tuple[Rollout, list[RolloutGame]]:
        """InvalidRollout (a bad version, an unknown game, no game to move) or RolloutConflict (a game
        another active rollout holds, named)."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLOUT_LOCK)
            target = await conn.fetchrow("SELECT * FROM engine_versions WHERE version = $1 FOR SHARE",
                                         req.target_version)
            if target is None:
                raise InvalidRollout(f"field target_version: no engine version {req.target_version}")
            status = VersionStatus(target["status"])
            if status is VersionStatus.DISABLED or (registry and status is not VersionStatus.ACTIVE):
                raise InvalidRollout(f"field target_version: engine version {req.target_version} is "
                                     f"{status.value} and takes no new games")
            image = target["image_ref"]
            if not allowlist.allows(image):
                raise InvalidRollout(f"field target_version: its image {image!r} is not allowed by "
                                     "RTMANAGER_IMAGE_ALLOWLIST")
            if req.source_version is not None:
                source = await conn.fetchrow("SELECT * FROM engine_versions WHERE version = $1",
                                             req.source_version)
                if source is None:
                    raise InvalidRollout(f"field source_version: no engine version {req.source_version}")
                rows = await conn.fetch(
                    "SELECT game_id FROM runtime_records WHERE status <> 'removed' AND desired_status <> 'removed'"
                    " AND coalesce(desired_image_ref, current_image_ref) = $1 ORDER BY game_id", source["image_ref"])
                games = [r["game_id"] for r in rows]
                if not games:
                    raise InvalidRollout(f"field source_version: no live game runs {req.source_version}")
            else:
                assert req.game_ids is not None
                games = list(req.game_ids)
                known = {r["game_id"] for r in await conn.fetch(
                    "SELECT game_id FROM runtime_records WHERE game_id = ANY($1::text[])", games)}
                unknown = [g for g in games if g not in known]
                if unknown:
                    raise InvalidRollout("field game_ids: no runtime for " + ", ".join(unknown[:10])
                                         + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
            held = await conn.fetch("SELECT game_id, rollout_id FROM rollout_games WHERE active AND"
                                    " game_id = ANY($1::text[]) ORDER BY game_id LIMIT 10", games)
            if held:
                raise RolloutConflict("games already in an active rollout: "
                                      + ", ".join(f"{r['game_id']} (rollout {r['rollout_id']})" for r in held))
            row = await conn.fetchrow(
                "INSERT INTO rollouts (target_version, target_image_ref, source_version, max_parallel, canary,"
                " canary_hold, failure_budget, on_failure, force, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING *",
                req.target_version, image, req.source_version, req.max_parallel, req.canary, req.canary_hold,
                req.failure_budget, req.on_failure.value, req.force, now)
            # Each game's image now, the one that ran (RuntimeRecord.ran_image): what a rollback returns to, and
            # how a game another job moves meanwhile (a patch still waiting for a turn boundary included) is
            # told from one still to patch (desired/rollouts.py skip_reason): never a patch that has not run.
            ran = {r["game_id"]: record_from_row(r).ran_image for r in await conn.fetch(
                "SELECT * FROM runtime_records WHERE game_id = ANY($1::text[])", games)}
            await conn.executemany(
                "INSERT INTO rollout_games (rollout_id, game_id, position, from_image_ref) VALUES ($1, $2, $3, $4)",
                [(row["id"], g, n, ran.get(g)) for n, g in enumerate(games, 1)])
            await log_fleet_change(conn, "rollout_create", {"rollout_id": row["id"], "target_version":
                                                            req.target_version, "games": len(games)}, actor)
            return rollout_from_row(row), await self._games(conn, row["id"])

    async def _games(self, conn: asyncpg.Connection | asyncpg.Pool, rollout_id: int) -> list[RolloutGame]:
        rows = await conn.fetch("SELECT * FROM rollout_games WHERE rollout_id = $1 ORDER BY position", rollout_id)
        return [game_from_row(r) for r in rows]

    async def get_rollout(self, rollout_id: int) -> tuple[Rollout, list[RolloutGame]]:
        row = await self.pool.fetchrow("SELECT * FROM rollouts WHERE id = $1", rollout_id)
        if row is None:
            raise NotFound(str(rollout_id))
        return rollout_from_row(row), await self._games(self.pool, rollout_id)

    async def list_rollouts(self, state: RolloutState | None = None,
                            limit: int = 100) -> list[tuple[Rollout, dict[str, int]]]:
        """Newest first, each with its games per state."""
        rows = await self.pool.fetch(
            "SELECT r.*, (SELECT coalesce(jsonb_object_agg(s, n), '{}') FROM (SELECT state AS s, count(*) AS n"
            " FROM rollout_games g WHERE g.rollout_id = r.id GROUP BY state) c) AS counts"
            " FROM rollouts r WHERE $1::text IS NULL OR r.state = $1 ORDER BY r.id DESC LIMIT $2",
            state.value if state else None, limit)
        out = []
        for r in rows:
            raw = r["counts"]
            found = json.loads(raw) if isinstance(raw, str) else dict(raw)
            out.append((rollout_from_row(r), {s.value: int(found.get(s.value, 0)) for s in GameState}))
        return out

    async def steer_rollout(self, rollout_id: int, action: Action, *, actor: str | None = None) -> Rollout:
        """pause, resume or abort. NotFound; RolloutConflict when the state refuses the action (a
        finished rollout cannot be resumed or paused). Abort skips the games not yet started; the
        patches in flight finish and are recorded by the loop."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow("SELECT * FROM rollouts WHERE id = $1 FOR UPDATE", rollout_id)
            if row is None:
                raise NotFound(str(rollout_id))
            cur = rollout_from_row(row)
            new = allowed(cur.state, action)
            if new is None:
                raise RolloutConflict(f"rollout {rollout_id} is {cur.state.value}: it cannot {action.value}")
            if new is cur.state:
                return cur
            reason = {Action.PAUSE: "paused by an operator", Action.RESUME: "",
                      Action.ABORT: "aborted by an operator"}[action]
            row = await conn.fetchrow(
                "UPDATE rollouts SET state = $2, state_reason = $3, updated_at = $4,"
                " resumed_at = CASE WHEN $5 THEN $4 ELSE resumed_at END WHERE id = $1 RETURNING *",
                rollout_id, new.value, reason, now, action is Action.RESUME)
            await log_fleet_change(conn, f"rollout_{action.value}", {"rollout_id": rollout_id}, actor)
            if action is Action.ABORT:
                await conn.execute(
                    "UPDATE rollout_games SET state = 'skipped', reason = 'the rollout was aborted before its turn',"
                    " finished_at = $2, active = false WHERE rollout_id = $1 AND state = 'waiting'", rollout_id, now)
                await conn.execute("UPDATE rollout_games SET active = false WHERE rollout_id = $1 AND state = ANY($2)",
                                   rollout_id, FINAL)
            return rollout_from_row(row)

    # ------------------------------------------------------------------ the loop's
    async def unfinished_rollouts(self) -> list[tuple[Rollout, list[RolloutGame]]]:
        """Every rollout the loop still has work for: running, paused, or ended with patches in flight."""
        rows = await self.pool.fetch("SELECT * FROM rollouts WHERE finished_at IS NULL ORDER BY id")
        return [(rollout_from_row(r), await self._games(self.pool, r["id"])) for r in rows]

    async def rollout_operations(self, op_ids: list[int]) -> dict[int, OpView]:
        rows = await self.pool.fetch("SELECT id, status, error_code, error_message, finished_at"
                                     " FROM runtime_operations WHERE id = ANY($1::bigint[])", op_ids)
        return {r["id"]: OpView(status=OpStatus(r["status"]),
                                error_code=ErrorCode(r["error_code"]) if r["error_code"] else None,
                                error_message=r["error_message"] or "", finished_at=r["finished_at"]) for r in rows}

    async def settle_rollout_game(self, rollout_id: int, game_id: str, expect: GameState, state: GameState,
                                  reason: str) -> bool:
        """The game's row goes from ``expect`` to ``state`` (False: it was no longer ``expect``)."""
        async with self._tx() as (conn, now):
            done = await conn.fetchval(
                "UPDATE rollout_games g SET state = $4, reason = $5,"
                " finished_at = CASE WHEN $6 THEN $7 ELSE g.finished_at END,"
                " started_at = CASE WHEN $4 = 'waiting' THEN g.started_at ELSE coalesce(g.started_at, $7) END,"
                " active = g.active AND NOT ($6 AND (SELECT r.state IN ('completed', 'aborted') FROM rollouts r"
                "   WHERE r.id = g.rollout_id))"
                " WHERE g.rollout_id = $1 AND g.game_id = $2 AND g.state = $3 RETURNING 1",
                rollout_id, game_id, expect.value, state.value, reason[:2000], state.is_final, now)
            return bool(done)

    async def pause_rollout(self, rollout_id: int, reason: str) -> bool:
        """The rollout pauses itself (a failure budget spent, a canary failed); False when it was not running."""
        async with self._tx() as (conn, now):
            return bool(await conn.fetchval(
                "UPDATE rollouts SET state = 'paused', state_reason = $2, updated_at = $3 WHERE id = $1"
                " AND state = 'running' RETURNING 1", rollout_id, reason[:2000], now))

    async def finish_rollout(self, rollout_id: int) -> bool:
        """A running rollout with nothing left becomes completed; an aborted one with no patch in flight
        is finished. Its games are released (another rollout may take them)."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow("SELECT state FROM rollouts WHERE id = $1 AND finished_at IS NULL FOR UPDATE",
                                      rollout_id)
            if row is None:
                return False
            if await conn.fetchval("SELECT 1 FROM rollout_games WHERE rollout_id = $1 AND state IN"
                                   " ('waiting', 'in_progress') LIMIT 1", rollout_id):
                return False
            if row["state"] not in ("running", "aborted"):
                return False
            await conn.execute(
                "UPDATE rollouts SET state = CASE WHEN state = 'running' THEN 'completed' ELSE state END,"
                " state_reason = CASE WHEN state = 'running' THEN '' ELSE state_reason END,"
                " updated_at = $2, finished_at = $2 WHERE id = $1", rollout_id, now)
            await conn.execute("UPDATE rollout_games SET active = false WHERE rollout_id = $1", rollout_id)
            return True

    async def rollout_gauges(self) -> tuple[dict[str, int], dict[str, int]]:
        """Rollouts by state (all), and games by state (of the rollouts not finished)."""
        rollouts = {r["state"]: r["n"] for r in await self.pool.fetch(
            "SELECT state, count(*) AS n FROM rollouts GROUP BY state")}
        games = {r["state"]: r["n"] for r in await self.pool.fetch(
            "SELECT g.state, count(*) AS n FROM rollout_games g JOIN rollouts r ON r.id = g.rollout_id"
            " WHERE r.finished_at IS NULL GROUP BY g.state")}
        return rollouts, games
