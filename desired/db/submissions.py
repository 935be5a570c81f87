"""Admission: jobs recorded as desired state plus an operation, in one transaction.

Admission writes only the *desired* columns and ``generation``, under ``SELECT ... FOR UPDATE``
plus a per-game advisory lock (a record that does not exist yet cannot be locked)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from desired import drains, versions
from desired.db.base import StoreBase
from desired.db.drains import record_drain_step, refusing_targets
from desired.db.notifications import NOTIFY_CHANNEL
from desired.db.pool import translating
from desired.db.rollouts import record_step
from desired.db.rows import (
    GAME_LOCK_SPACE,
    INSERT_OP_WITH_ID,
    INSERT_RESULT,
    SELECT_FOR_UPDATE,
    op_row,
    record_from_row,
    result_row,
    version_from_row,
)
from desired.errors import NotFound, UniqueViolation
from desired.jobs import (
    Decision,
    DecisionAction,
    InvalidJob,
    Job,
    KeyReused,
    RecordDefaults,
    actor_of,
    decide,
    replaces,
    request_digest,
)
from desired.model import (
    DesiredStatus,
    ErrorCode,
    JobKind,
    JobResult,
    OpSource,
    OpStatus,
    Outcome,
    RuntimeRecord,
    Status,
)
from desired.values import Rejection, SubmitOutcome

# Seconds an admission waits for its games' locks (Postgres' lock_timeout, for its transaction only): past it,
# StoreBusy (desired/db/pool.py), which the intake takes as that game's, holding its entries, not as an outage.
LOCK_WAIT = 5.0
IDEMPOTENCY_INDEX = "runtime_operations_idempotency_key"  # migrations/0023_idempotency_keys.sql


@translating
class Submissions(StoreBase):
    """Jobs, rejected entries, adoptions and schedules."""

    async def submit(self, job: Job, defaults: RecordDefaults, *, registry: bool = False) -> SubmitOutcome:
        """Record one job as a desired-state change plus an operation, in one transaction: the
        one-item case of ``submit_many``.

        A stream entry already submitted (redelivery after a crash before XACK)
        is recognised by its (stream, entry_id) and changes nothing. With ``registry`` (the
        version policy), a start or patch that would run a new image needs an active version.
        """
        try:
            return (await self.submit_many([job], defaults, registry=registry))[0]
        except UniqueViolation as exc:
            # The same key sent at once for another game (whose lock this admission did not hold): the first
            # committed, and this one is judged against it (the same request: its operation; another: KeyReused).
            if not job.idempotency_key or exc.constraint != IDEMPOTENCY_INDEX:
                raise
            return (await self.submit_many([job], defaults, registry=registry))[0]

    async def submit_many(self, items: list[Job | Rejection], defaults: RecordDefaults, *,
                          registry: bool = False) -> list[SubmitOutcome]:
        """``submit`` (or, for a Rejection, ``reject_entry``) of each item, in order, in ONE transaction.

        A flood of replays and malformed entries costs a handful of statements per batch instead of
        about eight round trips per entry: one fence check, one duplicate query, the games' locks
        and records at once, then the operation rows and results of the batch in two executemany
        calls. Operation ids are taken from the sequence in entry order first, and rows written at
        once (desired-state changes, supersedes) flush what is buffered before them, so ids and
        results keep the entries' order."""
        keyed = [(i.stream, i.entry_id) for i in items if i.stream]
        # The fence and the duplicates in the transaction's first statement, and a bound on the wait for the
        # games' locks (``LOCK_WAIT``): a record another session holds (an operator's transaction left open)
        # is StoreBusy, that game's alone, not a wait that reads as Postgres being away.
        async with self._tx_reading(
                "ARRAY(SELECT (o.stream, o.entry_id, o.id) FROM runtime_operations o JOIN unnest($1::text[],"
                " $2::text[]) AS k(stream, entry_id) ON o.stream = k.stream AND o.entry_id = k.entry_id) AS existing,"
                f" set_config('lock_timeout', '{int(LOCK_WAIT * 1000)}', true) AS lock_wait",
                [k[0] for k in keyed], [k[1] for k in keyed]) as (conn, now, first):
            existing: dict[tuple[str, str], int] = {(r[0], r[1]): r[2] for r in first["existing"]}
            games = sorted({i.game_id for i in items if isinstance(i, Job)})
            records: dict[str, RuntimeRecord] = {}
            if games:
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext(g)) FROM unnest($2::text[]) AS g"
                                   " ORDER BY g", GAME_LOCK_SPACE, games)
                # The records and the batch's operation ids in one statement, both after the games' locks (so
                # a game's operations are numbered in the order their admissions commit). The rows are locked
                # in game order, as every statement that locks several records does (the turn clock's takes
                # no advisory lock: in the table's order, the two could deadlock).
                # The ids after the records' locks are granted, not before (nextval is not transactional: an id
                # taken while this waits for a transition's lock would be smaller than the operation that
                # transition writes and commits first): the series' bound reads the locked rows (an InitPlan,
                # run before the series), so the rows are locked before any nextval.
                rows = await conn.fetch(
                    "WITH r AS MATERIALIZED (SELECT * FROM runtime_records WHERE game_id = ANY($1::text[])"
                    " ORDER BY game_id FOR UPDATE),"
                    " ids AS (SELECT ARRAY(SELECT nextval(pg_get_serial_sequence('runtime_operations', 'id'))"
                    " FROM generate_series(1, $2::int + 0 * (SELECT count(*) FROM r)::int)) AS ids)"
                    " SELECT ids.ids, r.* FROM ids LEFT JOIN r ON true",
                    games, len(items))
                ids = list(rows[0]["ids"])
                records = {r["game_id"]: record_from_row(r) for r in rows if r["game_id"] is not None}
            else:
                ids = [r[0] for r in await conn.fetch(
                    "SELECT nextval(pg_get_serial_sequence('runtime_operations', 'id')) FROM generate_series(1, $1)",
                    len(items))]
            # REST jobs sent with an Idempotency-Key: the operation each key (of its token) already names. Read
            # under the games' locks: a retry of the same job waits for the first one's admission to commit.
            keys = [(actor_of(i) or "", i.idempotency_key) for i in items if isinstance(i, Job) and i.idempotency_key]
            known: dict[tuple[str, str], tuple[int, str | None]] = {}
            if keys:
                known = {(r["actor"], r["idempotency_key"]): (r["id"], r["digest"]) for r in await conn.fetch(
                    "SELECT o.id, o.actor, o.idempotency_key, o.params ->> 'request_digest' AS digest"
                    " FROM runtime_operations o JOIN unnest($1::text[], $2::text[]) AS k(actor, key)"
                    " ON o.actor = k.actor AND o.idempotency_key = k.key",
                    [k[0] for k in keys], [k[1] for k in keys])}
            ops: list[tuple[Any, ...]] = []
            results: list[tuple[Any, ...]] = []

            async def flush() -> None:
                if ops:
                    await conn.executemany(INSERT_OP_WITH_ID, ops)
                    ops.clear()
                if results:
                    self._outbox_written.add(conn)
                    await conn.executemany(INSERT_RESULT, results)
                    results.clear()

            outcomes: list[SubmitOutcome] = []
            notify: list[str] = []
            joined: set[str] = set()
            for item, op_id in zip(items, ids, strict=True):
                if item.stream and (item.stream, item.entry_id) in existing:
                    outcomes.append(SubmitOutcome(operation_id=existing[(item.stream, item.entry_id)],
                                                  decision=None, duplicate=True))
                    continue
                if isinstance(item, Rejection):
                    ops.append(op_row(op_id, item.game_id, item.kind, item.source, OpStatus.FAILED,
                                       0, item.stream, item.entry_id, {}, now, item.code, item.message,
                                       f"stream:{item.stream}" if item.stream else None))
                    results.append(result_row(op_id, JobResult(
                        result_id=str(uuid.uuid4()), game_id=item.game_id, outcome=Outcome.FAILURE, job=item.kind,
                        job_entry_id=item.entry_id, error_code=item.code, error_message=item.message)))
                    outcomes.append(SubmitOutcome(operation_id=op_id, decision=None))
                    continue
                job = item
                if job.idempotency_key:
                    seen = known.get((actor_of(job) or "", job.idempotency_key))
                    if seen is not None:
                        if seen[1] != request_digest(job):
                            raise KeyReused(f"the Idempotency-Key {job.idempotency_key!r} was used by this token for "
                                            f"another request (operation {seen[0]}); a new request needs a new key")
                        outcomes.append(SubmitOutcome(operation_id=seen[0], decision=None, duplicate=True))
                        continue
                current = records.get(job.game_id)
                decision = await self._decide(conn, current, job, now, defaults, registry)
                if decision.action is DecisionAction.SKIP:  # its operation id stays unused
                    outcomes.append(SubmitOutcome(operation_id=0, decision=decision))
                    continue
                params = {k: v for k, v in (("image_ref", job.image_ref),
                                            ("reason", job.reason.value if job.reason else None),
                                            ("force", job.force),
                                            ("drain_id", job.drain.drain_id if job.drain else None),
                                            ("request_digest", request_digest(job) if job.idempotency_key else None))
                          if v}
                if job.force and decision.waits and decision.record is not None:
                    # An operator's force: this generation's disruption does not wait for a generation.
                    forced = decision.record.replace(force_generation=decision.record.generation)
                    if decision.action is DecisionAction.JOIN and current is not None and forced != current:
                        await flush()
                        records[job.game_id] = await self._write_desired(conn, current, forced, now)
                        notify.append(job.game_id)
                    decision = dataclasses.replace(decision, record=forced)
                status = OpStatus.QUEUED if decision.waits else (
                    OpStatus.SUCCEEDED if decision.action is DecisionAction.REPLAY else OpStatus.FAILED)
                if decision.action is DecisionAction.CHANGE:
                    assert decision.record is not None
                    await flush()
                    # A drain's move: a restore pinned back to its node, or a pin to a drained node cleared.
                    moves = current is not None and decision.record.node_id != current.node_id and (
                        job.drain is not None or decision.record.node_id is None)
                    records[job.game_id] = await self._write_desired(conn, current, decision.record, now, moves=moves)
                    if current is not None and replaces(current, decision.record):
                        await self._supersede_older(conn, decision.record, now)
                    notify.append(job.game_id)
                if job.rollout is not None:  # a rollout's job: its game's row, in this transaction
                    await record_step(conn, job, current, decision, op_id, now)
                if job.drain is not None:  # a drain's job: its game's row, in this transaction
                    await record_drain_step(conn, job, current, decision, op_id, now)
                ops.append(op_row(op_id, job.game_id, job.kind, job.source, status,
                                   decision.op_generation, job.stream or None, job.entry_id or None, params, now,
                                   decision.error_code if status is OpStatus.FAILED else None,
                                   decision.message or None, actor_of(job), job.requested_by, job.idempotency_key))
                if decision.action in (DecisionAction.REPLAY, DecisionAction.REJECT):
                    results.append(result_row(op_id, JobResult(
                        result_id=str(uuid.uuid4()), game_id=job.game_id,
                        outcome=Outcome.SUCCESS if decision.action is DecisionAction.REPLAY else Outcome.FAILURE,
                        job=job.kind,
                        job_entry_id=job.entry_id, container_id=decision.container_id,
                        engine_endpoint=decision.engine_endpoint, error_code=decision.error_code,
                        error_message=decision.message)))
                if decision.action is DecisionAction.JOIN:
                    # Desired state unchanged, but an operation joined the generation: the leader claims it
                    # at its next sync only if woken (controller/reconciler.py ``job_admitted``).
                    notify.append(job.game_id)
                    joined.add(job.game_id)
                outcomes.append(SubmitOutcome(operation_id=op_id, decision=decision))
            await flush()
            if joined:
                # An operation never waits on a record its admission did not write: a job that joined a
                # generation writes the record too (its last operation's time, and so a new row version),
                # so that a compare-and-swap on the row's version that answers the generation's jobs
                # (base.py ``_swap``) cannot miss one that joined after its read.
                await conn.execute("UPDATE runtime_records SET last_op_at = greatest(last_op_at, $2)"
                                   " WHERE game_id = ANY($1::text[])", sorted(joined), now)
            if notify and self.fence is None:
                # Only a process that does not lead (an operator's tool) tells the leader; the leader's own
                # admission wakes its work queue and turn clock in process (controller/admission.py, _tx),
                # and its NOTIFY would only come back to its own listener: a second look at the game.
                await conn.execute("SELECT pg_notify($1, g) FROM unnest($2::text[]) AS g", NOTIFY_CHANNEL,
                                   sorted(set(notify)))
            return outcomes

    async def _decide(self, conn: asyncpg.Connection, current: RuntimeRecord | None, job: Job, now: datetime,
                      defaults: RecordDefaults, registry: bool) -> Decision:
        """``decide``, then, under the registry policy, the version of a new image: read FOR SHARE, so a
        concurrent disable or delete of the version waits for this job. A rollout's patch back to the
        game's own previous image is no new start: only a disabled version refuses it (a rollout's
        source may be deprecated; record_step checks the image is the game's previous one)."""
        decision = decide(current, job, now, defaults)
        if decision.action is DecisionAction.CHANGE and job.kind in (JobKind.START, JobKind.RESTART, JobKind.PATCH):
            targets = await refusing_targets(conn)
            refusal = drains.refusal(current, job.kind, targets)  # a drain keeps it off
            if refusal is not None:
                return Decision(action=DecisionAction.REJECT, record=current, error_code=ErrorCode.HOST_DRAINED,
                                message=refusal)
            if decision.record is not None:  # pinned to a drained node, state shared: a move
                decision = dataclasses.replace(decision, record=drains.unpinned(current, decision.record, job.kind,
                                                                                targets))
        if (registry and job.image_ref and job.kind in (JobKind.START, JobKind.PATCH)
                and decision.waits):
            row = await conn.fetchrow("SELECT * FROM engine_versions WHERE image_ref = $1 FOR SHARE", job.image_ref)
            # An undrain's restore brings back what ran, as a rollout's patch back does.
            back = (job.rollout is not None and job.rollout.back) or (
                job.drain is not None and job.drain.kind is drains.StepKind.RESTORE)
            refuse = versions.refuse_run if back else versions.refuse_new
            refusal = refuse(version_from_row(row) if row else None, job.image_ref)
            if refusal is not None:
                return Decision(action=DecisionAction.REJECT, record=current, error_code=ErrorCode.IMAGE_REJECTED,
                                message=refusal)
        return decision

    async def reject_entry(self, *, kind: JobKind, game_id: str, stream: str, entry_id: str,
                           code: ErrorCode, message: str, source: OpSource = OpSource.LOBBY) -> SubmitOutcome:
        """An entry that could not be parsed: a failed operation and its failure result."""
        async with self._tx() as (conn, now):
            existing = await conn.fetchval(
                "SELECT id FROM runtime_operations WHERE stream = $1 AND entry_id = $2", stream, entry_id)
            if existing is not None:
                return SubmitOutcome(operation_id=existing, decision=None, duplicate=True)
            op_id = await self._insert_op(conn, game_id, kind, source, OpStatus.FAILED, 0,
                                          stream, entry_id, {}, now, code, message, actor=f"stream:{stream}")
            await self._insert_result(conn, op_id, JobResult(
                result_id=str(uuid.uuid4()), game_id=game_id, outcome=Outcome.FAILURE, job=kind,
                job_entry_id=entry_id, error_code=code, error_message=message))
            return SubmitOutcome(operation_id=op_id, decision=None)

    async def adopt(self, game_id: str, image_ref: str, defaults: RecordDefaults,
                    container_id: str | None = None, *, actor: str | None = None, spec_revision: int = 0,
                    node_id: str | None = None) -> RuntimeRecord:
        """An operator hands an unowned unit back to rtmanager: a record that wants it running on its
        own image and state directory, naming the unit (``container_id``): a unit renamed from outside is
        found by it, not only by its name, so no second engine is made beside it. ``spec_revision``: the
        one the unit was made at (a game restarted or moved before its record was lost), so that the unit is
        the one the record asks for, not one to recreate; ``node_id``: the node it runs on, where its state
        is (a Swarm). InvalidJob when the game already has a record."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", GAME_LOCK_SPACE, game_id)
            if await conn.fetchval("SELECT 1 FROM runtime_records WHERE game_id = $1", game_id):
                raise InvalidJob(ErrorCode.INVALID_REQUEST, f"game {game_id} already has a runtime record", game_id)
            refusal = drains.refusal(None, JobKind.START, await refusing_targets(conn))  # a drained host
            if refusal is not None:
                raise InvalidJob(ErrorCode.HOST_DRAINED, refusal, game_id)
            record = RuntimeRecord(
                game_id=game_id, status=Status.STARTING, current_container_id=container_id, current_image_ref=None,
                engine_endpoint=defaults.endpoint(game_id), state_path=defaults.state_path(game_id),
                docker_network=defaults.docker_network, started_at=None, stopped_at=None, removed_at=None,
                last_op_at=now, created_at=now, desired_status=DesiredStatus.RUNNING, desired_image_ref=image_ref,
                generation=1, observed_generation=0, spec_revision=spec_revision, node_id=node_id)
            record = await self._write(conn, None, record, now)
            await self._insert_op(conn, game_id, JobKind.RECONCILE, OpSource.ADMIN, OpStatus.SUCCEEDED, 1, None,
                                  None, {"event": "adopt", "image_ref": image_ref, "container_id": container_id,
                                         "spec_revision": spec_revision, "node_id": node_id},
                                  now, None, None, actor=actor)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, game_id)
            return record

    async def set_schedule(self, game_id: str, turn_interval: int, source: OpSource, *,
                           actor: str | None = None) -> RuntimeRecord:
        """The turn clock's interval (desired state; nothing to converge, so no generation)."""
        async with self._tx() as (conn, now):
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", GAME_LOCK_SPACE, game_id)
            row = await conn.fetchrow(SELECT_FOR_UPDATE, game_id)
            if row is None:
                raise NotFound(game_id)
            cur = record_from_row(row)
            if cur.desired_status is DesiredStatus.REMOVED:
                raise InvalidJob(ErrorCode.INVALID_REQUEST, f"game {game_id} was removed", game_id)
            new = await self._write_desired(conn, cur, cur.replace(turn_interval=turn_interval,
                                                                   last_op_at=max(now, cur.last_op_at)), now)
            await self._insert_op(conn, game_id, JobKind.RECONCILE, source, OpStatus.SUCCEEDED, cur.generation,
                                  None, None, {"turn_interval": turn_interval}, now, None, None, actor=actor)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, game_id)
            return new
