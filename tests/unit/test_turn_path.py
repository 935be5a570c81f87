"""The turn path's short path (issue 25): a turn of an up game is one compare-and-swap POST with no
status request first, and no inspect while the event stream vouches for the unit."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.reconciler import UnitCache
from controller.turns import asks_at_once
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
