"""Drains in PostgreSQL: the ``drains`` rows an operator writes (REST, CLI), the ``drain_games`` rows
the leader's drain loop writes as it takes games, and the one record change a drain makes by itself
(``take_move``: the game's pin cleared and its spec revised, in the same transaction as its row).
The decisions are desired/drains.py."""

from __future__ import annotations

import builtins
from typing import Any

import asyncpg

from desired import drains, transitions
from desired.db.base import StoreBase
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
    Targets,
)
from desired.errors import NotFound
from desired.model import JobKind, OpSource, OpStatus, RuntimeRecord


def drain_from_row(row: asyncpg.Record) -> Drain:
    return Drain(id=row["id"], node=row["node"], max_parallel=row["max_parallel"], deadline_at=row["deadline_at"],
                 on_deadline=drains.OnDeadline(row["on_deadline"]),
                 local_state=drains.LocalState(row["local_state"]) if row["local_state"] else None,
                 state_shared=row["state_shared"], status=DrainStatus(row["status"]), source=row["source"],
                 created_at=row["created_at"], drained_at=row["drained_at"], undrain_at=row["undrain_at"],
                 undrained_at=row["undrained_at"])


def game_from_row(row: asyncpg.Record) -> DrainGame:
    return DrainGame(drain_id=row["drain_id"], game_id=row["game_id"], action=DrainAction(row["action"]),
                     state=GameState(row["state"]), generation=row["generation"], taken_at=row["taken_at"],
                     forced=row["forced"], image_ref=row["image_ref"], paused=row["paused"],
                     turn_interval=row["turn_interval"], from_node=row["from_node"], to_node=row["to_node"],
                     op_id=row["op_id"], note=row["note"], done_at=row["done_at"])


async def refusing_targets(conn: asyncpg.Connection) -> Targets:
    """What the refusing drains keep out of use, read in the caller's transaction (admission)."""
    rows = await conn.fetch("SELECT node FROM drains WHERE status IN ('draining', 'drained')")
    return Targets(host=any(r["node"] is None for r in rows),
                   nodes=frozenset(r["node"] for r in rows if r["node"] is not None))


_INSERT_GAME = (
    "INSERT INTO drain_games (drain_id, game_id, action, state, forced, image_ref, paused, turn_interval, from_node,"
    " generation, taken_at) VALUES ($1, $2, $3, 'in_progress', $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (drain_id, game_id) DO UPDATE SET forced = drain_games.forced OR excluded.forced")


@translating
class Drains(StoreBase):
    """Drain rows, and the record change of a move."""

    # ----------------------------------------------------------------- operators
    async def create_drain(self, request: DrainRequest, source: OpSource) -> Drain:
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
                                       " AND status <> 'undrained'", node)
        return drain_from_row(row) if row else None

    async def request_undrain(self, drain_id: int) -> Drain:
        """Undrain asked (idempotent: a drain undraining or undrained stays so). NotFound."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(
                "UPDATE drains SET status = 'undraining', undrain_at = $2 WHERE id = $1"
                " AND status IN ('draining', 'drained') RETURNING *", drain_id, now)
            if row is None:
                row = await conn.fetchrow("SELECT * FROM drains WHERE id = $1", drain_id)
                if row is None:
                    raise NotFound(str(drain_id))
            return drain_from_row(row)

    # ----------------------------------------------------------------- the loop
    async def active_drains(self) -> builtins.list[Drain]:
        rows = await self.pool.fetch("SELECT * FROM drains WHERE status <> 'undrained' ORDER BY id")
        return [drain_from_row(r) for r in rows]

    async def drained_targets(self) -> Targets:
        async with self.pool.acquire() as conn:
            return await refusing_targets(conn)

    async def drain_scope(self, drain: Drain) -> tuple[dict[str, RuntimeRecord], dict[str, DrainGame]]:
        """The records the drain may have to take (wanted running on its target) or took, and its game rows."""
        games = {g.game_id: g for g in (game_from_row(r) for r in await self.pool.fetch(
            "SELECT * FROM drain_games WHERE drain_id = $1", drain.id))}
        rows = await self.pool.fetch(
            "SELECT * FROM runtime_records WHERE (desired_status = 'running' AND status <> 'removed'"
            " AND ($1::text IS NULL OR node_id = $1)) OR game_id = ANY($2::text[])", drain.node, list(games))
        return {r["game_id"]: record_from_row(r) for r in rows}, games

    async def take_stop(self, drain: Drain, record: RuntimeRecord, forced: bool) -> None:
        """The drain takes a game to stop it: what it is (image, pause, schedule) for undrain. The stop
        itself goes through admission next; a kill in between leaves a row whose stop is asked again."""
        async with self._tx() as (conn, now):
            await conn.execute(_INSERT_GAME, drain.id, record.game_id, DrainAction.STOP.value, forced,
                               record.desired_image_ref or record.current_image_ref, record.paused,
                               record.turn_interval, record.node_id, record.generation, now)

    async def note_stop(self, drain_id: int, game_id: str, op_id: int, generation: int) -> None:
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE drain_games SET op_id = greatest(coalesce(op_id, 0), $3), generation = $4"
                               " WHERE drain_id = $1 AND game_id = $2", drain_id, game_id, op_id, generation)

    async def take_move(self, drain: Drain, record: RuntimeRecord, forced: bool) -> RuntimeRecord | None:
        """Move a game off the drained node, in one transaction: its row, and the record's pin cleared with
        a new spec revision (a new generation), so the reconciler replaces its unit (a planned disruption:
        at a turn boundary unless ``forced``) by one that avoids the node; the new node is recorded from
        where Swarm places it. None when the record changed since it was read (the next tick looks again)."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", GAME_LOCK_SPACE, record.game_id)
            row = await conn.fetchrow(SELECT_FOR_UPDATE, record.game_id)
            if row is None:
                return None
            cur = record_from_row(row)
            if cur.generation != record.generation or cur.node_id != drain.node:
                return None
            # Like a restart: older pending jobs are answered superseded, and a turn they asked for is no
            # longer asked (desired/jobs.py). Before its deadline a drain moves only converged games.
            new = transitions.turn_unasked(cur.replace(
                node_id=None, spec_revision=cur.spec_revision + 1, generation=cur.generation + 1,
                last_op_at=max(now, cur.last_op_at),
                force_generation=cur.generation + 1 if forced else cur.force_generation))
            new = await self._write(conn, cur, new, now)
            await self._supersede_older(conn, new, now)
            await conn.execute(_INSERT_GAME, drain.id, cur.game_id, DrainAction.MOVE.value, forced,
                               cur.desired_image_ref, cur.paused, cur.turn_interval, cur.node_id,
                               new.generation, now)
            await self._insert_op(conn, cur.game_id, JobKind.RECONCILE, OpSource.ADMIN, OpStatus.SUCCEEDED,
                                  new.generation, None, None,
                                  {"event": "drain_move", "drain_id": drain.id, "from_node": drain.node,
                                   "forced": forced}, now, None, None)
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
                if cur.generation == game.generation and not cur.converged:
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
        """Games of the drain with a stop or cleanup after the drain's own last stop (somebody else's). A
        row whose stop was not noted (a kill right after it) takes the first admin stop after it as the drain's."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT g.game_id FROM drain_games g JOIN runtime_operations o ON o.game_id = g.game_id"
            " WHERE g.drain_id = $1 AND g.action = 'stop' AND o.op IN ('stop', 'cleanup')"
            " AND o.created_at >= g.taken_at AND o.id > coalesce(g.op_id, (SELECT min(s.id) FROM runtime_operations s"
            " WHERE s.game_id = g.game_id AND s.op = 'stop' AND s.source = 'admin' AND s.created_at >= g.taken_at))",
            drain_id)
        return {r["game_id"] for r in rows}

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
