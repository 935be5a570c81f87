"""A pause, resume or reconcile of a game whose engine is generating a turn is answered without waiting
for the turn (red-team finding). These never touch the engine; on a game that is up they are answered
``success`` at once. They joined the turn's generation instead and were answered only when the engine
reached the turn: after a long turn as long, and, from an engine that says "generating" for ever,
never. The turn's own job still waits for the turn."""

from __future__ import annotations

import asyncio

import pytest

from desired.errors import DockerUnavailable, StoreUnavailable
from desired.jobs import Job
from desired.model import JobKind, OpSource
from observed.errors import BackendUnavailable
from tests.support.world import IMG, World, started, turn_engine


async def generating(w: World) -> dict:
    await started(w)
    eng = turn_engine(w)
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



async def test_a_resume_right_after_the_answered_pause_does_not_bring_back_the_withdrawn_turn(tmp_path):
    """Review: answering the pause before the turn path withdrew the scheduled turn it cancels let Lobby's
    resume, sent on seeing that answer, land first: the turn was then generated. A pause of a scheduled
    turn the engine was not asked for is answered with its withdrawal, in one transaction, as before."""
    w = World(tmp_path)
    await w.store.submit(Job(kind=JobKind.START, game_id="g1", source=OpSource.LOBBY, image_ref=IMG,
                             turn_interval=10, stream="s", entry_id="0-1"), w.defaults)
    await asyncio.wait_for(w.sync("g1"), 30)
    w.store.clock.advance(11)
    await w.store.submit(Job(kind=JobKind.TURN, game_id="g1", source=OpSource.SCHEDULER), w.defaults)
    await w.job(JobKind.PAUSE, "g1")
    real, sent = w.engine.status, []

    async def status(host, *, token=""):  # Lobby resumes once it sees the pause answered
        if ("pause", "success", "") in w.results("g1") and not sent:
            sent.append(1)
            await w.job(JobKind.RESUME, "g1")
        return await real(host, token=token)

    w.engine.status = status
    for _ in range(3):
        await asyncio.wait_for(w.sync("g1"), 30)
    assert w.engine.requests == []
    assert ("turn", "failure", "superseded") in w.results("g1")


@pytest.mark.parametrize("where", ["answer", "look"])
async def test_a_pause_whose_early_answer_failed_once_is_answered_at_a_later_poll(tmp_path, where):
    """Review: the early answer was tried only on the look that claimed the pause; a database blip in the
    answer, or a Docker blip in the look after the claim, left it waiting for the turn (for ever, for an
    engine that generates for ever)."""
    w = World(tmp_path)
    await generating(w)
    await w.job(JobKind.PAUSE, "g1")
    w.reconciler.job_admitted("g1")
    if where == "answer":
        real = w.store.answer_during_turn

        async def once(rec):
            w.store.answer_during_turn = real
            raise StoreUnavailable("blip")

        w.store.answer_during_turn = once
    else:
        real_lost = w.backend.lost_nodes

        async def once_lost():
            w.backend.lost_nodes = real_lost
            raise BackendUnavailable("blip")

        w.backend.lost_nodes = once_lost
    for _ in range(5):
        w.store.clock.advance(0.5)
        try:
            await asyncio.wait_for(w.sync("g1"), 30)
        except (StoreUnavailable, DockerUnavailable):  # what the reconciler's worker backs off from
            pass
    assert ("pause", "success", "") in w.results("g1")
    assert not [r for r in w.results("g1") if r[0] == "force_next_turn"]
