"""Regression tests for the six defects an adversarial review proved in node-loss handling and the
state directory made on a game's Swarm node, and for three of its suspicions (the fakes' backend with
nodes, the planner, and ``SwarmBackend`` with a stubbed docker API).

1. A job or a drift that wants a new unit of a ``node_lost`` game went around node-loss handling (the
   unit on the dead node removed, the game stuck ``starting``, the policy never applied, and after the
   job timeout the game given up): node loss is planned before any replacement, ``plan`` knows the lost
   nodes (a game with no unit, pinned to a lost node, is ``node_lost`` too), and an overdue job of such a
   game is answered without touching its desired state.
2. A node that dies while a start waits for the engine's health counted as a crash (``NodeLost`` now).
3. A move with nowhere to go removed the unit and left the game avoiding its own node for ever.
4. An unreachable engine whose node is lost (Swarm still calling its task running) spun a RECOVER loop.
5. A helper task still pulling its image was a permanent refusal (temporary now).
6. The helper ran the engine's image as root with DAC_OVERRIDE and FOWNER (a small helper image and
   CAP_CHOWN alone now).
"""

from __future__ import annotations

import asyncio
import types
from datetime import timedelta

import pytest

from controller.planner import ActionKind, plan
from desired import transitions
from desired.errors import TemporaryError
from desired.model import DesiredStatus, JobKind, Status
from desired.policy import NODE_LOSS_POLL, NodeLoss, NodeLossPolicy, node_loss_step
from observed import swarm_statedir
from observed.errors import BackendUnavailable, NodeLost, Refused
from observed.model import ContainerSpec
from observed.swarm import SwarmBackend
from tests.support.planning import KW, NOW, OLD_HASH, R, ours, record
from tests.support.world import IMG, IMG2, World

GRACE = 30


def world(tmp_path, policy: str, shared: str = "0", **env: str) -> World:
    w = World(tmp_path, RTMANAGER_NODE_LOSS=policy, RTMANAGER_NODE_LOSS_GRACE=str(GRACE),
              RTMANAGER_STATE_SHARED=shared, RTMANAGER_IMAGE_ALLOWLIST="galaxy/engine-stub:*", **env)
    w.backend.nodes = ["n1", "n2"]
    return w


async def on_node(w: World, game: str, node: str):
    w.backend.nodes = [node, *[n for n in ("n1", "n2") if n != node]]
    await w.job(JobKind.START, game, IMG)
    rec = await w.sync(game)
    assert rec.status is Status.RUNNING and rec.node_id == node, rec
    w.backend.nodes = ["n1", "n2"]
    return rec


async def sync_quiet(w: World, game: str):
    """A sync whose temporary failure is swallowed (the worker retries it)."""
    try:
        return await w.sync(game)
    except TemporaryError:
        return w.store.records[game]


async def worker_sync(w: World, game: str):
    """What Reconciler.worker does with a temporary failure: retried, and an overdue job is answered."""
    try:
        return await w.sync(game)
    except TemporaryError as exc:
        from controller.reconciler import NodeUnavailable
        await w.reconciler.fail_if_overdue(game, exc.code, exc.message, w.settings.runtime.job_timeout,
                                           answer_only=isinstance(exc, NodeUnavailable))
        return w.store.records[game]


def like_swarm(w: World) -> None:
    """The fake's make_state_dir refuses what SwarmBackend.pick_node refuses: no usable, non-avoided node."""
    real = w.backend.make_state_dir

    async def make_state_dir(root, spec):
        if not spec.node and w.backend._place(spec) is None:
            raise NodeLost("no Swarm node is ready and active")
        return await real(root, spec)

    w.backend.make_state_dir = make_state_dir


# ----------------------------------------------------------------------------- defect 1
@pytest.mark.parametrize("kind", [JobKind.RESTART, JobKind.PATCH])
async def test_a_job_on_a_node_lost_game_still_gets_the_policy_move_after_the_grace(tmp_path, kind):
    """reschedule + shared state: a restart or patch of a node_lost game must not remove its unit and
    retry the dead node for ever (stuck ``starting``): the game is moved after the grace and runs on n1."""
    w = world(tmp_path, "reschedule", shared="1")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    assert (await w.sync("g1")).status is Status.NODE_LOST
    await w.job(kind, "g1", IMG2 if kind is JobKind.PATCH else None)
    rec = await sync_quiet(w, "g1")
    assert rec.status is Status.NODE_LOST, rec  # the job did not take it out of node-loss handling
    assert [c for c in w.backend.containers.values() if c.node == "n2"], "the unit on the lost node was removed"
    for _ in range(10):
        w.store.clock.advance(GRACE)
        rec = await sync_quiet(w, "g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n1", rec
    assert rec.current_image_ref == (IMG2 if kind is JobKind.PATCH else IMG)
    assert w.results("g1")[-1] == (kind.value, "success", "")


async def test_the_stop_policy_applies_to_a_node_lost_game_a_job_wanted_restarted(tmp_path):
    """RTMANAGER_NODE_LOSS=stop: a restart job on a node_lost game does not keep it out of the policy:
    after the grace the game is stopped (and the job answered)."""
    w = world(tmp_path, "stop")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    assert (await w.sync("g1")).status is Status.NODE_LOST
    await w.job(JobKind.RESTART, "g1")
    for _ in range(4):
        w.store.clock.advance(GRACE)
        rec = await sync_quiet(w, "g1")
    assert rec.status is Status.STOPPED and rec.desired_status is DesiredStatus.STOPPED, rec
    assert w.results("g1")[-1][:2] == ("restart", "failure")


async def test_an_overdue_job_of_a_node_lost_game_is_answered_and_the_game_is_not_given_up(tmp_path):
    """RTMANAGER_NODE_LOSS=wait: a restart job that waits for the node past RTMANAGER_JOB_TIMEOUT is
    answered (docker_unavailable), the game is still wanted running, and runs when its node is back."""
    w = world(tmp_path, "wait")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    assert (await w.sync("g1")).status is Status.NODE_LOST
    await w.job(JobKind.RESTART, "g1")
    for _ in range(12):  # 6 minutes: past RTMANAGER_JOB_TIMEOUT (300 s)
        w.store.clock.advance(30)
        rec = await worker_sync(w, "g1")
    assert rec.desired_status is DesiredStatus.RUNNING and rec.status is Status.NODE_LOST, rec
    assert w.results("g1")[-1] == ("restart", "failure", "docker_unavailable")
    w.backend.lost.discard("n2")  # the node comes back
    rec = await worker_sync(w, "g1")
    assert rec.desired_status is DesiredStatus.RUNNING and rec.status is Status.RUNNING, rec
    assert rec.node_id == "n2" and len(w.running("g1")) == 1


async def test_a_start_whose_node_dies_before_the_unit_is_made_is_node_lost_not_stuck_starting(tmp_path):
    """No unit (a start removed it, or a kill came between) and the game's pinned node is lost: the
    planner says node_lost (the grace runs), never a create that fails again and again."""
    w = world(tmp_path, "stop")
    await on_node(w, "g1", "n2")
    for c in list(w.backend.containers.values()):
        w.backend.containers.pop(c.id)
    w.backend.lose_node("n2")
    rec = await sync_quiet(w, "g1")
    assert rec.status is Status.NODE_LOST and rec.node_lost_since is not None, rec
    w.store.clock.advance(GRACE + 1)
    rec = await sync_quiet(w, "g1")
    assert rec.status is Status.STOPPED and rec.desired_status is DesiredStatus.STOPPED, rec


def test_plan_decides_node_loss_before_a_replacement_and_without_a_unit() -> None:
    """``plan`` gets the lost nodes: a unit on a lost node whose spec changed is node loss first, not a
    RECREATE; once the policy moved the game off the node (avoid_nodes), the RECREATE goes ahead. A game
    with no unit, pinned to a lost node, is node loss too (not a CREATE there)."""
    lost = frozenset({"n2"})
    policy = NodeLossPolicy(mode=NodeLoss.WAIT, grace=GRACE)
    rec = record(Status.NODE_LOST, R, converged=False)
    unit = ours("exited", spec_hash=OLD_HASH, node="n2", node_lost=True)
    assert plan(rec, unit, **KW, node_loss=policy, lost_nodes=lost).kind is ActionKind.WAIT
    moved = rec.replace(node_id=None, avoid_nodes=("n2",))
    assert plan(moved, unit, **KW, node_loss=policy, lost_nodes=lost).kind is ActionKind.RECREATE
    alone = record(Status.STARTING, R, node_id="n2")
    act = plan(alone, None, **KW, node_loss=policy, lost_nodes=lost)
    assert act.kind is ActionKind.NODE_LOST and act.node == "n2"
    assert plan(alone, None, **KW, node_loss=policy).kind is ActionKind.CREATE


# ----------------------------------------------------------------------------- defect 2
async def test_a_node_that_dies_during_the_health_wait_is_node_loss_never_a_crash(tmp_path):
    """Each time the node comes back the engine is started again, and the node dies again while the
    start waits for its health: a node loss each time (NodeLost), no crash counted, never given up."""
    w = world(tmp_path, "wait")
    await on_node(w, "g1", "n2")
    real = w.engine.wait_healthy

    async def dies_while_probed(host, timeout, still_worth_it=None):
        w.backend.lose_node("n2")
        await asyncio.sleep(0.6)  # Starts.confirm looks at most every 0.5 s
        if still_worth_it is not None:
            await still_worth_it()
        return False, "connection refused"

    for _ in range(6):
        w.backend.lose_node("n2")
        rec = await w.sync("g1")
        assert rec.status is Status.NODE_LOST, rec
        w.backend.lost.discard("n2")  # back
        w.engine.wait_healthy = dies_while_probed
        with pytest.raises(TemporaryError):
            await w.sync("g1")
        w.engine.wait_healthy = real
        w.store.clock.advance(60)
    rec = w.store.records["g1"]
    assert rec.crash_count == 0 and rec.desired_status is DesiredStatus.RUNNING, rec
    w.backend.lost.discard("n2")
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and rec.crash_count == 0, rec


# ----------------------------------------------------------------------------- defect 3
async def test_no_move_without_a_usable_node_and_the_game_runs_again_when_its_node_returns(tmp_path):
    """reschedule + shared state, and the lost node was the only usable one: the game is not moved (its
    unit and pin stay), and when the node comes back it runs there again."""
    w = world(tmp_path, "reschedule", shared="1")
    w.backend.nodes = ["n2"]
    await w.job(JobKind.START, "g1", IMG)
    assert (await w.sync("g1")).node_id == "n2"
    like_swarm(w)
    w.backend.lose_node("n2")
    await w.sync("g1")
    w.store.clock.advance(GRACE + 1)
    rec = await sync_quiet(w, "g1")
    assert rec.status is Status.NODE_LOST and rec.node_id == "n2" and rec.avoid_nodes == (), rec
    assert len(w.backend.containers) == 1  # its unit was not removed
    w.backend.lost.discard("n2")
    for _ in range(3):
        w.store.clock.advance(60)
        rec = await sync_quiet(w, "g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n2", rec


async def test_a_node_the_game_was_moved_off_is_not_avoided_once_it_is_back(tmp_path):
    """The game was moved off n2 (avoid_nodes=(n2,)) but its new unit could not be started elsewhere (the
    only other node died too); n2 comes back: the game is placed there, not kept off it for ever."""
    w = world(tmp_path, "reschedule", shared="1")
    await on_node(w, "g1", "n2")
    like_swarm(w)
    w.backend.lose_node("n2")
    await w.sync("g1")
    w.store.clock.advance(GRACE + 1)
    real_place = w.backend.placeable

    async def n1_dies_right_after_the_check(avoid, node=None):
        ok = await real_place(avoid, node)
        w.backend.lose_node("n1")
        return ok

    w.backend.placeable = n1_dies_right_after_the_check
    rec = await sync_quiet(w, "g1")
    assert rec.node_id is None and rec.avoid_nodes == ("n2",), rec
    w.backend.placeable = real_place
    w.backend.lost.discard("n2")
    for _ in range(3):
        rec = await sync_quiet(w, "g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n2", rec
    assert w.backend.specs[-1].avoid_nodes == ()


def test_a_move_off_an_unknown_node_avoids_no_node() -> None:
    """A game whose node is not known (""): a move clears the pin but does not avoid a node named ""."""
    moved = transitions.moved_off(record(Status.NODE_LOST, R), NOW, node="")
    assert moved.avoid_nodes == ()


# ----------------------------------------------------------------------------- defect 4
async def test_an_unreachable_engine_on_a_lost_node_is_not_recovered_in_a_loop(tmp_path):
    """Swarm still calls the engine's task running, but its node is lost and the engine has not answered
    for longer than RTMANAGER_UNREACHABLE_RESTART_AFTER: one look, then a requeue at the node-loss poll
    interval; no restart, no spin of RECOVER steps."""
    w = world(tmp_path, "wait", RTMANAGER_UNREACHABLE_RESTART_AFTER="60")
    rec = await on_node(w, "g1", "n2")
    w.store.records["g1"] = rec.replace(status=Status.ENGINE_UNREACHABLE,
                                        unreachable_since=w.store.clock.now() - timedelta(seconds=600))
    w.backend.lost.add("n2")  # the task still runs as far as the manager says
    before = len(w.backend.ops("inspect"))
    step = await w.reconciler.sync("g1")
    assert len(w.backend.ops("inspect")) - before == 1, step
    assert step.after == NODE_LOSS_POLL and not w.backend.ops("stop"), step


# ----------------------------------------------------------------------------- defect 5 and 6
class _Api:
    """Just enough of docker's APIClient for observed/swarm_statedir.make_on_node."""

    def __init__(self, task_state: str, node: dict | None = None):
        self.task_state = task_state
        self.created: list[dict] = []
        self.node = node or {"ID": "n1", "Status": {"State": "ready", "Addr": "10.0.0.1"},
                             "Spec": {"Availability": "active"}}

    def _url(self, path, *a):
        return path

    def _post_json(self, url, data=None, **kw):
        self.created.append(data)
        return "res"

    def _result(self, res, json=False):
        return {"ID": "helper1"}

    def _get(self, *a, **kw):
        return b""

    def _get_result_tty(self, *a):
        return b"mkdir: can't create directory: Permission denied\n"

    def tasks(self, filters=None):
        return [{"ID": "t1", "NodeID": "n1", "DesiredState": "running",
                 "Status": {"State": self.task_state, "Message": self.task_state,
                            "ContainerStatus": {"ExitCode": 1}}}]

    def remove_service(self, name):
        pass

    def nodes(self):
        return [self.node]


def _backend(api: _Api, **kw) -> SwarmBackend:
    b = SwarmBackend(instance="i", network="net", **kw)
    b._client = types.SimpleNamespace(api=api)
    return b


def _spec(**kw) -> ContainerSpec:
    return ContainerSpec(**{**dict(name="galaxy-game-g1", image="galaxy/engine-stub:1.0", game_id="g1", instance="i",
                                   network="net", state_path="/srv/games/g1", state_target="/state", env={},
                                   memory_bytes=64 << 20, nano_cpus=10**9, pids_limit=64, generation=1,
                                   spec_revision=0, user="10000:10000", node="n1"), **kw})


@pytest.fixture
def quick_helper(monkeypatch):
    monkeypatch.setattr(swarm_statedir, "HELPER_WAIT", 0.3)
    monkeypatch.setattr(swarm_statedir, "POLL", 0.05)


@pytest.mark.parametrize("state", ["pending", "assigned", "preparing", "starting"])
async def test_a_helper_task_still_pulling_its_image_is_a_temporary_failure(quick_helper, state):
    """A helper task that has not ended within HELPER_WAIT (its image being pulled on the node) is tried
    again later (BackendUnavailable), never a permanent refusal that fails the start or counts a crash."""
    b = _backend(_Api(state))
    with pytest.raises(BackendUnavailable) as caught:
        await b.make_state_dir("/srv/games", _spec())
    assert not isinstance(caught.value, Refused) and state in caught.value.message


@pytest.mark.parametrize("state", ["rejected", "failed", "complete"])
async def test_a_rejected_or_failed_helper_task_is_a_refusal(quick_helper, state):
    b = _backend(_Api(state))
    with pytest.raises(Refused):
        await b.make_state_dir("/srv/games", _spec())


async def test_the_helper_runs_a_dedicated_image_without_fowner(quick_helper):
    """By default the helper is the small helper image (never the engine's), as root with CHOWN and
    DAC_OVERRIDE only (the state root is rtmanager's, 0711: root needs DAC_OVERRIDE to create in it; FOWNER
    is never needed); the engine image only when the operator says ``engine``."""
    api = _Api("complete")
    api.tasks = lambda filters=None: [{"ID": "t1", "NodeID": "n1", "DesiredState": "shutdown",
                                       "Status": {"State": "complete", "ContainerStatus": {"ExitCode": 0}}}]
    await _backend(api).make_state_dir("/srv/games", _spec())
    cs = api.created[0]["TaskTemplate"]["ContainerSpec"]
    assert cs["Image"] == swarm_statedir.DEFAULT_HELPER_IMAGE == "galaxy/statedir-helper:1"
    assert cs["CapabilityAdd"] == ["CAP_CHOWN", "CAP_DAC_OVERRIDE"] and cs["CapabilityDrop"] == ["ALL"]
    assert cs["User"] == "0:0" and cs["ReadOnly"] and cs["Mounts"][0]["Source"] == "/srv/games"
    engine = _Api("complete")
    engine.tasks = api.tasks
    await _backend(engine, state_helper_image="engine").make_state_dir("/srv/games", _spec())
    assert engine.created[0]["TaskTemplate"]["ContainerSpec"]["Image"] == "galaxy/engine-stub:1.0"


# ----------------------------------------------------------------------------- suspicions
@pytest.mark.parametrize("policy", ["stop", "reschedule_without_state"])
async def test_an_operators_drain_is_not_node_loss_under_stop_or_reschedule_without_state(tmp_path, policy):
    """An operator drains the game's node (Swarm availability drain; the node is up): Swarm shuts the
    engine down. Not a crash, and not a lost node: the game is neither stopped nor moved away from its
    intact state; it waits, and runs there again once the node is active."""
    w = world(tmp_path, policy)
    await on_node(w, "g1", "n2")
    w.backend.drain_node("n2")
    assert await w.backend.lost_nodes() == frozenset()
    rec = await sync_quiet(w, "g1")
    assert rec.status is Status.NODE_LOST and rec.crash_count == 0, rec
    for _ in range(4):
        w.store.clock.advance(GRACE)
        rec = await sync_quiet(w, "g1")
    assert rec.desired_status is DesiredStatus.RUNNING and rec.node_id == "n2" and rec.avoid_nodes == (), rec
    w.backend.lost.discard("n2")
    w.backend.drained.discard("n2")
    rec = await sync_quiet(w, "g1")
    assert rec.status is Status.RUNNING and rec.node_id == "n2", rec


def test_a_drained_node_moves_a_game_only_with_shared_state() -> None:
    rec = record(Status.NODE_LOST, R, node_lost_since=NOW - timedelta(seconds=GRACE + 1))
    for mode in NodeLoss:
        local = node_loss_step(rec, NOW, NodeLossPolicy(mode=mode, grace=GRACE), drained=True)
        assert local.kind == "wait", mode
    shared = NodeLossPolicy(mode=NodeLoss.RESCHEDULE, grace=GRACE, state_shared=True)
    assert node_loss_step(rec, NOW, shared, drained=True).kind == "move"
    assert node_loss_step(rec, NOW, NodeLossPolicy(mode=NodeLoss.STOP, grace=GRACE, state_shared=True),
                          drained=True).kind == "wait"


def test_a_unit_never_placed_names_the_node_it_is_pinned_to() -> None:
    """A new game whose chosen node dies before its first task: its unit (no task) names the node it is
    pinned to, so the snapshot and a move name that node, not ""."""
    b = SwarmBackend(instance="i", network="net")
    b._nodes = {"n1": {"state": "down", "availability": "active", "addr": ""}}
    service = {"ID": "s1", "Spec": {"Name": "galaxy-game-g1", "Labels": {}, "Mode": {"Replicated": {"Replicas": 0}},
                                    "TaskTemplate": {"ContainerSpec": {"Image": "x"},
                                                     "Placement": {"Constraints": ["node.id==n1"]}}}}
    seen = b._observe(service, [])
    assert seen.node == "n1" and seen.node_lost


async def test_the_directories_made_on_a_node_are_made_again_after_it_was_lost() -> None:
    """The per-process cache of directories made is not for ever: a node seen lost (it may come back
    with another disk) has its directories made again by the next start there."""
    api = _Api("complete", node={"ID": "n1", "Status": {"State": "down"}, "Spec": {"Availability": "active"}})
    b = _backend(api)
    b._dirs_made = {("/srv/games/g1", "n1"), ("/srv/games/g2", "n2")}
    assert await b.lost_nodes() == frozenset({"n1"})
    assert b._dirs_made == {("/srv/games/g2", "n2")}


async def test_a_stale_running_task_on_a_node_that_came_back_is_not_a_crash_when_its_exit_arrives(tmp_path):
    """Swarm keeps a lost node's task at its last state ("running") while the node is down, and for a
    moment after it comes back, until the node's agent reports that its dockerd stopped the engine
    (exit code 0). The controller confirms that stale task, sees the exit arrive during the health wait,
    and must not count it as a crash (seen on a loaded CI machine): the game is started again, crash 0."""
    w = world(tmp_path, "wait")
    await on_node(w, "g1", "n2")
    w.backend.lose_node("n2")
    rec = await w.sync("g1")
    assert rec.status is Status.NODE_LOST and rec.crash_count == 0, rec
    w.backend.lost.discard("n2")
    [unit] = [c for c in w.backend.containers.values() if c.node == "n2"]
    unit.state = "running"  # back; its task reads "running" again until the node's agent reports the exit
    real = w.engine.wait_healthy

    async def the_agent_reports_the_exit(host, timeout, still_worth_it=None):
        w.engine.wait_healthy = real  # once: the next start's engine is healthy
        unit.state, unit.exit_code = "exited", 0
        await asyncio.sleep(0.6)  # Starts.confirm looks at most every 0.5 s
        if still_worth_it is not None:
            await still_worth_it()
        return False, "connection refused"

    w.engine.wait_healthy = the_agent_reports_the_exit
    try:
        await sync_quiet(w, "g1")
    finally:
        w.engine.wait_healthy = real
    rec = w.store.records["g1"]
    assert rec.crash_count == 0 and rec.desired_status is DesiredStatus.RUNNING, rec
    rec = await sync_quiet(w, "g1")
    assert rec.status is Status.RUNNING and rec.crash_count == 0 and rec.node_id == "n2", rec
    assert len(w.running("g1")) == 1
