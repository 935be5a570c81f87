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
