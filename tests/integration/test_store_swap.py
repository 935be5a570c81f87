"""A compare-and-swap of a record read with its row's version is one statement (issue 25: the turn's
cost), and never decides otherwise than the locking path would.

``StoreBase._swap`` writes ``change(rec)`` over ``rec`` only if the row is still the version ``rec`` was
read as (Postgres' ``xmin``) and the leadership term is current; anything else (the row moved, the
clocks are apart, a record made by ``replace``) goes the locking path, which reads the row under its
lock and decides on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from desired.clock import Clock
from desired.db.store import Store
from desired.errors import Conflict
from desired.jobs import Job, RecordDefaults
from desired.model import JobKind, OpSource, Status
from desired.transitions import Probe
from desired.wakeup import OUTBOX_CHANNEL
from tests.support.statements import Counter

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMAGE = "galaxy/engine-stub:1.0"


async def turn_asked(store: Store, game: str):
    """A running game at turn 0 whose desired state asks for turn 1, read with its row's version."""
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMAGE), DEFAULTS)
    rec = await store.mark_starting(await store.get(game), rollback_image=None)
    await store.mark_running(rec, container_id=f"c-{game}", image=IMAGE,
                             probe=Probe(healthy=True, admin_api=True, turn=0, phase="idle"))
    await store.submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id=game, source=OpSource.LOBBY), DEFAULTS)
    rec = await store.get(game)
    assert rec.row_version is not None and rec.desired_turn == 1 and rec.status is Status.RUNNING
    return rec


async def snapshots(pool: asyncpg.Pool, game: str) -> list[dict]:
    rows = await pool.fetch("SELECT fields FROM job_results WHERE game_id = $1 AND kind = 'snapshot' ORDER BY seq",
                            game)
    return [json.loads(r["fields"]) for r in rows]


async def test_a_record_read_with_its_version_changes_in_one_statement_with_its_snapshot(pool):
    store = Store(pool)
    rec = await turn_asked(store, "swap-one")
    outbox = []
    store.outbox.subscribe(lambda: outbox.append(1))
    before = len(await snapshots(pool, "swap-one"))
    with Counter() as sql:
        new = await store.turn_requested(rec)
    assert sql.total == 1, sql.queries
    assert new.status is Status.GENERATION_IN_PROGRESS and new.row_version not in (None, rec.row_version)
    assert await store.get("swap-one") == new and (await store.get("swap-one")).row_version == new.row_version
    snaps = await snapshots(pool, "swap-one")
    assert len(snaps) == before + 1 and outbox == [1]
    assert snaps[-1]["status"] == "generation_in_progress"
    assert int(snaps[-1]["revision"]) == new.snapshot_revision == rec.snapshot_revision + 1
    assert snaps[-1]["reason"] == "generation_started" and snaps[-1]["previous_status"] == "running"
    # The timestamps are the database's clock (within the skew bound).
    db_now = await pool.fetchval("SELECT now()")
    assert abs((db_now - new.generation_started_at).total_seconds()) < 1.0
    # The record it returns carries the row's new version: the next change from it is one statement too,
    # and so is a change of nothing (a read of the row's version).
    with Counter() as sql:
        same = await store.record_observation(new, Probe(healthy=True, admin_api=True, turn=0, phase="generating"),
                                              unreachable_after=3, generation_timeout=600)
    assert sql.total == 1 and same is new, sql.queries
    with Counter() as sql:
        reached = await store.record_observation(new, Probe(healthy=True, admin_api=True, turn=1, phase="idle"),
                                                 unreachable_after=3, generation_timeout=600)
    assert sql.total == 1 and reached.turn == 1, sql.queries
    assert await store.get("swap-one") == reached


async def test_a_row_that_moved_since_it_was_read_takes_the_lock_and_is_decided_on_as_it_is(pool):
    store = Store(pool)
    rec = await turn_asked(store, "swap-moved")
    # Another writer changed a column the compare-and-swap does not look at (as a schedule does).
    await pool.execute("UPDATE runtime_records SET turn_interval = 99 WHERE game_id = 'swap-moved'")
    with Counter() as sql:
        new = await store.turn_requested(rec)
    assert sql.total > 1  # the one statement found the row moved: the locking path
    assert new.status is Status.GENERATION_IN_PROGRESS and new.turn_interval == 99  # the row as it is
    assert await store.get("swap-moved") == new
    # A change of what it does look at is a conflict, as before.
    stale = await store.get("swap-moved")
    await store.record_observation(stale, Probe(healthy=True, admin_api=True, turn=1, phase="idle"),
                                   unreachable_after=3, generation_timeout=600)
    with pytest.raises(Conflict):
        await store.turn_requested(stale)


async def test_a_replaced_record_is_no_rows_and_takes_the_lock(pool):
    store = Store(pool)
    rec = await turn_asked(store, "swap-replaced")
    local = rec.replace(paused=True)  # a copy changed here: not the row
    assert local.row_version is None and local == rec.replace(paused=True)
    with Counter() as sql:
        new = await store.turn_requested(local)
    assert sql.total > 1
    assert not new.paused  # decided on the row, not on the local copy


class Ahead(Clock):
    """A process whose reading of the database clock is a minute ahead (and stays so)."""

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=60)

    def observe_db(self, db_now, before, after) -> None:
        pass


async def test_a_clock_far_from_the_databases_takes_the_lock_and_its_time(pool):
    store = Store(pool, clock=Ahead())
    rec = await turn_asked(Store(pool), "swap-clock")
    with Counter() as sql:
        new = await store.turn_requested(rec)
    assert sql.total > 1
    db_now = await pool.fetchval("SELECT now()")
    assert abs((db_now - new.generation_started_at).total_seconds()) < 5.0  # the database's time


async def test_a_tool_without_a_fence_tells_the_leaders_relay(pool, database_url):
    """An operator's tool writes with no fence: its snapshot must reach the leader's relay by NOTIFY,
    as the locking path's does."""
    rec = await turn_asked(Store(pool), "swap-tool")
    tool = Store(pool)
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener(OUTBOX_CHANNEL, lambda *a: heard.put_nowait(a[3]))
        with Counter() as sql:
            await tool.turn_requested(rec)
        assert sql.total == 1
        assert await asyncio.wait_for(heard.get(), 5) == tool.outbox.origin
    finally:
        await conn.close()


# ----------------------------------------- answering the generation's jobs without the record's lock
async def generating(store: Store, game: str):
    rec = await turn_asked(store, game)
    return await store.turn_requested(rec)


async def results_of(pool: asyncpg.Pool, game: str, ops: list[int]) -> dict[int, int]:
    """How many results each of the operations ``ops`` has."""
    rows = await pool.fetch("SELECT operation_id, count(*) AS n FROM job_results WHERE game_id = $1 AND kind = 'result'"
                            " AND operation_id = ANY($2::bigint[]) GROUP BY operation_id", game, ops)
    return {r["operation_id"]: r["n"] for r in rows}


class AfterTheRead:
    """The pool, whose connections run ``then`` once right after the swap's read of the pending operations."""

    def __init__(self, pool: asyncpg.Pool, then) -> None:
        self._pool, self._then, self.fired = pool, then, False

    def __getattr__(self, name):
        return getattr(self._pool, name)

    @contextlib.asynccontextmanager
    async def acquire(self):
        async with self._pool.acquire() as conn:
            yield _Hooked(conn, self)


class _Hooked:
    def __init__(self, conn: asyncpg.Connection, hook: AfterTheRead) -> None:
        self._conn, self._hook = conn, hook

    def __getattr__(self, name):
        return getattr(self._conn, name)

    async def fetch(self, query, *args):
        rows = await self._conn.fetch(query, *args)
        if not self._hook.fired and query.startswith("SELECT * FROM runtime_operations WHERE game_id"):
            self._hook.fired = True
            await self._hook._then()  # noqa: SLF001
        return rows


async def test_a_generated_turn_answers_its_jobs_in_a_read_and_one_write(pool):
    store = Store(pool)
    rec = await generating(store, "swap-done")
    (op,) = await store.pending_operations("swap-done")
    before = await snapshots(pool, "swap-done")
    with Counter() as sql:
        new = await store.mark_running(rec, container_id="c-swap-done", image=IMAGE,
                                       probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
    assert sql.total == 2, sql.queries
    assert new.converged and new.turn == 1 and new.status is Status.RUNNING
    assert await store.get("swap-done") == new
    assert await store.pending_operations("swap-done") == []
    done = {o.id: o for o in await store.operations("swap-done")}[op.id]
    assert done.status.value == "succeeded" and done.finished_at is not None
    assert await results_of(pool, "swap-done", [op.id]) == {op.id: 1}
    snaps = await snapshots(pool, "swap-done")
    assert len(snaps) == len(before) + 1 and snaps[-1]["reason"] == "turn_generated"
    # The snapshot comes before the result it goes with (the outbox's order is the streams').
    kinds = [r["kind"] for r in await pool.fetch(
        "SELECT kind FROM job_results WHERE game_id = 'swap-done' ORDER BY seq DESC LIMIT 2")]
    assert kinds == ["result", "snapshot"]


async def test_a_job_that_joins_after_the_read_is_answered_not_lost(pool):
    """The interleaving that would lose a job: the swap reads the generation's pending jobs, a forced
    turn joins the generation (same turn: no new generation), then the swap writes. The joined job's
    admission wrote the record, so the swap's write does not happen and the locking path answers both."""
    store = Store(pool)
    rec = await generating(store, "swap-join")

    async def join() -> None:
        out = await Store(pool).submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="swap-join",
                                           source=OpSource.LOBBY, stream="s:control", entry_id="9-0"), DEFAULTS)
        assert out.decision is not None and out.decision.action == "join"

    store.pool = AfterTheRead(pool, join)
    new = await store.mark_running(rec, container_id="c-swap-join", image=IMAGE,
                                   probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
    assert store.pool.fired
    assert new.converged and await Store(pool).pending_operations("swap-join") == []
    ops = [o for o in await Store(pool).operations("swap-join") if o.op is JobKind.FORCE_NEXT_TURN]
    assert len(ops) == 2 and all(o.status.value == "succeeded" for o in ops)
    assert await results_of(pool, "swap-join", [o.id for o in ops]) == {o.id: 1 for o in ops}


async def test_a_job_answered_meanwhile_by_another_path_gets_no_second_answer(pool):
    store = Store(pool)
    rec = await generating(store, "swap-other")
    (op,) = await store.pending_operations("swap-other")

    async def answered_elsewhere() -> None:
        await pool.execute("UPDATE runtime_operations SET status = 'failed', error_code = 'internal_error',"
                           " finished_at = now() WHERE id = $1", op.id)

    store.pool = AfterTheRead(pool, answered_elsewhere)
    new = await store.mark_running(rec, container_id="c-swap-other", image=IMAGE,
                                   probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
    assert store.pool.fired and new.converged
    done = {o.id: o for o in await Store(pool).operations("swap-other")}[op.id]
    assert done.status.value == "failed"  # its answer stands
    assert await results_of(pool, "swap-other", [op.id]) == {}  # and the swap wrote it no result


# ------------------------------------------------------------- found by review (issue 25)
async def test_a_swap_waiting_on_an_uncommitted_write_does_not_overwrite_it(pool):
    """The version is checked again once the row's lock is granted: a write committed while the swap
    waited for it makes the swap fall back, and the locking path decides on the row as it is."""
    store = Store(pool)
    rec = await turn_asked(store, "swap-epq")
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE runtime_records SET paused = true WHERE game_id = 'swap-epq'")
        task = asyncio.create_task(store.turn_requested(rec))
        done, _ = await asyncio.wait({task}, timeout=0.7)
        assert not done, "the swap did not wait for the row's lock"
        await tx.commit()
    new = await asyncio.wait_for(task, 10)
    assert new.paused and (await store.get("swap-epq")).paused, "the concurrent write was lost"
    assert new.status is Status.GENERATION_IN_PROGRESS


async def test_a_swap_that_changes_nothing_is_fenced(pool, database_url):
    from desired.db.lease import Lease
    from desired.leader import Fence, Fenced

    old_fence, new_fence = Fence(instance="i", holder="old", ttl=5), Fence(instance="i", holder="new", ttl=5)
    old, new = Lease(database_url, old_fence), Lease(database_url, new_fence)
    try:
        assert await old.acquire() == 1
        old_store = Store(pool, fence=old_fence)
        await old_store.submit(Job(kind=JobKind.START, game_id="noop", source=OpSource.LOBBY, image_ref=IMAGE),
                               DEFAULTS)
        await old_store.set_admin_token(await Store(pool).get("noop"), "t" * 32)
        await pool.execute("UPDATE leader_leases SET expires_at = now()")  # the term lapses in the database
        assert await new.acquire() == 2
        assert old_fence.valid_locally  # the old leader does not know yet
        with pytest.raises(Fenced):  # as the locking path raised for a write of nothing
            await old_store.set_admin_token(await Store(pool).get("noop"), "t" * 32)
    finally:
        await old.close()
        await new.close()


async def test_a_swap_that_waits_for_a_connection_reads_the_clock_after_the_wait(pool):
    """Found by review: the swap read the clock, then waited for a pooled connection: a wait of 0.5 s
    failed the skew guard (the locking path, under load, when it matters) and moved the clock's offset
    by half the wait."""
    store = Store(pool)
    rec = await turn_asked(store, "swap-pool")
    await store.ping()
    held = [await pool.acquire() for _ in range(pool.get_max_size())]

    async def give_back() -> None:
        await asyncio.sleep(0.8)
        for c in held:
            await pool.release(c)

    releaser = asyncio.create_task(give_back())
    with Counter() as sql:
        await store.turn_requested(rec)
    await releaser
    assert sql.total == 1, sql.queries
    assert abs(store.clock.offset.total_seconds()) < 0.2


async def test_a_note_on_a_job_between_the_read_and_the_write_is_in_its_answer(pool):
    """Found by review: a disruption's note (``note_disruption_overdue``) on a pending job between the
    swap's read of the jobs and its write: the note changes the job's answer, so it writes the record too
    and the swap falls back to the locking path, which answers with it."""
    store = Store(pool)
    rec = await generating(store, "swap-note")
    (op,) = await store.pending_operations("swap-note")

    async def note() -> None:
        await Store(pool).note_disruption_overdue(rec, "restart", 42.0, "NOTE-XYZ")

    store.pool = AfterTheRead(pool, note)
    new = await store.mark_running(rec, container_id="c-swap-note", image=IMAGE,
                                   probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
    assert store.pool.fired and new.converged
    fields = json.loads(await pool.fetchval("SELECT fields FROM job_results WHERE operation_id = $1", op.id))
    assert "NOTE-XYZ" in json.dumps(fields), fields


# ------------------------------------------------ the jobs a look read, carried to the answer (issue 25)
async def looked_and_asked(store: Store, game: str):
    """A woken game's look (it claims, and reads the pending jobs with the record), then the turn request."""
    await turn_asked(store, game)
    rec, claimed = await store.find_and_claim(game)
    assert len(claimed) == 1
    return await store.turn_requested(rec)


async def answered(store: Store, pool: asyncpg.Pool, game: str, rec):
    new = await store.mark_running(rec, container_id=f"c-{game}", image=IMAGE,
                                   probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
    assert new.converged and await Store(pool).pending_operations(game) == []
    ops = [o for o in await Store(pool).operations(game) if o.op is JobKind.FORCE_NEXT_TURN]
    assert all(o.status.value == "succeeded" for o in ops), ops
    assert await results_of(pool, game, [o.id for o in ops]) == {o.id: 1 for o in ops}
    return ops


async def test_a_turn_whose_look_read_its_jobs_answers_them_in_one_statement(pool):
    """The look read the generation's pending jobs with the record; the record's own writes since (the
    request, a probe) were this store's compare-and-swaps, which add no job: the answer needs no read."""
    store = Store(pool)
    rec = await looked_and_asked(store, "carry-one")
    rec = await store.record_observation(rec, Probe(healthy=True, admin_api=True, turn=0, phase="generating",
                                                    refused="slow"), unreachable_after=3, generation_timeout=600)
    assert rec.last_error_code is not None  # a probe that changed the record: a swap of this store
    with Counter() as sql:
        new = await store.mark_running(rec, container_id="c-carry-one", image=IMAGE,
                                       probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
    assert sql.total == 1, sql.queries
    assert new.converged
    assert len(await answered(store, pool, "carry-one", new)) == 1


async def test_the_first_change_after_the_look_needs_no_read_either(pool):
    store = Store(pool)
    await turn_asked(store, "carry-first")
    rec, _ = await store.find_and_claim("carry-first")
    with Counter() as sql:
        await store.mark_running(rec, container_id="c-carry-first", image=IMAGE,
                                 probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
    assert sql.total == 1, sql.queries


async def test_a_job_that_joins_after_the_look_is_answered_too(pool):
    """A forced turn joins the generation after the look: its admission wrote the record, so what the look
    read is not that version's; the answer reads the jobs again (or the swap falls back)."""
    store = Store(pool)
    rec = await looked_and_asked(store, "carry-join")
    out = await Store(pool).submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="carry-join", source=OpSource.LOBBY,
                                       stream="s:control", entry_id="9-0"), DEFAULTS)
    assert out.decision is not None and out.decision.action == "join"
    rec = await store.find("carry-join")  # the poll's read: the version the join wrote
    assert len(await answered(store, pool, "carry-join", rec)) == 2


async def test_a_job_that_joins_before_the_request_is_answered_too(pool):
    store = Store(pool)
    await turn_asked(store, "carry-early")
    rec, _ = await store.find_and_claim("carry-early")
    await Store(pool).submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="carry-early", source=OpSource.LOBBY,
                                 stream="s:control", entry_id="9-1"), DEFAULTS)
    rec = await store.turn_requested(rec)  # from the look's version: the locking path
    assert len(await answered(store, pool, "carry-early", rec)) == 2


async def test_a_note_on_a_job_after_the_look_is_in_its_answer(pool):
    store = Store(pool)
    rec = await looked_and_asked(store, "carry-note")
    (op,) = await store.pending_operations("carry-note")
    await Store(pool).note_disruption_overdue(rec, "restart", 42.0, "NOTE-CARRY")
    rec = await store.find("carry-note")
    await answered(store, pool, "carry-note", rec)
    fields = json.loads(await pool.fetchval("SELECT fields FROM job_results WHERE operation_id = $1", op.id))
    assert "NOTE-CARRY" in json.dumps(fields), fields


async def test_a_column_added_while_running_does_not_fail_the_claiming_look(pool):
    """Review: the look read the pending jobs as the table's row type, which asyncpg caches per connection:
    a migration adding a column while the controller ran failed its next look after it had claimed."""
    store = Store(pool)
    await turn_asked(store, "carry-ddl")
    await store.find_and_claim("carry-ddl")
    await pool.execute("ALTER TABLE runtime_operations ADD COLUMN added_later integer")
    out = await Store(pool).submit(Job(kind=JobKind.FORCE_NEXT_TURN, game_id="carry-ddl", source=OpSource.LOBBY,
                                       stream="s:control", entry_id="9-2"), DEFAULTS)
    for _ in range(2):  # on every pooled connection
        rec, claimed = await store.find_and_claim("carry-ddl")
        assert rec is not None
    assert [o.status.value for o in await store.pending_operations("carry-ddl")] == ["running", "running"]
    assert out.operation_id in {o.id for o in await store.pending_operations("carry-ddl")}


async def test_jobs_carried_from_another_term_are_read_again(pool, database_url):
    """Review: a failover to a replica that lost transactions may give a row version again; what a store
    carried is used only in the term it was read in."""
    from desired.db.lease import Lease
    from desired.leader import Fence

    fence = Fence(instance="carry", holder="me", ttl=5)
    lease = Lease(database_url, fence)
    try:
        assert await lease.acquire() == 1
        store = Store(pool, fence=fence)
        await turn_asked(store, "carry-term")
        rec, _ = await store.find_and_claim("carry-term")
        assert await lease.acquire(reclaim=True) == 2  # this replica again, in a new term
        with Counter() as sql:
            await store.mark_running(
                rec, container_id="c-carry-term", image=IMAGE,
                probe=Probe(healthy=True, admin_api=True, turn=1, phase="idle"))
        assert sql.total == 2, sql.queries  # the jobs were read again
        await answered(store, pool, "carry-term", await store.get("carry-term"))
    finally:
        await lease.close()
