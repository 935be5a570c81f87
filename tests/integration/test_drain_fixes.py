"""Regression tests, on real Postgres, of the defects an adversarial review of drains proved (the drain
loop's ticks are driven by hand; the reconciler's part is played by the store's transitions):

* (1) undrain never starts a game somebody else stopped: the drain's jobs carry its id, the take is a
  compare-and-swap in the stop's own transaction, and a stop asked again never moves op_id;
* (3) an undrain's restore is judged as a rollout's patch back (only a disabled version refuses it),
  and a refusal leaves the row skipped with why, never "restored";
* (4) a drain of a node the Swarm does not know: 400 on REST, failed (not "drained") in the loop;
* (5) a drain's stop and move carry the drain's deadline as their generation's own;
* (6) a game a failed move stopped comes back on its node;
* (7) a restart of a game pinned to a shared-state drained node is admitted as a move;
* and a suspicion: a take after undrain was asked (a tick in flight) takes nothing.
"""

from __future__ import annotations

from datetime import timedelta

from controller.admission import Admission
from controller.drains import Drainer
from controller.drains_api import DrainApi
from controller.metrics import Metrics
from desired.clock import Clock
from desired.db.store import Store
from desired.drains import DrainRequest, DrainStatus, GameState, LocalState
from desired.jobs import DecisionAction, Job, RecordDefaults
from desired.model import DesiredStatus, ErrorCode, JobKind, OpSource, StopReason
from desired.versions import VersionStatus

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMG = "galaxy/engine-stub:1.0"
HOST = DrainRequest(node=None, max_parallel=2, deadline=600)
NODES = {"nodea": "worker1", "nodeb": "worker2"}


def lobby_stop(game: str) -> Job:
    return Job(kind=JobKind.STOP, game_id=game, source=OpSource.LOBBY, reason=StopReason.CANCELLED)


async def running(store: Store, game: str, node: str | None = None):
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMG), DEFAULTS)
    return await store.mark_running(await store.get(game), container_id="c" * 64, image=IMG, node=node)


class ShiftClock(Clock):
    """The drain loop's clock, moved forward by the test (the deadline passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = 0.0

    def now(self):
        return super().now() + timedelta(seconds=self.shift)


def drainer(store: Store, admission: Admission | None = None, clock: Clock | None = None) -> Drainer:
    async def nodes():
        return NODES

    return Drainer(store=store, admission=admission or Admission(store, DEFAULTS, wake=lambda g: None),
                   metrics=Metrics(), clock=clock or Clock(), wake=lambda g: None, nodes=nodes)


async def _drain_and_undrain(store: Store, d: Drainer, game: str) -> int:
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    await d.tick()  # takes the game, asks for its stop
    rec = await store.get(game)
    assert rec.desired_status is DesiredStatus.STOPPED
    await store.mark_stopped(rec, container_id="c" * 64)  # the reconciler stops it
    await d.tick()
    assert (await store.get_drain(drain.id))[0].status is DrainStatus.DRAINED
    await store.request_undrain(drain.id)
    await d.tick()
    return drain.id


# ------------------------------------------------------------------------- (1) who stopped it
async def test_a_lobby_stop_between_the_drains_look_and_its_take_is_not_undone_by_undrain(pool):
    """Lobby's stop lands after the loop read the records, before the take: the take's compare-and-swap
    (under the game's lock, in the stop's own transaction) sees the record changed and takes nothing."""
    store = Store(pool)
    await running(store, "g1")
    admission = Admission(store, DEFAULTS, wake=lambda g: None)
    d = drainer(store, admission)
    real = store.drain_scope

    async def drain_scope(drain):
        looked = await real(drain)
        if not looked[1]:  # nothing taken yet: Lobby's stop lands right after the look
            await admission.submit(lobby_stop("g1"))
        return looked

    store.drain_scope = drain_scope  # type: ignore[method-assign]
    drain_id = await _drain_and_undrain(store, d, "g1")
    assert (await store.get("g1")).desired_status is DesiredStatus.STOPPED, "undrain started a game Lobby stopped"
    _, games = await store.get_drain(drain_id)
    assert games == []  # never taken: its stop was Lobby's


async def test_a_lobby_stop_right_before_the_drains_stop_is_not_undone_by_undrain(pool):
    """Lobby's stop lands just before the drain's: the drain's would change nothing (a join), so the drain
    does not take the game."""
    store = Store(pool)
    await running(store, "g1")
    admission = Admission(store, DEFAULTS, wake=lambda g: None)
    d = drainer(store, admission)
    real, raced = admission.submit, []

    async def submit(job):
        if job.source is OpSource.ADMIN and job.kind is JobKind.STOP and not raced:
            raced.append(await real(lobby_stop(job.game_id)))
        return await real(job)

    admission.submit = submit  # type: ignore[method-assign]
    await _drain_and_undrain(store, d, "g1")
    assert (await store.get("g1")).desired_status is DesiredStatus.STOPPED, "undrain started a game Lobby stopped"


async def test_a_lobby_stop_while_the_drains_stop_waits_still_counts_after_the_deadline_forces_it(pool):
    """The drain's stop waits for a turn boundary; Lobby's stop joins it; the deadline passes and the drain
    asks its stop again, forced: op_id stays the take's, and Lobby's stop still counts."""
    store = Store(pool)
    await running(store, "g1")
    admission = Admission(store, DEFAULTS, wake=lambda g: None)
    clock = ShiftClock()
    d = drainer(store, admission, clock)
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    await d.tick()  # the drain's stop waits for the engine's turn boundary (not converged)
    assert not (await store.get("g1")).converged
    taken = (await store.get_drain(drain.id))[1][0]
    await admission.submit(lobby_stop("g1"))  # Lobby's game is over meanwhile: its stop joins
    assert await store.stopped_since(drain.id) == {"g1"}
    clock.shift = 700  # past the drain's deadline
    await d.tick()  # the drain forces its stop
    again = (await store.get_drain(drain.id))[1][0]
    assert again.forced and again.op_id == taken.op_id, "a stop asked again moved op_id"
    assert (await store.get("g1")).force_generation == (await store.get("g1")).generation
    await store.mark_stopped(await store.get("g1"), container_id="c" * 64)
    await d.tick()
    assert await store.stopped_since(drain.id) == {"g1"}
    await store.request_undrain(drain.id)
    await d.tick()
    assert (await store.get("g1")).desired_status is DesiredStatus.STOPPED, "undrain started a game Lobby stopped"
    row = (await store.get_drain(drain.id))[1][0]
    assert row.state is GameState.SKIPPED and "another job" in (row.note or "")


async def test_the_drains_own_stop_forced_at_the_deadline_does_not_keep_the_game_from_coming_back(pool):
    """The drain's stop asked again (forced) is its own, tagged: undrain still starts the game again."""
    store = Store(pool)
    await running(store, "g1")
    clock = ShiftClock()
    d = drainer(store, clock=clock)
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    await d.tick()
    clock.shift = 700
    await d.tick()  # forced: a second stop operation of the drain's
    await store.mark_stopped(await store.get("g1"), container_id="c" * 64)
    await d.tick()
    assert await store.stopped_since(drain.id) == set()
    await store.request_undrain(drain.id)
    await d.tick()
    assert (await store.get("g1")).desired_status is DesiredStatus.RUNNING
    assert (await store.get_drain(drain.id))[1][0].state is GameState.RESTORED


async def test_the_drains_own_stops_are_tagged_and_only_the_take_is_recorded(pool):
    """The drain's operations carry its id; an untagged stop after the take is somebody else's."""
    store = Store(pool)
    await running(store, "g1")
    d = drainer(store)
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    await d.tick()
    row = (await store.get_drain(drain.id))[1][0]
    ops = await store.operations("g1") if hasattr(store, "operations") else None
    async with pool.acquire() as conn:
        tagged = await conn.fetch("SELECT id, params ->> 'drain_id' AS drain FROM runtime_operations"
                                  " WHERE game_id = 'g1' AND op = 'stop'")
    assert [(r["id"], r["drain"]) for r in tagged] == [(row.op_id, str(drain.id))], ops
    assert await store.stopped_since(drain.id) == set()


# ------------------------------------------------------------------------- (3) restores judged as runs
async def test_undrain_brings_back_a_game_on_a_deprecated_version(pool):
    """A deprecated version takes no new starts, but a restore runs what the game ran: admitted."""
    store = Store(pool)
    await store.create_version("1.0", IMG, VersionStatus.ACTIVE, "")
    await running(store, "g1")
    await store.update_version("1.0", status=VersionStatus.DEPRECATED, notes=None)
    d = drainer(store, Admission(store, DEFAULTS, wake=lambda g: None, registry=True))
    drain_id = await _drain_and_undrain(store, d, "g1")
    assert (await store.get("g1")).desired_status is DesiredStatus.RUNNING
    row = (await store.get_drain(drain_id))[1][0]
    assert row.state is GameState.RESTORED
    assert (await store.get_drain(drain_id))[0].status is DrainStatus.UNDRAINED


async def test_a_refused_restore_is_skipped_with_the_reason_never_restored(pool):
    """A disabled version refuses even a restore: the row says skipped and why; the drain is undrained."""
    store = Store(pool)
    await store.create_version("1.0", IMG, VersionStatus.ACTIVE, "")
    await running(store, "g1")
    d = drainer(store, Admission(store, DEFAULTS, wake=lambda g: None, registry=True))
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    await d.tick()
    await store.mark_stopped(await store.get("g1"), container_id="c" * 64)
    await d.tick()
    await store.update_version("1.0", status=VersionStatus.DISABLED, notes=None)
    await store.request_undrain(drain.id)
    await d.tick()
    assert (await store.get("g1")).desired_status is DesiredStatus.STOPPED
    done, rows = await store.get_drain(drain.id)
    assert rows[0].state is GameState.SKIPPED and "not started again" in (rows[0].note or ""), rows[0]
    assert done.status is DrainStatus.UNDRAINED


# ------------------------------------------------------------------------- (4) unknown nodes
async def test_a_drain_of_a_node_the_swarm_does_not_know_is_refused_on_rest(pool):
    """A typo: 400 naming it; a hostname: the node's id is stored."""
    store = Store(pool)

    async def nodes():
        return NODES

    api = DrainApi(store, backend="swarm", state_shared=True, nodes=nodes)
    status, body = await api.create(api.parse({"node": "worker9"}))
    assert status == 400 and "no Swarm node worker9" in body["error"], body
    status, body = await api.create(api.parse({"node": "worker2"}))
    assert status == 201 and body["node"] == "nodeb", body
    # the list names the hostname beside the id (the CLI's undrain finds a node by either)
    status, listed = await api.list()
    assert status == 200 and [(d["node"], d.get("node_name")) for d in listed["drains"]] == [("nodeb", "worker2")]


async def test_a_drain_of_an_unknown_node_written_by_the_cli_fails_in_the_loop(pool):
    """The CLI writes the row itself: the leader's loop marks it failed, with why, never drained; a
    failed drain is not active (the node may be drained again)."""
    store = Store(pool)
    await running(store, "g1", node="nodeb")
    drain = await store.create_drain(DrainRequest(node="worker9", state_shared=True), OpSource.ADMIN)
    await drainer(store).tick()
    failed, games = await store.get_drain(drain.id)
    assert failed.status is DrainStatus.FAILED and "no Swarm node worker9" in (failed.note or ""), failed
    assert games == [] and (await store.drained_targets()).nodes == frozenset()
    assert (await store.get("g1")).desired_status is DesiredStatus.RUNNING
    again = await store.create_drain(DrainRequest(node="worker9", state_shared=True), OpSource.ADMIN)
    assert again.id != drain.id


# ------------------------------------------------------------------------- (5) the deadline is the generation's
async def test_a_drains_stop_and_move_carry_the_drains_deadline(pool):
    """The reconciler's wait for a turn boundary ends at the drain's deadline (controller/planner.py)."""
    store = Store(pool)
    await running(store, "h1")
    d = drainer(store)
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    await d.tick()
    rec = await store.get("h1")
    assert rec.disruption_until == drain.deadline_at and rec.disruption_generation == rec.generation
    await store.mark_stopped(rec, container_id="c" * 64)
    await d.tick()
    await store.request_undrain(drain.id)
    await d.tick()
    await running(store, "m1", node="nodeb")
    node = await store.create_drain(DrainRequest(node="nodeb", state_shared=True), OpSource.ADMIN)
    await d.tick()
    moved = await store.get("m1")
    assert moved.node_id is None and moved.disruption_until == node.deadline_at
    assert moved.disruption_generation == moved.generation and moved.avoid_nodes == ("nodeb",)
    # A job admitted while the move waits for the turn boundary keeps the drain's deadline.
    out = await store.submit(Job(kind=JobKind.PAUSE, game_id="m1", source=OpSource.LOBBY), DEFAULTS)
    assert out.decision.action is DecisionAction.CHANGE
    paused = await store.get("m1")
    assert paused.generation == moved.generation + 1 and paused.disruption_generation == paused.generation


# ------------------------------------------------------------------------- (6) a failed move comes back
async def test_undrain_brings_back_a_game_its_failed_move_stopped_pinned_to_its_node(pool):
    store = Store(pool)
    await running(store, "g1", node="nodeb")
    d = drainer(store)
    drain = await store.create_drain(DrainRequest(node="nodeb", state_shared=False,
                                                  local_state=LocalState.MOVE_WITHOUT_STATE), OpSource.ADMIN)
    await d.tick()
    moving = await store.get("g1")
    assert moving.node_id is None
    failed = await store.fail_generation("g1", moving.generation, ErrorCode.CONTAINER_START_FAILED, "no node")
    assert failed is not None and failed.desired_status is DesiredStatus.STOPPED
    await store.mark_stopped(failed, container_id=None)
    await d.tick()
    done, rows = await store.get_drain(drain.id)
    assert done.status is DrainStatus.DRAINED and "stopped instead of moved" in (rows[0].note or ""), rows
    await store.request_undrain(drain.id)
    await d.tick()
    back = await store.get("g1")
    assert back.desired_status is DesiredStatus.RUNNING and back.node_id == "nodeb"
    assert back.spec_revision > moving.spec_revision
    row = (await store.get_drain(drain.id))[1][0]
    assert row.state is GameState.RESTORED and "nodeb" in (row.note or "")


# ------------------------------------------------------------------------- (7) shared state: a move
async def test_a_restart_on_a_shared_state_drained_node_is_admitted_as_a_move(pool):
    store = Store(pool)
    await running(store, "g1", node="nodeb")
    await running(store, "g2", node="nodea")
    await store.create_drain(DrainRequest(node="nodeb", state_shared=True), OpSource.ADMIN)
    await store.create_drain(DrainRequest(node="nodea", state_shared=False, local_state=LocalState.STOP),
                             OpSource.ADMIN)
    out = await store.submit(Job(kind=JobKind.RESTART, game_id="g1", source=OpSource.LOBBY), DEFAULTS)
    assert out.decision.action is DecisionAction.CHANGE
    rec = await store.get("g1")
    assert rec.node_id is None and rec.desired_status is DesiredStatus.RUNNING and rec.avoid_nodes == ("nodeb",)
    out = await store.submit(Job(kind=JobKind.RESTART, game_id="g2", source=OpSource.LOBBY), DEFAULTS)
    assert out.decision.action is DecisionAction.REJECT and out.decision.error_code is ErrorCode.HOST_DRAINED
    assert "its state is there" in out.decision.message


# ------------------------------------------------------------------------- a tick in flight during undrain
async def test_a_take_after_undrain_was_asked_takes_nothing(pool):
    """A tick that read the drain as draining before undrain was asked takes no game afterwards."""
    store = Store(pool)
    await running(store, "g1")
    await running(store, "m1", node="nodeb")
    d = drainer(store)
    host = await store.create_drain(HOST, OpSource.ADMIN)
    node = await store.create_drain(DrainRequest(node="nodeb", state_shared=True), OpSource.ADMIN)
    await store.request_undrain(host.id)
    await store.request_undrain(node.id)
    await d.drain(host)  # the drains as the tick read them: draining
    await d.drain(node)
    assert (await store.get("g1")).desired_status is DesiredStatus.RUNNING
    assert (await store.get("m1")).node_id == "nodeb"
    assert (await store.get_drain(host.id))[1] == [] and (await store.get_drain(node.id))[1] == []


# ------------------------------------------------------------------------- adopt on a drained host
async def test_adopt_on_a_drained_host_is_refused(pool):
    """rtmanager adopt bypasses admission; it must not make a game wanted running on a drained host."""
    import pytest

    from desired.jobs import InvalidJob
    store = Store(pool)
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    with pytest.raises(InvalidJob) as refused:
        await store.adopt("g1", IMG, DEFAULTS)
    assert refused.value.code is ErrorCode.HOST_DRAINED and "drained" in refused.value.message
    await store.request_undrain(drain.id)
    await store.set_drain_status(drain.id, DrainStatus.UNDRAINING, DrainStatus.UNDRAINED)
    assert (await store.adopt("g1", IMG, DEFAULTS)).desired_status is DesiredStatus.RUNNING
