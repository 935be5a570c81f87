"""A turn request the engine never takes is answered (red-team finding): an engine idle short of the turn
that answered the request 202 and never generated, or 200 or 409 for ever, kept the turn's job unanswered
for ever (with 202, two snapshots every half second). Once the job has waited RTMANAGER_START_TIMEOUT +
RTMANAGER_GENERATION_TIMEOUT (its age in the database: no restart or pause resets it), it is answered
engine_unreachable, the game stays up; an engine that lost a request it took is asked again every few
seconds. An engine that says it generates is never failed by this bound (a long turn is a turn)."""

from __future__ import annotations

import asyncio

import pytest

from desired.model import JobKind
from observed.engine import EngineStatus
from observed.errors import EngineConflict
from tests.support.world import World, started, turn_engine


def engine_that(w: World, answer: str) -> list[int]:
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
    return asked


def answered(w: World) -> list[tuple[str, str, str]]:
    return [r for r in w.results("g1") if r[0] == "force_next_turn"]


async def run_for(w: World, seconds: float, every: float = 30, each=None):
    waited = 0.0
    rec = await asyncio.wait_for(w.sync("g1"), 30)
    while not answered(w) and waited <= seconds:
        w.store.clock.advance(every)
        waited += every
        if each is not None:
            await each(waited)
        rec = await asyncio.wait_for(w.sync("g1"), 30)
    return rec, waited


async def generates_after_loading(w: World, eng: dict, seconds: int) -> None:
    """Look once a second while the restarted engine loads; it generates turn 1 once it takes the request,
    and the forced turn is answered success."""
    for _ in range(seconds):
        await asyncio.wait_for(w.sync("g1"), 30)
        if answered(w):
            break
        if eng["phase"] == "generating":
            eng.update(turn=1, phase="idle")
        w.store.clock.advance(1)
    assert answered(w) == [("force_next_turn", "success", "")]


@pytest.mark.parametrize("answer", ["202", "200", "409"])
async def test_a_turn_request_the_engine_never_takes_is_answered(tmp_path, answer):
    w = World(tmp_path)
    await started(w)
    asked = engine_that(w, answer)
    snapshots = sum(1 for r in w.store.results if r["kind"] == "snapshot")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    limit = w.settings.engine.start_timeout + w.settings.engine.generation_timeout
    rec, waited = await run_for(w, limit + 60)
    assert answered(w) == [("force_next_turn", "failure", "engine_unreachable")]
    assert limit <= waited <= limit + 60
    assert rec.status.is_up and rec.desired_status.value == "running" and rec.converged
    assert sum(1 for r in w.store.results if r["kind"] == "snapshot") - snapshots < 2 * len(asked) + 6


async def test_an_engine_that_says_it_generates_is_not_failed_by_the_bound(tmp_path):
    """Review: a bound counted while the engine answered 'generating' failed a healthy long turn."""
    w = World(tmp_path)
    await started(w)
    engine_that(w, "generating")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    limit = w.settings.engine.start_timeout + w.settings.engine.generation_timeout
    await run_for(w, 2 * limit)
    assert answered(w) == []


@pytest.mark.parametrize("env,every,period", [({}, 10, 20), ({"RTMANAGER_START_TIMEOUT": "300"}, 30, 120)])
async def test_frequent_jobs_of_the_game_do_not_reset_the_refusal_span(tmp_path, env, every, period):
    """Review: the span of refusals was kept per generation, so a reconcile, pause or resume more often
    than RTMANAGER_START_TIMEOUT started it again and the turn was never answered. It is kept per turn."""
    w = World(tmp_path, **env)
    await started(w)
    engine_that(w, "409")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    limit = w.settings.engine.start_timeout + w.settings.engine.generation_timeout
    paused = {"p": False}

    async def meanwhile(waited: float) -> None:
        if waited % period == 0:
            await w.job(JobKind.RECONCILE, "g1")
            await w.job(JobKind.RESUME if paused["p"] else JobKind.PAUSE, "g1")
            paused["p"] = not paused["p"]

    _, waited = await run_for(w, 5 * limit, every=every, each=meanwhile)
    assert answered(w) == [("force_next_turn", "failure", "engine_unreachable")]
    assert waited <= limit + w.settings.engine.start_timeout + every


async def test_a_restarted_engine_loading_after_a_long_turn_is_not_failed(tmp_path):
    """Review: one refusal early in a generation armed the span for the whole generation; after a long turn
    and a crash, the restarted engine's first 409 while it loaded failed the turn at once. Taking the
    request, or generating, ends a span."""
    w = World(tmp_path)
    await started(w)
    eng = turn_engine(w, refuse=2)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")
    w.store.clock.advance(0.5)
    await w.sync("g1")
    for _ in range(40):  # a long turn: 20 minutes generating
        w.store.clock.advance(30)
        await asyncio.wait_for(w.sync("g1"), 30)
    assert answered(w) == []
    w.backend.crash("g1")
    eng.update(phase="idle", refuse=3)  # restarted mid-turn, it loads for a second or so
    await generates_after_loading(w, eng, 60)


async def test_pauses_and_restarts_of_the_controller_do_not_reset_the_bound(tmp_path):
    """Review: a bound kept in memory per generation started again at every pause, resume or reconcile
    (each makes a new generation) and at every restart of the controller: a stuck turn went unanswered."""
    from controller.metrics import Metrics
    from controller.reconciler import Reconciler
    w = World(tmp_path)
    await started(w)
    engine_that(w, "409")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    limit = w.settings.engine.start_timeout + w.settings.engine.generation_timeout

    async def meanwhile(waited: float) -> None:
        if waited % 120 == 0:
            await w.job(JobKind.RECONCILE, "g1")
        if waited % 300 == 0:  # a new controller process: nothing it remembers
            w.reconciler = Reconciler(w.settings, w.store, w.backend, w.engine, Metrics(), w.queue,
                                      clock=w.store.clock, database="db-1")

    _, waited = await run_for(w, 2 * limit, each=meanwhile)
    assert answered(w) == [("force_next_turn", "failure", "engine_unreachable")]
    assert waited <= limit + 60


async def test_a_blip_of_refusals_does_not_fail_an_old_turn(tmp_path):
    """Review: two refusals half a second apart (a restarted engine answering 409 while it loads) failed a
    turn whose job was old for other reasons (it waited behind a long turn, or a disruption)."""
    w = World(tmp_path)
    await started(w)
    refusals = {"left": 4}
    turn = {"n": 0}

    async def request_turn(host, expected_turn, *, token=""):
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise EngineConflict("loading")
        turn["n"] = expected_turn + 1
        return True

    async def status(host, *, token=""):
        return EngineStatus(turn=turn["n"], phase="idle")

    w.engine.request_turn = request_turn
    w.engine.status = status
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    w.store.clock.advance(w.settings.engine.start_timeout + w.settings.engine.generation_timeout + 60)
    for _ in range(8):
        await asyncio.wait_for(w.sync("g1"), 30)
        w.store.clock.advance(0.5)
        if answered(w):
            break
    assert answered(w) == [("force_next_turn", "success", "")]


@pytest.mark.parametrize("env,lag", [({"RTMANAGER_HEALTH_INTERVAL": "4"}, 0.0), ({}, 12.0)])
async def test_a_202_then_idle_engine_probed_by_the_health_round_is_answered(tmp_path, env, lag):
    """Review: the health round's idle write cleared the request time, so the short path asked again; its
    202 counted as a taken request and ended the span, and the turn was never answered. Only a generating
    engine (or the turn reached) ends a span. The reconciler follows its own requeue delays here (plus
    ``lag``, a busy work queue), and the round skips engines answered within its interval."""
    w = World(tmp_path, **env)
    await started(w)
    engine_that(w, "202")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    e = w.settings.engine
    health = w.reconciler.health
    t, next_sync, next_round = 0.0, 0.0, e.health_interval
    while not answered(w) and t <= 4 * (e.start_timeout + e.generation_timeout):
        if t >= next_sync:
            step = await asyncio.wait_for(w.reconciler.sync("g1"), 30)
            next_sync = t + (step.after or 1.0) + lag
        if t >= next_round:
            rec = w.store.records["g1"]
            if not health.answered_within(rec, e.health_interval):
                await w.reconciler.observe(rec, w.backend.ip_of(w.running("g1")[0]))
            next_round = t + e.health_interval
        w.store.clock.advance(0.5)
        t += 0.5
    assert answered(w) == [("force_next_turn", "failure", "engine_unreachable")]
    assert t <= 2 * e.start_timeout + e.generation_timeout + 30


async def test_a_turn_request_that_fails_for_ever_is_answered(tmp_path):
    """Review: a turn request answered 503, timing out or garbled (the engine's status idle at the turn
    before) was polled for ever without counting as a refusal."""
    from observed.errors import EngineUnreachable
    w = World(tmp_path)
    await started(w)

    async def request_turn(host, expected_turn, *, token=""):
        raise EngineUnreachable("engine turns: HTTP 503")

    async def status(host, *, token=""):
        return EngineStatus(turn=0, phase="idle")

    w.engine.request_turn = request_turn
    w.engine.status = status
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    limit = w.settings.engine.start_timeout + w.settings.engine.generation_timeout
    _, waited = await run_for(w, 4 * limit)
    assert answered(w) == [("force_next_turn", "failure", "engine_unreachable")]
    assert waited <= limit + 60


async def test_refusals_before_a_long_turn_the_status_could_not_see_are_not_counted_after_a_crash(tmp_path):
    """Review: 25 s of 409s, then a turn taken and generated while the engine was too busy to answer its
    status (so nobody saw it 'generating'), then a crash: the restarted engine's 25 s of 409s while it
    loaded continued the first span and failed the turn it then generated. A span ends after a gap."""
    from observed.errors import EngineUnreachable
    w = World(tmp_path)
    await started(w)
    clock = w.store.clock
    eng = {"turn": 0, "phase": "idle", "refuse_until": clock.now().timestamp() + 25}

    async def request_turn(host, expected_turn, *, token=""):
        if clock.now().timestamp() < eng["refuse_until"]:
            raise EngineConflict("loading")
        eng["phase"] = "generating"
        return True

    async def status(host, *, token=""):
        if eng["phase"] == "generating":
            raise EngineUnreachable("status timed out: the engine is busy generating")
        return EngineStatus(turn=eng["turn"], phase=eng["phase"])

    w.engine.request_turn = request_turn
    w.engine.status = status
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    while eng["phase"] != "generating":
        await asyncio.wait_for(w.sync("g1"), 30)
        clock.advance(5)
    for _ in range(58):
        clock.advance(10)
        await asyncio.wait_for(w.sync("g1"), 30)
    assert answered(w) == []
    w.backend.crash("g1")
    eng.update(phase="idle", refuse_until=clock.now().timestamp() + 25)
    await generates_after_loading(w, eng, 120)
