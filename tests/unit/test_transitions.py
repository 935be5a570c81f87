"""The pure rules of desired/: transitions (timestamps, rollback, engine observations), the crash
policy and snapshot reasons, as tables."""

from __future__ import annotations

from datetime import timedelta

import pytest

from desired import snapshots, transitions
from desired.model import ErrorCode, Health
from desired.policy import CrashPolicy, next_crash, rollback_target
from desired.transitions import Probe
from tests.support.transition_records import T0, S, rec

NOW = T0 + timedelta(minutes=5)
OBS = dict(unreachable_after=3, generation_timeout=600)

# (name, record, probe, expected status, expected probe_failures)
OBSERVATIONS = [
    ("healthy-idle-stays-running", rec(), Probe(healthy=True, admin_api=True, turn=4, phase="idle"), S.RUNNING, 0),
    ("one-failure-counts", rec(), Probe(healthy=False), S.RUNNING, 1),
    ("third-failure-is-unreachable", rec(probe_failures=2), Probe(healthy=False), S.ENGINE_UNREACHABLE, 3),
    ("unreachable-stays-unreachable", rec(S.ENGINE_UNREACHABLE, probe_failures=3, unreachable_since=T0),
     Probe(healthy=False), S.ENGINE_UNREACHABLE, 4),
    ("first-success-recovers", rec(S.ENGINE_UNREACHABLE, probe_failures=7, unreachable_since=T0),
     Probe(healthy=True), S.RUNNING, 0),
    ("recovers-into-a-generation", rec(S.ENGINE_UNREACHABLE, probe_failures=7, unreachable_since=T0),
     Probe(healthy=True, admin_api=True, turn=4, phase="generating"), S.GENERATION_IN_PROGRESS, 0),
    ("finished", rec(), Probe(healthy=True, admin_api=True, turn=9, phase="finished"), S.FINISHED, 0),
    ("generating", rec(), Probe(healthy=True, admin_api=True, turn=4, phase="generating"),
     S.GENERATION_IN_PROGRESS, 0),
    ("generated", rec(S.GENERATION_IN_PROGRESS, generation_started_at=T0),
     Probe(healthy=True, admin_api=True, turn=5, phase="idle"), S.RUNNING, 0),
    ("generation-failed", rec(S.GENERATION_IN_PROGRESS, generation_started_at=T0),
     Probe(healthy=True, admin_api=True, turn=4, phase="idle", failed_turn=5), S.GENERATION_FAILED, 0),
    ("an-old-failure-is-not-this-turn", rec(), Probe(healthy=True, admin_api=True, turn=6, phase="idle",
                                                     failed_turn=5), S.RUNNING, 0),
    ("failures-while-generating-wait", rec(S.GENERATION_IN_PROGRESS, generation_started_at=NOW - timedelta(
        seconds=60), probe_failures=0), Probe(healthy=False), S.GENERATION_IN_PROGRESS, 0),
    ("after-the-generation-timeout-they-count", rec(S.GENERATION_IN_PROGRESS, probe_failures=2,
                                                    generation_started_at=NOW - timedelta(seconds=601)),
     Probe(healthy=False), S.ENGINE_UNREACHABLE, 3),
    ("no-admin-api-health-only", rec(admin_api=False, turn=None, phase=None), Probe(healthy=True), S.RUNNING, 0),
    ("not-up-is-not-observed", rec(S.STOPPED, current_container_id=None), Probe(healthy=False), S.STOPPED, 0),
]


@pytest.mark.parametrize(("record", "probe", "status", "failures"), [o[1:] for o in OBSERVATIONS],
                         ids=[o[0] for o in OBSERVATIONS])
def test_observed(record, probe, status, failures) -> None:
    new = transitions.observed(record, NOW, probe, **OBS)
    assert new.status is status and new.probe_failures == failures
    new.validate()
    if new.status is S.ENGINE_UNREACHABLE and record.status is not S.ENGINE_UNREACHABLE:
        assert new.unreachable_since == NOW
    if probe.healthy and record.status.is_up:
        assert new.health is Health.HEALTHY and new.unreachable_since is None


def test_an_unchanged_observation_changes_nothing() -> None:
    """The health round writes only when something changed: nothing per probe."""
    r = rec(health=Health.HEALTHY, admin_api=True)
    assert transitions.observed(r, NOW, Probe(healthy=True, admin_api=True, turn=4, phase="idle"), **OBS) == r
    # and the record itself comes back, no copy: the health round makes this call per engine per round
    assert transitions.observed(r, NOW, Probe(healthy=True, admin_api=True, turn=4, phase="idle"), **OBS) is r


def test_a_new_turn_restarts_the_clock() -> None:
    new = transitions.observed(rec(), NOW, Probe(healthy=True, admin_api=True, turn=5, phase="idle"), **OBS)
    assert new.turn == 5 and new.last_turn_at == NOW


@pytest.mark.parametrize(("old", "new", "forced", "reason"), [
    (None, rec(S.STARTING, current_container_id=None, started_at=None), None, "started"),
    (rec(S.STARTING), rec(), None, "started"),
    (rec(), rec(S.STOPPED), None, "stopped"),
    (rec(), rec(S.ENGINE_UNREACHABLE), None, "engine_unreachable"),
    (rec(S.ENGINE_UNREACHABLE), rec(), None, "recovered"),
    (rec(), rec(S.GENERATION_IN_PROGRESS), None, "generation_started"),
    (rec(S.GENERATION_IN_PROGRESS), rec(turn=5), None, "turn_generated"),
    (rec(S.GENERATION_IN_PROGRESS), rec(S.GENERATION_FAILED), None, "generation_failed"),
    (rec(), rec(S.FINISHED), None, "finished"),
    (rec(), rec(paused=True), None, "paused"),
    (rec(paused=True), rec(), None, "resumed"),
    (rec(), rec(turn=5), None, "turn_generated"),
    (rec(), rec(), None, None),                        # nothing Lobby sees changed
    (rec(), rec(crash_count=1), None, None),
    (rec(), rec(S.STARTING), "crashed", "crashed"),
    (rec(), rec(), "resync", "resync"),
])
def test_snapshot_reasons(old, new, forced, reason) -> None:
    assert snapshots.reason_for(old, new, forced) == reason
    assert reason is None or reason in snapshots.REASONS


def test_snapshot_fields_are_all_strings_and_complete() -> None:
    new = rec(S.STARTING, last_exit_code=137, last_error_code=ErrorCode.CONTAINER_START_FAILED,
              last_error_message="boom", snapshot_revision=4)
    body = snapshots.fields(new, previous=S.RUNNING, reason="crashed", snapshot_id="x", now=NOW)
    assert list(body) == list(snapshots.FIELDS) and all(isinstance(v, str) for v in body.values())
    assert (body["revision"], body["exit_code"], body["error_code"], body["engine_endpoint"]) == \
        ("4", "137", "container_start_failed", "")
    calm = snapshots.fields(rec(last_exit_code=137), previous=S.STARTING, reason="started", snapshot_id="y",
                            now=NOW)
    assert calm["exit_code"] == "" and calm["engine_endpoint"] == "http://galaxy-game-g1:8080"


POLICY = CrashPolicy(limit=3, window=600, backoff_max=30)


@pytest.mark.parametrize(("count", "last", "expected_count", "give_up", "delay"), [
    (0, None, 1, False, 0.1),
    (1, NOW - timedelta(seconds=10), 2, False, 0.2),
    (2, NOW - timedelta(seconds=10), 3, True, 0.0),
    (2, NOW - timedelta(seconds=601), 1, False, 0.1),  # outside the window: counting starts again
])
def test_crash_policy(count, last, expected_count, give_up, delay) -> None:
    v = next_crash(rec(crash_count=count, last_crash_at=last), NOW, POLICY)
    assert (v.count, v.give_up, v.delay) == (expected_count, give_up, pytest.approx(delay))


def test_crash_backoff_is_capped() -> None:
    v = next_crash(rec(crash_count=20, last_crash_at=NOW), NOW, CrashPolicy(limit=100, window=600, backoff_max=30))
    assert v.delay == 30


@pytest.mark.parametrize(("record", "target"), [
    (rec(desired_image_ref="img:2"), "img:1"),                               # failed before touching it
    (rec(), None),                                     # the generation asked for the image that runs
    (rec(S.STARTING, rollback_image_ref="img:1"), None),  # a restart on the same image: nothing to go back to
    (rec(S.STARTING, rollback_image_ref="img:0"), "img:0"),                  # replacing a running engine
    (rec(S.STARTING), None),                                                 # a start of a stopped game
    (rec(S.STARTING, rollback_image_ref="img:0", rolling_back=True), None),  # only once
    (rec(S.STOPPED, current_container_id=None), None),
])
def test_rollback_target(record, target) -> None:
    assert rollback_target(record) == target


@pytest.mark.parametrize("step_back", [0, 3600])
def test_timestamps_never_break_an_invariant_when_the_clock_steps_back(step_back) -> None:
    r = rec(last_op_at=NOW)
    earlier = NOW - timedelta(seconds=step_back)
    stopped = transitions.stopped(r, earlier, container_id="c1")
    stopped.validate()
    assert stopped.stopped_at >= stopped.started_at and stopped.last_op_at >= r.last_op_at
    removed = transitions.removed(stopped, earlier)
    removed.validate()
    started = transitions.running(transitions.starting(stopped, earlier, rollback_image=None), earlier,
                                  container_id="c2", image="img:1")
    started.validate()
    assert started.started_at >= started.created_at


_SCHEDULED = dict(admin_api=True, turn_interval=60, last_turn_at=T0 + timedelta(seconds=5))


@pytest.mark.parametrize(("old", "new", "moves"), [
    (None, rec(S.STARTING, current_container_id=None, started_at=None), False),  # a new game: due once running
    (rec(S.STARTING, **_SCHEDULED), rec(**_SCHEDULED), True),                   # converged: due from now on
    (rec(admin_api=True), rec(admin_api=True, turn=5, last_turn_at=T0), False),  # no schedule: never due
    (rec(admin_api=True), rec(admin_api=True, desired_turn=5, generation=4), False),  # a forced turn, unscheduled
    (rec(**_SCHEDULED), rec(**_SCHEDULED, desired_turn=5, generation=4), False),  # a turn asked: not due meanwhile
    (rec(**_SCHEDULED, turn=5, desired_turn=5, generation=4, observed_generation=3),
     rec(**_SCHEDULED | {"last_turn_at": T0 + timedelta(seconds=9)}, turn=5, desired_turn=5, generation=4,
         observed_generation=4), True),  # the turn generated: due again later
    (rec(**_SCHEDULED), rec(**_SCHEDULED | {"turn_interval": 30}), True),       # a new interval
    (rec(admin_api=True), rec(**_SCHEDULED), True),                             # a schedule set
    (rec(**_SCHEDULED, paused=True), rec(**_SCHEDULED), True),                  # resumed
    (rec(**_SCHEDULED), rec(**_SCHEDULED, paused=True), False),                 # paused: the clock finds it gone
    (rec(**_SCHEDULED), rec(**_SCHEDULED, probe_failures=1), False),           # nothing the clock reads
])
def test_what_moves_the_turn_clock(old, new, moves) -> None:
    """The clock is woken when a commit makes a game due at a time it was not due at before (it became
    due-able, or its due time moved); a game that stops being due needs no wake: the clock's next look
    finds it gone. So a forced turn of a game with no schedule, the most frequent write of a turn, wakes
    nothing (issue 25)."""
    assert transitions.moves_the_clock(old, new) is moves
