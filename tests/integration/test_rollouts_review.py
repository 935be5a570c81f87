"""Regression tests of the rollout loop against a real Postgres, one section per defect an
adversarial review proved (each failed before its fix): the loop's ticks are driven by hand, and the
reconciler's part (a patch converging, failing, an engine crashing) is played through the store's
own transitions, as the reconciler would write them."""

from __future__ import annotations

import pytest

from controller.admission import Admission
from controller.metrics import Metrics
from controller.rollouts import RolloutLoop
from desired import transitions
from desired.db.store import Store
from desired.errors import Conflict
from desired.jobs import ImageAllowlist, Job, RecordDefaults
from desired.model import DesiredStatus, ErrorCode, JobKind, OpSource, Status, StopReason
from desired.policy import CrashPolicy
from desired.rollouts import GameState, RolloutGame, RolloutState, RolloutStep, parse_request
from desired.values import Crash
from desired.versions import VersionStatus

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
OLD, NEW, NEWER = "galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1", "galaxy/engine-stub:1.2"
ALLOW = ImageAllowlist("galaxy/engine-stub:*")


@pytest.fixture
async def store(pool):
    s = Store(pool)
    await s.create_version("1.0", OLD, VersionStatus.ACTIVE, "")
    await s.create_version("1.1", NEW, VersionStatus.ACTIVE, "")
    await s.create_version("1.2", NEWER, VersionStatus.ACTIVE, "")
    return s


def loop_over(store: Store, registry: bool = False) -> RolloutLoop:
    admission = Admission(store, DEFAULTS, wake=lambda g: None, registry=registry)
    return RolloutLoop(store=store, admission=admission, metrics=Metrics(), interval=1)


async def running_game(store: Store, game: str, image: str = OLD) -> None:
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=image), DEFAULTS)
    await store.mark_running(await store.get(game), container_id=game[-1] * 64, image=image)


async def converge(store: Store, game: str, image: str) -> None:
    """The reconciler carries out the game's pending generation, and the engine of ``image`` answers."""
    rec = await store.get(game)
    rec = await store.mark_starting(rec, rollback_image=rec.current_image_ref)
    await store.mark_running(rec, container_id=(game[-1] * 63) + "n", image=image)


async def lobby(store: Store, kind: JobKind, game: str, image: str | None = None) -> None:
    await store.submit(Job(kind=kind, game_id=game, source=OpSource.LOBBY, image_ref=image,
                           reason=StopReason.CANCELLED if kind is JobKind.STOP else None), DEFAULTS)


async def unreachable(store: Store, game: str) -> None:
    """The game's engine stops answering its health probes."""
    await store.record_observation(await store.get(game), transitions.Probe(healthy=False), unreachable_after=1,
                                   generation_timeout=600)
    assert (await store.get(game)).status is Status.ENGINE_UNREACHABLE


async def rows(store: Store, rollout_id: int) -> dict[str, RolloutGame]:
    _, games = await store.get_rollout(rollout_id)
    return {g.game_id: g for g in games}


async def start(store: Store, **body) -> int:
    rollout, _ = await store.create_rollout(parse_request(
        {"target_version": "1.1", "source_version": "1.0", **body}), ALLOW, False)
    return rollout.id


# 1. a canary that fails its hold goes back to its source version, even a deprecated one ----------
async def test_a_canary_failing_its_hold_is_patched_back_to_a_deprecated_source(store):
    """Under the registry policy the patch back to the canary's own previous (deprecated) version is
    no new start and is not refused; the row stays in flight until the old engine runs again, then
    reads rolled_back, and only then does the rollout pause over its canary."""
    for g in ("g1", "g2"):
        await running_game(store, g)
    await store.update_version("1.0", status=VersionStatus.DEPRECATED, notes=None)
    rollout, _ = await store.create_rollout(parse_request(
        {"target_version": "1.1", "source_version": "1.0", "canary": 1, "canary_hold": 600}), ALLOW, True)
    loop = loop_over(store, registry=True)
    await loop.tick()
    assert (await store.get("g1")).desired_image_ref == NEW
    await converge(store, "g1", NEW)
    await unreachable(store, "g1")
    await loop.tick()
    g1 = (await rows(store, rollout.id))["g1"]
    assert (await store.get("g1")).desired_image_ref == OLD, g1.reason
    assert g1.state is GameState.IN_PROGRESS and g1.back_operation_id is not None, g1
    assert (await store.get_rollout(rollout.id))[0].state is RolloutState.RUNNING
    await converge(store, "g1", OLD)
    await loop.tick()
    g1 = (await rows(store, rollout.id))["g1"]
    assert g1.state is GameState.ROLLED_BACK and f"patched back to {OLD}" in g1.reason, g1
    r, _ = await store.get_rollout(rollout.id)
    assert r.state is RolloutState.PAUSED and r.state_reason.startswith("canary g1 rolled_back"), r.state_reason
    assert (await store.get("g2")).desired_image_ref == OLD


async def test_a_refused_patch_back_never_reads_rolled_back(store):
    """A patch back the version policy refuses (the source was disabled meanwhile) leaves the canary
    on the target: its row says failed, with the refusal, not rolled_back."""
    await running_game(store, "g1")
    rollout, _ = await store.create_rollout(parse_request(
        {"target_version": "1.1", "game_ids": ["g1"], "canary": 1, "canary_hold": 600}), ALLOW, True)
    loop = loop_over(store, registry=True)
    await loop.tick()
    await converge(store, "g1", NEW)
    await store.update_version("1.0", status=VersionStatus.DISABLED, notes=None)
    await unreachable(store, "g1")
    await loop.tick()
    g1 = (await rows(store, rollout.id))["g1"]
    assert (await store.get("g1")).desired_image_ref == NEW
    assert g1.state is GameState.FAILED and "the patch back was refused" in g1.reason, g1


# 2. a game another job moved meanwhile is not patched over ----------------------------------------
async def test_a_waiting_game_another_job_moved_is_skipped_not_patched_over(store):
    """A rollout of 'every live game on 1.0' must not undo a patch Lobby made meanwhile (to 1.2)."""
    for g in ("g1", "g2"):
        await running_game(store, g)
    rollout_id = await start(store, canary=0, max_parallel=1)
    loop = loop_over(store)
    await loop.tick()
    await lobby(store, JobKind.PATCH, "g2", NEWER)
    await converge(store, "g2", NEWER)
    await converge(store, "g1", NEW)
    await loop.tick()
    g2 = (await rows(store, rollout_id))["g2"]
    assert (await store.get("g2")).desired_image_ref == NEWER
    assert g2.state is GameState.SKIPPED and g2.reason.startswith("moved by another job"), g2


async def test_the_rollouts_patch_is_refused_under_the_game_lock_once_another_job_moved_the_game(store):
    """The loop looks at the game, then submits: a patch Lobby makes in between is caught in the
    rollout patch's own transaction, which then records nothing (the next tick skips the game)."""
    await running_game(store, "g1")
    rollout_id = await start(store)
    await lobby(store, JobKind.PATCH, "g1", NEWER)
    step = RolloutStep(rollout_id=rollout_id, expect=GameState.WAITING, state=GameState.IN_PROGRESS,
                       reason="patching")
    admission = Admission(store, DEFAULTS, wake=lambda g: None)
    with pytest.raises(Conflict, match="moved by another job"):
        await admission.submit(Job(kind=JobKind.PATCH, game_id="g1", source=OpSource.ADMIN, image_ref=NEW,
                                   rollout=step))
    assert (await store.get("g1")).desired_image_ref == NEWER
    assert (await rows(store, rollout_id))["g1"].state is GameState.WAITING


# 3. the rest proceed only after a canary held ------------------------------------------------------
@pytest.mark.parametrize("how", ["lobby patches the canary back", "lobby stops the canary mid-patch"])
async def test_a_skipped_canary_is_replaced_and_the_rest_still_wait(store, how):
    """A canary another job takes over is skipped and does not count: the next waiting game becomes
    the canary, and no other game is patched before a canary has held."""
    for g in ("g1", "g2", "g3"):
        await running_game(store, g)
    rollout_id = await start(store, canary=1, canary_hold=600, max_parallel=2)
    loop = loop_over(store)
    await loop.tick()
    if how == "lobby patches the canary back":
        await converge(store, "g1", NEW)
        await loop.tick()
        await lobby(store, JobKind.PATCH, "g1", OLD)
    else:
        await lobby(store, JobKind.STOP, "g1")
    await loop.tick()
    by = await rows(store, rollout_id)
    assert by["g1"].state is GameState.SKIPPED, by["g1"]
    assert by["g2"].state is GameState.IN_PROGRESS and by["g2"].canary, by["g2"]
    assert by["g3"].state is GameState.WAITING and (await store.get("g3")).desired_image_ref == OLD


# 4. a failed patch holds its slot until its rollback has converged ---------------------------------
async def test_a_failed_patch_holds_its_slot_until_its_rollback_converges(store):
    """max_parallel 1: while g1's failed patch is being rolled back (its old engine not up yet), g1
    stays in flight and g2's patch does not begin; once the old engine runs, g1 is rolled_back."""
    for g in ("g1", "g2"):
        await running_game(store, g)
    rollout_id = await start(store, max_parallel=1, failure_budget=3)
    loop = loop_over(store)
    await loop.tick()
    rec = await store.mark_starting(await store.get("g1"), rollback_image=OLD)
    await store.fail_generation("g1", rec.generation, ErrorCode.ENGINE_UNREACHABLE, "never became healthy")
    rec = await store.get("g1")
    assert rec.desired_image_ref == OLD and rec.rolling_back
    await loop.tick()
    by = await rows(store, rollout_id)
    assert by["g1"].state is GameState.IN_PROGRESS and "rolling back" in by["g1"].reason, by["g1"]
    assert (await store.get("g2")).desired_image_ref == OLD, "g2 patched while g1 was still down"
    await converge(store, "g1", OLD)
    await loop.tick()
    by = await rows(store, rollout_id)
    assert by["g1"].state is GameState.ROLLED_BACK, by["g1"]
    assert (await store.get("g2")).desired_image_ref == NEW


async def test_a_rollback_that_fails_reads_failed_not_rolled_back(store):
    """The rollback's own start fails too: the game ends stopped, and its row says so."""
    await running_game(store, "g1")
    rollout_id = await start(store)
    loop = loop_over(store)
    await loop.tick()
    rec = await store.mark_starting(await store.get("g1"), rollback_image=OLD)
    await store.fail_generation("g1", rec.generation, ErrorCode.ENGINE_UNREACHABLE, "never became healthy")
    rec = await store.get("g1")
    await store.fail_generation("g1", rec.generation, ErrorCode.ENGINE_UNREACHABLE, "the old one neither")
    rec = await store.get("g1")
    assert rec.desired_status is DesiredStatus.STOPPED
    await loop.tick()
    assert (await rows(store, rollout_id))["g1"].state is GameState.IN_PROGRESS  # still going down
    await store.mark_stopped(rec, container_id=None)
    await loop.tick()
    g1 = (await rows(store, rollout_id))["g1"]
    assert g1.state is GameState.FAILED and "rollback failed" in g1.reason, g1


# 5. what other jobs do to a canary during its hold is not an engine failure ------------------------
@pytest.mark.parametrize("event, state", [
    ("lobby restarts the canary", GameState.IN_PROGRESS),   # waits for the engine to be up again
    ("the canary's game finishes", GameState.SKIPPED),
    ("lobby stops the canary", GameState.SKIPPED),
])
async def test_a_canary_other_jobs_touch_during_its_hold_is_not_an_engine_failure(store, event, state):
    """Neither patched back (a downgrade nobody asked for) nor a reason to pause the rollout."""
    for g in ("g1", "g2"):
        await running_game(store, g)
    rollout_id = await start(store, canary=1, canary_hold=600)
    loop = loop_over(store)
    await loop.tick()
    await converge(store, "g1", NEW)
    await loop.tick()
    rec = await store.get("g1")
    if event == "lobby restarts the canary":
        await lobby(store, JobKind.RESTART, "g1")
        await store.mark_starting(await store.get("g1"), rollback_image=NEW)
    elif event == "the canary's game finishes":
        await store.record_observation(rec, transitions.Probe(healthy=True, phase="finished", turn=40),
                                       unreachable_after=3, generation_timeout=600)
    else:
        await lobby(store, JobKind.STOP, "g1")
    await loop.tick()
    r, _ = await store.get_rollout(rollout_id)
    g1 = (await rows(store, rollout_id))["g1"]
    assert r.state is RolloutState.RUNNING, r.state_reason
    assert g1.state is state and g1.back_operation_id is None, g1
    assert (await store.get("g1")).desired_image_ref == NEW


# 6. a game briefly not up when its turn comes is tried again, not left behind ----------------------
async def test_a_game_briefly_restarting_when_its_turn_comes_is_patched_later(store):
    """g2 is restarting after a crash (status starting) when its turn comes: it stays waiting, the
    rollout goes on with the others and patches g2 once it is up; it never completes without it."""
    for g in ("g1", "g2"):
        await running_game(store, g)
    rollout_id = await start(store, max_parallel=2)
    rec = await store.get("g2")
    await store.record_crash(rec, Crash(code=ErrorCode.CONTAINER_START_FAILED, detail="exit 1",
                                        container_id=rec.current_container_id),
                             CrashPolicy(limit=5, window=600, backoff_max=30))
    assert (await store.get("g2")).status is Status.STARTING
    loop = loop_over(store)
    await loop.tick()
    by = await rows(store, rollout_id)
    assert by["g1"].state is GameState.IN_PROGRESS
    assert by["g2"].state is GameState.WAITING and "not up now" in by["g2"].reason, by["g2"]
    await converge(store, "g1", NEW)
    await loop.tick()
    assert (await store.get_rollout(rollout_id))[0].state is RolloutState.RUNNING
    await store.mark_running(await store.get("g2"), container_id="x" * 64, image=OLD)
    await loop.tick()
    assert (await store.get("g2")).desired_image_ref == NEW
    assert (await rows(store, rollout_id))["g2"].state is GameState.IN_PROGRESS


# suspicion: an operation row removed by retention before the rollout saw it end --------------------
async def test_a_patch_whose_operation_row_vanished_is_read_from_the_record(store):
    """Retention (desired/db/outbox.py prune) deleted the patch's result and operation before the
    loop saw it end: the game is not left in flight forever; its runtime record says how it went."""
    await running_game(store, "g1")
    rollout_id = await start(store)
    loop = loop_over(store)
    await loop.tick()
    await converge(store, "g1", NEW)
    op_id = (await rows(store, rollout_id))["g1"].operation_id
    await store.pool.execute("DELETE FROM job_results WHERE operation_id = $1", op_id)
    await store.pool.execute("DELETE FROM runtime_operations WHERE id = $1", op_id)
    await loop.tick()
    assert (await rows(store, rollout_id))["g1"].state is GameState.DONE
    assert (await store.get_rollout(rollout_id))[0].state is RolloutState.COMPLETED


# suspicion: the plan within one tick did not see a patch refused at once -------------------------
async def test_a_patch_refused_at_once_counts_within_the_same_tick(store):
    """max_parallel 2, failure budget 1: g1 is skipped (stopped), g2's patch is refused by the
    version policy (the target was deprecated after the rollout began). The slot g1 freed must not
    start g3 in the same tick: g2's failure already spent the budget."""
    for g in ("g1", "g2", "g3"):
        await running_game(store, g)
    rollout, _ = await store.create_rollout(parse_request(
        {"target_version": "1.1", "source_version": "1.0", "max_parallel": 2, "failure_budget": 1}), ALLOW, True)
    await lobby(store, JobKind.STOP, "g1")
    loop = loop_over(store, registry=True)
    entry = await store.engine_version_of(NEW)
    real = store.engine_version_of

    async def read_before_the_change(image):  # the target is deprecated just after the loop read it
        return entry if image == NEW else await real(image)

    store.engine_version_of = read_before_the_change  # type: ignore[method-assign]
    await store.update_version("1.1", status=VersionStatus.DEPRECATED, notes=None)
    await loop.tick()
    by = await rows(store, rollout.id)
    assert (by["g1"].state, by["g2"].state, by["g3"].state) == (GameState.SKIPPED, GameState.FAILED,
                                                                 GameState.WAITING), by
    r, _ = await store.get_rollout(rollout.id)
    assert r.state is RolloutState.PAUSED and r.state_reason.startswith("failure budget spent: 1 of 1")


async def test_a_failed_patch_still_rolling_back_spends_the_budget_for_new_patches(store):
    """Red-team, stop 44: max_parallel 2, failure_budget 1. g1's patch failed and rolls back; g2's succeeded,
    freeing a slot. The failure counted only once g1's rollback converged, so the free slots started more
    patches past a budget already spent. No new patch starts; the rollout pauses once g1 is rolled back."""
    for g in ("g1", "g2", "g3", "g4", "g5"):
        await running_game(store, g)
    rollout_id = await start(store, max_parallel=2, failure_budget=1, canary=0)
    loop = loop_over(store)
    await loop.tick()
    assert {g for g, r in (await rows(store, rollout_id)).items() if r.state is GameState.IN_PROGRESS} == {"g1", "g2"}
    rec = await store.mark_starting(await store.get("g1"), rollback_image=OLD)
    await store.fail_generation("g1", rec.generation, ErrorCode.ENGINE_UNREACHABLE, "never became healthy")
    await converge(store, "g2", NEW)
    await loop.tick()
    by = await rows(store, rollout_id)
    assert by["g2"].state is GameState.DONE and by["g1"].state is GameState.IN_PROGRESS
    assert [(await store.get(g)).desired_image_ref for g in ("g3", "g4", "g5")] == [OLD] * 3, "patched past the budget"
    await converge(store, "g1", OLD)
    await loop.tick()
    rollout, _ = await store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.PAUSED and "budget" in rollout.state_reason
    assert [(await store.get(g)).desired_image_ref for g in ("g3", "g4", "g5")] == [OLD] * 3


@pytest.mark.parametrize("edit", ["disable", "delete and register again"])
async def test_a_target_version_disabled_or_replaced_mid_rollout_pauses_it(store, edit):
    """Red-team, stop 44: the runbook says to disable a bad version; a rollout to it went on patching games
    onto it (under the default allowlist policy), and one whose version was deleted and registered again
    with another image went on with the old image. It pauses, saying why, before any further patch."""
    for g in ("g1", "g2", "g3"):
        await running_game(store, g)
    rollout_id = await start(store, max_parallel=1, canary=1, canary_hold=0)
    loop = loop_over(store)
    await loop.tick()
    assert (await store.get("g1")).desired_image_ref == NEW  # the canary's patch
    if edit == "disable":
        await store.update_version("1.1", status=VersionStatus.DISABLED, notes=None)
    else:
        await converge(store, "g1", NEW)
        await lobby(store, JobKind.PATCH, "g1", OLD)  # the only game on it goes back: the entry may go
        await converge(store, "g1", OLD)
        await store.delete_version("1.1")
        await store.create_version("1.1", "galaxy/engine-stub:1.3", VersionStatus.ACTIVE, "")
    await converge(store, "g1", (await store.get("g1")).desired_image_ref)
    await loop.tick()
    rollout, _ = await store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.PAUSED and "1.1" in rollout.state_reason, rollout.state_reason
    assert [(await store.get(g)).desired_image_ref for g in ("g2", "g3")] == [OLD, OLD]
