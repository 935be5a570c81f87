"""The turn path's short path (issue 25): a turn of an up game is one compare-and-swap POST with no
status request first, and no inspect while the event stream vouches for the unit."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.turns import asks_at_once
from controller.units import UnitCache
from desired.model import DesiredStatus, RuntimeRecord, Status
from observed.model import ObservedContainer


def record(**kw) -> RuntimeRecord:
    base = dict(game_id="g1", status=Status.RUNNING, current_container_id="c1", desired_status=DesiredStatus.RUNNING,
                admin_api=True, phase="idle", turn=3, desired_turn=4)
    return _make(**{**base, **kw})


def _make(**kw) -> RuntimeRecord:
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(RuntimeRecord)}
    now = datetime.now(UTC)
    values = {}
    for name, f in fields.items():
        if name in kw:
            values[name] = kw[name]
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        elif "at" in name or name.endswith("_since"):
            values[name] = now
        elif name in ("generation", "observed_generation", "crash_count", "spec_revision"):
            values[name] = 1
        else:
            values[name] = ""
    return RuntimeRecord(**values)


def test_a_turn_is_asked_at_once_only_of_an_idle_engine_nothing_was_asked_of():
    assert asks_at_once(record())
    assert not asks_at_once(record(phase="generating"))     # a forced turn during a generation: look first
    assert not asks_at_once(record(paused=True))            # a pause read before the engine was asked
    assert not asks_at_once(record(generation_started_at=datetime.now(UTC)))  # asked: its failure is read
    assert not asks_at_once(record(admin_api=None))
    assert not asks_at_once(record(turn=None))
    assert not asks_at_once(record(turn=4))


def unit(running: bool = True) -> ObservedContainer:
    return ObservedContainer(id="c1", name="galaxy-game-g1", image="img", state="running" if running else "exited",
                             labels={})


def test_a_unit_is_kept_only_while_the_same_event_stream_vouches_for_it():
    stream = {"n": 1}
    cache = UnitCache()
    cache.stream = lambda: stream["n"]
    token = cache.token("g1")
    cache.put("g1", token, unit())
    assert cache.get(record()) is not None
    cache.touch("g1")  # an event named the game
    assert cache.get(record()) is None
    token = cache.token("g1")
    cache.touch("g1")  # an event while the inspect ran: its answer is not kept
    cache.put("g1", token, unit())
    assert cache.get(record()) is None
    cache.put("g1", cache.token("g1"), unit())
    stream["n"] = 2  # the stream reconnected: what it said before vouches for nothing
    assert cache.get(record()) is None
    cache.put("g1", cache.token("g1"), unit())
    assert cache.get(record(current_container_id="c2")) is None  # the record knows another unit
    cache.put("g1", cache.token("g1"), unit(running=False))
    assert cache.get(record()) is None
    stream["n"] = None  # no stream: nothing is kept
    cache.put("g1", cache.token("g1"), unit())
    assert cache.get(record()) is None


async def test_a_resync_that_finds_a_turn_pending_does_not_make_its_next_look_an_inspect(tmp_path):
    """At 1,000 games a generated turn cost 2 inspects: every resync found the games with a turn in
    flight not converged (a TURN plan) and touched them, so each one's next poll inspected its unit
    again though the list had just shown it running as the record says. A TURN (or RECORD) plan keeps
    the unit; only a finding that the unit is not as the record says distrusts it."""
    import asyncio

    from controller.triggers import Resync
    from desired.model import JobKind
    from tests.support.world import IMG, World, started

    async def ready() -> bool:
        return True

    w = World(tmp_path)
    w.reconciler.units.stream = lambda: 1  # an event stream connected without a break
    w.engine.admin[IMG] = "slow"  # the turn stays generating
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await asyncio.wait_for(w.sync("g1"), 30)
    await asyncio.wait_for(w.sync("g1"), 30)  # a poll: the unit is cached by now
    inspects = len(w.backend.ops("inspect"))
    await asyncio.wait_for(w.sync("g1"), 30)
    assert len(w.backend.ops("inspect")) == inspects  # polls of a cached unit inspect nothing
    resync = Resync(store=w.store, backend=w.backend, reconciler=w.reconciler, queue=w.queue,
                    metrics=w.reconciler.metrics, interval=30, retention_days=7, ready_check=ready)
    assert await resync.once() == 0  # its poll is already due: the resync does not queue it again
    await asyncio.wait_for(w.sync("g1"), 30)
    assert len(w.backend.ops("inspect")) == inspects
    # A unit the list shows otherwise than the record says is a finding: the next look inspects it.
    w.backend.containers[w.store.records["g1"].current_container_id].state = "exited"
    await resync.once()
    assert w.reconciler.units.get(w.store.records["g1"]) is None


async def test_a_unit_whose_address_the_lists_show_changed_is_looked_at_again(tmp_path):
    """A network disconnect and connect of a running engine gives it a new address and no container event
    (the stream carries container events only). The cached unit kept the old address, and the turn path
    sent the game's admin token to whatever container got that address next (found by a red-team
    reading). The resync's and the health round's lists show every unit's address: one that changed makes
    the next look an inspect."""
    import asyncio

    from controller.triggers import HealthRound
    from desired.model import JobKind
    from tests.support.world import IMG, World, started

    w = World(tmp_path)
    w.reconciler.units.stream = lambda: 1  # an event stream connected without a break
    w.engine.admin[IMG] = "slow"  # the turn stays generating: its polls use the cached unit
    rec = await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await asyncio.wait_for(w.sync("g1"), 30)
    await asyncio.wait_for(w.sync("g1"), 30)
    assert w.reconciler.units.get(w.store.records["g1"]) is not None
    w.backend.containers[rec.current_container_id].ip = "10.9.9.9"  # reconnected to the network
    await HealthRound(store=w.store, backend=w.backend, reconciler=w.reconciler, interval=15,
                      metrics=w.reconciler.metrics).once()
    unit = w.reconciler.units.get(w.store.records["g1"])
    assert unit is None or unit.address == "10.9.9.9"
    inspects = len(w.backend.ops("inspect"))
    await asyncio.wait_for(w.sync("g1"), 30)
    assert len(w.backend.ops("inspect")) == inspects + 1
    assert w.reconciler.units.get(w.store.records["g1"]).address == "10.9.9.9"
