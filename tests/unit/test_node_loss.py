"""A lost Swarm node is not a crash loop (the fakes' backend with nodes, and the pure policy).

A game whose node is lost becomes ``node_lost`` (a snapshot with reason ``node_lost``, no crash
counted, no start tried there); after RTMANAGER_NODE_LOSS_GRACE the policy waits, moves it off the
node (its unit avoids the node and is recreated elsewhere) or stops it; a node that comes back gets
its games started again, one engine each. Games on a dead node hold no reconcile worker.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from controller.workqueue import WorkQueue
from desired import snapshots
from desired.model import DesiredStatus, JobKind, Status
from desired.policy import NodeLoss, NodeLossPolicy, node_loss_step
from tests.support import eventually
from tests.support.planning import NOW, R, record
from tests.support.world import IMG, World

GRACE = 30


def world(tmp_path, policy: str, shared: str = "0") -> World:
    w = World(tmp_path, RTMANAGER_NODE_LOSS=policy, RTMANAGER_NODE_LOSS_GRACE=str(GRACE),
              RTMANAGER_STATE_SHARED=shared)
    w.backend.nodes = ["n1", "n2"]
    return w


async def on_node(w: World, game: str, node: str):
    w.backend.nodes = [node, *[n for n in ("n1", "n2") if n != node]]
    await w.job(JobKind.START, game, IMG)
    rec = await w.sync(game)
    assert rec.status is Status.RUNNING and rec.node_id == node, rec
    return rec


def snapshot_reasons(w: World, game: str) -> list[str]:
    return [r["fields"]["reason"] for r in w.store.results if r["kind"] == "snapshot" and r["game_id"] == game]


@pytest.mark.parametrize(("mode", "shared", "since", "kind"), [
    (NodeLoss.WAIT, False, 10, "wait"),
    (NodeLoss.WAIT, True, 3600, "wait"),
    (NodeLoss.RESCHEDULE, True, 10, "wait"),          # within the grace: every policy waits
    (NodeLoss.RESCHEDULE, True, 30, "move"),          # the grace is over (exactly)
    (NodeLoss.RESCHEDULE, False, 3600, "wait"),       # node-local state never moves unless asked to
    (NodeLoss.RESCHEDULE_WITHOUT_STATE, False, 31, "move"),
    (NodeLoss.STOP, False, 31, "stop"),
    (NodeLoss.STOP, True, 29, "wait"),
])
def test_node_loss_step(mode, shared, since, kind) -> None:
    rec = record(Status.NODE_LOST, R, node_lost_since=NOW - timedelta(seconds=since))
    step = node_loss_step(rec, NOW, NodeLossPolicy(mode=mode, grace=GRACE, state_shared=shared))
    assert step.kind == kind and step.why
    if kind == "wait":
        assert 0 < step.delay <= 10  # looked at again, never a busy loop nor an hour's sleep


def test_a_node_lost_snapshot_says_which_node_without_an_error_code() -> None:
    old = record(Status.RUNNING, R)
    new = record(Status.NODE_LOST, R, last_error_message="node n2 is down or unreachable")
    assert snapshots.reason_for(old, new) == "node_lost"
    f = snapshots.fields(new, previous=Status.RUNNING, reason="node_lost", snapshot_id="s", now=NOW)
    assert f["status"] == "node_lost" and f["error_code"] == "" and "n2" in f["error_message"]
    assert snapshots.reason_for(new, record(Status.RUNNING, R)) == "recovered"


async def test_a_lost_node_is_not_a_crash_and_wait_keeps_the_game_for_its_node(tmp_path):
    w = world(tmp_path, "wait")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    rec = await w.sync("g1")
    assert rec.status is Status.NODE_LOST and rec.crash_count == 0 and rec.node_id == "n2"
    assert rec.desired_status is DesiredStatus.RUNNING and rec.node_lost_since is not None
    assert snapshot_reasons(w, "g1")[-1] == "node_lost"
    starts = len(w.backend.ops("start", "create"))
    for _ in range(3):  # long past the grace: still waiting, nothing started, nothing counted
        w.store.clock.advance(GRACE * 10)
        rec = await w.sync("g1")
        assert rec.status is Status.NODE_LOST and rec.crash_count == 0
    assert len(w.backend.ops("start", "create")) == starts
    # The node comes back (its dockerd stopped the engine when it went down): started again there.
    w.backend.lost.discard("n2")
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n2" and rec.crash_count == 0
    assert len(w.running("g1")) == 1 and snapshot_reasons(w, "g1")[-1] == "started"


async def test_reschedule_with_shared_state_moves_the_game_off_the_node_after_the_grace(tmp_path):
    w = world(tmp_path, "reschedule", shared="1")
    first = await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    rec = await w.sync("g1")
    assert rec.status is Status.NODE_LOST
    w.store.clock.advance(GRACE - 1)
    rec = await w.sync("g1")
    assert rec.status is Status.NODE_LOST and rec.node_id == "n2"  # the grace is not over
    w.store.clock.advance(2)
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n1" and rec.avoid_nodes == ("n2",), rec
    assert rec.current_container_id != first.current_container_id and rec.crash_count == 0
    (unit,) = [c for c in w.backend.containers.values() if c.name == "galaxy-game-g1"]
    assert unit.node == "n1" and unit.state == "running"
    assert w.backend.specs[-1].avoid_nodes == ("n2",) and w.backend.specs[-1].node == "n1"
    assert snapshot_reasons(w, "g1")[-3:] == ["node_lost", "started", "started"]
    # The node comes back: the old unit was removed, so nothing of the game runs there.
    w.backend.lost.discard("n2")
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and len(w.running("g1")) == 1 and w.running("g1")[0].node == "n1"


async def test_reschedule_with_node_local_state_waits_unless_asked_to_move_without_it(tmp_path):
    w = world(tmp_path, "reschedule", shared="0")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    await w.sync("g1")
    w.store.clock.advance(GRACE * 10)
    rec = await w.sync("g1")
    assert rec.status is Status.NODE_LOST and rec.node_id == "n2" and rec.avoid_nodes == ()

    w = world(tmp_path / "b", "reschedule_without_state")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    await w.sync("g1")
    w.store.clock.advance(GRACE + 1)
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n1" and rec.crash_count == 0


async def test_stop_gives_the_game_up_after_the_grace_without_a_crash(tmp_path):
    w = world(tmp_path, "stop")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    await w.sync("g1")
    w.store.clock.advance(GRACE + 1)
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and rec.desired_status is DesiredStatus.STOPPED and rec.crash_count == 0
    assert "RTMANAGER_NODE_LOSS=stop" in rec.last_error_message
    assert snapshot_reasons(w, "g1")[-2:] == ["node_lost", "stopped"]
    assert not w.backend.ops("start")[1:]  # only the first start: none on the dead node


async def test_games_on_a_dead_node_hold_no_worker(tmp_path):
    """A dozen games sit on a dead node (a start there would wait for the node: the fake hangs) while four
    workers serve; every other game's start is answered promptly."""
    w = world(tmp_path, "wait")
    for i in range(12):
        await on_node(w, f"dead-{i}", "n2")
    w.backend.lose_node("n2")
    w.backend.nodes = ["n1"]
    before = len(w.backend.calls)
    w.queue = w.reconciler.queue = WorkQueue()
    workers = [asyncio.create_task(w.reconciler.worker(n)) for n in range(4)]
    try:
        t0 = time.monotonic()
        for i in range(12):
            w.queue.add(f"dead-{i}")
        for wave in range(4):  # other games' jobs keep coming while the dead node's games come back again
            await asyncio.sleep(0.15)  # (resyncs, the task poller), a minute apart: a crash backoff is over
            w.store.clock.advance(60)
            for i in range(12):
                w.queue.add(f"dead-{i}")
            for i in range(2 * wave, 2 * wave + 2):
                await w.job(JobKind.START, f"live-{i}", IMG)
                w.queue.add(f"live-{i}")
        await eventually(lambda: all(w.results(f"live-{i}") for i in range(8)), timeout=5, interval=0.01,
                         what="every other game's start answered")
        assert time.monotonic() - t0 < 5
        assert all(w.results(f"live-{i}")[-1] == ("start", "success", "") for i in range(8))
        for i in range(12):
            rec = w.store.records[f"dead-{i}"]
            assert rec.status is Status.NODE_LOST and rec.crash_count == 0
        dead = {u.id for u in w.backend.containers.values() if u.node == "n2"}
        assert len(dead) == 12
        assert not [c for c in w.backend.calls[before:] if c[0] in ("start", "create", "remove") and (
            c[1] in dead or c[1].startswith("galaxy-game-dead-"))]
    finally:
        w.queue.shut_down()
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)



async def test_a_job_for_a_game_waiting_for_its_node_waits_with_it(tmp_path):
    """Under wait, a start of a node_lost game waits with the game (no start is tried on the dead node) and is
    answered when the game runs again on its node."""
    w = world(tmp_path, "wait")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    await w.sync("g1")
    await w.job(JobKind.START, "g1", IMG)
    w.store.clock.advance(3600)
    rec = await w.sync("g1")
    assert rec.status is Status.NODE_LOST and len(w.results("g1")) == 1 and len(w.backend.ops("start")) == 1
    w.backend.lost.discard("n2")
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and w.results("g1") == [("start", "success", "")] * 2
