"""Issue 25: an engine the turn path talked to within the last health interval is not probed again by the
health round. At 1,000 games on a turn clock every engine had a turn in flight at nearly every round, so no
engine was ever steady (controller/pacing.py) and the round probed all of them: 1.75 probes per turn on top
of the turn's own POST and status poll, most of the round's cost and about a quarter of the CPU per turn.

A status the turn path got is as fresh as the round's probe would be: the engine answered over the same
admin API, within the same interval, and the answer was written into the record as a probe's is. What the
round still probes: an engine whose last status request failed (a refusal, a timeout, garbage) or whose
turn request did, one whose last status is older than the interval, one whose record is not known healthy,
and a new unit of the game."""

from __future__ import annotations

import pytest

from controller.metrics import Metrics
from controller.triggers import HealthRound
from desired.model import ErrorCode, Health, JobKind, Status
from observed.errors import EngineConflict, EngineUnreachable
from tests.support.world import IMG, World

pytestmark = pytest.mark.looptime

INTERVAL = 15.0


async def up(w: World, *games: str) -> None:
    for g in games:
        await w.job(JobKind.START, g, IMG)
        assert (await w.sync(g)).status is Status.RUNNING


def statuses(w: World) -> list[str]:
    """The games whose engine was asked its status, in order."""
    asked: list[str] = []
    status = w.engine.status

    async def counted(host: str, *, token: str = ""):
        c = w.engine._container(host)
        asked.append(c.name.removeprefix("galaxy-game-") if c else host)
        return await status(host, token=token)

    w.engine.status = counted
    return asked


async def probed_in_a_round(w: World) -> list[str]:
    """The games whose engine one health round asked its status, in order."""
    asked = statuses(w)
    await health_round(w).once()
    return asked


def health_round(w: World) -> HealthRound:
    return HealthRound(store=w.store, backend=w.backend, reconciler=w.reconciler, interval=INTERVAL,
                       metrics=Metrics())


async def turned(w: World, game: str) -> None:
    """A forced turn, asked for and recorded by the turn path (two looks: the ask, then its poll)."""
    turn = w.store.records[game].turn or 0
    await w.job(JobKind.FORCE_NEXT_TURN, game)
    await w.sync(game)
    assert (await w.sync(game)).turn == turn + 1


async def test_an_engine_the_turn_path_talked_to_within_the_interval_is_not_probed(tmp_path):
    w = World(tmp_path)
    await up(w, "g1", "g2")
    w.store.clock.advance(INTERVAL + 1)  # the starts' own answers are old
    await turned(w, "g1")
    assert await probed_in_a_round(w) == ["g2"]


async def test_an_answer_older_than_the_interval_does_not_count(tmp_path):
    w = World(tmp_path)
    await up(w, "g1")
    await turned(w, "g1")
    w.store.clock.advance(INTERVAL + 0.5)
    assert await probed_in_a_round(w) == ["g1"]


async def test_a_turn_path_that_got_no_answer_leaves_the_engine_to_the_round(tmp_path):
    w = World(tmp_path)
    await up(w, "g1")
    w.store.clock.advance(INTERVAL + 1)
    w.engine.fail["galaxy-game-g1"] = EngineUnreachable("engine turns: timed out")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")
    del w.engine.fail["galaxy-game-g1"]
    assert await probed_in_a_round(w) == ["g1"]


async def test_a_record_with_a_failed_probe_is_probed_whatever_the_turn_path_heard(tmp_path):
    w = World(tmp_path)
    await up(w, "g1")
    w.store.clock.advance(INTERVAL + 1)
    await turned(w, "g1")
    rec = w.store.records["g1"]
    w.store.records["g1"] = rec.replace(probe_failures=1)
    assert await probed_in_a_round(w) == ["g1"]


async def test_a_unit_that_no_longer_runs_is_looked_at_whatever_its_engine_answered(tmp_path):
    w = World(tmp_path)
    await up(w, "g1")
    w.store.clock.advance(INTERVAL + 1)
    await turned(w, "g1")
    w.backend.crash("g1")
    woken: list[str] = []
    w.reconciler.health._wake = woken.append  # the reconciler's work queue, as the round wakes it
    await health_round(w).once()
    assert "g1" in woken


async def test_an_answer_of_the_engine_a_restart_replaced_does_not_count_for_the_new_one(tmp_path):
    w = World(tmp_path)
    await up(w, "g1")
    await turned(w, "g1")
    before = w.store.records["g1"].current_container_id
    await w.job(JobKind.RESTART, "g1")
    for _ in range(5):
        rec = await w.sync("g1")
        if rec.converged:
            break
    assert rec.status is Status.RUNNING and rec.current_container_id != before
    assert await probed_in_a_round(w) == ["g1"]


async def test_an_engine_that_refuses_turns_as_busy_and_answers_no_status_is_probed(tmp_path):
    """Found by review: the engine answers a turn request 409 (busy in a generation the record does not
    know of) but its status times out. A 409 is no status: the round probes it, and after
    RTMANAGER_UNREACHABLE_AFTER such rounds the game is engine_unreachable."""
    w = World(tmp_path)
    await up(w, "g1")
    await turned(w, "g1")  # an answer that counts, from before the engine wedged

    async def busy(host: str, expected_turn: int, *, token: str = "") -> bool:
        raise EngineConflict("generating")

    async def silent(host: str, *, token: str = ""):
        raise EngineUnreachable("engine status: timed out")

    async def unhealthy(host: str) -> tuple[bool, str]:
        return False, "timed out"

    w.engine.request_turn, w.engine.status, w.engine.check = busy, silent, unhealthy
    health = health_round(w)
    for _ in range(w.settings.engine.unreachable_after):
        await w.job(JobKind.FORCE_NEXT_TURN, "g1")
        await w.sync("g1")  # the 409, then the status that does not come
        await health.once()
    assert w.store.records["g1"].status is Status.ENGINE_UNREACHABLE


async def test_an_engine_that_refuses_our_token_is_probed_and_the_refusal_written(tmp_path):
    w = World(tmp_path)
    await up(w, "g1")
    await turned(w, "g1")
    unit = w.backend.by_name("galaxy-game-g1")
    unit.admin_token = "the token of a restored database's unit"  # the engine refuses the record's token
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")
    assert await probed_in_a_round(w) == ["g1"]
    assert w.store.records["g1"].last_error_code is ErrorCode.ENGINE_REFUSED


async def test_a_record_not_known_healthy_is_probed_whatever_the_turn_path_heard(tmp_path):
    w = World(tmp_path)
    await up(w, "g1")
    await turned(w, "g1")
    w.store.records["g1"] = w.store.records["g1"].replace(health=Health.UNKNOWN)
    assert await probed_in_a_round(w) == ["g1"]


async def test_with_no_health_round_no_answer_is_kept(tmp_path):
    """RTMANAGER_HEALTH_INTERVAL=0 runs no round, which is what prunes the answers: none is kept."""
    w = World(tmp_path, RTMANAGER_HEALTH_INTERVAL="0")
    await up(w, "g1")
    await turned(w, "g1")
    assert not w.reconciler.health.answered_within(w.store.records["g1"], 3600)
