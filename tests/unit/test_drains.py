"""The pure decisions of drains (desired/drains.py): the request's validation, what a drain does with a
game on each backend, which games it takes next, the deadline, when it is done, what undrain brings
back, and which starts it refuses; and the Swarm constraints a spec's ``avoid_nodes`` becomes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from desired import drains
from desired.drains import (
    Drain,
    DrainAction,
    DrainGame,
    DrainStatus,
    GameState,
    InvalidDrain,
    LocalState,
    OnDeadline,
    Restore,
    Targets,
)
from desired.model import DesiredStatus, JobKind, Status
from observed.model import ContainerSpec
from observed.swarm import SwarmBackend
from tests.support.job_records import NOW, rec

NODE_A, NODE_B = "nodea", "nodeb"


def drain(node: str | None = None, *, parallel: int = 2, past: bool = False, shared: bool = True,
          local: LocalState | None = None, on_deadline: OnDeadline = OnDeadline.MOVE) -> Drain:
    return Drain(id=1, node=node, max_parallel=parallel, deadline_at=NOW + timedelta(seconds=-1 if past else 600),
                 on_deadline=on_deadline, local_state=local, state_shared=shared, status=DrainStatus.DRAINING,
                 source="admin", created_at=NOW - timedelta(minutes=1))


def game(r, action: DrainAction = DrainAction.STOP, *, state: GameState = GameState.IN_PROGRESS,
         forced: bool = False, **kw) -> DrainGame:
    return DrainGame(drain_id=1, game_id=r.game_id, action=action, state=state, generation=r.generation,
                     taken_at=NOW - timedelta(seconds=30), forced=forced, image_ref=r.desired_image_ref, **kw)


def up(g: str, status: Status = Status.RUNNING, *, node: str | None = None, gen: int = 2, obs: int = 2, **kw):
    return rec(Status.RUNNING, DesiredStatus.RUNNING, gen=gen, obs=obs, game_id=g,
               state_path=f"/var/lib/rtmanager/games/{g}", node_id=node, **kw).replace(status=status)


def stopped(g: str, *, gen: int = 3, obs: int = 3, node: str | None = None):
    return rec(Status.STOPPED, DesiredStatus.STOPPED, gen=gen, obs=obs, game_id=g,
               state_path=f"/var/lib/rtmanager/games/{g}", node_id=node)


# ------------------------------------------------------------------------------ requests
@pytest.mark.parametrize(("body", "backend", "shared", "field"), [
    ({}, "docker", False, "node"),
    ({"host": True, "node": "abc"}, "docker", False, "node"),
    ({"node": "abc"}, "docker", False, "node"),
    ({"host": True}, "swarm", True, "host"),
    ({"node": "ABC"}, "swarm", True, "node"),
    ({"node": 7}, "swarm", True, "node"),
    ({"host": "yes"}, "docker", False, "host"),
    ({"host": True, "max_parallel": 0}, "docker", False, "max_parallel"),
    ({"host": True, "max_parallel": True}, "docker", False, "max_parallel"),
    ({"host": True, "deadline": -1}, "docker", False, "deadline"),
    ({"host": True, "deadline": 1.5}, "docker", False, "deadline"),
    ({"host": True, "local_state": "stop"}, "docker", False, "local_state"),
    ({"host": True, "on_deadline": "move"}, "docker", False, "on_deadline"),
    ({"node": "abc"}, "swarm", False, "local_state"),  # node-local state: the operator must choose
    ({"node": "abc", "local_state": "keep"}, "swarm", False, "local_state"),
    ({"node": "abc", "on_deadline": "wait"}, "swarm", True, "on_deadline"),
    ({"host": True, "bogus": 1}, "docker", False, "bogus"),
])
def test_a_bad_request_names_its_field(body, backend, shared, field) -> None:
    with pytest.raises(InvalidDrain) as err:
        drains.parse_request(body, backend=backend, state_shared=shared)
    assert err.value.field == field and f"field {field}" in err.value.message


def test_good_requests() -> None:
    req = drains.parse_request({"host": True}, backend="docker", state_shared=False)
    assert req.node is None and req.max_parallel == 1 and req.deadline == 3600
    req = drains.parse_request({"node": "abc", "max_parallel": 3, "deadline": 0, "on_deadline": "stop"},
                               backend="swarm", state_shared=True)
    assert (req.node, req.max_parallel, req.deadline, req.on_deadline, req.local_state) == (
        "abc", 3, 0, OnDeadline.STOP, None)
    req = drains.parse_request({"node": "abc", "local_state": "move_without_state"}, backend="swarm",
                               state_shared=False)
    assert req.local_state is LocalState.MOVE_WITHOUT_STATE and not req.state_shared


# ------------------------------------------------------------------------------ the action per backend
@pytest.mark.parametrize(("d", "before", "after"), [
    (drain(None), DrainAction.STOP, DrainAction.STOP),                          # one Docker host: only stop
    (drain(NODE_B), DrainAction.MOVE, DrainAction.MOVE),                        # shared state: it follows
    (drain(NODE_B, on_deadline=OnDeadline.STOP), DrainAction.MOVE, DrainAction.STOP),
    (drain(NODE_B, shared=False, local=LocalState.STOP), DrainAction.STOP, DrainAction.STOP),
    (drain(NODE_B, shared=False, local=LocalState.MOVE_WITHOUT_STATE), DrainAction.MOVE, DrainAction.MOVE),
])
def test_what_a_drain_does_with_a_game(d, before, after) -> None:
    assert drains.action_of(d) is before and drains.deadline_action(d) is after


# ------------------------------------------------------------------------------ which games next
def test_a_host_drain_takes_max_parallel_games_idle_and_stopped_engines_first() -> None:
    records = {r.game_id: r for r in [
        up("a-gen", Status.GENERATION_IN_PROGRESS), up("b-idle"), up("c-crashed", Status.STARTING),
        up("d-idle"), stopped("e-stopped")]}
    p = drains.plan(drain(None, parallel=2), records, {}, NOW)
    assert [t.record.game_id for t in p.take] == ["c-crashed", "b-idle"]
    assert all(t.action is DrainAction.STOP and not t.forced for t in p.take)
    assert p.waiting == 2 and not p.complete  # the stopped game is not the drain's


def test_in_flight_games_use_the_slots_and_finished_ones_free_them() -> None:
    a, c = up("a"), up("c")
    a_stopping = a.replace(desired_status=DesiredStatus.STOPPED, generation=3)  # its stop waits for the turn
    b_done = stopped("b")
    records = {"a": a_stopping, "b": b_done, "c": c}
    games = {"a": game(a_stopping), "b": game(b_done)}
    p = drains.plan(drain(None, parallel=2), records, games, NOW)
    assert [g.game_id for g in p.finish] == ["b"]
    assert [t.record.game_id for t in p.take] == ["c"]  # one slot: a is still in flight
    p = drains.plan(drain(None, parallel=1), records, games, NOW)
    assert p.take == [] and p.waiting == 1


def test_a_stop_taken_but_not_asked_for_is_asked_again() -> None:
    """A kill between the row and the stop job: the row says stop, the record still wants running."""
    a = up("a")
    p = drains.plan(drain(None), {"a": a}, {"a": game(a)}, NOW)
    assert [g.game_id for g in p.resubmit] == ["a"] and p.take == []


def test_past_the_deadline_every_rest_goes_at_once_and_in_flight_ones_are_forced() -> None:
    a = up("a").replace(desired_status=DesiredStatus.STOPPED, generation=3)
    records = {"a": a, "b": up("b", Status.GENERATION_IN_PROGRESS), "c": up("c"), "d": up("d")}
    p = drains.plan(drain(None, parallel=1, past=True), records, {"a": game(a)}, NOW)
    assert [g.game_id for g in p.force] == ["a"]
    assert sorted(t.record.game_id for t in p.take) == ["b", "c", "d"] and all(t.forced for t in p.take)
    p = drains.plan(drain(None, parallel=1, past=True), records, {"a": game(a, forced=True)}, NOW)
    assert p.force == []


def test_a_node_drain_takes_only_the_games_pinned_to_its_node() -> None:
    records = {r.game_id: r for r in [up("a", node=NODE_A), up("b", node=NODE_B), up("c", node=None)]}
    p = drains.plan(drain(NODE_B), records, {}, NOW)
    assert [(t.record.game_id, t.action) for t in p.take] == [("b", DrainAction.MOVE)]


def test_a_move_waits_for_a_job_in_flight_until_the_deadline() -> None:
    busy = up("b", node=NODE_B, gen=3, obs=2)
    assert drains.plan(drain(NODE_B), {"b": busy}, {}, NOW).take == []
    p = drains.plan(drain(NODE_B, past=True), {"b": busy}, {}, NOW)
    assert [(t.record.game_id, t.forced) for t in p.take] == [("b", True)]
    p = drains.plan(drain(NODE_B, past=True, on_deadline=OnDeadline.STOP), {"b": busy}, {}, NOW)
    assert p.take[0].action is DrainAction.STOP


def test_a_move_is_done_once_the_game_runs_on_another_node() -> None:
    moving = up("b", node=None, gen=4, obs=3)   # its pin cleared, its unit being replaced
    d = drain(NODE_B)
    assert not drains.finished(d, game(moving, DrainAction.MOVE), moving)
    there = up("b", node=NODE_A, gen=4, obs=4)
    assert drains.finished(d, game(there, DrainAction.MOVE), there)
    failed = stopped("b", gen=5, obs=5, node=None)  # the move failed: the game was stopped
    assert drains.finished(d, game(failed, DrainAction.MOVE), failed)
    p = drains.plan(d, {"b": there}, {"b": game(moving, DrainAction.MOVE)}, NOW)
    assert [g.game_id for g in p.finish] == ["b"] and p.complete


def test_the_drain_is_complete_when_nothing_is_in_flight_or_in_scope() -> None:
    assert drains.plan(drain(None), {}, {}, NOW).complete
    s = stopped("a")
    p = drains.plan(drain(None), {"a": s}, {"a": game(s, state=GameState.DONE)}, NOW)
    assert p.complete and p.take == [] and p.finish == []


# ------------------------------------------------------------------------------ undrain
def test_undrain_brings_back_what_the_drain_stopped_and_only_that() -> None:
    s = stopped("a")
    removed = rec(Status.REMOVED, DesiredStatus.REMOVED, gen=4, obs=4, game_id="b",
                  state_path="/var/lib/rtmanager/games/b")
    again = up("d", gen=5, obs=5)
    moved = up("f", gen=5, obs=5)
    records = {"a": s, "b": removed, "c": stopped("c"), "d": again, "e": stopped("e"), "f": moved,
               "g": stopped("g")}
    games = {"a": game(s, state=GameState.DONE), "b": game(removed, state=GameState.DONE),
             "c": game(records["c"], state=GameState.DONE), "d": game(again, state=GameState.DONE),
             "e": game(records["e"], DrainAction.MOVE, state=GameState.DONE),   # its move failed: back
             "f": game(moved, DrainAction.MOVE, state=GameState.DONE),          # moved: nothing to undo
             "g": game(records["g"], DrainAction.MOVE, state=GameState.DONE)}   # Lobby stopped it since
    steps = {s.game.game_id: s.verdict for s in drains.restore_plan(games, records, stopped_since={"c", "g"})}
    assert steps == {"a": Restore.START, "b": Restore.SKIP, "c": Restore.SKIP, "d": Restore.RESTORED,
                     "e": Restore.START}


# ------------------------------------------------------------------------------ refusals
def test_starts_refused_under_a_drain() -> None:
    pinned = stopped("a", node=NODE_B)
    assert drains.refusal(None, JobKind.START, Targets(host=True))
    assert drains.refusal(pinned, JobKind.RESTART, Targets(host=True))
    assert drains.refusal(pinned, JobKind.START, Targets(nodes=frozenset({NODE_B})))
    assert drains.refusal(pinned, JobKind.START, Targets(nodes=frozenset({NODE_A}))) is None
    assert drains.refusal(None, JobKind.START, Targets(nodes=frozenset({NODE_B}))) is None  # placed elsewhere
    assert drains.refusal(pinned, JobKind.STOP, Targets(host=True)) is None
    assert drains.refusal(pinned, JobKind.START, Targets()) is None


# ------------------------------------------------------------------------------ Swarm constraints
def spec(node: str | None, avoid: tuple[str, ...]) -> ContainerSpec:
    return ContainerSpec(name="galaxy-game-a", image="galaxy/engine:1", game_id="a", instance="default",
                         network="galaxy-games", state_path="/s/a", state_target="/state", env={}, memory_bytes=1,
                         nano_cpus=1, pids_limit=1, generation=1, spec_revision=0, node=node, avoid_nodes=avoid)


def test_avoid_nodes_become_constraints_and_a_pin_wins_and_the_hash_ignores_them() -> None:
    backend = SwarmBackend(instance="default", network="galaxy-games")
    try:
        place = backend._service_spec(spec(None, (NODE_B, NODE_B)))["TaskTemplate"]["Placement"]
        assert place["Constraints"] == [f"node.id!={NODE_B}"]
        place = backend._service_spec(spec(NODE_A, (NODE_A, NODE_B)))["TaskTemplate"]["Placement"]
        assert place["Constraints"] == [f"node.id=={NODE_A}", f"node.id!={NODE_B}"]
        assert "Placement" not in backend._service_spec(spec(None, ()))["TaskTemplate"]
    finally:
        backend.close()
    assert spec(None, (NODE_B,)).spec_hash == spec(NODE_A, ()).spec_hash


# ------------------------------------------------------------------------------ the reconciler's hold
async def test_a_game_stopped_on_a_drained_target_outlives_the_cleanup_ttl(tmp_path) -> None:
    """Red-team finding: a drain longer than RTMANAGER_CLEANUP_TTL had every game it stopped removed for good
    (removal is final: undrain then skips them as removed meanwhile). Nothing is removed nobody asked for
    while a drain holds the game's host or node; once it is undrained, the TTL applies again."""
    from tests.support.world import IMG, World

    w = World(tmp_path, RTMANAGER_CLEANUP_TTL="60")
    held: list[str] = []

    async def hold(record):
        return "the host is drained" if held else None

    w.reconciler.hold = w.reconciler.hold_removal = hold
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    held.append("host")
    await w.job(JobKind.STOP, "g1")  # the drain's stop
    assert (await w.sync("g1")).status is Status.STOPPED
    w.store.clock.advance(3600)
    step = await w.reconciler.sync("g1")
    rec = w.store.records["g1"]
    assert rec.status is Status.STOPPED and rec.desired_status.value == "stopped" and not w.backend.ops("remove")
    # Looked at again at the resync's pace, not every few seconds: a long drain holds many stopped games.
    assert step.after == w.settings.runtime.resync_interval
    held.clear()
    rec = await w.sync("g1")
    assert rec.status is Status.REMOVED and w.backend.ops("remove")


async def test_a_crash_on_a_drained_target_is_not_restarted(tmp_path) -> None:
    from tests.support.world import IMG, World

    w = World(tmp_path)
    held: list[str] = []

    async def hold(record):
        return "the host is drained" if held else None

    w.reconciler.hold = hold
    await w.job(JobKind.START, "g1", IMG)
    assert (await w.sync("g1")).status is Status.RUNNING
    held.append("host")
    w.backend.crash("g1", code=5)
    rec = await w.sync("g1")
    assert rec.crash_count == 1 and rec.status is Status.STARTING
    w.store.clock.advance(60)
    rec = await w.sync("g1")
    assert rec.status is Status.STARTING and w.running("g1") == []  # held: the drain stops it instead
    held.clear()
    rec = await w.sync("g1")
    assert rec.status is Status.RUNNING and len(w.running("g1")) == 1  # no drain: restarted as before


async def test_the_drains_list_names_active_nodes_without_waiting_long_for_the_swarm(monkeypatch):
    """Review, stop 44: the drains list read the Swarm's node list for every node drain ever made, uncached
    and unbounded: a slow Swarm held GET /api/v1/drains (and undrain, and the console's poll) for up to the
    daemon's timeout. Only active drains are named, and the names are waited for NAMES_WAIT at most."""
    import asyncio
    from datetime import UTC, datetime

    from controller import drains_api
    from controller.drains_api import DrainApi
    from desired.drains import Drain, DrainStatus, OnDeadline

    now = datetime.now(UTC)

    def drain(i: int, status: DrainStatus) -> Drain:
        return Drain(id=i, node=f"node{i}", max_parallel=1, deadline_at=now, on_deadline=OnDeadline.MOVE,
                     local_state=None, state_shared=True, status=status, source="admin", created_at=now)

    class Store:
        def __init__(self, found):
            self.found = found

        async def list_drains(self):
            return self.found

    asked = []

    async def slow_nodes():
        asked.append(1)
        await asyncio.sleep(30)
        return {}

    async def nodes():
        asked.append(1)
        return {"node1": "worker1", "node2": "worker2"}

    monkeypatch.setattr(drains_api, "NAMES_WAIT", 0.1)
    over = DrainApi(Store([drain(1, DrainStatus.UNDRAINED)]), backend="swarm", state_shared=True, nodes=slow_nodes)
    assert (await asyncio.wait_for(over.list(), 1))[0] == 200 and asked == []  # nothing active: not asked
    live = DrainApi(Store([drain(1, DrainStatus.DRAINING)]), backend="swarm", state_shared=True, nodes=slow_nodes)
    status, body = await asyncio.wait_for(live.list(), 1)  # the Swarm slow: the list without the names
    assert status == 200 and "node_name" not in body["drains"][0]
    named = DrainApi(Store([drain(1, DrainStatus.DRAINED), drain(2, DrainStatus.UNDRAINED)]), backend="swarm",
                     state_shared=True, nodes=nodes)
    status, body = await named.list()
    assert [d.get("node_name") for d in body["drains"]] == ["worker1", None]


async def test_a_game_whose_move_failed_is_not_removed_by_the_cleanup_ttl_before_undrain(tmp_path) -> None:
    """Red-team 131: a move that failed leaves the game stopped and pinned to no node, so no drained node
    named it and the hold let the cleanup TTL remove it for good while the drain that would start it again
    at undrain was still on. The removal's hold also asks whether a drain took the game."""
    from controller.drains import Drainer
    from desired.drains import Targets
    from tests.support.world import IMG, World

    w = World(tmp_path, RTMANAGER_CLEANUP_TTL="60")
    taken = {"g1"}

    class Store:
        async def drained_targets(self) -> Targets:
            return Targets(nodes=frozenset({"n1"}))

        async def brought_back_at_undrain(self, game_id: str) -> bool:
            return game_id in taken

    drainer = Drainer(store=Store(), admission=None, metrics=None, clock=w.store.clock,  # type: ignore[arg-type]
                      wake=lambda g: None)
    w.reconciler.hold, w.reconciler.hold_removal = drainer.hold, drainer.hold_removal
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.STOP, "g1")  # as a failed move leaves it: stopped, node_id None
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and rec.node_id is None
    w.store.clock.advance(3600)
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and not w.backend.ops("remove")
    taken.clear()  # undrained (or the drain is done with it otherwise): the TTL applies again
    rec = await w.sync("g1")
    assert rec.status is Status.REMOVED and w.backend.ops("remove")
