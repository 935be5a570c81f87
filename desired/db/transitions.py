"""The reconciler's named transitions of the observed columns (``mark_running``, ``record_crash``, ...)
and the turn clock: each a compare-and-swap on ``(status, current_container_id)`` (and on
``generation`` when it answers jobs), computed by the pure functions of desired/transitions.py."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from desired import transitions
from desired.db.base import StoreBase
from desired.db.pool import translating
from desired.db.rows import SELECT_FOR_UPDATE, operation_from_json, record_from_row
from desired.errors import Conflict, NotFound
from desired.model import (
    MAX_TURN,
    DesiredStatus,
    ErrorCode,
    JobKind,
    OpSource,
    OpStatus,
    Outcome,
    RuntimeRecord,
    Status,
)
from desired.policy import CrashPolicy, CrashVerdict, next_crash
from desired.values import KEEP, Claimed, Crash, Finish, Operation, ReconcilerNote

# What a failure that only answers a generation's jobs (transitions.keeps_running) answers as failed: the
# turn asks and a reconcile (nobody could look); a pause or a resume took effect when it was accepted.
FAILING_UNCONVERGED = transitions.TURN_ASKS | {JobKind.RECONCILE}

# When a game's next scheduled turn is due: its interval after its last turn, or after it was started
# or resumed (clock_from) when that is later. The due-turns query and turn_lateness share it.
TURN_DUE_AT = ("(greatest(coalesce(last_turn_at, clock_from, created_at), coalesce(clock_from, created_at))"
               " + make_interval(secs => turn_interval))")
# Which records the turn clock asks turns of, once due (desired/jobs.py ``turn_due``, in SQL): running and
# meant to, on a clock, unpaused, converged (the previous request answered), with an admin API, no
# disruption waiting for the engine, and a next turn that fits its column.
TURN_WANTED = ("turn_interval > 0 AND NOT paused AND desired_status = 'running' AND status = 'running'"
               " AND admin_api IS TRUE AND (desired_turn IS NULL OR desired_turn <= turn)"
               f" AND (turn IS NULL OR turn < {MAX_TURN})"
               " AND observed_generation = generation AND disruption_wait_since IS NULL")


@translating
class Transitions(StoreBase):
    """What the reconciler records: observed state, and the answers of the jobs it converged."""

    async def _transition(self, rec: RuntimeRecord, change: Callable[[RuntimeRecord, datetime], RuntimeRecord], *,
                          finish: Outcome | None = None, guard_generation: bool = False,
                          note: ReconcilerNote | None = None, reason: str | None = None,
                          container_id: Any = KEEP) -> RuntimeRecord:
        """Compare-and-swap from ``rec`` (status, container id, and generation when asked) to
        ``change(current, now)``; with ``finish``, answer the pending jobs of its generation.

        A change that notes nothing, from a record whose row has not moved since it was read, is one
        write statement (``_swap``; with ``finish``, a read of the pending jobs before it); any other
        takes the record's lock first."""
        if note is None and container_id is KEEP:
            swapped = await self._swap(rec, change, reason, finish)
            if swapped is not None:
                return swapped
        async with self._tx_locking(rec.game_id) as (conn, now, row):
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            expected_container = rec.current_container_id if container_id is KEEP else container_id
            if cur.status is not rec.status or cur.current_container_id != expected_container or (
                    (guard_generation or finish is not None) and cur.generation != rec.generation):
                raise Conflict(
                    f"{rec.game_id}: expected status {rec.status.value}, container {expected_container}, "
                    f"generation {rec.generation}; found {cur.status.value}, {cur.current_container_id}, "
                    f"{cur.generation}")
            answers = None
            if finish is not None:
                # Its jobs answered in the record's own write (base.py ``_write``): the operations first.
                def answers(new: RuntimeRecord) -> Awaitable[list[tuple[Any, ...]]]:
                    return self._answer_pending(conn, new, Finish(generation=cur.generation, outcome=finish), now)
            new = await self._write(conn, cur, change(cur, now), now, reason, answers=answers)
            if note is not None:
                await self._insert_note(conn, new, note, now)
            return new

    async def mark_starting(self, rec: RuntimeRecord, *, rollback_image: str | None) -> RuntimeRecord:
        """Guarded on the generation too: the unit about to be created is built from ``rec``'s desired
        state; a job accepted meanwhile must be planned for first."""
        return await self._transition(rec, lambda cur, now: transitions.starting(
            cur, now, rollback_image=rollback_image), guard_generation=True)

    async def mark_rollback_overtaken(self, rec: RuntimeRecord, *, container_id: str) -> RuntimeRecord:
        """desired/transitions.py ``rollback_overtaken``; guarded on the generation (the job's)."""
        return await self._transition(rec, lambda cur, now: transitions.rollback_overtaken(
            cur, now, container_id=container_id), guard_generation=True)

    async def mark_running(self, rec: RuntimeRecord, *, container_id: str, image: str,
                           probe: transitions.Probe | None = None, unreachable_after: int = 3,
                           generation_timeout: float = 600, node: str | None = None) -> RuntimeRecord:
        """The engine answers: the generation converged and its jobs are answered ``success``
        (with what the engine said of itself, when it was asked) -- unless desired state also asks
        for a turn the engine has not reached: then the turn comes first."""
        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            new = transitions.running(cur, now, container_id=container_id, image=image, node=node)
            if probe is not None:
                new = transitions.observed(new, now, probe, unreachable_after=unreachable_after,
                                           generation_timeout=generation_timeout)
            return new if transitions.turn_reached(new) else new.replace(observed_generation=cur.observed_generation)
        if rec.desired_turn is not None and not transitions.turn_reached(rec) and (
                probe is None or probe.turn is None or probe.turn < rec.desired_turn):
            return await self._transition(rec, change, guard_generation=True)
        return await self._transition(rec, change, finish=Outcome.SUCCESS)

    async def mark_converged(self, rec: RuntimeRecord) -> RuntimeRecord:
        """The running unit already is what the generation asks for: its jobs are answered ``success``."""
        return await self._transition(rec, transitions.recorded, finish=Outcome.SUCCESS)

    async def set_admin_token(self, rec: RuntimeRecord, token: str) -> RuntimeRecord:
        """Record the admin token of the unit about to be created (or of one adopted as it is). Guarded on
        the generation, as ``mark_starting``: the unit is ``rec``'s; a job accepted meanwhile is planned
        for first (Conflict)."""
        return await self._transition(rec, lambda cur, now: cur.replace(admin_token=token), guard_generation=True)

    async def turn_requested(self, rec: RuntimeRecord) -> RuntimeRecord:
        return await self._transition(rec, transitions.turn_requested)

    async def answer_during_turn(self, rec: RuntimeRecord) -> RuntimeRecord | None:
        """The unit of an up game is the one desired state wants, and only a turn is still to come: the
        pending jobs that change nothing of the engine (``transitions.ANSWERED_DURING_TURN``: a pause, a
        resume, a reconcile) are answered ``success`` now; the turn's jobs wait for it. When that may not
        be (``transitions.answers_during_turn``), they are answered with the turn, as before.
        The record's row is written too (a new version: its pending jobs changed, base.py ``_swap``).
        Returns the record as written, None when there was nothing to answer; Conflict when the record
        has moved to another generation or unit, or is no longer up."""
        async with self._tx_locking(rec.game_id) as (conn, now, row):
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            if (cur.generation != rec.generation or not cur.status.is_up
                    or cur.current_container_id != rec.current_container_id):
                raise Conflict(f"{rec.game_id}: expected generation {rec.generation} up on "
                               f"{rec.current_container_id}; found {cur.generation}, {cur.status.value} on "
                               f"{cur.current_container_id}")
            pending = await self._pending_ops(conn, cur.game_id, cur.generation)
            jobs = [op for op in pending if op.op in transitions.ANSWERED_DURING_TURN]
            if not jobs or not transitions.answers_during_turn(cur, [op.op for op in pending]):
                return None
            version = await conn.fetchval("UPDATE runtime_records SET last_op_at = last_op_at WHERE game_id = $1"
                                          " RETURNING xmin::text::bigint", cur.game_id)
            for op in jobs:
                await self._end_op(conn, op, Outcome.SUCCESS, None, "", cur.current_container_id or "",
                                   cur.engine_endpoint, now)
            return cur.replace(row_version=version)

    async def fail_turn(self, rec: RuntimeRecord, code: ErrorCode, message: str) -> RuntimeRecord:
        """The turn of ``rec.generation`` cannot be had: answer its jobs; the game stays up."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(SELECT_FOR_UPDATE, rec.game_id)
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            if cur.generation != rec.generation:
                raise Conflict(f"{rec.game_id}: a newer generation took over")
            new = await self._write(conn, cur, transitions.turn_failed(cur, now, code=code, message=message), now)
            await self._answer_failing(conn, new, await self._pending_ops(conn, cur.game_id, cur.generation),
                                           code, message, now)
            return new

    async def _answer_failing(self, conn: asyncpg.Connection, new: RuntimeRecord, jobs: list[Operation],
                                  code: ErrorCode, message: str, now: datetime, *,
                                  failing: frozenset[JobKind] = transitions.TURN_ASKS) -> None:
        """The jobs of the kinds ``failing`` fail; the others are done: after a turn's failure the game is up
        and converged (a pause, a resume, a reconcile, a start that joined it); after a failure that only
        answers (``FAILING_UNCONVERGED``), a pause or a resume took effect when it was accepted."""
        up = new.status.is_up and new.current_container_id is not None
        for op in jobs:
            if op.op in failing:
                await self._end_op(conn, op, Outcome.FAILURE, code, message, "", "", now)
            else:
                await self._end_op(conn, op, Outcome.SUCCESS, None, "", (new.current_container_id or "") if up else "",
                                   new.engine_endpoint if up else "", now)

    async def due_turns(self, limit: int = transitions.DUE_PAGE) -> tuple[list[str], float | None]:
        """The turn clock, in one query: games whose interval has passed since their last turn (or
        since they were started or resumed), and the seconds until the next one is due.

        A game is asked for one turn at a time, and only once the previous request has been
        answered (its generation converged): a turn the health round saw reached is not answered
        yet, and asking for the next one then would move the generation on before its jobs are
        answered, on every turn of a loaded controller (observed at 1,000 games)."""
        rows = await self.pool.fetch(
            f"SELECT game_id, extract(epoch FROM {TURN_DUE_AT} - now())::float8 AS due_in"
            f" FROM runtime_records WHERE {TURN_WANTED} ORDER BY due_in LIMIT $1", limit)
        due = [r["game_id"] for r in rows if r["due_in"] <= 0]
        later = [r["due_in"] for r in rows if r["due_in"] > 0]
        return due, (min(later) if later else None)

    async def ask_due_turns(self, limit: int = transitions.DUE_PAGE,
                            skip: Sequence[str] = ()) -> tuple[list[str], float | None, bool]:
        """The turn clock's tick in ONE statement (no BEGIN, no COMMIT): the due-turns query's page,
        and for each game of it that is due now (but ``skip``'s) the ``turn`` job the clock would submit
        (desired/jobs.py: a new generation asking for the turn after the engine's, and a queued
        operation of source scheduler), under the game's lock and the leadership fence. Returns the
        games asked, the seconds until the next game of the page is due, and whether the clock should
        look again soon: every game of the page was due (more may be, behind it), or a due game was
        passed over (locked, or no longer due once locked).

        What ``submit`` decides for such a job is decided here in SQL: the due filter is evaluated again
        on each record as it is once locked (Postgres re-reads a row a concurrent transaction changed
        before locking it), so a pause, a forced turn, a stop or a new schedule since the page was read
        leaves the game out, as ``submit`` would skip it. The locks are taken in game order (as the
        intake's batches take theirs), the operation ids after the locks; a record another transaction
        holds locked is passed over (SKIP LOCKED), not waited for with the others' locks held: its game
        is asked at the next tick. A turn asked writes no snapshot (the status, the turn and the pause
        are unchanged) and answers nobody.

        One bad record fails the statement for every game of the page (a generation at the top of its
        column, say): the clock then asks game by game (``due_turns`` and ``submit``), where that game's
        failure is its own."""
        fence_ok, fence_args = self._fence_ok(3)
        row = await self.pool.fetchrow(
            f"WITH fence_ok AS ({fence_ok}),"
            f" page AS (SELECT game_id, extract(epoch FROM {TURN_DUE_AT} - now())::float8 AS due_in"
            f" FROM runtime_records WHERE {TURN_WANTED} ORDER BY due_in LIMIT $1),"
            " locked AS MATERIALIZED (SELECT game_id, generation, turn, last_op_at FROM runtime_records"
            " WHERE game_id IN (SELECT game_id FROM page WHERE due_in <= 0) AND game_id <> ALL($2::text[])"
            f" AND {TURN_WANTED} AND {TURN_DUE_AT} <= now() AND EXISTS (SELECT 1 FROM fence_ok)"
            " ORDER BY game_id FOR UPDATE SKIP LOCKED),"
            " asked AS (UPDATE runtime_records r SET generation = l.generation + 1,"
            " desired_turn = coalesce(l.turn, 0) + 1, last_op_at = greatest(now(), l.last_op_at)"
            " FROM locked l WHERE r.game_id = l.game_id RETURNING r.game_id, r.generation),"
            " ops AS (INSERT INTO runtime_operations (game_id, op, source, status, generation, params, created_at)"
            " SELECT game_id, 'turn', 'scheduler', 'queued', generation, '{}'::jsonb, now() FROM asked"
            " ORDER BY game_id RETURNING game_id)"
            " SELECT EXISTS (SELECT 1 FROM fence_ok) AS fence_valid, ARRAY(SELECT game_id FROM ops) AS asked,"
            " (SELECT min(due_in) FROM page WHERE due_in > 0) AS next_in,"
            " (SELECT count(*) FROM page WHERE due_in <= 0) >= $1 AS full,"
            " (SELECT count(*) FROM page WHERE due_in <= 0 AND game_id <> ALL($2::text[]))"
            " > (SELECT count(*) FROM locked) AS passed_over",
            limit, list(skip), *fence_args)
        assert row is not None
        if not row["fence_valid"]:
            raise self._over()
        return sorted(row["asked"]), row["next_in"], bool(row["full"] or row["passed_over"])

    async def turn_lateness(self) -> tuple[float, int]:
        """How late the turns of the games that should be turning are, in one aggregate query (for
        ``rtmanager_turn_lateness_intervals``): the largest lateness in whole turn intervals past the
        due time of the due-turns query (0 when no game is late), and how many games are at least
        one interval late. Unlike the due-turns query it counts a game whose turn was asked and is
        not generated yet (a queue behind, a generation that hangs): those are late too."""
        row = await self.pool.fetchrow(
            "SELECT coalesce(max(late), 0)::float8 AS worst, count(*) FILTER (WHERE late >= 1) AS late"
            f" FROM (SELECT extract(epoch FROM now() - {TURN_DUE_AT}) / turn_interval AS late"
            " FROM runtime_records WHERE turn_interval > 0 AND NOT paused AND desired_status = 'running'"
            " AND status IN ('running', 'generation_in_progress') AND admin_api IS TRUE"
            f" AND (turn IS NULL OR turn < {MAX_TURN})) AS games")
        assert row is not None
        return max(0.0, float(row["worst"])), int(row["late"])

    async def mark_stopped(self, rec: RuntimeRecord, *, container_id: str | None,
                           stopped_now: bool = False) -> RuntimeRecord:
        return await self._transition(rec, lambda cur, now: transitions.stopped(cur, now, container_id=container_id,
                                                                                stopped_now=stopped_now),
                                      finish=Outcome.SUCCESS)

    async def note_stopped(self, game_id: str, *, container_id: str) -> RuntimeRecord | None:
        """This process stopped ``container_id`` but a newer generation overtook the stop's: record
        only that the unit no longer runs (so the newer generation starts it again, and the exit is
        never taken for a crash), answering nobody. None when the record no longer names that unit
        as up (whatever changed it decides)."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(SELECT_FOR_UPDATE, game_id)
            if row is None:
                raise NotFound(game_id)
            cur = record_from_row(row)
            if not cur.status.is_up or cur.current_container_id != container_id:
                return None
            return await self._write(conn, cur, transitions.stopped(cur, now, container_id=container_id,
                                                                    converged=False), now, None)

    async def mark_removed(self, rec: RuntimeRecord) -> RuntimeRecord:
        return await self._transition(rec, transitions.removed, finish=Outcome.SUCCESS)

    async def record_observation(self, rec: RuntimeRecord, probe: transitions.Probe, *, unreachable_after: int,
                                 generation_timeout: float, disruption_waits: bool = False) -> RuntimeRecord:
        """What a probe of a running engine changed (desired/transitions.py ``observed``); with
        ``disruption_waits``, a planned disruption waits for the turn it generates."""
        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            if transitions.probe_predates(rec, cur, probe):
                raise Conflict(f"{rec.game_id}: a probe of turn {probe.turn} older than the recorded turn {cur.turn}")
            new = transitions.observed(cur, now, probe, unreachable_after=unreachable_after,
                                       generation_timeout=generation_timeout)
            return transitions.disruption_waiting(new, now) if disruption_waits else new
        return await self._transition(rec, change)

    async def restart_disruption_wait(self, rec: RuntimeRecord, turn: int) -> RuntimeRecord:
        """desired/transitions.py ``disruption_wait_restarted``."""
        return await self._transition(rec, lambda cur, now: transitions.disruption_wait_restarted(cur, now,
                                                                                                  turn=turn))

    async def clear_stopping(self, rec: RuntimeRecord, *, same_generation: bool = True) -> RuntimeRecord:
        """desired/transitions.py ``not_stopping``. At the generation it was read at (as ``mark_stopping``), when
        the caller goes on with the record it gets back: one of a newer generation (a job that landed while the
        engine stopped) would carry the older generation's action on as the newer's, and answer its jobs.
        ``same_generation=False`` clears the mark whatever the generation (no signal went out, or the unit is
        gone): the caller checks the generation itself."""
        return await self._transition(rec, transitions.not_stopping, guard_generation=same_generation)

    async def mark_stopping(self, rec: RuntimeRecord, unit_id: str | None = None) -> RuntimeRecord:
        """A unit of the game is about to be asked to stop (desired/transitions.py ``stopping``); Conflict when
        a job changed the generation since the record was read (the stop is then planned again)."""
        return await self._transition(rec, lambda cur, now: transitions.stopping(cur, now, unit_id),
                                      guard_generation=True)

    async def note_disruption_wait(self, rec: RuntimeRecord) -> RuntimeRecord:
        """A planned disruption waits for a turn the record says is generated, the engine not saying
        otherwise: the wait's limit counts from now (if no earlier look began it)."""
        return await self._transition(rec, transitions.disruption_waiting)

    async def note_disruption_overdue(self, rec: RuntimeRecord, action: str, waited: float, note: str) -> None:
        """A planned disruption waited its limit for a generation and goes ahead: the operation log
        says so on the pending operations it answers (their results carry the note), or on an
        operation of its own when none waits (a drift of the spec)."""
        params = {"disruption": action, "disruption_waited_seconds": round(waited, 1), "disruption_note": note}
        async with self._tx() as (conn, now):
            # What a pending job will be answered changes: the record is written too (a new row version), so
            # that a swap that read the jobs before this does not answer them without the note (base.py).
            await conn.execute("UPDATE runtime_records SET last_op_at = greatest(last_op_at, $2) WHERE game_id = $1",
                               rec.game_id, now)
            n = await conn.fetchval(
                "WITH u AS (UPDATE runtime_operations SET params = params || $3::jsonb WHERE game_id = $1"
                " AND status IN ('queued', 'running') AND generation <= $2 RETURNING 1) SELECT count(*) FROM u",
                rec.game_id, rec.generation, json.dumps(params))
            if not n:
                await self._insert_note(conn, rec, ReconcilerNote(op=JobKind.RECONCILE, params=params, message=note),
                                        now)

    async def record_crash(self, rec: RuntimeRecord, crash: Crash,
                           policy: CrashPolicy) -> tuple[RuntimeRecord, CrashVerdict]:
        """One more crash of a game nobody asked to change (an exit, or a failed restart after one):
        a restart after the policy's backoff, or (the limit-th in the window) the game given up."""
        verdict: list[CrashVerdict] = []

        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            v = next_crash(cur, now, policy)
            verdict.append(v)
            return transitions.crashed(cur, now, verdict=v, code=crash.code, detail=crash.detail,
                                       exit_code=crash.exit_code, oom_killed=crash.oom_killed, window=policy.window)

        params = {"event": "crash", "exit_code": crash.exit_code, "oom_killed": crash.oom_killed,
                  "log_tail": crash.log_tail[-2000:], "container_id": crash.container_id,
                  "detail": crash.detail[:1000]}
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(SELECT_FOR_UPDATE, rec.game_id)
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            if cur.generation != rec.generation or cur.status is not rec.status:
                raise Conflict(f"{rec.game_id}: changed since the crash was seen")
            new = change(cur, now)
            v = verdict[-1]
            new = await self._write(conn, cur, new, now, "crash_loop" if v.give_up else "crashed")
            params.update(crash_count=v.count, **({"gave_up": True} if v.give_up else {"restart_in": v.delay}))
            await self._insert_note(conn, new, ReconcilerNote(
                op=JobKind.RESTART, params=params, error_code=crash.code if v.give_up else None,
                message=new.last_error_message or "" if v.give_up else ""), now)
            if v.give_up:  # a job that joined the crashed generation hears why
                await self._finish_pending(conn, new, Finish(generation=cur.generation, outcome=Outcome.FAILURE,
                                                             error_code=crash.code,
                                                             message=new.last_error_message or ""), now)
            return new, v

    async def record_node_loss(self, rec: RuntimeRecord, step: str, *, node: str, message: str = "") -> RuntimeRecord:
        """A game whose node is lost (desired/transitions.py): ``lost`` records it (no crash counted),
        ``move`` clears its pin and avoids the node (its unit is recreated elsewhere), ``stop`` gives it
        up as desired stopped (a job of its generation hears why). Compare-and-swap on the status, the
        unit and the generation; the operation log says what was done."""
        def change(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
            if step == "lost":
                return transitions.node_lost(cur, now, node=node)
            if step == "move":
                return transitions.moved_off(cur, now, node=node)
            return transitions.stopped_for_node_loss(cur, now, message=message)

        async with self._tx() as (conn, now):
            row = await conn.fetchrow(SELECT_FOR_UPDATE, rec.game_id)
            if row is None:
                raise NotFound(rec.game_id)
            cur = record_from_row(row)
            if (cur.status is not rec.status or cur.current_container_id != rec.current_container_id
                    or cur.generation != rec.generation):
                raise Conflict(f"{rec.game_id}: changed since its node was seen lost")
            new = await self._write(conn, cur, change(cur, now), now)
            await self._insert_note(conn, new, ReconcilerNote(
                op=JobKind.RECONCILE, params={"event": f"node_lost_{step}" if step != "lost" else "node_lost",
                                              "node": node},
                message=message or new.last_error_message or ""), now)
            if step == "stop":
                await self._finish_pending(conn, new, Finish(generation=cur.generation, outcome=Outcome.FAILURE,
                                                             error_code=ErrorCode.CONTAINER_START_FAILED,
                                                             message=message), now)
            return new

    async def answer_overdue(self, game_id: str, generation: int, code: ErrorCode, message: str) -> int:
        """The jobs of ``generation`` (and older ones still pending) waited too long for a game whose node
        is lost: answered with this failure; desired state stays (desired/transitions.py
        ``answered_unconverged``). Returns how many were answered (0: a newer generation took over)."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(SELECT_FOR_UPDATE, game_id)
            if row is None:
                return 0
            cur = record_from_row(row)
            if cur.generation != generation:
                return 0
            new = await self._write(conn, cur, transitions.answered_unconverged(cur, now, code=code,
                                                                                message=message), now)
            return await self._finish_pending(conn, new, Finish(generation=generation, outcome=Outcome.FAILURE,
                                                                error_code=code, message=message), now)

    async def fail_generation(self, game_id: str, generation: int, code: ErrorCode,
                              message: str, *, answer_now: bool = False,
                              kept_revision: int | None = None) -> RuntimeRecord | None:
        """``generation`` cannot converge: answer its jobs with this failure, and ask for what is safe
        now (desired/transitions.py ``failed``: roll back, stop, or keep removing).

        When a game that was wanted running is to be stopped, its jobs are not answered yet: the
        failure is recorded on them and answered by the transition that records the game stopped (results come after
        convergence: Lobby never hears of a failed start while its engine still runs). With
        ``answer_now`` (a job overdue) they are answered at once. ``kept_revision``: the running engine was
        not touched, and is the unit at that spec revision: the game keeps it (``transitions.failed``).

        Returns the new record, or None when a newer generation took over meanwhile."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(SELECT_FOR_UPDATE, game_id)
            if row is None:
                return None
            cur = record_from_row(row)
            if cur.generation != generation:
                return None
            jobs = await self._pending_ops(conn, game_id, generation)
            asked = {op.op for op in jobs}
            new, target = transitions.failed(cur, now, code=code, message=message, asked=asked,
                                             kept_revision=kept_revision)
            new = await self._write(conn, cur, new, now)
            if transitions.keeps_running(cur, asked):
                await self._answer_failing(conn, new, jobs, code, message, now, failing=FAILING_UNCONVERGED)
                return new
            answer = f"{message}; rolled back to {target}" if target else message
            # Held only when the failed generation wanted the game running (a start whose engine
            # never became healthy): a failed stop is answered now, or it would never be.
            if (new.desired_status is DesiredStatus.STOPPED and cur.desired_status is DesiredStatus.RUNNING
                    and not answer_now):
                for op in jobs:  # answered once stopped (_end_op); a failure recorded first stands
                    await conn.execute("UPDATE runtime_operations SET error_code = $2, error_message = $3"
                                       " WHERE id = $1 AND error_code IS NULL", op.id, code.value, answer)
                return new
            await self._finish_pending(conn, new, Finish(generation=generation, outcome=Outcome.FAILURE,
                                                         error_code=code, message=answer), now)
            if target:
                note_op = jobs[0].op if jobs else JobKind.RECONCILE
                await self._insert_note(conn, new, ReconcilerNote(
                    op=note_op, params={"event": "rollback", "from": cur.desired_image_ref, "to": target,
                                   "failed_generation": generation, "error_code": code.value}), now)
            return new

    async def note_state_restore(self, rec: RuntimeRecord, copy: str, why: str) -> None:
        """In the operation log, before it is done: the game's state directory gets the copy ``copy`` back
        (``why``). A rollback's restore is noted with the rollback; these are the others (a job that asked
        for the replaced image again, a stop during a replacement)."""
        async with self._tx() as (conn, now):
            await self._insert_note(conn, rec, ReconcilerNote(
                op=JobKind.RECONCILE, params={"event": "state_restore", "copy": copy, "why": why},
                message=f"the state directory gets the copy {copy} back: {why}"), now)

    async def cleaned_up(self, game_id: str, generation: int) -> RuntimeRecord | None:
        """The cleanup TTL removed a stopped unit: the record becomes removed, for audit."""
        async with self._tx() as (conn, now):
            row = await conn.fetchrow(SELECT_FOR_UPDATE, game_id)
            if row is None:
                return None
            cur = record_from_row(row)
            if cur.generation != generation or cur.status is not Status.STOPPED:
                return None
            new = await self._write(conn, cur, transitions.cleaned_up(cur, now), now)
            await self._insert_op(conn, game_id, JobKind.CLEANUP, OpSource.RECONCILER, OpStatus.SUCCEEDED,
                                  new.generation, None, None, {"reason": "cleanup_ttl"}, now, None, None)
            return new

    async def find_and_claim(self, game_id: str) -> tuple[RuntimeRecord | None, list[Claimed]]:
        """``find`` and ``claim`` of the record's generation in one statement: the record (with its row's
        version) as it was before the claim, which does not write it, and each queued
        operation of its generation, marked running now. Raises Fenced when the term is over."""
        rows = await self._fenced_read(
            "UPDATE runtime_operations o SET status = 'running' FROM runtime_records r WHERE r.game_id = $1"
            " AND o.game_id = $1 AND o.generation = r.generation AND o.status = 'queued'"
            " AND EXISTS (SELECT 1 FROM fence_ok) RETURNING o.id, o.created_at, o.op",
            "SELECT xmin AS row_version, r.*, (SELECT array_agg(id ORDER BY id) FROM changed) AS claimed_ids,"
            " (SELECT array_agg(created_at ORDER BY id) FROM changed) AS claimed_at,"
            " (SELECT array_agg(op ORDER BY id) FROM changed) AS claimed_ops,"
            " (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.id) FROM runtime_operations p WHERE p.game_id = $1"
            " AND p.status IN ('queued', 'running') AND p.generation <= r.generation) AS pending"
            " FROM runtime_records r WHERE r.game_id = $1", game_id)
        if not rows:
            return None, []
        row = rows[0]
        record = record_from_row(row)
        claimed = [Claimed(op_id, at, JobKind(op)) for op_id, at, op in zip(
            row["claimed_ids"] or (), row["claimed_at"] or (), row["claimed_ops"] or (), strict=True)]
        if record.row_version is not None:
            # The generation's pending jobs at this version of the row, as the claim leaves them: its answer
            # needs no read of them while this store's own writes are the row's only ones (``_swap``).
            ids = {c.id for c in claimed}
            # As JSON, not as the table's row type: asyncpg caches a row type per connection, and a column
            # added by a migration while this process runs would fail the statement after it claimed.
            pending = [operation_from_json(p) for p in json.loads(row["pending"] or "[]")]
            self.remember_pending(game_id, record.row_version, [
                dataclasses.replace(op, status=OpStatus.RUNNING) if op.id in ids else op for op in pending])
        return record, claimed

    async def claim(self, game_id: str, generation: int) -> list[Claimed]:
        """Mark the queued operations of ``generation`` as running; return each."""
        rows = await self._fenced(
            "UPDATE runtime_operations SET status = 'running' WHERE game_id = $1 AND generation = $2"
            " AND status = 'queued' AND EXISTS (SELECT 1 FROM fence_ok) RETURNING id, created_at, op",
            game_id, generation)
        return [Claimed(r["id"], r["created_at"], JobKind(r["op"])) for r in rows]
