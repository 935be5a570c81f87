"""Issue 25: a health round probes a steady engine every Nth round, every other engine every round.

Steady: up and healthy, converged (no job or turn in flight), its last probes found nothing new and
nothing happened to its unit since (an event, an action, a resync's finding). What this costs is the
detection of an idle engine that hangs: its first failed probe comes within N rounds instead of one,
and from then on it is probed every round (the test of that bound is below). Everything else an engine
can do (exit, crash, vanish) is seen by the backend's events and the resync, as before."""

from __future__ import annotations

import collections

import pytest

from controller.metrics import Metrics
from controller.pacing import STEADY_AFTER, ProbePacing
from controller.triggers import HealthRound
from desired.model import JobKind, Status
from tests.support.world import IMG, IMG2, World

pytestmark = pytest.mark.looptime

EVERY = 4


async def up(w: World, game: str, image: str = IMG):
    await w.job(JobKind.START, game, image)
    rec = await w.sync(game)
    assert rec.status is Status.RUNNING
    return rec


def counting(w: World) -> collections.Counter[str]:
    probed: collections.Counter[str] = collections.Counter()
    observe = w.reconciler.observe

    async def counted(record, address):
        probed[record.game_id] += 1
        return await observe(record, address)

    w.reconciler.observe = counted
    return probed


def round_of(w: World, every: int = EVERY) -> HealthRound:
    return HealthRound(store=w.store, backend=w.backend, reconciler=w.reconciler, interval=1, metrics=Metrics(),
                       steady_every=every)


async def games_up(tmp_path, games: list[str], every: int = EVERY):
    """A world with these games up, its probes counted, and a health round over it."""
    w = World(tmp_path)
    for g in games:
        await up(w, g)
    return w, counting(w), round_of(w, every)


async def test_a_steady_engine_is_probed_every_nth_round_and_the_rounds_share_them(tmp_path):
    games = [f"g{i}" for i in range(40)]
    w, probed, health = await games_up(tmp_path, games)
    per_round = []
    for _ in range(STEADY_AFTER + 4 * EVERY):
        before = sum(probed.values())
        await health.once()
        per_round.append(sum(probed.values()) - before)
    # Every engine is probed until its probes found nothing new STEADY_AFTER times in a row...
    assert per_round[:STEADY_AFTER] == [len(games)] * STEADY_AFTER
    # ... then each once every EVERY rounds, and not all in the same round.
    for g in games:
        assert probed[g] == STEADY_AFTER + 4, (g, probed[g])
    steady_rounds = per_round[STEADY_AFTER:]
    assert sum(steady_rounds) == 4 * len(games)
    assert max(steady_rounds) < len(games) / 2, steady_rounds


async def test_every_one_probes_every_engine_every_round(tmp_path):
    _, probed, health = await games_up(tmp_path, ["a", "b", "c"], every=1)
    for _ in range(6):
        await health.once()
    assert probed == {"a": 6, "b": 6, "c": 6}


async def test_an_event_or_a_change_of_the_record_makes_the_next_round_probe_it(tmp_path):
    # every=10**6: a steady engine would not be probed again in this test
    w, probed, health = await games_up(tmp_path, ["a", "b"], every=10**6)
    for _ in range(STEADY_AFTER + 1):
        await health.once()
    assert probed == {"a": STEADY_AFTER, "b": STEADY_AFTER}
    w.reconciler.units.touch("a")  # an event named a's unit
    await health.once()
    assert probed == {"a": STEADY_AFTER + 1, "b": STEADY_AFTER}
    # A record that changed while still quiet (another replica recorded a turn) makes b's next round probe it.
    rec = w.store.records["b"]
    w.store.records["b"] = rec.replace(turn=(rec.turn or 0) + 1)
    await health.once()
    assert probed["b"] == STEADY_AFTER + 1
    # A desired change (a job admitted: the record's generation moves) too, and every round until converged.
    rec = w.store.records["b"]
    w.store.records["b"] = rec.replace(generation=rec.generation + 1)
    await health.once()
    await health.once()
    assert probed["b"] == STEADY_AFTER + 3


async def test_an_idle_engine_that_hangs_is_unreachable_within_n_plus_the_limit_rounds(tmp_path):
    w = World(tmp_path)
    await up(w, "quiet", IMG)
    await up(w, "hangs", IMG2)
    health = round_of(w)
    for _ in range(STEADY_AFTER + EVERY):
        await health.once()
    w.backend.behaviour[IMG2] = "mute"  # the engine's process runs, it answers nothing
    limit = w.settings.engine.unreachable_after
    rounds = 0
    while w.store.records["hangs"].status is not Status.ENGINE_UNREACHABLE:
        await health.once()
        rounds += 1
        assert rounds <= EVERY + limit - 1, "a hung engine must be probed every round once a probe failed"
    assert w.store.records["quiet"].status is Status.RUNNING


async def test_an_engine_in_flight_is_probed_every_round(tmp_path):
    """Generating, unreachable or not converged: every round, whatever its history."""
    pacing = ProbePacing(every=EVERY)
    w = World(tmp_path)
    rec = await up(w, "g")
    for _ in range(STEADY_AFTER):
        pacing.start_round(["g"])
        assert pacing.due(rec, touches=0)
        pacing.probed(rec, touches=0, steady=True)
    due = []
    for _ in range(2 * EVERY):
        pacing.start_round(["g"])
        due.append(pacing.due(rec, touches=0))
        if due[-1]:
            pacing.probed(rec, touches=0, steady=True)
    assert due.count(True) == 2, due
    for other in (rec.replace(status=Status.GENERATION_IN_PROGRESS),
                  rec.replace(status=Status.ENGINE_UNREACHABLE, probe_failures=3),
                  rec.replace(observed_generation=rec.generation - 1)):
        for _ in range(EVERY):
            pacing.start_round(["g"])
            assert pacing.due(other, touches=0)


def test_a_game_no_longer_up_is_forgotten():
    pacing = ProbePacing(every=EVERY)
    pacing._seen["gone"] = (1, 0, STEADY_AFTER, 0)
    pacing.start_round(["kept"])
    assert "gone" not in pacing._seen


async def test_a_game_whose_unit_does_not_run_wakes_the_reconciler_every_round(tmp_path):
    """Its record written (a failed probe counted) or not, a game up on a unit that is not running is
    the reconciler's to look at: the round wakes it (review of the pacing change: the write's branch
    returned before the wake)."""
    w = World(tmp_path)
    rec = await up(w, "g")
    woken: list[str] = []
    w.reconciler.health._wake = woken.append
    steady = await w.reconciler.observe(rec, None)
    assert not steady
    assert woken == ["g"]
    assert w.store.records["g"].probe_failures == 1  # and the failure was counted


async def test_a_steady_engine_whose_round_failed_is_probed_at_the_next_round(tmp_path):
    """A round that fails (an outage) or a probe that raises leaves its engines due: they are not
    deferred for another N rounds because their turn fell in a failed round."""
    w, probed, health = await games_up(tmp_path, [f"g{i}" for i in range(12)])
    for _ in range(STEADY_AFTER + EVERY):
        await health.once()
    observe = w.reconciler.observe
    failed: list[str] = []

    async def broken(record, address):
        failed.append(record.game_id)
        raise RuntimeError("this game's bad data")

    w.reconciler.observe = broken
    await health.once()  # every due probe raises: none of them is done
    assert failed
    w.reconciler.observe = observe
    before = dict(probed)
    await health.once()
    assert all(probed[g] == before[g] + 1 for g in failed), (failed, before, probed)


async def test_a_steady_game_whose_unit_stopped_running_is_looked_at_the_next_round(tmp_path):
    """No event said so (a missed one): the round's own list shows the unit not running, and the game is
    looked at (a wake, no probe) whatever its steadiness."""
    w, probed, health = await games_up(tmp_path, ["g"], every=10**6)
    for _ in range(STEADY_AFTER + 1):
        await health.once()
    assert probed["g"] == STEADY_AFTER
    woken: list[str] = []
    w.reconciler.health._wake = woken.append
    w.backend.containers[w.store.records["g"].current_container_id].state = "exited"
    await health.once()
    assert probed["g"] == STEADY_AFTER + 1
    assert woken == ["g"]
