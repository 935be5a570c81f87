"""A game's container renamed from outside (``docker rename galaxy-game-g1 g1-debug``) is still its engine
(red-team finding). The look went by name only: it found nothing and created a second engine of the game,
both on its state directory, both answering to its network alias. The record names the unit by id: a
unit of this instance with the game's labels under that id is the game's, whatever its name."""

from __future__ import annotations

from desired.model import JobKind
from tests.support.world import IMG, World, started


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


async def test_a_unit_of_another_game_under_this_games_name_is_never_touched(tmp_path):
    """Red-team finding: a unit of this instance named galaxy-game-g2 whose game label is g1 (g1's engine
    renamed from outside) was taken for g2's: g2's stop stopped g1's engine, and a start of g2 replaced it,
    mid-turn. Only the unit of the game itself is the game's."""
    w = World(tmp_path)
    await started(w, "g1")
    await started(w, "g2")
    await w.job(JobKind.STOP, "g2")
    await w.sync("g2")
    g2 = w.backend.by_name("galaxy-game-g2")
    del w.backend.containers[g2.id]
    [g1] = w.running("g1")
    g1.name = "galaxy-game-g2"
    for game in ("g1", "g2"):
        w.reconciler.units.touch(game)
    await w.job(JobKind.RECONCILE, "g2")
    await w.sync("g2")
    await w.job(JobKind.START, "g2", IMG)
    await w.sync("g2")
    touched = [op for op in w.backend.ops("stop") + w.backend.ops("remove") if op[1] == g1.id]
    assert touched == [] and g1.state == "running"
    assert w.results("g2")[-1] == ("start", "failure", "container_start_failed")
    rec = await w.sync("g1")  # g1 still finds its engine by id
    assert rec.current_container_id == g1.id and rec.status.value == "running"


async def test_a_game_whose_name_another_games_unit_took_finds_its_own_renamed_engine(tmp_path):
    """Review: g2's engine renamed away and g1's renamed to g2's name: a poll of g2 found g1's unit there,
    planned BLOCKED and recorded g2 stopped while its engine ran on as g2-debug; after the advised rename
    back, a start of g2 made a second g2 engine. The unit the record names is looked for by id whenever
    the unit under the name is not the game's."""
    w = World(tmp_path)
    await started(w, "g1")
    rec2 = await started(w, "g2")
    [g1], [g2] = w.running("g1"), w.running("g2")
    g2.name, g1.name = "g2-debug", "galaxy-game-g2"
    for game in ("g1", "g2"):
        w.reconciler.units.touch(game)
    rec = await w.sync("g2")
    assert rec.status.value == "running" and rec.current_container_id == g2.id == rec2.current_container_id
    assert not w.backend.ops("stop", "remove") and g1.state == g2.state == "running"
    g1.name = "galaxy-game-g1"  # renamed back
    w.reconciler.units.touch("g2")
    await w.job(JobKind.START, "g2", IMG)
    await w.sync("g2")
    g2_units = [c for c in w.backend.containers.values() if c.labels.get("com.galaxy.game-id") == "g2"
                and c.state == "running"]
    assert [c.id for c in g2_units] == [g2.id]
