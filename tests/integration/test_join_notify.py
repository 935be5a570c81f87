"""A replica's (operator tool's, CLI's: no fence) admission of a job that JOINs a pending generation tells the
leader, whose claim memo (controller/reconciler.py, g25-turn3) skips the claim until a job of the game is
admitted: without the NOTIFY the joined operation stays ``queued`` until the generation converges."""

from __future__ import annotations

import asyncio

import asyncpg

from desired.db.notifications import NOTIFY_CHANNEL
from desired.db.store import Store
from desired.jobs import Job
from desired.model import JobKind, OpSource
from tests.integration.test_store import DEFAULTS, converge_running, start


def turn(entry: str) -> Job:
    return Job(kind=JobKind.FORCE_NEXT_TURN, game_id="g1", source=OpSource.LOBBY, stream="s:control", entry_id=entry)


async def test_a_replicas_join_notifies_the_leader(pool, database_url):
    store = Store(pool)  # no fence: a process that does not lead
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    await store.submit(turn("2-0"), DEFAULTS)  # a new generation (a CHANGE: notified)
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener(NOTIFY_CHANNEL, lambda *a: heard.put_nowait(a[3]))
        outcome = await store.submit(turn("3-0"), DEFAULTS)  # the same turn: it joins the generation
        assert outcome.decision is not None and outcome.decision.action.value == "join"
        assert await asyncio.wait_for(heard.get(), 5) == "g1"
    finally:
        await conn.close()


async def test_a_games_operations_are_numbered_in_commit_order(pool, database_url):
    """Admission takes its operation ids in the statement that locks the records (g25-turn3): when a transition
    holds the record's lock (lock_record) and writes an operation of its own (a reconciler's note,
    base.py ``_insert_note``), the admission's ids must still come after it, as it commits after it."""
    store = Store(pool)
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await converge_running(store, "g1")
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT * FROM runtime_records WHERE game_id = 'g1' FOR UPDATE")  # a transition's lock
        admission = asyncio.ensure_future(store.submit(turn("2-0"), DEFAULTS))
        await asyncio.sleep(0.5)  # the admission waits for the record
        assert not admission.done()
        note = await conn.fetchval(
            "INSERT INTO runtime_operations (game_id, op, source, status, generation, params, created_at, finished_at)"
            " VALUES ('g1', 'reconcile', 'reconciler', 'succeeded', 1, '{}'::jsonb, now(), now()) RETURNING id")
        await tx.commit()
        outcome = await asyncio.wait_for(admission, 10)
        assert outcome.operation_id > note, (outcome.operation_id, note)
    finally:
        await conn.close()
