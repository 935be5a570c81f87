"""A drain's stops and moves wait for the engine's turn boundary until the drain's deadline, whatever
else happens to the game meanwhile (red-team findings): RTMANAGER_DISRUPTION_WAIT=0 does not cancel
the drain's own deadline; a pause or reconcile admitted during the wait does not drop it; an engine
on a node that was lost and came back is asked before it is replaced; and a move of a game whose node
is lost happens under the default RTMANAGER_NODE_LOSS=wait."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controller.planner import ActionKind, plan
from desired import transitions
from desired.model import JobKind, Status
from tests.support.planning import KW, NOW, ST, ours, record
from tests.support.world import IMG, IMG2, World

NAME = "galaxy-game-g1"


def test_a_drains_deadline_holds_with_no_global_wait():
    rec = record(Status.GENERATION_IN_PROGRESS, ST, converged=False, admin_api=True, turn=4, phase="generating",
                 disruption_until=NOW + timedelta(hours=1), disruption_generation=5)
    for wait in (0.0, 1.0):
        assert plan(rec, ours(), **{**KW, "disruption_wait": wait}).kind is ActionKind.WAIT, wait
    past = rec.replace(disruption_until=NOW - timedelta(seconds=1))
    assert plan(past, ours(), **{**KW, "disruption_wait": 0.0}).kind is ActionKind.STOP


async def lost_on_n2(tmp_path) -> World:
    """g1 ran on n2 (shared state, RTMANAGER_NODE_LOSS=wait), and n2 is lost: the record says node_lost."""
    w = World(tmp_path, RTMANAGER_NODE_LOSS="wait", RTMANAGER_NODE_LOSS_GRACE="30", RTMANAGER_STATE_SHARED="1")
    w.backend.nodes = ["n2", "n1"]
    await w.job(JobKind.START, "g1", IMG)
    assert (await w.sync("g1")).node_id == "n2"
    w.backend.lose_node("n2")
    assert (await w.sync("g1")).status is Status.NODE_LOST
    return w


def moving(w: World, deadline: timedelta = timedelta(hours=1), node: str | None = "n2"):
    """What the drain of ``node`` writes when it takes g1 (its starts avoid the drained node)."""

    async def avoid():
        return frozenset({node} if node else ())

    w.reconciler.starts.avoid = avoid
    cur = w.store.records["g1"]
    w.store.records["g1"] = transitions.drain_moved(cur, w.store.clock.now(), node=node, forced=False,
                                                    deadline=w.store.clock.now() + deadline)


async def test_a_pause_during_a_drains_move_keeps_the_drains_deadline(tmp_path):
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60", RTMANAGER_STATE_SHARED="1")
    w.backend.nodes = ["n2", "n1"]
    w.engine.admin[IMG] = "slow"
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    unit = w.backend.by_name(NAME)
    w.engine.game(NAME).phase = "generating"
    moving(w)
    rec = await w.sync("g1")
    assert rec.disruption_wait_since is not None and unit.id in w.backend.containers
    w.store.clock.advance(61)
    await w.sync("g1")
    assert unit.id in w.backend.containers  # the drain's deadline holds past RTMANAGER_DISRUPTION_WAIT
    await w.job(JobKind.PAUSE, "g1")
    rec = await w.sync("g1")
    assert rec.disruption_generation == rec.generation
    assert unit.id in w.backend.containers, "cut mid-turn long before the drain's deadline"
    w.engine.finish_generation(NAME)
    rec = await w.sync("g1")
    assert unit.id not in w.backend.containers and rec.node_id == "n1"


@pytest.mark.parametrize("how", ["drain_move", "patch"])
async def test_an_engine_on_a_node_that_came_back_is_asked_before_it_is_replaced(tmp_path, how):
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="600", RTMANAGER_NODE_LOSS="wait", RTMANAGER_STATE_SHARED="1")
    w.backend.nodes = ["n2", "n1"]
    w.engine.admin[IMG] = "slow"
    await w.job(JobKind.START, "g1", IMG)
    rec = await w.sync("g1")
    assert rec.node_id == "n2" and rec.admin_api is True
    w.engine.game(NAME).phase = "generating"
    unit = w.backend.by_name(NAME)
    w.backend.lost.add("n2")
    unit.state = "exited"  # as the manager sees a task on a node it cannot reach
    assert (await w.sync("g1")).status is Status.NODE_LOST
    if how == "drain_move":
        moving(w)
    else:
        await w.job(JobKind.PATCH, "g1", IMG2)
    w.backend.lost.discard("n2")
    unit.state = "running"  # the partition heals: the engine ran on, and is mid-turn
    await w.sync("g1")
    assert unit.id in w.backend.containers, "replaced mid-turn without asking the engine"
    w.engine.finish_generation(NAME)
    for _ in range(3):
        await w.sync("g1")
    assert unit.id not in w.backend.containers


async def test_a_drain_moves_a_game_whose_node_is_lost_under_the_wait_policy(tmp_path):
    w = await lost_on_n2(tmp_path)
    moving(w)
    for _ in range(5):
        rec = await w.sync("g1")
        if rec.converged:
            break
    assert rec.status is Status.RUNNING and rec.converged and rec.node_id == "n1"


async def _moving_mid_turn(tmp_path, wait: str, deadline: timedelta = timedelta(hours=1)):
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT=wait, RTMANAGER_STATE_SHARED="1")
    w.backend.nodes = ["n2", "n1"]
    w.engine.admin[IMG] = "slow"
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    w.engine.game(NAME).phase = "generating"
    moving(w, deadline)
    await w.sync("g1")
    unit = w.backend.by_name(NAME)
    assert unit.id in w.backend.containers
    return w, unit


@pytest.mark.parametrize("wait", ["60", "0"])
async def test_a_patch_during_a_drains_move_keeps_the_drains_deadline(tmp_path, wait):
    """Review: the deadline was carried by pauses and reconciles only; a patch (or a restart, a stop)
    admitted while the move waited dropped it, and the turn was cut after the global wait, or at once."""
    w, unit = await _moving_mid_turn(tmp_path, wait)
    await w.job(JobKind.PATCH, "g1", IMG2)
    w.store.clock.advance(61)
    await w.sync("g1")
    assert unit.id in w.backend.containers


async def test_past_the_drains_deadline_the_move_is_forced_again_after_a_job_since(tmp_path):
    """Review: the drain forces a move once, at its deadline, on the generation it saw; a pause since made
    a new generation that carried the deadline but not the force, and the move waited for the turn again
    (up to RTMANAGER_DISRUPTION_WAIT more). The drain's plan forces it again; once forced, it goes."""
    from desired.drains import Drain as DrainRow
    from desired.drains import DrainAction, DrainGame, DrainStatus, GameState, LocalState, OnDeadline, unforced
    from desired.drains import plan as drain_plan
    w, unit = await _moving_mid_turn(tmp_path, "600", timedelta(seconds=30))
    deadline = w.store.records["g1"].disruption_until
    took = w.store.records["g1"].generation
    forced = w.store.records["g1"].replace(force_generation=took)  # the drain's force at its deadline
    w.store.records["g1"] = forced
    await w.job(JobKind.PAUSE, "g1")
    rec = w.store.records["g1"]
    assert rec.generation == took + 1 and rec.disruption_generation == rec.generation
    drain = DrainRow(id=1, node="n2", max_parallel=2, deadline_at=deadline, on_deadline=OnDeadline.MOVE,
                     local_state=LocalState.STOP, state_shared=True, status=DrainStatus.DRAINING, source="admin",
                     created_at=deadline - timedelta(seconds=30))
    row = DrainGame(drain_id=1, game_id="g1", action=DrainAction.MOVE, state=GameState.IN_PROGRESS,
                    generation=took, taken_at=drain.created_at, forced=True, from_node="n2")
    w.store.clock.advance(31)
    assert unforced(drain, rec)
    assert [g.game_id for g in drain_plan(drain, {"g1": rec}, {"g1": row}, w.store.clock.now()).force] == ["g1"]
    await w.sync("g1")
    assert unit.id in w.backend.containers  # not forced yet: the turn is waited for
    w.store.records["g1"] = rec.replace(force_generation=rec.generation)  # what force_move now writes
    assert not unforced(drain, w.store.records["g1"])
    await w.sync("g1")
    assert unit.id not in w.backend.containers


async def test_once_the_move_converged_its_deadline_binds_no_later_job(tmp_path):
    """The deadline goes with the disruption it bounds, not with the game: a patch after the move
    converged waits for the turn as any patch does (RTMANAGER_DISRUPTION_WAIT), expired deadline or not."""
    w, unit = await _moving_mid_turn(tmp_path, "600", timedelta(seconds=30))
    w.engine.finish_generation(NAME)
    rec = await w.sync("g1")
    assert rec.converged and unit.id not in w.backend.containers
    w.store.clock.advance(3600)
    w.engine.game(NAME).phase = "generating"
    moved = w.backend.by_name(NAME)
    await w.job(JobKind.PATCH, "g1", IMG2)
    rec = await w.sync("g1")
    assert rec.disruption_generation != rec.generation and moved.id in w.backend.containers


async def test_a_restart_admitted_as_a_move_off_a_lost_drained_node_happens(tmp_path):
    """Review: a start, restart or patch of a game pinned to a drained node (shared state) is admitted as
    a move; it cleared the pin but did not avoid the node, so with the node lost the game waited for it
    under RTMANAGER_NODE_LOSS=wait, and the drain (which takes games still pinned there) never did."""
    from desired import drains
    w = await lost_on_n2(tmp_path)

    async def avoid():
        return frozenset({"n2"})

    w.reconciler.starts.avoid = avoid
    cur = w.store.records["g1"]
    await w.job(JobKind.RESTART, "g1")
    targets = drains.Targets(nodes=frozenset({"n2"}), shared=frozenset({"n2"}))
    w.store.records["g1"] = drains.unpinned(cur, w.store.records["g1"], JobKind.RESTART, targets)
    for _ in range(10):
        w.store.clock.advance(60)
        rec = await w.sync("g1")
        if rec.converged:
            break
    assert rec.converged and rec.node_id == "n1" and rec.status is Status.RUNNING


def test_the_image_a_drain_records_is_the_one_whose_engine_last_wrote_the_state():
    """A patch still waiting for a turn boundary: what runs (the drain's stop supersedes the patch). Not up
    (a replacement under way, a restart after a crash with a patch admitted in its backoff, a start from
    stopped on another image): the image asked for, whose engine may already have written the state
    (reviews: the old image on the new image's state, its copy then dropped; a game a rollout selected
    by the image it was starting on, then skipped as moved)."""
    from desired.model import DesiredStatus
    waiting = record(Status.RUNNING, DesiredStatus.RUNNING, converged=False).replace(
        current_image_ref=IMG, desired_image_ref=IMG2)
    assert waiting.ran_image == IMG
    for status in (Status.GENERATION_IN_PROGRESS, Status.ENGINE_UNREACHABLE, Status.GENERATION_FAILED,
                   Status.FINISHED, Status.NODE_LOST):  # node lost: a patch's recreate waits for the node
        assert waiting.replace(status=status).ran_image == IMG
    for status in (Status.STARTING, Status.STOPPED):
        assert waiting.replace(status=status).ran_image == IMG2
    assert waiting.replace(status=Status.STARTING, rollback_image_ref=IMG).ran_image == IMG2
    # its node lost while the new image's unit started (review): that unit is the one that ran last
    assert waiting.replace(status=Status.NODE_LOST, rollback_image_ref=IMG).ran_image == IMG2
    assert waiting.replace(status=Status.STARTING, current_image_ref=None).ran_image == IMG2  # a first start
    assert waiting.replace(desired_image_ref=None).ran_image == IMG


def test_a_drain_of_a_replacement_under_way_records_the_replaced_image():
    """What a drain records is the image whose state its stop leaves (``stop_image``). A replacement under way
    does not survive the stop: the replaced engine's copy is put back (or the unit stopped is that engine),
    so undrain starts the replaced image, not the new one on the old state with nothing to roll back to."""
    from desired.model import DesiredStatus
    replacing = record(Status.STARTING, DesiredStatus.RUNNING, converged=False).replace(
        current_image_ref=IMG, desired_image_ref=IMG2, rollback_image_ref=IMG, current_container_id="c" * 64)
    assert replacing.stop_image == IMG and replacing.ran_image == IMG2
    # rolling back to the replaced image: that is what is asked for, and what the state is put back for
    back = replacing.replace(rolling_back=True, rollback_image_ref=None, desired_image_ref=IMG)
    assert back.stop_image == IMG
    # a start from stopped on another image (nothing to roll back to): its engine may have written the state
    assert replacing.replace(rollback_image_ref=None).stop_image == IMG2
    # its node lost during the replacement: no stop restores anything there
    assert replacing.replace(status=Status.NODE_LOST).stop_image == IMG2
    for status in (Status.RUNNING, Status.GENERATION_IN_PROGRESS, Status.STOPPED):
        assert replacing.replace(status=status).stop_image == replacing.replace(status=status).ran_image
