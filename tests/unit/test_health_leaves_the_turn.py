"""Issue 25: at 1,000 games half the generated turns cost two record writes: the health round probed an
engine whose turn was in flight, found the turn generated and wrote it (turn, phase, status, snapshot),
then the reconciler's poll converged the generation with its jobs' answers in a second write. The
turn the reconciler asked for is the reconciler's to record: the round wakes it instead, and its poll
records the turn and answers the jobs in one write."""

from __future__ import annotations

import asyncio

from controller.config import Settings
from desired.model import JobKind, OpStatus, Status
from tests.support.world import IMG, World, started


async def _generated_meanwhile(tmp_path) -> World:
    w = World(tmp_path)
    w.engine.admin[IMG] = "slow"
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    rec = await asyncio.wait_for(w.sync("g1"), 30)
    assert rec.status is Status.GENERATION_IN_PROGRESS and not rec.converged
    w.engine.finish_generation("galaxy-game-g1")  # the engine is done; nobody has looked yet
    return w


async def test_the_round_wakes_the_reconciler_for_a_turn_it_asked_for_instead_of_writing_it(tmp_path):
    w = await _generated_meanwhile(tmp_path)
    rec = w.store.records["g1"]
    writes: list[str] = []
    observation = w.store.record_observation

    async def counted(*args, **kw):
        writes.append("record_observation")
        return await observation(*args, **kw)

    w.store.record_observation = counted
    address = w.backend.ip_of(w.running("g1")[0])
    assert await w.reconciler.observe(rec, address) is False  # something is new: not steady
    assert writes == [] and w.store.records["g1"] == rec
    assert w.queue.due_within("g1", 0)  # woken
    done = await asyncio.wait_for(w.sync("g1"), 30)
    assert done.converged and done.turn == 1 and done.status is Status.RUNNING
    assert [o.status for o in w.store.ops if o.op is JobKind.FORCE_NEXT_TURN] == [OpStatus.SUCCEEDED]


async def test_a_failed_probe_of_a_game_with_a_turn_in_flight_is_still_the_rounds(tmp_path):
    """Only a generated turn is left to the reconciler; what else the probe finds is written as before."""
    w = await _generated_meanwhile(tmp_path)
    w.engine.game("galaxy-game-g1").phase = "finished"
    rec = w.store.records["g1"]
    address = w.backend.ip_of(w.running("g1")[0])
    await w.reconciler.observe(rec, address)
    assert w.store.records["g1"].status is Status.FINISHED


async def test_a_turn_the_reconciler_did_not_record_by_the_next_round_is_written_by_the_round(tmp_path):
    """Review: a reconciler that fails on this game (or runs dry) would leave the record generating for
    ever, and its job answered with a failure that stops a healthy game. The round leaves a turn to the
    reconciler once per state of the record; finding it unchanged, it writes it as before."""
    w = await _generated_meanwhile(tmp_path)
    rec = w.store.records["g1"]
    address = w.backend.ip_of(w.running("g1")[0])
    await w.reconciler.observe(rec, address)
    assert w.store.records["g1"] == rec  # left to the reconciler, which does not come
    await w.reconciler.observe(rec, address)  # the next round: the same record
    written = w.store.records["g1"]
    assert written.turn == 1 and written.status is Status.RUNNING


async def test_in_dry_run_the_round_writes_a_generated_turn_itself(tmp_path):
    w = await _generated_meanwhile(tmp_path)
    w.reconciler.health.settings = Settings.from_env({"RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*",
                                                      "RTMANAGER_STATE_ROOT": w.settings.storage.state_root,
                                                      "RTMANAGER_DRY_RUN": "1"})
    assert w.reconciler.health.settings.runtime.dry_run
    rec = w.store.records["g1"]
    await w.reconciler.observe(rec, w.backend.ip_of(w.running("g1")[0]))
    assert w.store.records["g1"].turn == 1


async def test_a_failed_generation_is_the_rounds_to_write(tmp_path):
    """Review: the engine idle at the old turn with its last generation failed is no turn generated."""
    w = await _generated_meanwhile(tmp_path)
    g = w.engine.game("galaxy-game-g1")
    g.turn, g.phase, g.last = 0, "idle", (1, False, "the galaxy collapsed")
    rec = w.store.records["g1"]
    await w.reconciler.observe(rec, w.backend.ip_of(w.running("g1")[0]))
    assert w.store.records["g1"].status is Status.GENERATION_FAILED
