"""Red-team, stop 45: a replacement refused before it touched the running engine stopped a healthy game.

* A restart (same image) refused by the allowlist or the registry (``ImageRejected``, raised before any side
  effect) had nothing to roll back to, so the failed generation asked for the game stopped.
* A drift nobody asked for (a setting changed, so the unit's spec hash is no longer the wanted one) of a game
  whose image is no longer allowed, or can no longer be pulled, was failed (stopped) or counted as crashes
  until the crash policy gave the game up, although its engine ran on, healthy, the whole time.

A failed replacement whose engine is still running keeps it: a job's generation is answered with the failure
and desired state goes back to that engine (its image and spec revision); a drift is left as it is, said in the
log, and tried again later."""

from __future__ import annotations

import dataclasses

from controller.spec import Specs
from desired.jobs import ImageAllowlist
from desired.model import DesiredStatus, JobKind, Status
from tests.support.world import IMG, World, started


def _narrowed(w: World, *, drift: bool = False) -> None:
    s = w.reconciler.settings
    s = dataclasses.replace(s, images=dataclasses.replace(s.images,
                                                          image_allowlist=ImageAllowlist("galaxy/engine-stub:9.*")))
    if drift:
        s = dataclasses.replace(s, engine=dataclasses.replace(s.engine, engine_pids=999))
    _settings(w, s)


def _settings(w: World, s) -> None:
    w.reconciler.settings = s
    w.reconciler.starts.settings = s
    w.reconciler.specs = Specs(s, w.reconciler.specs.database)


async def _a_refused_restart(w: World):
    """A restart of g1 once its image is no longer allowed, synced as far as it goes: the record then."""
    _narrowed(w)
    await w.job(JobKind.RESTART, "g1")
    for _ in range(3):
        rec = await w.sync("g1")
    return rec


async def test_a_restart_refused_before_it_touched_the_engine_keeps_the_game_running(tmp_path) -> None:
    w = World(tmp_path)
    rec = await started(w)
    [unit] = w.running("g1")
    rec = await _a_refused_restart(w)
    assert w.results("g1")[-1] == ("restart", "failure", "image_rejected")
    assert [c.id for c in w.running("g1")] == [unit.id] and w.backend.ops("stop") == []
    assert rec.desired_status is DesiredStatus.RUNNING and rec.status is Status.RUNNING and rec.converged
    assert rec.current_container_id == unit.id and rec.desired_image_ref == IMG
    seen = await w.backend.inspect(unit.id)
    assert seen is not None and w.reconciler.specs.want_hash(rec) == seen.spec_hash  # it asks for what runs
    await w.sync("g1")
    assert [c.id for c in w.running("g1")] == [unit.id]


async def test_a_drift_whose_image_is_no_longer_allowed_keeps_the_running_engine(tmp_path) -> None:
    w = World(tmp_path)
    rec = await started(w)
    [unit] = w.running("g1")
    results = list(w.results("g1"))
    _narrowed(w, drift=True)
    for _ in range(4):
        rec = await w.sync("g1")
        w.store.clock.advance(400)
    assert [c.id for c in w.running("g1")] == [unit.id] and w.backend.ops("stop") == []
    assert rec.desired_status is DesiredStatus.RUNNING and rec.status is Status.RUNNING and rec.crash_count == 0
    assert w.results("g1") == results  # nobody asked: nothing to answer


async def test_a_drift_whose_image_cannot_be_pulled_is_no_crash(tmp_path) -> None:
    w = World(tmp_path)
    rec = await started(w)
    [unit] = w.running("g1")
    w.backend.images.discard(IMG)  # the host can no longer find or pull it; the engine runs on
    s = w.reconciler.settings
    _settings(w, dataclasses.replace(s, engine=dataclasses.replace(s.engine, engine_pids=999)))
    for _ in range(12):
        rec = await w.sync("g1")
        w.store.clock.advance(400)
    assert [c.id for c in w.running("g1")] == [unit.id] and w.backend.ops("stop") == []
    assert rec.desired_status is DesiredStatus.RUNNING and rec.crash_count == 0, rec


async def test_a_drain_move_refused_before_it_touched_the_engine_does_not_keep_the_game_on_the_node(tmp_path) -> None:
    """Review of the fix: keeping the unit of a refused move kept the game on the node it must leave (its pin
    cleared, the node avoided), converged, and the drain never ended. A move is not kept: it fails as before
    (the game stopped; undrain starts it again on its node)."""
    from desired import transitions

    w = World(tmp_path)
    w.backend.nodes = ["n1", "n2"]
    rec = await started(w)
    assert rec.node_id == "n1"
    w.store.records["g1"] = transitions.drain_moved(rec, w.store.clock.now(), node="n1", forced=True, deadline=None)
    _narrowed(w)
    for _ in range(4):
        rec = await w.sync("g1")
    assert not (rec.converged and rec.status is Status.RUNNING and w.running("g1")), rec
    assert rec.desired_status is DesiredStatus.STOPPED


async def test_a_unit_paused_from_outside_whose_replacement_is_refused_is_not_kept_frozen(tmp_path) -> None:
    """Review of the fix: a paused unit counts as running for Docker; keeping it kept a frozen engine for ever."""
    w = World(tmp_path)
    await started(w)
    [c] = w.running("g1")
    c.state = "paused"
    _narrowed(w)
    for _ in range(4):
        w.store.clock.advance(400)
        rec = await w.sync("g1")
    assert rec.desired_status is DesiredStatus.STOPPED, rec


async def test_a_swarm_game_with_no_recorded_node_is_kept_too(tmp_path) -> None:
    """Review of the fix (125): a game running since before nodes were recorded (node_id NULL) was taken for a
    move, so a refused restart stopped it again. Only a recorded node that differs, or an avoided one, is a
    move."""
    w = World(tmp_path)
    w.backend.nodes = ["n1", "n2"]
    rec = await started(w)
    w.store.records["g1"] = rec.replace(node_id=None)
    [unit] = w.running("g1")
    rec = await _a_refused_restart(w)
    assert w.results("g1")[-1] == ("restart", "failure", "image_rejected")
    assert [c.id for c in w.running("g1")] == [unit.id] and rec.desired_status is DesiredStatus.RUNNING


async def test_a_game_back_on_a_node_it_once_left_is_kept_too(tmp_path) -> None:
    """Red-team 131: the nodes a game moved off stay in ``avoid_nodes``. Drained off n1 (undrained), then off
    n2 and placed back on n1, the game runs pinned to n1 with n1 still in that list: a refused restart took the
    unit for one on a node the game must leave, and stopped the healthy game. A unit on the node the record is
    pinned to is no move."""
    from desired import transitions

    w = World(tmp_path)
    w.backend.nodes = ["n1", "n2", "n3"]
    drained = {"now": frozenset[str]()}

    async def avoid() -> frozenset[str]:
        return drained["now"]

    w.reconciler.starts.avoid = avoid
    rec = await started(w)
    assert rec.node_id == "n1"
    for node in ("n1", "n2"):  # drain n1, undrain it; then drain n2, undrain it
        drained["now"] = frozenset({node})
        w.store.records["g1"] = transitions.drain_moved(w.store.records["g1"], w.store.clock.now(), node=node,
                                                        forced=True, deadline=None)
        for _ in range(3):
            rec = await w.sync("g1")
        drained["now"] = frozenset()
    assert rec.node_id == "n1" and "n1" in rec.avoid_nodes and rec.converged, rec
    [unit] = w.running("g1")
    _narrowed(w)
    await w.job(JobKind.RESTART, "g1")
    for _ in range(4):
        rec = await w.sync("g1")
    assert [c.id for c in w.running("g1")] == [unit.id] and rec.desired_status is DesiredStatus.RUNNING, rec
    assert w.results("g1")[-1][:3] == ("restart", "failure", "image_rejected"), w.results("g1")
