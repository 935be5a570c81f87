"""The turn clock when more games are due than its due query returns (a page of ``DUE_PAGE``, 200).

Issue 25 (d0a6ca9) stopped waking the clock for a commit after which a game is no longer due: a turn
asked is such a commit. Before, each turn the clock asked woke it again, so a page full of due games
was followed by the next page a quarter of a second later. Since, a full page whose games are all due
reports no next due time (``next_in`` None), so the clock slept ``max_sleep`` (the resync interval,
30 s by default) or until a turn of the first page was generated and converged: the games beyond the
page waited for it (1,000 games started together on one interval: five waves, each one a turn's
generation apart). The clock itself must look again at once after a full page it asked turns from."""

from __future__ import annotations

import asyncio

import asyncpg

from controller.admission import Admission
from controller.metrics import Metrics
from controller.triggers import TurnClock
from desired.db.store import Store
from desired.jobs import Job, RecordDefaults
from desired.model import JobKind, OpSource
from desired.transitions import Probe
from tests.support import eventually

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMAGE = "galaxy/engine-stub:1.0"
PAGE = 3


class SmallPage(Store):
    """The store with a due page of PAGE games instead of 200 (the same query, fewer games to make)."""

    async def due_turns(self, limit: int = PAGE):
        return await super().due_turns(limit)


async def test_games_beyond_a_full_page_of_due_games_are_asked_at_once(pool: asyncpg.Pool):
    store = SmallPage(pool)
    games = [f"page-{n}" for n in range(PAGE + 2)]
    for game in games:
        await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMAGE,
                               turn_interval=10), DEFAULTS)
        rec = await store.mark_starting(await store.get(game), rollback_image=None)
        await store.mark_running(rec, container_id=f"c-{game}", image=IMAGE,
                                 probe=Probe(healthy=True, admin_api=True, turn=0, phase="idle"))
    await pool.execute("UPDATE runtime_records SET clock_from = now() - interval '1 hour',"
                       " last_turn_at = now() - interval '1 hour'")
    clock = TurnClock(store=store, admission=Admission(store, DEFAULTS, wake=lambda g: None), metrics=Metrics(),
                      max_sleep=30.0)
    clock.page = PAGE
    store.schedule.subscribe(clock.wake.set)
    stopping = asyncio.Event()
    task = asyncio.create_task(clock.run(stopping))

    async def all_asked() -> bool:
        return [(await store.get(g)).desired_turn for g in games] == [1] * len(games)

    try:
        await eventually(all_asked, 5.0, "a turn asked for every due game, the ones beyond the first page too")
    finally:
        stopping.set()
        clock.wake.set()
        await asyncio.wait_for(task, 5)
