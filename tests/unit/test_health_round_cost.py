"""Issue 25: the health round's cost at scale. Its probes run on a fixed number of workers (not one
task per game: at 100,000 games those tasks and their frames were most of what the garbage collector
walked), and a probe that fails for a reason that is not the game's fails the round at once."""

from __future__ import annotations

import asyncio

import pytest

from controller import triggers
from controller.metrics import Metrics
from controller.triggers import HealthRound
from desired.errors import StoreUnavailable
from tests.support.world import World

pytestmark = pytest.mark.looptime


async def up(w: World, *games: str) -> None:
    from desired.model import JobKind, Status
    from tests.support.world import IMG
    for g in games:
        await w.job(JobKind.START, g, IMG)
        assert (await w.sync(g)).status is Status.RUNNING


async def test_the_round_runs_its_probes_on_a_fixed_number_of_tasks(tmp_path):
    w = World(tmp_path)
    games = [f"g{i}" for i in range(3 * triggers.HEALTH_CONCURRENCY)]
    await up(w, *games)
    seen: list[int] = []
    observe = w.reconciler.observe

    async def counting(record, address):
        seen.append(len(asyncio.all_tasks()))
        await asyncio.sleep(0)
        await observe(record, address)

    w.reconciler.observe = counting
    before = len(asyncio.all_tasks())
    await HealthRound(store=w.store, backend=w.backend, reconciler=w.reconciler, interval=1, metrics=Metrics()).once()
    assert len(seen) == len(games)
    assert max(seen) <= before + triggers.HEALTH_CONCURRENCY


async def test_an_outage_during_the_round_fails_it_and_stops_its_probes(tmp_path):
    w = World(tmp_path)
    games = [f"g{i}" for i in range(3 * triggers.HEALTH_CONCURRENCY)]
    await up(w, *games)
    probed: list[str] = []

    async def away(record, address):
        probed.append(record.game_id)
        await asyncio.sleep(0)
        raise StoreUnavailable("postgres away")

    w.reconciler.observe = away
    before = len(asyncio.all_tasks())
    with pytest.raises(StoreUnavailable):
        await HealthRound(store=w.store, backend=w.backend, reconciler=w.reconciler, interval=1,
                          metrics=Metrics()).once()
    await asyncio.sleep(0.1)
    assert len(probed) <= triggers.HEALTH_CONCURRENCY  # no probe started after the round failed
    assert len(asyncio.all_tasks()) == before  # and none is left running
