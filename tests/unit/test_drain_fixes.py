"""Regression tests of the defects an adversarial review of drains proved (the pure and reconciler
parts; the store's are tests/integration/test_drain_fixes.py):

* (2) a crash mid-turn on a drained target is held like any other restart nobody asked for;
* (5) a drain's stop waits for a turn boundary until the drain's deadline, not only
  RTMANAGER_DISRUPTION_WAIT;
* (6) a game a failed move stopped is brought back by undrain, pinned to its original node;
* (7) under a shared-state node drain, a start, restart or patch of a game pinned to the node is a
  move, not a refusal (a refusal under node-local state says why, truly).
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest

from controller.planner import Action, ActionKind, planned_disruption
from desired import drains
from desired.drains import DrainAction, DrainGame, DrainStep, GameState, Restore, StepKind, Targets
from desired.jobs import Job
from desired.model import DesiredStatus, JobKind, OpSource, Status, StopReason
from tests.support import eventually
from tests.support.job_records import NOW, rec
from tests.support.world import IMG, IMG2, World


async def test_a_crash_mid_turn_on_a_drained_target_is_not_restarted_there(tmp_path) -> None:
    """Defect 2: a turn keeps the record unconverged for its whole generation; the hold must be asked
    whatever the convergence, or the crash of a generating engine restarts it on the drained target."""
    w = World(tmp_path)
    w.engine.admin[IMG] = "slow"
    held: list[str] = []

    async def hold(record) -> str:
        held.append(record.game_id)
        return "the host is drained"

    await w.job(JobKind.START, "g1", IMG)
    assert (await w.sync("g1")).status is Status.RUNNING
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    rec1 = await w.sync("g1")
    assert rec1.status is Status.GENERATION_IN_PROGRESS and not rec1.converged
    w.reconciler.hold = hold  # the host is drained from here on
    w.backend.crash("g1", code=5)
    for _ in range(4):
        await w.sync("g1")
        w.store.clock.advance(60)
    assert held, "the hold was never asked"
    assert w.running("g1") == [], "a crash restart happened on a drained host"


def _drain_stop(wait_until, forced: bool = False) -> Job:
    """What the drain loop submits to take a game (controller/drains.py ``_stop``)."""
    return Job(kind=JobKind.STOP, game_id="g1", source=OpSource.ADMIN, reason=StopReason.ADMIN_REQUEST,
               force=forced, drain=DrainStep(drain_id=1, kind=StepKind.TAKE, generation=0, wait_until=wait_until,
                                             forced=forced))


async def test_a_drains_stop_waits_for_a_turn_boundary_until_the_drains_deadline(tmp_path) -> None:
    """Defect 5: before its deadline the drain's stop must not cut a turn once RTMANAGER_DISRUPTION_WAIT
    is over; it waits until the drain's own deadline, then goes ahead."""
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="30")
    w.engine.admin[IMG] = "slow"
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    assert (await w.sync("g1")).status is Status.GENERATION_IN_PROGRESS
    deadline = w.store.clock.now() + timedelta(seconds=3600)
    await w.store.submit(_drain_stop(deadline), w.defaults)
    record = w.store.records["g1"]
    assert record.disruption_until == deadline and record.disruption_generation == record.generation
    await w.sync("g1")
    assert len(w.running("g1")) == 1  # waits for the turn boundary
    w.store.clock.advance(31)  # past RTMANAGER_DISRUPTION_WAIT, an hour before the drain's deadline
    await w.sync("g1")
    assert w.engine.game("galaxy-game-g1").phase == "generating"
    assert len(w.running("g1")) == 1, "the drain's stop cut the turn before the drain's deadline"
    w.store.clock.advance(3600)  # the deadline is over: the stop goes ahead
    await w.sync("g1")
    assert w.running("g1") == []


def test_the_generations_own_deadline_applies_to_that_generation_only() -> None:
    """A later generation (Lobby's restart, say) waits only RTMANAGER_DISRUPTION_WAIT again."""
    base = rec(Status.GENERATION_IN_PROGRESS, DesiredStatus.STOPPED, gen=3, obs=2, game_id="g1",
               state_path="/srv/g1", current_container_id="c1", current_image_ref=IMG, turn=4,
               started_at=NOW - timedelta(hours=1))
    own = base.replace(disruption_wait_since=NOW - timedelta(seconds=100),
                       disruption_until=NOW + timedelta(seconds=600), disruption_generation=3)
    from observed.model import ObservedContainer
    container = ObservedContainer(id="c1", name="galaxy-game-g1", image=IMG, state="running", labels={},
                                  created_at=NOW)
    stop = Action(ActionKind.STOP, "desired stopped")
    assert planned_disruption(stop, own, container, now=NOW, disruption_wait=30).kind is ActionKind.WAIT
    later = own.replace(generation=4)
    assert planned_disruption(stop, later, container, now=NOW, disruption_wait=30).kind is ActionKind.STOP
    forced = own.replace(force_generation=3)
    assert planned_disruption(stop, forced, container, now=NOW, disruption_wait=30).kind is ActionKind.STOP


def test_a_game_a_failed_move_stopped_is_brought_back_by_undrain() -> None:
    """Defect 6: a move that failed stopped the game; nobody else stopped it, so undrain starts it again."""
    failed = rec(Status.STOPPED, DesiredStatus.STOPPED, gen=5, obs=5, game_id="g1", state_path="/srv/g1")
    g = DrainGame(drain_id=1, game_id="g1", action=DrainAction.MOVE, state=GameState.DONE, generation=4,
                  taken_at=NOW - timedelta(minutes=5), image_ref=IMG, from_node="nodeb",
                  note="stopped instead of moved (start_failed: ...)")
    steps = drains.restore_plan({"g1": g}, {"g1": failed}, stopped_since=set())
    assert [s.verdict for s in steps] == [Restore.START], steps
    assert drains.restore_plan({"g1": g}, {"g1": failed}, stopped_since={"g1"}) == []  # Lobby stopped it


def test_a_restore_of_a_failed_move_is_pinned_back_to_its_node() -> None:
    """Defect 6: its state (node-local) is on its original node; a new spec revision makes the unit there."""
    r = rec(Status.STOPPED, DesiredStatus.RUNNING, gen=6, obs=5, game_id="g1", state_path="/srv/g1", spec_revision=2)
    pinned = drains.with_step(r, DrainStep(drain_id=1, kind=StepKind.RESTORE, pin="nodeb"))
    assert pinned.node_id == "nodeb" and pinned.spec_revision == 3


def test_a_restart_on_a_drained_node_with_shared_state_is_admitted_as_a_move() -> None:
    """Defect 7: with a shared state root the game's state is not on the node: a start or restart is
    admitted, its pin cleared (a move); under node-local state it is refused, saying why."""
    r = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=2, obs=2, game_id="g1", state_path="/srv/g1",
            node_id="nodeb", spec_revision=1)
    shared = Targets(nodes=frozenset({"nodeb"}), shared=frozenset({"nodeb"}))
    local = Targets(nodes=frozenset({"nodeb"}))
    for kind in (JobKind.START, JobKind.RESTART):
        assert drains.refusal(r, kind, shared) is None
        why = drains.refusal(r, kind, local)
        assert why is not None and "nodeb is drained and its state is there" in why
    wanted = r.replace(generation=3)
    moved = drains.unpinned(r, wanted, JobKind.RESTART, shared)
    assert moved.node_id is None and moved.spec_revision == 2
    patched = drains.unpinned(r, wanted, JobKind.PATCH, shared)  # a patch would recreate it on the node
    assert patched.node_id is None
    assert drains.unpinned(r, wanted, JobKind.RESTART, local) == wanted  # refused before, never unpinned
    elsewhere = r.replace(node_id="nodea")
    assert drains.unpinned(elsewhere, elsewhere, JobKind.RESTART, shared) == elsewhere


def test_an_unknown_node_is_resolved_by_hostname_or_named_in_the_refusal() -> None:
    """Defect 4: the node's id or its hostname; anything else is named, with the nodes there are."""
    known = {"abc123": "worker1", "def456": "worker2"}
    assert drains.resolve_node("abc123", known) == "abc123"
    assert drains.resolve_node("worker2", known) == "def456"
    assert drains.resolve_node("worker3", known) is None
    assert drains.resolve_node("twin", {"a1": "twin", "b2": "twin"}) is None  # ambiguous
    why = drains.unknown_node("worker3", known)
    assert "no Swarm node worker3" in why and "abc123 (worker1)" in why


def test_a_stop_taken_on_a_node_is_done_once_a_restart_moved_the_game_off_it() -> None:
    """Defect 7's other side: a restart admitted as a move takes the game off the drained node; the
    drain's stop row is done with it, and is never asked again (it would stop the moved game)."""
    from tests.unit.test_drains import drain as a_drain
    from tests.unit.test_drains import game
    moved = rec(Status.STARTING, DesiredStatus.RUNNING, gen=4, obs=3, game_id="g1", state_path="/srv/g1")
    d = a_drain("nodeb", past=True)
    g = game(moved.replace(node_id="nodeb"), DrainAction.STOP, forced=True)
    step = drains.plan(d, {"g1": moved}, {"g1": g}, NOW)
    assert [x.game_id for x in step.finish] == ["g1"] and step.resubmit == []
    still = moved.replace(node_id="nodeb")
    step = drains.plan(d, {"g1": still}, {"g1": g}, NOW)
    assert step.finish == [] and [x.game_id for x in step.resubmit] == ["g1"]


def test_a_game_crashed_mid_turn_on_a_drained_node_is_moved_before_the_deadline() -> None:
    """Defect 2's other side: its restart is held on the drained node, so the drain must not wait for its
    turn's job to converge (it cannot there) until the deadline: it has nothing to cut, it moves now."""
    from tests.unit.test_drains import drain as a_drain
    crashed = rec(Status.STARTING, DesiredStatus.RUNNING, gen=3, obs=2, game_id="g1", state_path="/srv/g1",
                  node_id="nodeb")
    busy = rec(Status.GENERATION_IN_PROGRESS, DesiredStatus.RUNNING, gen=3, obs=2, game_id="g2",
               state_path="/srv/g2", node_id="nodeb", current_container_id="c2", current_image_ref=IMG,
               started_at=NOW - timedelta(hours=1))
    step = drains.plan(a_drain("nodeb", parallel=5), {"g1": crashed, "g2": busy}, {}, NOW)
    assert [t.record.game_id for t in step.take] == ["g1"] and step.waiting == 1


async def drain_moved(w: World, node: str) -> None:
    from desired import transitions

    async def avoid():
        return frozenset({node})

    w.reconciler.starts.avoid = avoid
    w.store.records["g1"] = transitions.drain_moved(w.store.records["g1"], w.store.clock.now(), node=node,
                                                    forced=False, deadline=w.store.clock.now() + timedelta(hours=1))


async def test_a_drains_move_with_nowhere_to_go_keeps_the_running_engine(tmp_path) -> None:
    """Red-team, stop 44: a drain's move removed the running unit and only then looked for a node; with none
    usable (the only other node down, paused or drained too) the game had no engine until a node came back,
    and no job waited to say so. The move now waits with the engine running, as the node-loss move does."""
    from desired.errors import NodeUnavailable

    w = World(tmp_path, RTMANAGER_STATE_SHARED="1")
    w.backend.nodes = ["n1", "n2"]
    await w.job(JobKind.START, "g1", IMG)
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n1"
    running = w.running("g1")
    w.backend.paused.add("n2")  # the only other node takes no new task
    await drain_moved(w, "n1")
    for _ in range(3):
        try:
            await w.sync("g1")
        except NodeUnavailable:
            pass  # the worker retries it later
    assert w.running("g1") == running and w.store.records["g1"].status.is_up
    w.backend.paused.discard("n2")  # a node to go to: the move goes on
    await w.sync("g1")
    [moved] = w.running("g1")
    assert moved.node == "n2" and w.store.records["g1"].status is Status.RUNNING


async def patched_on_a_paused_node(w: World) -> list:
    """g1 runs IMG on n1 (of n1, n2); n1 is paused; a patch to IMG2 is admitted. The units running before it."""
    w.backend.nodes = ["n1", "n2"]
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    running = w.running("g1")
    w.backend.paused.add("n1")
    await w.job(JobKind.PATCH, "g1", IMG2)
    return running


async def test_a_patch_of_a_game_pinned_to_a_paused_node_keeps_its_engine(tmp_path) -> None:
    """The other half: a replacement pinned to a node that takes no new task (paused) is not begun."""
    from desired.errors import NodeUnavailable

    w = World(tmp_path)
    running = await patched_on_a_paused_node(w)
    with pytest.raises(NodeUnavailable):
        await w.sync("g1")
    assert w.running("g1") == running and w.store.records["g1"].status is Status.RUNNING


async def test_a_patch_answered_failed_because_its_node_takes_no_unit_is_not_carried_out_later(tmp_path) -> None:
    """Review, stop 44: the replacement refused for want of a node (its pinned node paused) was answered
    docker_unavailable once overdue, as a lost node's jobs are: desired state kept the new image, and the game
    was patched days later, when the node was active again, with no result (Lobby had been told the patch
    failed). Nothing was touched, so its failure now ends the generation as any failed patch of a running
    game does: back to the image that runs."""
    w = World(tmp_path)
    running = await patched_on_a_paused_node(w)
    s = w.settings.runtime
    w.store.clock.advance(s.job_timeout + s.disruption_wait + 1)
    worker = asyncio.create_task(w.reconciler.worker(0))
    try:
        w.reconciler.queue.add("g1")
        await eventually(lambda: ("patch", "failure", "docker_unavailable") in w.results("g1"), 5.0, interval=0.01)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    for _ in range(3):
        await w.sync("g1")
    w.backend.paused.discard("n1")  # the node is active again
    for _ in range(3):
        rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and rec.desired_image_ref == IMG and rec.converged
    assert w.running("g1") == running  # the engine was never replaced


@pytest.mark.parametrize("shared", ["1", "0"])
async def test_an_engine_that_exits_on_a_paused_node_is_treated_as_on_a_drained_one(tmp_path, shared) -> None:
    """Review, stop 44: a paused node takes no new task, so the engine that exited there could not be started
    again, and the planner knew lost and drained nodes only: the game stayed starting for ever, no policy
    applied. A unit that is not running on a paused node is on a node its operator took out of use, as a
    drained one: node_lost (no crash counted), moved with its state when the state root is shared."""
    from desired.errors import NodeUnavailable

    w = World(tmp_path, RTMANAGER_STATE_SHARED=shared, RTMANAGER_NODE_LOSS="reschedule",
              RTMANAGER_NODE_LOSS_GRACE="1")
    w.backend.nodes = ["n1", "n2"]
    await w.job(JobKind.START, "g1", IMG)
    rec = await w.sync("g1")
    assert rec.node_id == "n1"
    w.backend.paused.add("n1")
    w.backend.crash("g1")
    for _ in range(6):
        w.store.clock.advance(120)
        try:
            await w.sync("g1")
        except NodeUnavailable:
            pass
    rec = w.store.records["g1"]
    if shared == "1":
        assert rec.status is Status.RUNNING and rec.node_id == "n2"
    else:  # its state is on n1: it waits for the node, as for a drained one
        assert rec.status is Status.NODE_LOST and rec.desired_status is DesiredStatus.RUNNING
    assert rec.crash_count == 0


def test_a_move_that_succeeded_is_not_undone_by_undrain_after_the_game_stopped_later() -> None:
    """Red-team 131: moved to node m (done), the game was later given up there (a crash loop, a lost node's
    policy); undrain took it for a failed move and started it again, pinned to its old node, with the image
    the drain recorded: a game Lobby was told is stopped ran again, maybe an older image on a newer state."""
    from controller.drains import _outcome

    given_up = rec(Status.STOPPED, DesiredStatus.STOPPED, gen=9, obs=9, game_id="g1", state_path="/srv/g1",
                   node_id="nodem", last_error_message="crash loop: 5 crashes within 600s; last: exit 1")
    g = DrainGame(drain_id=1, game_id="g1", action=DrainAction.MOVE, state=GameState.DONE, generation=4,
                  taken_at=NOW - timedelta(days=2), image_ref=IMG, from_node="noden", to_node="nodem",
                  note="moved to node nodem")
    assert drains.restore_plan({"g1": g}, {"g1": given_up}, stopped_since=set()) == []
    # and a move that failed is done with no node (the tick's outcome), so undrain brings that one back
    failed = rec(Status.STOPPED, DesiredStatus.STOPPED, gen=5, obs=5, game_id="g1", state_path="/srv/g1",
                 node_id="nodem")
    assert _outcome(g, failed)[0] is None
    assert drains.restore_plan({"g1": dataclasses.replace(g, to_node=None)}, {"g1": failed}, set())[0].verdict \
        is Restore.START
