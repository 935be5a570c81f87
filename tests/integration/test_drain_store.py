"""The drains' part of the store on real Postgres: one active drain per target (the database decides),
admission's host_drained refusal in the job's own transaction, a move's record change (pin cleared,
spec revised, a new generation, compare-and-swap), what undrain must not bring back, and undrain."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from desired import drains
from desired.db.store import Store
from desired.drains import (
    DrainAction,
    DrainExists,
    DrainRequest,
    DrainStatus,
    DrainStep,
    GameState,
    LocalState,
    StepKind,
)
from desired.errors import NotFound
from desired.jobs import DecisionAction, Job, RecordDefaults
from desired.model import ErrorCode, JobKind, OpSource, StopReason

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMG = "galaxy/engine-stub:1.0"
HOST = DrainRequest(node=None, max_parallel=2, deadline=60)


def start(game: str) -> Job:
    return Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMG)


def stop(game: str, source: OpSource = OpSource.LOBBY) -> Job:
    return Job(kind=JobKind.STOP, game_id=game, source=source, reason=StopReason.CANCELLED)


async def running(store: Store, game: str, node: str | None = None):
    await store.submit(start(game), DEFAULTS)
    rec = await store.get(game)
    return await store.mark_running(rec, container_id="c" * 64, image=IMG, node=node)


async def test_one_active_drain_per_target_even_when_two_race(pool):
    store = Store(pool)
    outcomes = await asyncio.gather(*(store.create_drain(HOST, OpSource.ADMIN) for _ in range(4)),
                                    return_exceptions=True)
    made = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(made) == 1 and all(isinstance(o, DrainExists) for o in outcomes if o not in made), outcomes
    node = await store.create_drain(DrainRequest(node="nodeb", local_state=LocalState.STOP), OpSource.ADMIN)
    assert node.node == "nodeb" and (await store.drained_targets()).nodes == {"nodeb"}
    drain = made[0]
    assert (await store.active_drain(None)).id == drain.id
    undraining = await store.request_undrain(drain.id)
    assert undraining.status is DrainStatus.UNDRAINING and undraining.undrain_at is not None
    assert (await store.request_undrain(drain.id)).status is DrainStatus.UNDRAINING  # idempotent
    with pytest.raises(NotFound):
        await store.request_undrain(10**9)
    with pytest.raises(DrainExists):  # undraining is still active
        await store.create_drain(HOST, OpSource.ADMIN)
    assert await store.set_drain_status(drain.id, DrainStatus.UNDRAINING, DrainStatus.UNDRAINED)
    assert not await store.set_drain_status(drain.id, DrainStatus.UNDRAINING, DrainStatus.UNDRAINED)
    again = await store.create_drain(HOST, OpSource.ADMIN)
    assert again.id != drain.id and [d.id for d in await store.list_drains()][:2] == [again.id, node.id]


async def test_a_host_drain_refuses_new_starts_in_the_jobs_transaction(pool):
    store = Store(pool)
    await running(store, "g-up")
    await store.submit(start("g-stopped"), DEFAULTS)
    await store.submit(stop("g-stopped"), DEFAULTS)
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    assert (await store.drained_targets()).host
    out = await store.submit(start("g-new"), DEFAULTS)
    assert out.decision.action is DecisionAction.REJECT and out.decision.error_code is ErrorCode.HOST_DRAINED
    assert await store.find("g-new") is None
    out = await store.submit(start("g-stopped"), DEFAULTS)
    assert out.decision.error_code is ErrorCode.HOST_DRAINED
    out = await store.submit(start("g-up"), DEFAULTS)  # already runs that image: a replay, not a refusal
    assert out.decision.action is DecisionAction.REPLAY
    restart = Job(kind=JobKind.RESTART, game_id="g-up", source=OpSource.ADMIN)
    assert (await store.submit(restart, DEFAULTS)).decision.error_code is ErrorCode.HOST_DRAINED
    assert (await store.submit(stop("g-up"), DEFAULTS)).decision.action is DecisionAction.CHANGE
    await store.request_undrain(drain.id)  # undraining: its own starts must get through
    assert (await store.submit(start("g-new"), DEFAULTS)).decision.action is DecisionAction.CHANGE


async def test_a_move_clears_the_pin_and_revises_the_spec_once(pool):
    store = Store(pool)
    rec = await running(store, "g1", node="nodeb")
    await running(store, "g2", node="nodea")
    drain = await store.create_drain(DrainRequest(node="nodeb", state_shared=True), OpSource.ADMIN)
    records, games = await store.drain_scope(drain)
    assert set(records) == {"g1"} and games == {}
    # A start of a game pinned to the drained node is refused (its state is there); elsewhere it is not.
    stopped = await store.submit(stop("g2"), DEFAULTS)
    assert stopped.decision.action is DecisionAction.CHANGE
    moved = await store.take_move(drain, rec, forced=False)
    assert moved is not None and moved.node_id is None and moved.spec_revision == rec.spec_revision + 1
    assert moved.generation == rec.generation + 1 and not moved.converged and moved.force_generation is None
    assert await store.take_move(drain, rec, forced=False) is None  # the record moved on: compare-and-swap
    records, games = await store.drain_scope(drain)
    assert games["g1"].action is DrainAction.MOVE and games["g1"].state is GameState.IN_PROGRESS
    assert games["g1"].from_node == "nodeb" and "g1" in records
    assert await store.force_move(drain, games["g1"])
    assert (await store.get("g1")).force_generation == moved.generation
    after = await store.mark_running(await store.get("g1"), container_id="d" * 64, image=IMG, node="nodea")
    assert after.node_id == "nodea" and after.converged
    await store.finish_games(drain.id, [("g1", "nodea", "moved to node nodea")])
    _, rows = await store.get_drain(drain.id)
    assert [(g.game_id, g.state, g.to_node) for g in rows] == [("g1", GameState.DONE, "nodea")]
    # done with the node it went to: undrain will not bring it back, so nothing holds its cleanup
    assert not await store.brought_back_at_undrain("g1")


async def test_a_game_a_failed_move_stopped_is_held_from_the_cleanup_until_undrain(pool):
    """Red-team 131: the cleanup TTL's hold asks whether a drain not undrained yet would start the game again."""
    store = Store(pool)
    rec = await running(store, "g1", node="nodeb")
    drain = await store.create_drain(DrainRequest(node="nodeb", state_shared=True), OpSource.ADMIN)
    assert not await store.brought_back_at_undrain("g1")  # not taken yet
    assert await store.take_move(drain, rec, forced=False) is not None
    assert await store.brought_back_at_undrain("g1")  # a move under way
    await store.finish_games(drain.id, [("g1", None, "stopped instead of moved")])
    assert await store.brought_back_at_undrain("g1")  # failed: undrain starts it again
    assert not await store.brought_back_at_undrain("g2")
    await store.request_undrain(drain.id)
    assert await store.brought_back_at_undrain("g1")  # undraining: not yet brought back
    assert await store.set_drain_status(drain.id, DrainStatus.UNDRAINING, DrainStatus.UNDRAINED)
    assert not await store.brought_back_at_undrain("g1")


async def test_undrain_does_not_bring_back_a_game_stopped_by_another_job_after_the_drain(pool):
    store = Store(pool)
    recs = {g: await running(store, g) for g in ("g1", "g2", "g3")}
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    for g, rec in recs.items():  # the drain's take: its stop and its row in one transaction
        out = await store.submit(Job(kind=JobKind.STOP, game_id=g, source=OpSource.ADMIN,
                                     reason=StopReason.ADMIN_REQUEST,
                                     drain=DrainStep(drain_id=drain.id, kind=StepKind.TAKE,
                                                     generation=rec.generation)), DEFAULTS)
        assert out.decision.action is DecisionAction.CHANGE
    assert await store.stopped_since(drain.id) == set()
    assert await store.brought_back_at_undrain("g2")
    await store.submit(stop("g2"), DEFAULTS)  # Lobby stops g2 too, after the drain did
    assert await store.stopped_since(drain.id) == {"g2"}
    # undrain leaves g2 stopped: nothing holds its cleanup (review 133); g1 is still the drain's to bring back
    assert not await store.brought_back_at_undrain("g2") and await store.brought_back_at_undrain("g1")
    _, rows = await store.get_drain(drain.id)
    assert {g.game_id: (g.image_ref, g.paused, g.turn_interval) for g in rows} == {
        g: (IMG, False, 0) for g in ("g1", "g2", "g3")}


async def test_a_drain_records_the_image_the_game_runs_not_a_patch_that_waits(pool):
    """Red-team finding: a patch waiting for the turn boundary when the drain took the game was recorded
    as the game's image, and undrain started the game on an image it never ran (the patch superseded by
    the drain's stop; no copy of its state, no rollback). The drain records what runs; undrain's image
    falls back to what ran last, then to what was asked."""
    store = Store(pool)
    rec = await running(store, "p1")
    patched = "galaxy/engine-stub:1.1"
    await store.submit(Job(kind=JobKind.PATCH, game_id="p1", source=OpSource.LOBBY, image_ref=patched), DEFAULTS)
    rec = await store.get("p1")
    assert rec.desired_image_ref == patched and rec.current_image_ref == IMG
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    await store.submit(Job(kind=JobKind.STOP, game_id="p1", source=OpSource.ADMIN, reason=StopReason.ADMIN_REQUEST,
                           drain=DrainStep(drain_id=drain.id, kind=StepKind.TAKE, generation=rec.generation)),
                       DEFAULTS)
    _, rows = await store.get_drain(drain.id)
    assert [g.image_ref for g in rows] == [IMG]
    assert drains.restore_image(replace(rows[0], image_ref=None), await store.get("p1")) == IMG


async def test_a_drain_that_takes_a_game_mid_patch_records_the_image_its_stop_puts_back(pool):
    """A drain took a game whose patch had begun (the new engine created, not yet healthy) and recorded the
    patch's image. The drain's stop undoes the patch (the replaced engine's copy of the state is put back,
    or the unit stopped is the replaced engine itself), so undrain started the new image on the old
    image's state with no copy and nothing to roll back to. The drain records the replaced image."""
    store = Store(pool)
    await running(store, "p1")
    patched = "galaxy/engine-stub:1.1"
    await store.submit(Job(kind=JobKind.PATCH, game_id="p1", source=OpSource.LOBBY, image_ref=patched), DEFAULTS)
    rec = await store.mark_starting(await store.get("p1"), rollback_image=IMG)  # the patch under way
    assert rec.desired_image_ref == patched and rec.rollback_image_ref == IMG
    drain = await store.create_drain(HOST, OpSource.ADMIN)
    out = await store.submit(Job(kind=JobKind.STOP, game_id="p1", source=OpSource.ADMIN,
                                 reason=StopReason.ADMIN_REQUEST, force=True,
                                 drain=DrainStep(drain_id=drain.id, kind=StepKind.TAKE, generation=rec.generation,
                                                 forced=True)), DEFAULTS)
    assert out.decision.action is DecisionAction.CHANGE
    _, rows = await store.get_drain(drain.id)
    assert [g.image_ref for g in rows] == [IMG]
    stopped = await store.mark_stopped(await store.get("p1"), container_id="c" * 64, stopped_now=True)
    assert drains.restore_image(rows[0], stopped) == IMG
