"""The pure decisions of rollouts (desired/rollouts.py), as tables: the request, which games start
next, whether the canary held, whether the budget is spent, what became of a patch."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from desired.jobs import DecisionAction
from desired.model import DesiredStatus, ErrorCode, JobKind, OpStatus, Status, StopReason
from desired.rollouts import (
    Action,
    GameState,
    InvalidRollout,
    OnFailure,
    OpView,
    Rollout,
    RolloutGame,
    RolloutState,
    RolloutStep,
    allowed,
    counts,
    follow,
    not_ready,
    parse_request,
    plan,
    skip_reason,
    step_outcome,
)
from tests.support.job_records import NOW, T0, rec

OLD, NEW = "galaxy/engine:1", "galaxy/engine:2"
W, P, D, F, R, S = (GameState.WAITING, GameState.IN_PROGRESS, GameState.DONE, GameState.FAILED,
                    GameState.ROLLED_BACK, GameState.SKIPPED)


def rollout(**kw) -> Rollout:
    base = dict(id=1, target_version="2", target_image_ref=NEW, source_version="1", state=RolloutState.RUNNING,
                max_parallel=3, canary=1, canary_hold=30.0, failure_budget=2, on_failure=OnFailure.ROLLBACK,
                force=False, state_reason="", created_at=T0, updated_at=T0)
    base.update(kw)
    return Rollout(**base)


def games(*states: GameState | tuple[GameState, bool], finished=NOW) -> list[RolloutGame]:
    out = []
    for n, s in enumerate(states):
        state, canary = s if isinstance(s, tuple) else (s, False)
        out.append(RolloutGame(rollout_id=1, game_id=f"g{n}", position=n, state=state, canary=canary,
                               from_image_ref=OLD, finished_at=finished if state.is_final else None))
    return out


def started(p) -> list[tuple[str, bool]]:
    return p.start


# ---------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("states, kw, want", [
    # canary first: one game, as a canary, whatever max_parallel
    ((W, W, W, W), {}, [("g0", True)]),
    # the canary is in flight (or holding): the rest wait
    (((P, True), W, W, W), {}, []),
    # the canary held: max_parallel of the rest
    (((D, True), W, W, W, W), {}, [("g1", False), ("g2", False), ("g3", False)]),
    # slots: two in flight leave one
    (((D, True), P, P, W, W), {}, [("g3", False)]),
    (((D, True), P, P, P, W), {}, []),
    # no canary: max_parallel at once
    ((W, W, W, W), {"canary": 0}, [("g0", False), ("g1", False), ("g2", False)]),
    # a canary skipped (not running) does not count: the next game is the canary
    ((S, W, W), {}, [("g1", True)]),
    # ... nor one skipped after it began (another job took the game, it finished): the next is the canary
    (((S, True), W, W), {}, [("g1", True)]),
    (((S, True), (D, True), W, W), {"canary": 2}, [("g2", True)]),
    # a canary that held counts, one in flight (or being patched back) holds the rest
    (((S, True), (D, True), W, W), {}, [("g2", False), ("g3", False)]),
    (((S, True), (P, True), W, W), {}, []),
    # two canaries, max_parallel 1: one at a time
    (((D, True), W, W), {"canary": 2, "max_parallel": 1}, [("g1", True)]),
    # a rollout that is not running starts nothing
    ((W, W), {"state": RolloutState.PAUSED}, []),
    ((W, W), {"state": RolloutState.ABORTED}, []),
])
def test_plan_starts(states, kw, want):
    p = plan(rollout(**kw), games(*states))
    assert p.pause is None and not p.complete
    assert started(p) == want


@pytest.mark.parametrize("states, kw, passed, want", [
    # a game briefly not up is passed over: the next one starts in its place
    (((D, True), W, W, W), {}, {"g1"}, [("g2", False), ("g3", False)]),
    # ... as a canary too
    ((W, W), {}, {"g0"}, [("g1", True)]),
    # every waiting game passed over: nothing starts, and the rollout is not complete
    (((D, True), W), {}, {"g1"}, []),
])
def test_plan_passes_over_games_not_ready(states, kw, passed, want):
    p = plan(rollout(**kw), games(*states), frozenset(passed))
    assert p.pause is None and not p.complete and started(p) == want


@pytest.mark.parametrize("states, kw, pause", [
    # a canary failed or was rolled back: pause, whatever the budget
    (((R, True), W, W), {"failure_budget": 5}, "canary g0 rolled_back"),
    (((F, True), W, W), {"failure_budget": 5}, "canary g0 failed"),
    # the budget: two failures of two
    (((D, True), F, R, P, W), {}, "failure budget spent: 2 of 2"),
    # one failure of two: go on
    (((D, True), F, D, W), {}, None),
    # a skip is not a failure
    (((D, True), S, S, S, W), {"failure_budget": 1}, None),
])
def test_plan_pauses(states, kw, pause):
    p = plan(rollout(**kw), games(*states))
    if pause is None:
        assert p.pause is None
    else:
        assert p.pause is not None and p.pause.startswith(pause), p.pause


def test_failures_before_a_resume_do_not_count():
    gs = games((R, True), F, W, W, finished=NOW)
    r = rollout(resumed_at=NOW + timedelta(seconds=1))
    p = plan(r, gs)
    # the canary that failed before the resume no longer counts, as a failure nor as a canary: the
    # rollout goes on with a new canary, which must hold before the rest proceed
    assert p.pause is None and p.start == [("g2", True)]
    later = [dataclasses.replace(g, finished_at=NOW + timedelta(seconds=5)) if g.game_id == "g1" else g for g in gs]
    later = [dataclasses.replace(g, state=F, finished_at=NOW + timedelta(seconds=5)) if g.game_id == "g2" else g
             for g in later]
    assert plan(r, later).pause is not None  # two failures after the resume


def test_a_patch_that_failed_and_still_rolls_back_counts_against_the_budget_at_once():
    """Red-team, stop 44: a failed patch counted only once its rollback had converged (a stop, a restore, the
    old engine's health: tens of seconds). With room for several patches at once, the slots other games
    freed meanwhile started more patches past a budget already spent. Such a game now keeps its slot and
    counts as a failure for what the plan starts."""
    r = rollout(canary=0, max_parallel=3, failure_budget=1)
    gs = games(P, D, W, W, W)  # g0's patch failed, its rollback under way; g1 done
    assert plan(r, gs).start  # not known as failing: room for two more
    p = plan(r, gs, failing=frozenset({"g0"}))
    assert p.start == [] and p.pause is None  # no new patch; paused once the rollback is over (counted then)
    r2 = rollout(canary=0, max_parallel=3, failure_budget=2)
    assert [g for g, _ in plan(r2, gs, failing=frozenset({"g0"})).start] == ["g2", "g3"]  # within the budget


def test_follow_says_when_a_game_in_flight_has_failed():
    g = RolloutGame(rollout_id=1, game_id="g1", position=0, state=P, from_image_ref=OLD, operation_id=7,
                    started_at=NOW)
    assert follow(rollout(), g, FAIL, ROLLING_BACK, NOW).failing
    assert not follow(rollout(), g, _op(OpStatus.RUNNING), _running(), NOW).failing


@pytest.mark.parametrize("states, complete", [
    (((D, True), D, F, S, R), True),
    (((D, True), D, P), False),
    (((D, True), W), False),
])
def test_plan_completes(states, complete):
    assert plan(rollout(failure_budget=5), games(*states)).complete is complete


def test_counts_name_every_state():
    assert counts(games(W, P, D, D, S)) == {"waiting": 1, "in_progress": 1, "done": 2, "failed": 0,
                                            "rolled_back": 0, "skipped": 1}


# ---------------------------------------------------------------------------------------- skip_reason
def _running(**kw):
    r = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=1, obs=1)
    return r.replace(**kw)


@pytest.mark.parametrize("record, reason", [
    (None, "no runtime record"),
    (rec(Status.STOPPED, DesiredStatus.STOPPED, gen=2, obs=2), "not running (desired stopped, status stopped)"),
    (rec(Status.STOPPED, DesiredStatus.STOPPED, gen=2, obs=2, last_error_message="crash loop: 5 crashes"),
     "not running: given up after a crash loop"),
    (rec(Status.REMOVED, DesiredStatus.REMOVED, gen=3, obs=3), "not running (desired removed, status removed)"),
    (_running(status=Status.FINISHED), "the game is finished"),
    (_running(desired_image_ref="other/engine:1", current_image_ref="other/engine:1"), "runs other/engine:1"),
    # another job moved the game off its image of when the rollout began: never patched over
    (_running(desired_image_ref="galaxy/engine:3", current_image_ref=OLD), "moved by another job"),
    # ... unless to the target itself (the patch joins or replays it)
    (_running(desired_image_ref=NEW, current_image_ref=OLD), None),
    (_running(desired_image_ref=OLD, current_image_ref=OLD), None),
    # briefly not up: not a reason to skip (not_ready makes it wait)
    (_running(status=Status.ENGINE_UNREACHABLE, desired_image_ref=OLD), None),
    (rec(Status.STARTING, DesiredStatus.RUNNING, gen=2, obs=1).replace(desired_image_ref=OLD), None),
])
def test_skip_reason(record, reason):
    got = skip_reason(record, NEW, OLD)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason), got


@pytest.mark.parametrize("record, waits", [
    (_running(), False),
    (_running(status=Status.GENERATION_IN_PROGRESS), False),  # the patch waits for the turn boundary
    (_running(status=Status.GENERATION_FAILED), False),
    (_running(status=Status.ENGINE_UNREACHABLE), True),
    (rec(Status.STARTING, DesiredStatus.RUNNING, gen=2, obs=1), True),  # restarting after a crash
    (rec(Status.STOPPED, DesiredStatus.RUNNING, gen=2, obs=1), True),   # being started again
])
def test_not_ready(record, waits):
    got = not_ready(record)
    assert (got is not None) is waits, got
    if waits:
        assert got.startswith("waiting: not up now")


@pytest.mark.parametrize("expect, back, action, state, reason", [
    (W, False, DecisionAction.CHANGE, P, "step"),
    (W, False, DecisionAction.JOIN, P, "step"),
    (W, False, DecisionAction.REPLAY, D, "already on the target version"),
    (W, False, DecisionAction.REJECT, F, "image_rejected: no"),
    # a patch back: in flight while it runs, never the success state when refused
    (P, True, DecisionAction.CHANGE, P, "canary unhealthy; patching back to galaxy/engine:1"),
    (P, True, DecisionAction.REJECT, F, "canary unhealthy; the patch back was refused (image_rejected: no)"),
    (P, True, DecisionAction.REPLAY, R, "canary unhealthy; back on its previous image"),
    # a stop (on_failure stop) records its step whatever admission made of it
    (P, False, DecisionAction.REPLAY, F, "step"),
])
def test_step_outcome(expect, back, action, state, reason):
    step_reason = "canary unhealthy; patching back to galaxy/engine:1" if back else "step"
    step = RolloutStep(rollout_id=1, expect=expect, state=P if (expect is W or back) else F, reason=step_reason,
                       back=back)
    got = step_outcome(step, action, ErrorCode.IMAGE_REJECTED if action is DecisionAction.REJECT else None, "no")
    assert got == (state, reason)


# -------------------------------------------------------------------------------------------- follow
def _op(status: OpStatus, code: ErrorCode | None = None, message: str = "", at=NOW) -> OpView:
    return OpView(status=status, error_code=code, error_message=message, finished_at=at if status.is_final else None)


ON_NEW = dict(current_image_ref=NEW, desired_image_ref=NEW)
BACK = dict(current_image_ref=OLD, desired_image_ref=OLD)


FAIL = _op(OpStatus.FAILED, ErrorCode.ENGINE_UNHEALTHY, "no answer")
ROLLING_BACK = rec(Status.STARTING, DesiredStatus.RUNNING, gen=3, obs=2, rolling_back=True)  # old engine not up yet
LATER = NOW + timedelta(seconds=10)


@pytest.mark.parametrize("name, r, canary, op, record, now, state, then", [
    ("still going", {}, False, _op(OpStatus.RUNNING), _running(), NOW, P, None),
    ("done", {}, False, _op(OpStatus.SUCCEEDED), _running(**ON_NEW), NOW, D, None),
    ("moved off by another job", {}, False, _op(OpStatus.SUCCEEDED), _running(**BACK), NOW, S, None),
    ("superseded", {}, False, _op(OpStatus.FAILED, ErrorCode.SUPERSEDED, "replaced"), _running(), NOW, S, None),
    # a failed patch stays in flight (holding its slot) until its rollback has converged
    ("failed, rolling back", {}, False, FAIL, ROLLING_BACK, NOW, P, None),
    ("failed, rolled back", {}, False, FAIL, _running(**BACK), NOW, R, None),
    ("failed, rollback failed: stopped", {}, False, FAIL, rec(Status.STOPPED, DesiredStatus.STOPPED, gen=4, obs=4),
     NOW, F, None),
    ("failed, going down", {}, False, FAIL, rec(Status.RUNNING, DesiredStatus.STOPPED, gen=4, obs=3), NOW, P, None),
    ("failed, then moved by another job", {}, False, FAIL,
     _running(desired_image_ref="galaxy/engine:3", current_image_ref="galaxy/engine:3"), NOW, F, None),
    ("rolled back, on_failure stop: stopped at once", {"on_failure": OnFailure.STOP}, False, FAIL, ROLLING_BACK,
     NOW, F, JobKind.STOP),
    ("failed and stopped (no rollback possible)", {}, False, _op(OpStatus.FAILED, ErrorCode.ENGINE_UNHEALTHY),
     rec(Status.STOPPED, DesiredStatus.STOPPED, gen=3, obs=3), NOW, F, None),
    # the canary's hold
    ("canary holding", {}, True, _op(OpStatus.SUCCEEDED), _running(**ON_NEW), LATER, P, None),
    ("canary held", {}, True, _op(OpStatus.SUCCEEDED), _running(**ON_NEW), NOW + timedelta(seconds=30), D, None),
    ("canary generating is healthy", {}, True, _op(OpStatus.SUCCEEDED),
     _running(status=Status.GENERATION_IN_PROGRESS, **ON_NEW), LATER, P, None),
    # engine evidence: patched back (the row stays in flight until the patch back has converged)
    ("canary unreachable: patched back", {}, True, _op(OpStatus.SUCCEEDED),
     _running(status=Status.ENGINE_UNREACHABLE, **ON_NEW), LATER, P, JobKind.PATCH),
    ("canary generation failed: patched back", {}, True, _op(OpStatus.SUCCEEDED),
     _running(status=Status.GENERATION_FAILED, **ON_NEW), LATER, P, JobKind.PATCH),
    ("canary crashed: patched back", {}, True, _op(OpStatus.SUCCEEDED),
     _running(last_crash_at=NOW + timedelta(seconds=2), **ON_NEW), LATER, P, JobKind.PATCH),
    ("canary restarting after a crash: patched back", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.STARTING, DesiredStatus.RUNNING, gen=1, obs=1, last_crash_at=NOW + timedelta(seconds=2), **ON_NEW),
     LATER, P, JobKind.PATCH),
    ("canary given up after a crash loop: failed, already stopped", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.RUNNING, DesiredStatus.STOPPED, gen=2, obs=1, last_crash_at=NOW + timedelta(seconds=2), **ON_NEW),
     LATER, F, None),
    ("canary crashed before its patch: healthy", {}, True, _op(OpStatus.SUCCEEDED),
     _running(last_crash_at=NOW - timedelta(seconds=2), **ON_NEW), LATER, P, None),
    ("canary unhealthy, on_failure stop", {"on_failure": OnFailure.STOP}, True, _op(OpStatus.SUCCEEDED),
     _running(status=Status.ENGINE_UNREACHABLE, **ON_NEW), LATER, F, JobKind.STOP),
    # other jobs during the hold: no engine failure
    ("canary restarted by Lobby: waits for it", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.STARTING, DesiredStatus.RUNNING, gen=2, obs=1, **ON_NEW), NOW + timedelta(seconds=60), P, None),
    ("canary's game finished: skipped", {}, True, _op(OpStatus.SUCCEEDED),
     _running(status=Status.FINISHED, **ON_NEW), LATER, S, None),
    ("canary stopped by Lobby: skipped", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.RUNNING, DesiredStatus.STOPPED, gen=2, obs=1, **ON_NEW), LATER, S, None),
    # red-team, stop 44: restarted (by Lobby, a drain's move) during its hold, the target's engine did not come
    # back healthy, and the failure stopped the game: the engine's evidence, not another job's stop
    ("canary restarted, its engine failed: failed, already stopped", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.STOPPED, DesiredStatus.STOPPED, gen=3, obs=3, last_error_code=ErrorCode.ENGINE_UNHEALTHY,
         last_op_at=NOW + timedelta(seconds=5), **ON_NEW), LATER, F, None),
    ("canary's restart failing: failed, going down", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.STARTING, DesiredStatus.STOPPED, gen=3, obs=2, last_error_code=ErrorCode.CONTAINER_START_FAILED,
         last_op_at=NOW + timedelta(seconds=5), **ON_NEW), LATER, F, None),
    # review: a stop by the node-loss policy, or a restart answered after a Docker outage, is not the engine's
    ("canary's restart given up on a Docker outage: skipped", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.RUNNING, DesiredStatus.STOPPED, gen=3, obs=2, last_error_code=ErrorCode.DOCKER_UNAVAILABLE,
         last_op_at=NOW + timedelta(seconds=5), **ON_NEW), LATER, S, None),
    ("canary failed before its patch, stopped by Lobby since: skipped", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.STOPPED, DesiredStatus.STOPPED, gen=3, obs=3, last_error_code=ErrorCode.ENGINE_UNHEALTHY,
         stop_reason=StopReason.CANCELLED, last_op_at=NOW + timedelta(seconds=5), **ON_NEW), LATER, S, None),
    ("canary patched back by Lobby: skipped", {}, True, _op(OpStatus.SUCCEEDED),
     rec(Status.RUNNING, DesiredStatus.RUNNING, gen=2, obs=1, current_image_ref=NEW, desired_image_ref=OLD), LATER,
     S, None),
    ("no canary hold: done at once", {"canary_hold": 0.0}, True, _op(OpStatus.SUCCEEDED), _running(**ON_NEW),
     NOW, D, None),
    # the operation row is gone (retention): read from the record
    ("operation gone, on the target", {}, False, None, _running(**ON_NEW), NOW, D, None),
    ("operation gone, not converged", {}, False, None, ROLLING_BACK, NOW, P, None),
    ("operation gone, back on the old image", {}, False, None, _running(**BACK), NOW, R, None),
    ("operation gone, no record", {}, False, None, None, NOW, F, None),
])
def test_follow(name, r, canary, op, record, now, state, then):
    g = RolloutGame(rollout_id=1, game_id="g1", position=0, state=P, canary=canary, from_image_ref=OLD,
                    operation_id=7, started_at=NOW)
    v = follow(rollout(**r), g, op, record, now)
    assert (v.state, v.then) == (state, then), (name, v)
    if then is JobKind.PATCH:
        assert v.image_ref == OLD


PATCHING_BACK = f"canary unhealthy within its hold (crashed); patching back to {OLD}"


@pytest.mark.parametrize("name, back, record, state, reason", [
    ("patch back in flight", _op(OpStatus.QUEUED), ROLLING_BACK, P, PATCHING_BACK),
    ("patch back done, old engine not up yet", _op(OpStatus.SUCCEEDED), ROLLING_BACK, P, PATCHING_BACK),
    ("patch back converged", _op(OpStatus.SUCCEEDED), _running(**BACK), R,
     f"canary unhealthy within its hold (crashed); patched back to {OLD}"),
    ("patch back failed: stopped", FAIL, rec(Status.STOPPED, DesiredStatus.STOPPED, gen=4, obs=4), F,
     "canary unhealthy within its hold (crashed); patch back failed; stopped"),
    ("patch back failed: rolled back to the target", FAIL, _running(**ON_NEW), F,
     f"canary unhealthy within its hold (crashed); now on {NEW}"),
    ("patch back's operation gone", None, _running(**BACK), R,
     f"canary unhealthy within its hold (crashed); patched back to {OLD}"),
])
def test_follow_a_canary_patched_back(name, back, record, state, reason):
    g = RolloutGame(rollout_id=1, game_id="g1", position=0, state=P, canary=True, from_image_ref=OLD,
                    operation_id=7, back_operation_id=8, reason=PATCHING_BACK)
    v = follow(rollout(), g, _op(OpStatus.SUCCEEDED), record, LATER, back)
    assert (v.state, v.reason, v.then) == (state, reason, None), name


# --------------------------------------------------------------------------------------------- request
def test_parse_request_defaults():
    req = parse_request({"target_version": "2", "source_version": "1"})
    assert (req.max_parallel, req.canary, req.canary_hold, req.failure_budget, req.on_failure, req.force) == (
        1, 0, 60.0, 1, OnFailure.ROLLBACK, False)


@pytest.mark.parametrize("body, message", [
    ([], "the body must be a JSON object"),
    ({"source_version": "1"}, "field target_version"),
    ({"target_version": "2"}, "give exactly one"),
    ({"target_version": "2", "source_version": "1", "game_ids": ["a"]}, "give exactly one"),
    ({"target_version": "2", "source_version": "2"}, "field source_version must differ"),
    ({"target_version": "2", "game_ids": []}, "field game_ids"),
    ({"target_version": "2", "game_ids": ["../x"]}, "field game_ids"),
    ({"target_version": "2", "game_ids": ["a", "a"]}, "field game_ids names a game twice"),
    ({"target_version": "2", "source_version": "1", "max_parallel": 0}, "field max_parallel"),
    ({"target_version": "2", "source_version": "1", "max_parallel": True}, "field max_parallel"),
    ({"target_version": "2", "source_version": "1", "max_parallel": 101}, "field max_parallel"),
    ({"target_version": "2", "source_version": "1", "canary": -1}, "field canary"),
    ({"target_version": "2", "source_version": "1", "canary_hold": "x"}, "field canary_hold"),
    ({"target_version": "2", "source_version": "1", "failure_budget": 0}, "field failure_budget"),
    ({"target_version": "2", "source_version": "1", "on_failure": "explode"}, "field on_failure"),
    ({"target_version": "2", "source_version": "1", "force": "yes"}, "field force"),
    ({"target_version": "2", "source_version": "1", "extra": 1}, "field extra is not a field"),
])
def test_parse_request_refuses(body, message):
    with pytest.raises(InvalidRollout, match=message):
        parse_request(body)


@pytest.mark.parametrize("state, action, want", [
    (RolloutState.RUNNING, Action.PAUSE, RolloutState.PAUSED),
    (RolloutState.PAUSED, Action.PAUSE, RolloutState.PAUSED),
    (RolloutState.PAUSED, Action.RESUME, RolloutState.RUNNING),
    (RolloutState.RUNNING, Action.ABORT, RolloutState.ABORTED),
    (RolloutState.PAUSED, Action.ABORT, RolloutState.ABORTED),
    (RolloutState.ABORTED, Action.ABORT, RolloutState.ABORTED),
    (RolloutState.COMPLETED, Action.ABORT, None),
    (RolloutState.COMPLETED, Action.RESUME, None),
    (RolloutState.ABORTED, Action.RESUME, None),
    (RolloutState.ABORTED, Action.PAUSE, None),
])
def test_allowed_actions(state, action, want):
    assert allowed(state, action) is want


@pytest.mark.parametrize("entry, registry, refused", [
    (dict(version="2", image_ref=NEW, status="active"), False, None),
    (dict(version="2", image_ref=NEW, status="deprecated"), False, None),
    (dict(version="2", image_ref=NEW, status="deprecated"), True, "deprecated"),
    (dict(version="2", image_ref=NEW, status="disabled"), False, "disabled"),
    (None, False, "no longer registered"),  # deleted (and perhaps made again with another image)
    (dict(version="3", image_ref=NEW, status="active"), False, "version 3"),  # the image moved to another version
])
def test_a_target_version_the_registry_no_longer_allows_stops_the_rollout(entry, registry, refused):
    """Red-team, stop 44: the rollout never read its target version again. Disabling it (the runbook's way to
    stop a bad version) or deleting it and registering the name again with another image left the rollout
    patching games onto the old image. What the registry now says of the target is read before each step
    that starts patches; a refusal pauses the rollout with the reason."""
    from desired.rollouts import target_refusal
    from desired.versions import EngineVersion, VersionStatus

    found = None if entry is None else EngineVersion(version=entry["version"], image_ref=entry["image_ref"],
                                                     status=VersionStatus(entry["status"]), notes="",
                                                     created_at=T0, updated_at=T0)
    got = target_refusal(rollout(), found, registry=registry)
    if refused is None:
        assert got is None
    else:
        assert got is not None and refused in got, got


def test_a_canary_the_node_loss_policy_stops_is_judged_by_that_stop_not_by_an_earlier_error():
    """Review, stop 44: the node-loss stop kept the record's last error code from long before (a turn answered
    engine_unreachable weeks ago): whether the canary counted as failed depended on that history. The stop
    now carries its own code (docker_unavailable: the node out of reach, not the engine): the canary is
    skipped, not counted, whatever came before (only the engine fails a canary)."""
    from desired import transitions

    g = RolloutGame(rollout_id=1, game_id="g1", position=0, state=P, canary=True, from_image_ref=OLD,
                    operation_id=7, started_at=NOW)
    running = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=5, obs=5, last_error_code=ErrorCode.ENGINE_UNREACHABLE,
                  last_error_message="old", **ON_NEW)
    lost = transitions.node_lost(running, NOW + timedelta(seconds=2), node="n1")
    stopped = transitions.stopped_for_node_loss(lost, NOW + timedelta(seconds=5),
                                                message="stopped: its node n1 was lost for more than 60s")
    assert stopped.last_error_code is ErrorCode.DOCKER_UNAVAILABLE
    clean = transitions.stopped_for_node_loss(transitions.node_lost(running.replace(last_error_code=None),
                                                                    NOW + timedelta(seconds=2), node="n1"),
                                              NOW + timedelta(seconds=5), message="stopped: its node n1 was lost")
    for rec_ in (stopped, clean):
        assert follow(rollout(), g, _op(OpStatus.SUCCEEDED), rec_, LATER).state is S
