"""The store's part of rollouts against a real Postgres: creation and its refusals, one active
rollout per game (racing creates too), a game's step written in its patch's own transaction,
pause / resume / abort, and the loop's writes."""

from __future__ import annotations

import asyncio

import pytest

from desired.db.store import Store
from desired.errors import Conflict, NotFound
from desired.jobs import ImageAllowlist, Job, RecordDefaults
from desired.model import JobKind, OpSource, OpStatus, StopReason
from desired.rollouts import (
    Action,
    GameState,
    InvalidRollout,
    RolloutConflict,
    RolloutState,
    RolloutStep,
    parse_request,
)
from desired.versions import VersionStatus

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
OLD, NEW = "galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1"
ALLOW = ImageAllowlist("galaxy/engine-stub:*")


@pytest.fixture
async def store(pool):
    s = Store(pool)
    await s.create_version("1.0", OLD, VersionStatus.ACTIVE, "")
    await s.create_version("1.1", NEW, VersionStatus.ACTIVE, "")
    return s


async def running_game(store: Store, game: str, image: str = OLD) -> None:
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=image), DEFAULTS)
    rec = await store.get(game)
    await store.mark_running(rec, container_id="c" * 64, image=image)


def req(**body):
    return parse_request({"target_version": "1.1", **body})


def patch(game: str, rollout_id: int, canary: bool = False) -> Job:
    return Job(kind=JobKind.PATCH, game_id=game, source=OpSource.ADMIN, image_ref=NEW, rollout=RolloutStep(
        rollout_id=rollout_id, expect=GameState.WAITING, state=GameState.IN_PROGRESS, reason="patching",
        canary=canary))


async def test_create_by_source_version_takes_its_live_games_in_order(store):
    for g in ("g-c", "g-a", "g-b"):
        await running_game(store, g)
    await running_game(store, "g-new", NEW)  # already on the target: not on the source version
    rollout, games = await store.create_rollout(req(source_version="1.0", max_parallel=2), ALLOW, False)
    assert rollout.state is RolloutState.RUNNING and rollout.target_image_ref == NEW
    assert [g.game_id for g in games] == ["g-a", "g-b", "g-c"]
    assert all(g.state is GameState.WAITING for g in games)
    listed = await store.list_rollouts()
    assert [(r.id, c["waiting"]) for r, c in listed] == [(rollout.id, 3)]


@pytest.mark.parametrize("body, registry, message", [
    ({"target_version": "9.9", "source_version": "1.0"}, False, "no engine version 9.9"),
    ({"source_version": "7.7"}, False, "no engine version 7.7"),
    ({"game_ids": ["g1", "nope"]}, False, "no runtime for nope"),
    ({"target_version": "1.0", "source_version": "1.1"}, False, "no live game runs 1.1"),
])
async def test_create_refusals_name_the_field(store, body, registry, message):
    await running_game(store, "g1")
    with pytest.raises(InvalidRollout, match=message):
        await store.create_rollout(parse_request({"target_version": "1.1", **body}), ALLOW, registry)


async def test_a_disabled_or_unallowed_target_is_refused_a_deprecated_source_is_not(store):
    await running_game(store, "g1")
    await store.update_version("1.0", status=VersionStatus.DEPRECATED, notes=None)
    await store.update_version("1.1", status=VersionStatus.DISABLED, notes=None)
    with pytest.raises(InvalidRollout, match="disabled"):
        await store.create_rollout(req(source_version="1.0"), ALLOW, False)
    await store.update_version("1.1", status=VersionStatus.DEPRECATED, notes=None)
    with pytest.raises(InvalidRollout, match="deprecated"):  # under the registry policy, a patch would be refused
        await store.create_rollout(req(source_version="1.0"), ALLOW, True)
    await store.update_version("1.1", status=VersionStatus.ACTIVE, notes=None)
    with pytest.raises(InvalidRollout, match="RTMANAGER_IMAGE_ALLOWLIST"):
        await store.create_rollout(req(source_version="1.0"), ImageAllowlist("galaxy/engine:*"), True)
    rollout, games = await store.create_rollout(req(source_version="1.0"), ALLOW, True)  # a deprecated source
    assert [g.game_id for g in games] == ["g1"]


async def test_a_game_is_in_one_active_rollout_and_racing_creates_give_one(store):
    for g in ("g1", "g2", "g3"):
        await running_game(store, g)
    first, _ = await store.create_rollout(req(game_ids=["g1", "g2"]), ALLOW, False)
    with pytest.raises(RolloutConflict, match=rf"g2 \(rollout {first.id}\)"):
        await store.create_rollout(req(game_ids=["g3", "g2"]), ALLOW, False)
    answers = await asyncio.gather(*(store.create_rollout(req(game_ids=["g3"]), ALLOW, False) for _ in range(4)),
                                   return_exceptions=True)
    assert sum(not isinstance(a, BaseException) for a in answers) == 1, answers
    assert all(isinstance(a, RolloutConflict) for a in answers if isinstance(a, BaseException)), answers
    # once the first rollout is aborted and finished, its games are free again
    await store.steer_rollout(first.id, Action.ABORT)
    assert await store.finish_rollout(first.id)
    again, _ = await store.create_rollout(req(game_ids=["g1", "g2"]), ALLOW, False)
    assert again.id != first.id


async def test_the_patch_and_the_step_commit_together_or_not_at_all(store, pool):
    for g in ("g1", "g2"):
        await running_game(store, g)
    rollout, _ = await store.create_rollout(req(game_ids=["g1", "g2"], max_parallel=2), ALLOW, False)
    outcome = await store.submit(patch("g1", rollout.id, canary=True), DEFAULTS)
    _, games = await store.get_rollout(rollout.id)
    g1 = games[0]
    assert (g1.state, g1.operation_id, g1.from_image_ref, g1.canary) == (
        GameState.IN_PROGRESS, outcome.operation_id, OLD, True)
    assert (await store.get("g1")).desired_image_ref == NEW
    # The same step twice: the row is no longer waiting, so the whole job is refused: no second patch.
    ops_before = await pool.fetchval("SELECT count(*) FROM runtime_operations WHERE game_id = 'g1'")
    with pytest.raises(Conflict):
        await store.submit(patch("g1", rollout.id), DEFAULTS)
    assert await pool.fetchval("SELECT count(*) FROM runtime_operations WHERE game_id = 'g1'") == ops_before
    # Paused meanwhile: a first patch is refused and nothing is written.
    await store.steer_rollout(rollout.id, Action.PAUSE)
    with pytest.raises(Conflict, match="paused"):
        await store.submit(patch("g2", rollout.id), DEFAULTS)
    assert (await store.get("g2")).desired_image_ref == OLD
    _, games = await store.get_rollout(rollout.id)
    assert games[1].state is GameState.WAITING and games[1].operation_id is None


async def test_a_patch_that_is_a_replay_or_a_rejection_is_settled_at_once(store):
    await running_game(store, "g1", NEW)   # already on the target
    await running_game(store, "g2", OLD)
    await running_game(store, "g3", OLD)
    rollout, _ = await store.create_rollout(req(game_ids=["g1", "g2", "g3"]), ALLOW, True)
    await store.submit(patch("g1", rollout.id, canary=True), DEFAULTS, registry=True)
    await store.update_version("1.1", status=VersionStatus.DEPRECATED, notes=None)
    await store.submit(patch("g2", rollout.id), DEFAULTS, registry=True)  # the version policy refuses it
    await store.submit(Job(kind=JobKind.STOP, game_id="g3", source=OpSource.LOBBY,
                           reason=StopReason.FINISHED), DEFAULTS)
    with pytest.raises(Conflict, match="not running"):  # stopped since: nothing recorded, the loop skips it
        await store.submit(patch("g3", rollout.id), DEFAULTS)
    _, games = await store.get_rollout(rollout.id)
    assert (games[0].state, games[0].canary, games[0].reason) == (GameState.DONE, False,
                                                                  "already on the target version")
    assert games[1].state is GameState.FAILED and "deprecated" in games[1].reason, games[1]
    assert games[2].state is GameState.WAITING and games[2].operation_id is None


async def test_steer_settle_pause_and_finish(store, pool):
    for g in ("g1", "g2", "g3"):
        await running_game(store, g)
    rollout, _ = await store.create_rollout(req(source_version="1.0", max_parallel=3), ALLOW, False)
    with pytest.raises(NotFound):
        await store.steer_rollout(rollout.id + 100, Action.PAUSE)
    await store.submit(patch("g1", rollout.id), DEFAULTS)
    assert await store.settle_rollout_game(rollout.id, "g2", GameState.WAITING, GameState.SKIPPED, "not running")
    assert not await store.settle_rollout_game(rollout.id, "g2", GameState.WAITING, GameState.SKIPPED, "again")
    assert not await store.finish_rollout(rollout.id)  # g1 in flight, g3 waiting
    assert await store.pause_rollout(rollout.id, "failure budget spent")
    assert not await store.pause_rollout(rollout.id, "twice")
    paused, _ = await store.get_rollout(rollout.id)
    assert (paused.state, paused.state_reason) == (RolloutState.PAUSED, "failure budget spent")
    resumed = await store.steer_rollout(rollout.id, Action.RESUME)
    assert resumed.state is RolloutState.RUNNING and resumed.resumed_at is not None
    aborted = await store.steer_rollout(rollout.id, Action.ABORT)
    assert aborted.state is RolloutState.ABORTED
    with pytest.raises(RolloutConflict, match="aborted: it cannot resume"):
        await store.steer_rollout(rollout.id, Action.RESUME)
    _, games = await store.get_rollout(rollout.id)
    assert [(g.game_id, g.state) for g in games] == [("g1", GameState.IN_PROGRESS), ("g2", GameState.SKIPPED),
                                                     ("g3", GameState.SKIPPED)]
    assert await pool.fetchval("SELECT array_agg(game_id ORDER BY game_id) FROM rollout_games WHERE active") == ["g1"]
    assert not await store.finish_rollout(rollout.id)  # the patch in flight is still followed
    ops = await store.rollout_operations([games[0].operation_id])
    assert ops[games[0].operation_id].status is OpStatus.QUEUED
    assert await store.settle_rollout_game(rollout.id, "g1", GameState.IN_PROGRESS, GameState.DONE, "on 1.1")
    assert await store.finish_rollout(rollout.id)
    done, _ = await store.get_rollout(rollout.id)
    assert done.state is RolloutState.ABORTED and done.finished_at is not None
    assert await pool.fetchval("SELECT count(*) FROM rollout_games WHERE active") == 0
    by_rollout, by_game = await store.rollout_gauges()
    assert by_rollout == {"aborted": 1} and by_game == {}


async def test_rest_refusals_are_4xx_naming_the_problem(api):
    await api.start()
    assert (await api.request("POST", "/api/v1/rollouts", auth=False, json={}))[0] == 401
    status, body, _ = await api.request("POST", "/api/v1/rollouts", data=b"not json")
    assert status == 400 and "JSON object" in body["error"]
    status, body, _ = await api.request("POST", "/api/v1/rollouts", json={"target_version": "1.1",
                                                                          "source_version": "1.0", "canary": -1})
    assert status == 400 and "field canary" in body["error"], body
    status, body, _ = await api.request("POST", "/api/v1/rollouts", json={"target_version": "9.9",
                                                                          "source_version": "1.0"})
    assert status == 400 and "no engine version 9.9" in body["error"], body
    for path, code in (("/api/v1/rollouts/abc", 400), ("/api/v1/rollouts/0", 400), ("/api/v1/rollouts/77", 404),
                       ("/api/v1/rollouts?state=done", 400)):
        assert (await api.get(path))[0] == code, path
    for action in ("pause", "resume", "abort"):
        assert (await api.request("POST", f"/api/v1/rollouts/77/{action}"))[0] == 404
    status, body = await api.get("/api/v1/rollouts")
    assert status == 200 and body == {"rollouts": []}


async def test_a_rollout_and_its_steering_are_in_the_operation_log_with_who_asked(store):
    for g in ("g1", "g2"):
        await running_game(store, g)
    rollout, _ = await store.create_rollout(req(game_ids=["g1", "g2"]), ALLOW, False, actor="token:boss")
    await store.steer_rollout(rollout.id, Action.PAUSE, actor="cli:alice")
    await store.steer_rollout(rollout.id, Action.PAUSE, actor="cli:alice")  # already paused: no change, no entry
    await store.steer_rollout(rollout.id, Action.ABORT)
    log = await store.operation_log(game_id=None)
    fleet = [(e["op"], e["actor"], e["params"].get("rollout_id")) for e in log if e["op"].startswith("rollout_")]
    assert fleet == [("rollout_abort", None, rollout.id), ("rollout_pause", "cli:alice", rollout.id),
                     ("rollout_create", "token:boss", rollout.id)]


async def test_a_patch_still_waiting_when_the_rollout_begins_is_not_its_image_to_return_to(store):
    """Review: a game's image was taken as its desired one, so a Lobby patch still waiting for a turn
    boundary became the image a failed rollout rolled the game back to (it never ran), and the rollout
    patched over that Lobby patch. The image is the one that ran; the rollout leaves such a game to the
    job that moved it."""
    await running_game(store, "g-p")
    other = "galaxy/engine-stub:1.0-hotfix"
    await store.submit(Job(kind=JobKind.PATCH, game_id="g-p", source=OpSource.LOBBY, image_ref=other), DEFAULTS)
    assert (await store.get("g-p")).desired_image_ref == other
    rollout, games = await store.create_rollout(req(game_ids=["g-p"]), ALLOW, False)
    assert [g.from_image_ref for g in games] == [OLD]
    with pytest.raises(Conflict, match="moved by another job"):
        await store.submit(patch("g-p", rollout.id), DEFAULTS)
