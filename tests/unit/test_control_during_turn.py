"""A pause, resume or reconcile of a game whose engine is generating a turn is answered without waiting
for the turn (red-team finding). These never touch the engine; on a game that is up they are answered
``success`` at once. They joined the turn's generation instead and were answered only when the engine
reached the turn: after a long turn as long, and, from an engine that says "generating" for ever,
never. The turn's own job still waits for the turn."""

from __future__ import annotations

import asyncio

import pytest

from desired.model import JobKind
from observed.engine import EngineStatus
from tests.support.world import World, started


def generating_engine(w: World) -> dict:
    eng = {"turn": 0, "phase": "idle"}

    async def request_turn(host, expected_turn, *, token=""):
        eng["phase"] = "generating"
        return True

    async def status(host, *, token=""):
        return EngineStatus(turn=eng["turn"], phase=eng["phase"])

    w.engine.request_turn = request_turn
    w.engine.status = status
    return eng


async def generating(w: World) -> dict:
    await started(w)
    eng = generating_engine(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await asyncio.wait_for(w.sync("g1"), 30)
    assert eng["phase"] == "generating"
    return eng


@pytest.mark.parametrize("ops", [[JobKind.PAUSE], [JobKind.RECONCILE], [JobKind.PAUSE, JobKind.RESUME],
                                 [JobKind.RECONCILE, JobKind.PAUSE, JobKind.RECONCILE]])
async def test_control_jobs_during_a_turn_are_answered_before_it(tmp_path, ops):
    w = World(tmp_path)
    eng = await generating(w)
    for op in ops:
        await w.job(op, "g1")
        w.store.clock.advance(0.5)
        rec = await asyncio.wait_for(w.sync("g1"), 30)
        assert rec.status.value == "generation_in_progress"
    got = [r for r in w.results("g1") if r[0] != "start"]
    assert got == [(op.value, "success", "") for op in ops]  # the turn still generates
    eng.update(turn=1, phase="idle")
    w.store.clock.advance(0.5)
    rec = await asyncio.wait_for(w.sync("g1"), 30)
    assert [r for r in w.results("g1") if r[0] == "force_next_turn"] == [("force_next_turn", "success", "")]
    assert rec.turn == 1 and rec.converged
    assert rec.paused is (JobKind.PAUSE in ops and ops[-1] is not JobKind.RESUME)


async def test_a_pause_of_an_engine_generating_for_ever_is_answered(tmp_path):
    w = World(tmp_path)
    await generating(w)
    w.store.clock.advance(3 * w.settings.engine.generation_timeout)
    await asyncio.wait_for(w.sync("g1"), 30)
    await w.job(JobKind.PAUSE, "g1")
    w.store.clock.advance(0.5)
    rec = await asyncio.wait_for(w.sync("g1"), 30)
    assert ("pause", "success", "") in w.results("g1")
    assert not [r for r in w.results("g1") if r[0] == "force_next_turn"]  # a long turn is a turn
    assert rec.paused and not rec.converged

