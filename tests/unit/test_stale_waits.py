"""Red-team, stop 45: a turn cut because a record said more than the engine did.

* A database restored from an older backup held a stop waiting for turn N's boundary, begun an hour before.
  In the lost hour the stop was carried out, the game started again, and it now generates another turn.
  The wait looked an hour old, so the stop went ahead on the first look, without asking the engine, and cut
  the turn. An overdue disruption now asks the engine once more: a generation that began since the wait
  began (another turn than the one waited for) has a wait of its own.
* An engine the record knows as generating (rtmanager asked for the turn) that is too busy to answer at all
  was taken for one that is not generating: the stop went ahead at once. Silence while the record says
  generating is waited out like any generation, up to RTMANAGER_DISRUPTION_WAIT.
* The unreachable restart (RTMANAGER_UNREACHABLE_RESTART_AFTER) stopped the engine on the record's word,
  without asking it: one that answers again (busy generating past the generation timeout, or a record
  restored from before a short blip) was cut mid-turn and counted as a crash. It is asked first."""

from __future__ import annotations

import copy
from datetime import timedelta

from controller.metrics import Metrics
from controller.reconciler import Reconciler
from controller.workqueue import WorkQueue
from desired.model import JobKind, Status
from observed.errors import EngineUnreachable
from tests.support.world import IMG, World, started, turn_engine


async def _a_stop_waiting_for_a_turn(w: World):
    """g1 generates a turn rtmanager asked for, and a stop waits for its boundary: (its engine, the record)."""
    await started(w)
    eng = turn_engine(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    assert (await w.sync("g1")).status is Status.GENERATION_IN_PROGRESS
    await w.job(JobKind.STOP, "g1")
    return eng, await w.sync("g1")


async def test_a_restored_wait_does_not_cut_a_turn_generated_since(tmp_path) -> None:
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60")
    await started(w)
    eng = turn_engine(w)
    s = w.store
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")  # turn 1 is generated
    await w.job(JobKind.STOP, "g1")
    rec = await w.sync("g1")  # the stop waits for the turn's boundary
    assert rec.disruption_wait_since is not None and w.backend.ops("stop") == []
    backup = (copy.deepcopy(s.records), copy.deepcopy(s.ops), copy.deepcopy(s.results))
    # the lost hour: turn 1 ends, the stop is carried out, the game is started again and generates turn 2
    eng["turn"], eng["phase"] = 1, "idle"
    s.clock.advance(5)
    await w.sync("g1")
    assert s.records["g1"].status is Status.STOPPED
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")
    assert eng == {"turn": 1, "phase": "generating", "refuse": 0}
    s.clock.advance(3600)
    s.records, s.ops, s.results = backup  # the database restored from the backup
    w.reconciler = Reconciler(w.settings, s, w.backend, w.engine, Metrics(), WorkQueue(), clock=s.clock,
                              database="db-1")
    stops = len(w.backend.ops("stop"))
    await w.sync("g1")
    assert len(w.backend.ops("stop")) == stops, "the stop cut turn 2 on a wait begun for turn 1"
    s.clock.advance(61)  # turn 2's own wait is over: the stop goes ahead
    await w.sync("g1")
    assert len(w.backend.ops("stop")) == stops + 1


async def test_a_generating_engine_too_busy_to_answer_is_waited_for(tmp_path) -> None:
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60")
    eng, rec = await _a_stop_waiting_for_a_turn(w)
    assert w.backend.ops("stop") == [] and rec.disruption_wait_since is not None

    async def silent(host, *, token=""):
        raise EngineUnreachable("no answer")

    [c] = w.running("g1")
    w.backend.behaviour[c.image] = "mute"  # it answers nothing, health path nor status, while it generates
    w.engine.status = silent
    for _ in range(3):
        w.store.clock.advance(15)
        rec = await w.sync("g1")
        assert w.backend.ops("stop") == [] and eng["phase"] == "generating", rec
    w.store.clock.advance(16)  # RTMANAGER_DISRUPTION_WAIT is over: it goes ahead
    rec = await w.sync("g1")
    assert len(w.backend.ops("stop")) == 1 and rec.status is Status.STOPPED


async def test_the_unreachable_restart_asks_the_engine_first(tmp_path) -> None:
    w = World(tmp_path, RTMANAGER_UNREACHABLE_RESTART_AFTER="60")
    w.engine.admin[IMG] = "slow"
    rec = await started(w)
    now = w.store.clock.now()
    # the record says unreachable for 61 s (a health round's word, or a restored backup's) ...
    w.store.records["g1"] = rec.replace(status=Status.ENGINE_UNREACHABLE, probe_failures=3,
                                        unreachable_since=now - timedelta(seconds=61))
    w.engine.game("galaxy-game-g1").phase = "generating"  # ... and the engine answers, generating a turn
    rec = await w.sync("g1")
    assert w.backend.ops("stop") == [] and rec.crash_count == 0, rec
    assert rec.status is Status.GENERATION_IN_PROGRESS and len(w.running("g1")) == 1


async def test_an_engine_whose_turn_flips_cannot_hold_a_stop_for_ever(tmp_path) -> None:
    """Review of the fix: each look that found another turn restarted the wait, with no cap: an engine whose
    status flipped between two turns held the stop (and its job's answer) for ever. A later turn restarts the
    wait once per generation."""
    from observed.engine import EngineStatus

    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60")
    await started(w)
    turn_engine(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    assert (await w.sync("g1")).status is Status.GENERATION_IN_PROGRESS
    n = {"i": 0}

    async def status(host, *, token=""):
        n["i"] += 1
        return EngineStatus(turn=n["i"] % 2, phase="generating")  # turn 0, then 1, then 0, ... stuck generating

    w.engine.status = status
    await w.job(JobKind.STOP, "g1")
    for _ in range(6):  # 366 s: at most two waits of 60 s and their polls
        w.store.clock.advance(61)
        rec = await w.sync("g1")
    assert len(w.backend.ops("stop")) == 1 and rec.status is Status.STOPPED, rec


async def test_a_generating_engine_with_no_address_is_waited_for_within_the_limit(tmp_path) -> None:
    """Review of the fix: a unit with no address (off the game network) while the record says generating
    never began the wait's clock, so the stop was held for ever."""
    import dataclasses

    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60", RTMANAGER_HEALTH_INTERVAL="0")
    await started(w)
    turn_engine(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    assert (await w.sync("g1")).status is Status.GENERATION_IN_PROGRESS
    real = w.backend._observe
    w.backend._observe = lambda c: dataclasses.replace(real(c), address=None)
    await w.job(JobKind.STOP, "g1")
    rec = await w.sync("g1")
    assert w.backend.ops("stop") == [] and rec.disruption_wait_since is not None
    w.store.clock.advance(61)
    rec = await w.sync("g1")
    assert len(w.backend.ops("stop")) == 1 and rec.status is Status.STOPPED, rec


async def test_a_later_turn_seen_by_a_poll_before_the_wait_ran_out_gets_a_wait_of_its_own(tmp_path) -> None:
    """Review of the fix (125): the later turn was told by the record's turn, which a poll had already moved
    on, so a turn that began 30 s before the wait ran out was cut. It is told by the turn the wait began for."""
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60")
    eng, rec = await _a_stop_waiting_for_a_turn(w)
    assert rec.disruption_wait_since is not None and w.backend.ops("stop") == []
    w.store.clock.advance(30)
    await w.sync("g1")
    eng["turn"], eng["phase"] = 1, "generating"  # turn 1 ended unseen; turn 2 began back to back
    w.store.clock.advance(1)
    await w.sync("g1")  # a poll: the record's turn is 1 now
    w.store.clock.advance(30)  # the wait began 61 s ago; turn 2 began 31 s ago
    await w.sync("g1")
    assert w.backend.ops("stop") == [], "turn 2 cut 30 s in"
    w.store.clock.advance(61)
    rec = await w.sync("g1")
    assert len(w.backend.ops("stop")) == 1 and rec.status is Status.STOPPED
