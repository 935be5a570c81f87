"""A turn the engine never generates is answered (red-team finding): an engine idle short of the turn
that answers the request 202 and never generates, 200 or 409 for ever, or says it generates for ever,
kept the turn's job unanswered for ever (with 202, two snapshots every half second). Past
RTMANAGER_START_TIMEOUT + RTMANAGER_GENERATION_TIMEOUT the job is answered engine_unreachable, the game
stays up, and an engine that lost a request it took is asked again every few seconds, not twice a second."""

from __future__ import annotations

import asyncio

import pytest

from desired.model import JobKind, Status
from observed.engine import EngineStatus
from observed.errors import EngineConflict
from tests.support.world import World, started


@pytest.mark.parametrize("answer", ["202", "200", "409", "generating"])
async def test_a_turn_the_engine_never_generates_is_answered(tmp_path, answer):
    w = World(tmp_path)
    await started(w)
    asked: list[int] = []

    async def request_turn(host, expected_turn, *, token=""):
        asked.append(expected_turn)
        if answer == "409":
            raise EngineConflict("busy")
        return answer in ("202", "generating")

    async def status(host, *, token=""):
        return EngineStatus(turn=0, phase="generating" if answer == "generating" and asked else "idle")

    w.engine.request_turn = request_turn
    w.engine.status = status
    snapshots = sum(1 for r in w.store.results if r["kind"] == "snapshot")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    limit = w.settings.engine.start_timeout + w.settings.engine.generation_timeout
    rec = await asyncio.wait_for(w.sync("g1"), 30)
    waited = 0
    while not [r for r in w.results("g1") if r[0] == "force_next_turn"] and waited <= limit + 60:
        w.store.clock.advance(30)
        waited += 30
        rec = await asyncio.wait_for(w.sync("g1"), 30)
    assert limit <= waited <= limit + 60
    assert [r for r in w.results("g1") if r[0] == "force_next_turn"] == [
        ("force_next_turn", "failure", "engine_unreachable")]
    assert rec.status.is_up and rec.desired_status.value == "running" and rec.converged
    assert rec.status is not Status.STOPPED
    assert sum(1 for r in w.store.results if r["kind"] == "snapshot") - snapshots < 2 * len(asked) + 6
