"""Drains in PostgreSQL: the ``drains`` rows an operator writes (REST, CLI), the ``drain_games`` rows
the leader's drain loop writes as it takes games, and the one record change a drain makes by itself
(``take_move``: the game's pin cleared and its spec revised, in the same transaction as its row).
The decisions are desired/drains.py."""

from __future__ import annotations

import builtins
from typing import Any

import asyncpg

from desired import drains, transitions
from desired.db.base import StoreBase, log_fleet_change
from desired.db.notifications import NOTIFY_CHANNEL
from desired.db.pool import translating
from desired.db.rows import GAME_LOCK_SPACE, SELECT_FOR_UPDATE, record_from_row
from desired.drains import (
    Drain,
    DrainAction,
    DrainExists,
    DrainGame,
    DrainRequest,
    DrainStatus,
    GameState,
    StepKind,
    Targets,
)
from desired.errors import Conflict, NotFound
from desired.jobs import Decision, DecisionAction, Job
from desired.model import DesiredStatus, JobKind, OpSource, OpStatus, RuntimeRecord, Status


def drain_from_row(row: asyncpg.Record) -> Drain:
    return Drain(id=row["id"], node=row["node"], max_parallel=row["max_parallel"], deadline_at=row["deadline_at"],
                 on_deadline=drains.OnDeadline(row["on_deadline"]),
                 local_state=drains.LocalState(row["local_state"]) if row["local_state"] else None,
                 state_shared=row["state_shared"], status=DrainStatus(row["status"]), source=row["source"],
                 created_at=row["created_at"], drained_at=row["drained_at"], undrain_at=row["undrain_at"],
                 undrained_at=row["undrained_at"], note=row["note"])


def game_from_row(row: asyncpg.Record) -> DrainGame:
    return DrainGame(drain_id=row["drain_id"], game_id=row["game_id"], action=DrainAction(row["action"]),
                     state=GameState(row["state"]), generation=row["generation"], taken_at=row["taken_at"],
                     forced=row["forced"], image_ref=row["image_ref"], paused=row["paused"],
                     turn_interval=row["turn_interval"], from_node=row["from_node"], to_node=row["to_node"],
                     op_id=row["op_id"], note=row["note"], done_at=row["done_at"])


async def refusing_targets(conn: asyncpg.Connection) -> Targets:
    """What the refusing drains keep out of use, read in the caller's transaction (admission)."""
    rows = await conn.fetch("SELECT node, state_shared FROM drains WHERE status IN ('draining', 'drained')")
    return Targets(host=any(r["node"] is None for r in rows),
                   nodes=frozenset(r["node"] for r in rows if r["node"] is not None),
                   shared=frozenset(r["node"] for r in rows if r["node"] is not None and r["state_shared"]))


# Somebody else's stop: a stop or cleanup of the game after the operation that took it, not tagged with
# this drain's id (a row without op_id, written before it was recorded so, counts from when it was taken).
_SOMEBODY_ELSES = (
    " o.game_id = g.game_id AND o.op IN ('stop', 'cleanup')"
    " AND (o.id > g.op_id OR (g.op_id IS NULL AND o.created_at >= g.taken_at))"
    " AND (o.params ->> 'drain_id') IS DISTINCT FROM g.drain_id::text")


async def record_drain_step(conn: asyncpg.Connection, job: Job, current: RuntimeRecord | None, decision: Decision,
                            op_id: int, now: Any) -> None:
    """The row of ``job.drain``'s game takes the job's step, in the job's transaction (which holds the
    game's lock). Conflict (the whole transaction is rolled back: no job, no row change) when:

    * a take finds the drain no longer draining, the game's row already there, or the record no longer
      what the plan saw (another generation, no longer wanted running, or off the drained target) -- or
      its stop would change nothing (another stop came first): the next tick looks again;
    * a stop asked again finds no row in progress;
    * a restore finds the row settled, or somebody else's stop since the take (the next tick skips it).

    Only the take records the operation (``op_id``); a stop asked again never moves it."""
    step = job.drain
    assert step is not None
    drain = await conn.fetchrow("SELECT node, status FROM drains WHERE id = $1 FOR SHARE", step.drain_id)
    row = await conn.fetchrow("SELECT * FROM drain_games WHERE drain_id = $1 AND game_id = $2 FOR UPDATE",
                              step.drain_id, job.game_id)
    if drain is None:
        raise Conflict(f"no drain {step.drain_id}")
    if step.kind is StepKind.TAKE:
        if drain["status"] != DrainStatus.DRAINING.value or row is not None:
            raise Conflict(f"drain {step.drain_id}: {job.game_id} is taken already, or the drain no longer drains")
        if (current is None or current.generation != step.generation
                or current.desired_status is not DesiredStatus.RUNNING or current.status is Status.REMOVED
                or (drain["node"] is not None and current.node_id != drain["node"])):
            raise Conflict(f"drain {step.drain_id}: {job.game_id} changed since the drain looked")
        if decision.action is not DecisionAction.CHANGE or decision.record is None:
            raise Conflict(f"drain {step.drain_id}: the stop of {job.game_id} would change nothing")
        await conn.execute(_INSERT_GAME, step.drain_id, job.game_id, DrainAction.STOP.value,
                           step.forced, current.stop_image, current.paused,
                           current.turn_interval, current.node_id, decision.record.generation, now)
        await conn.execute("UPDATE drain_games SET op_id = $3 WHERE drain_id = $1 AND game_id = $2",
                           step.drain_id, job.game_id, op_id)
        return
    if row is None:
        raise Conflict(f"drain {step.drain_id}: {job.game_id} was never taken")
    if step.kind is StepKind.AGAIN:
        if row["state"] != GameState.IN_PROGRESS.value:
            raise Conflict(f"drain {step.drain_id}: {job.game_id} is {row['state']}")
        changed = decision.action is DecisionAction.CHANGE and decision.record is not None
        await conn.execute(
            "UPDATE drain_games SET forced = forced OR $3, generation = CASE WHEN $4 THEN $5 ELSE generation END"
            " WHERE drain_id = $1 AND game_id = $2", step.drain_id, job.game_id, step.forced, changed,
            decision.record.generation if changed and decision.record else 0)
        return
    # a restore
    if row["state"] not in (GameState.IN_PROGRESS.value, GameState.DONE.value):
        raise Conflict(f"drain {step.drain_id}: {job.game_id} is {row['state']} already")
    if await conn.fetchval("SELECT 1 FROM drain_games g JOIN runtime_operations o ON" + _SOMEBODY_ELSES
                           + " WHERE g.drain_id = $1 AND g.game_id = $2 LIMIT 1", step.drain_id, job.game_id):
        raise Conflict(f"drain {step.drain_id}: {job.game_id} was stopped by another job since")
    if decision.action is DecisionAction.REJECT:
        state, note = GameState.SKIPPED, f"not started again: {decision.message}"
    elif decision.action is DecisionAction.CHANGE:
        state, note = GameState.RESTORED, "started again" + (f" on node {step.pin}" if step.pin else "")
    else:
        state, note = GameState.RESTORED, "wanted running again"
    await conn.execute("UPDATE drain_games SET state = $3, note = $4 WHERE drain_id = $1 AND game_id = $2",
                       step.drain_id, job.game_id, state.value, note[:2000])


_INSERT_GAME = (
    "INSERT INTO drain_games (drain_id, game_id, action, state, forced, image_ref, paused, turn_interval, from_node,"
    " generation, taken_at) VALUES ($1, $2, $3, 'in_progress', $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (drain_id, game_id) DO UPDATE SET forced = drain_games.forced OR excluded.forced")


@translating
class Drains(StoreBase):
    """Drain rows, and the record change of a move."""

    # ----------------------------------------------------------------- operators
    async def create_drain(self, request: DrainRequest, source: OpSource, *, actor: str | None = None) -> Drain:
        """DrainExists when the target has an active drain (the unique index decides, so two racing
        requests give one drain)."""
        try:
            async with self._tx() as (conn, now):
                row = await conn.fetchrow(
                    "INSERT INTO drains (node, max_parallel, deadline_at, on_deadline, local_state, state_shared,"
                    " status, source, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'draining', $7, $8) RETURNING *",
                    request.node, request.max_parallel, drains.deadline_of(request, now), request.on_deadline.value,
                    request.local_state.value if request.local_state else None, request.state_shared,
                    source.value, now)
                await log_fleet_change(conn, "drain_create", {"drain_id": row["id"], "target": row["node"] or "host"},
                                       actor)
        except asyncpg.exceptions.UniqueViolationError:
            raise DrainExists("the host" if request.node is None else f"node {request.node}") from None
        return drain_from_row(row)

    async def list_drains(self, limit: int = 100) -> builtins.list[Drain]:
        rows = await self.pool.fetch("SELECT * FROM drains ORDER BY id DESC LIMIT $1", limit)
        return [drain_from_row(r) for r in rows]

    async def get_drain(self, drain_id: int) -> tuple[Drain, builtins.list[DrainGame]]:
        row = await self.pool.fetchrow("SELECT * FROM drains WHERE id = $1", drain_id)
        if row is None:
            raise NotFound(str(drain_id))
        games = await self.pool.fetch("SELECT * FROM drain_games WHERE drain_id = $1 ORDER BY game_id", drain_id)
        return drain_from_row(row), [game_from_row(g) for g in games]

    async def active_drain(self, node: str | None) -> Drain | None:
        row = await self.pool.fetchrow("SELECT * FROM drains WHERE coalesce(node, '') = coalesce($1, '')"
                                       " AND status NOT IN ('undrained', 'failed')", node)
        return drain_from_row(row) if row else None

    async def request_undrain(self, drain_id: int, *, actor: str | None = None) -> Drain:
        """Undrain asked (idempotent: a drain undraining or undrained stays so). NotFound."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(
                "UPDATE drains SET status = 'undraining', undrain_at = $2 WHERE id = $1"
                " AND status IN ('draining', 'drained') RETURNING *", drain_id, now)
            if row is not None:
                await log_fleet_change(conn, "drain_undrain", {"drain_id": drain_id}, actor)
            if row is None:
                row = await conn.fetchrow("SELECT * FROM drains WHERE id = $1", drain_id)
                if row is None:
                    raise NotFound(str(drain_id))
            return drain_from_row(row)

    # ----------------------------------------------------------------- the loop
    async def active_drains(self) -> builtins.list[Drain]:
        rows = await self.pool.fetch("SELECT * FROM drains WHERE status NOT IN ('undrained', 'failed') ORDER BY id")
        return [drain_from_row(r) for r in rows]

    async def drained_targets(self) -> Targets:
        async with self.pool.acquire() as conn:
            return await refusing_targets(conn)

    async def brought_back_at_undrain(self, game_id: str) -> bool:
        """Whether a drain not undrained yet took the game and its undrain may start it again (the drain's
        stop, or a move under way or one that failed: not a move done with the node it went to, nor a game
        somebody else stopped or removed since, which undrain leaves as it is: ``restore_plan``)."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM drain_games g JOIN drains d ON d.id = g.drain_id WHERE g.game_id = $1"
            " AND d.status IN ('draining', 'drained', 'undraining')"
            " AND NOT (g.action = 'move' AND g.state = 'done' AND g.to_node IS NOT NULL)"
            " AND NOT EXISTS (SELECT 1 FROM runtime_operations o WHERE" + _SOMEBODY_ELSES + "))", game_id))

    async def drain_scope(self, drain: Drain) -> tuple[dict[str, RuntimeRecord], dict[str, DrainGame]]:
        """The records the drain may have to take (wanted running on its target) or took, and its game rows."""
        games = {g.game_id: g for g in (game_from_row(r) for r in await self.pool.fetch(
            "SELECT * FROM drain_games WHERE drain_id = $1", drain.id))}
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_records WHERE (desired_status = 'running' AND status <> 'removed'"
            " AND ($1::text IS NULL OR node_id = $1)) OR game_id = ANY($2::text[])", drain.node, list(games))
        return {r["game_id"]: record_from_row(r) for r in rows}, games

    async def take_move(self, drain: Drain, record: RuntimeRecord, forced: bool) -> RuntimeRecord | None:
        """Move a game off the drained node, in one transaction: its row, and the record's pin cleared with
        a new spec revision (a new generation), so the reconciler replaces its unit (a planned disruption:
        at a turn boundary unless ``forced``) by one that avoids the node; the new node is recorded from
        where Swarm places it. None when the record changed since it was read (the next tick looks again)."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", GAME_LOCK_SPACE, record.game_id)
            row = await conn.fetchrow(SELECT_FOR_UPDATE, record.game_id)
            status = await conn.fetchval("SELECT status FROM drains WHERE id = $1 FOR SHARE", drain.id)
            if row is None or status != DrainStatus.DRAINING.value:
                return None  # (an undrain asked meanwhile takes no more games)
            cur = record_from_row(row)
            if cur.generation != record.generation or cur.node_id != drain.node:
                return None
            # Older pending jobs are answered superseded (below). Before its deadline a drain moves only
            # converged games.
            new = transitions.drain_moved(cur, now, node=drain.node, forced=forced, deadline=drain.deadline_at)
            new = await self._write(conn, cur, new, now)
            await self._supersede_older(conn, new, now)
            await conn.execute(_INSERT_GAME, drain.id, cur.game_id, DrainAction.MOVE.value, forced,
                               cur.stop_image, cur.paused, cur.turn_interval,
                               cur.node_id, new.generation, now)
            op_id = await self._insert_op(conn, cur.game_id, JobKind.RECONCILE, OpSource.ADMIN, OpStatus.SUCCEEDED,
                                          new.generation, None, None,
                                          {"event": "drain_move", "drain_id": drain.id, "from_node": drain.node,
                                           "forced": forced}, now, None, None)
            await conn.execute("UPDATE drain_games SET op_id = $3 WHERE drain_id = $1 AND game_id = $2",
                               drain.id, cur.game_id, op_id)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, cur.game_id)
            return new

    async def force_move(self, drain: Drain, game: DrainGame) -> bool:
        """Past the deadline: the move in flight no longer waits for a turn boundary."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", GAME_LOCK_SPACE, game.game_id)
            row = await conn.fetchrow(SELECT_FOR_UPDATE, game.game_id)
            moved = False
            if row is not None:
                cur = record_from_row(row)
                if (cur.generation == game.generation or drains.unforced(drain, cur)) and not cur.converged:
                    await self._write(conn, cur, cur.replace(force_generation=cur.generation), now)
                    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, cur.game_id)
                    moved = True
            await conn.execute("UPDATE drain_games SET forced = true WHERE drain_id = $1 AND game_id = $2",
                               drain.id, game.game_id)
            return moved

    async def finish_games(self, drain_id: int, done: builtins.list[tuple[str, str | None, str | None]]) -> None:
        """(game, node it runs on now, note) of each game the drain is done with."""
        if not done:
            return
        async with self._tx() as (conn, now):
            await conn.executemany(
                "UPDATE drain_games SET state = 'done', to_node = $3, note = $4, done_at = $5"
                " WHERE drain_id = $1 AND game_id = $2 AND state = 'in_progress'",
                [(drain_id, g, node, note, now) for g, node, note in done])

    async def set_drain_status(self, drain_id: int, frm: DrainStatus, to: DrainStatus) -> bool:
        column = {DrainStatus.DRAINED: "drained_at", DrainStatus.UNDRAINED: "undrained_at"}[to]
        async with self._tx() as (conn, now):
            done = await conn.fetchval(f"UPDATE drains SET status = $3, {column} = $4 WHERE id = $1 AND status = $2"
                                       " RETURNING id", drain_id, frm.value, to.value, now)
            return done is not None

    async def stopped_since(self, drain_id: int) -> set[str]:
        """Games of the drain with somebody else's stop or cleanup (Lobby's, an operator's) since the drain
        took them: any after the operation that took it, not tagged with the drain's id."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT g.game_id FROM drain_games g JOIN runtime_operations o ON" + _SOMEBODY_ELSES
            + " WHERE g.drain_id = $1", drain_id)
        return {r["game_id"] for r in rows}

    async def fail_drain(self, drain_id: int, note: str) -> bool:
        """A draining drain that cannot be carried out (its node is unknown): failed, with why."""
        async with self._tx() as (conn, _):
            done = await conn.fetchval("UPDATE drains SET status = 'failed', note = $2 WHERE id = $1"
                                       " AND status = 'draining' RETURNING id", drain_id, note[:2000])
            return done is not None

    async def game_restored(self, drain_id: int, game_id: str, state: GameState, note: str) -> None:
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE drain_games SET state = $3, note = $4 WHERE drain_id = $1 AND game_id = $2",
                               drain_id, game_id, state.value, note or None)

    async def drain_counts(self, drain: Drain) -> dict[str, Any]:
        """How many games in scope the drain has not taken yet (for REST and the CLI)."""
        waiting = await self.pool.fetchval(
            "SELECT count(*) FROM runtime_records r WHERE r.desired_status = 'running' AND r.status <> 'removed'"
            " AND ($1::text IS NULL OR r.node_id = $1) AND NOT EXISTS (SELECT 1 FROM drain_games g"
            " WHERE g.drain_id = $2 AND g.game_id = r.game_id)", drain.node, drain.id)
        return {"waiting": int(waiting) if drain.status is DrainStatus.DRAINING else 0}
