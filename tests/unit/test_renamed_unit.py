"""A game's container renamed from outside (``docker rename galaxy-game-g1 g1-debug``) is still its engine
(red-team finding). The look went by name only: it found nothing and created a second engine of the game,
both on its state directory, both answering to its network alias. The record names the unit by id: a
unit of this instance with the game's labels under that id is the game's, whatever its name."""

from __future__ import annotations

from desired.model import JobKind
from tests.support.world import World, started


async def test_a_renamed_engine_gets_no_twin(tmp_path):
    w = World(tmp_path)
    rec = await started(w)
    [unit] = w.running("g1")
    unit.name = "g1-debug"
    w.reconciler.units.touch("g1")  # the cache forgets it, as after the rename's event
    await w.job(JobKind.RECONCILE, "g1")
    rec = await w.sync("g1")
    running = [c for c in w.backend.containers.values() if c.state == "running"]
    assert [c.id for c in running] == [unit.id]
    assert not w.backend.ops("create")[1:]
    assert rec.converged and rec.current_container_id == unit.id and rec.status.value == "running"
    assert w.results("g1")[-1] == ("reconcile", "success", "")


async def test_a_stop_stops_the_renamed_engine(tmp_path):
    w = World(tmp_path)
    await started(w)
    [unit] = w.running("g1")
    unit.name = "g1-debug"
    w.reconciler.units.touch("g1")
    await w.job(JobKind.STOP, "g1")
    rec = await w.sync("g1")
    assert rec.status.value == "stopped" and unit.state != "running"
    assert not [c for c in w.backend.containers.values() if c.state == "running"]
