"""A turn that cannot be had, for whatever reason, says nothing against running the game.

Found by a red-team reading: a Docker outage longer than RTMANAGER_JOB_TIMEOUT failed the generation of
every game with a turn pending (the turn clock keeps asking while only Postgres is needed), and the
general failure (desired/transitions.py ``failed``) stops a game that was wanted running: when Docker
came back, every game that had a turn due during the outage was stopped, its engine healthy all along
(and removed for good by the cleanup TTL a day later)."""

from __future__ import annotations

import pytest

from desired.errors import DockerUnavailable
from desired.model import DesiredStatus, ErrorCode, JobKind, Status
from tests.support.world import World, started


async def overdue_in_an_outage(w: World, code: ErrorCode = ErrorCode.DOCKER_UNAVAILABLE,
                               timeout: float | None = None) -> None:
    """Docker goes away; the game's look fails, and the job waits past ``timeout`` (the job timeout):
    the worker's ``fail_if_overdue`` then gives it up with ``code``."""
    timeout = w.settings.runtime.job_timeout if timeout is None else timeout
    w.backend.down = True
    with pytest.raises(DockerUnavailable):
        await w.sync("g1")
    w.store.clock.advance(timeout + 1)
    await w.reconciler.fail_if_overdue("g1", code, "away", timeout)


@pytest.mark.parametrize("code,timeout", [(ErrorCode.DOCKER_UNAVAILABLE, "job_timeout"),
                                          (ErrorCode.CONTAINER_START_FAILED, "start_timeout")])
async def test_an_overdue_turn_fails_the_turn_and_the_game_keeps_running(tmp_path, code, timeout):
    w = World(tmp_path)
    rec = await started(w)
    unit = rec.current_container_id
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    # Docker away: the turn's step cannot look at the unit
    await overdue_in_an_outage(w, code, getattr(w.settings.runtime if timeout == "job_timeout" else w.settings.engine,
                                                timeout))
    assert w.results("g1")[-1] == ("force_next_turn", "failure", code.value)
    rec = w.store.records["g1"]
    assert rec.desired_status is DesiredStatus.RUNNING and rec.desired_turn == rec.turn
    w.backend.down = False  # Docker is back: nothing to do, the engine still runs
    calls = len(w.backend.calls)
    rec = await w.sync("g1")
    assert {c[0] for c in w.backend.calls[calls:]} == {"inspect"}  # looks only: no stop, no create
    assert [c.id for c in w.running("g1")] == [unit] and rec.converged
    assert [r for r in w.results("g1") if r[0] == "force_next_turn"] == [("force_next_turn", "failure", code.value)]


async def test_a_start_that_cannot_converge_is_still_given_up_with_the_game_stopped(tmp_path):
    """The general rule stands for jobs that asked the game to run: Lobby was told they failed."""
    w = World(tmp_path)
    await w.job(JobKind.START, "g1", "galaxy/engine-stub:1.0")
    await overdue_in_an_outage(w)
    assert w.results("g1")[-1] == ("start", "failure", "docker_unavailable")
    assert w.store.records["g1"].desired_status is DesiredStatus.STOPPED


@pytest.mark.parametrize("asked,stays", [
    ({JobKind.TURN}, True), ({JobKind.FORCE_NEXT_TURN, JobKind.PAUSE}, True), ({JobKind.PAUSE}, True),
    ({JobKind.RESUME}, True), ({JobKind.RECONCILE}, True), ({JobKind.TURN, JobKind.RESTART}, False),
    ({JobKind.START}, False), ((), False),
])
def test_only_jobs_that_change_what_runs_can_stop_a_game_by_failing(asked, stays):
    """A pause, a resume or a reconcile pending during a Docker outage changes nothing about what runs
    either (found by review of the first fix, which kept only turn asks)."""
    from desired import transitions
    from desired.model import Status
    from tests.support.planning import NOW, record
    cur = record(Status.GENERATION_IN_PROGRESS, DesiredStatus.RUNNING, converged=False, turn=4, desired_turn=5,
                 generation_started_at=NOW)
    now = NOW
    new, target = transitions.failed(cur, now, code=ErrorCode.DOCKER_UNAVAILABLE, message="away", asked=asked)
    assert (new.desired_status is DesiredStatus.RUNNING) is stays and target is None
    if stays:  # its jobs answered; nothing else was unconverged: the generation ends as a failed turn's
        assert new.converged and new.generation == cur.generation + 1 and new.desired_turn == 4
        assert new.last_error_code is ErrorCode.DOCKER_UNAVAILABLE
    # A rollback the jobs joined goes on (unconverged); without them its failure stops the game, as before.
    rolling = cur.replace(status=Status.STARTING, rolling_back=True, desired_image_ref="galaxy/engine:0")
    new, _ = transitions.failed(rolling, now, code=ErrorCode.DOCKER_UNAVAILABLE, message="away", asked=asked)
    assert (new.desired_status is DesiredStatus.RUNNING and new.rolling_back and not new.converged) is stays


async def test_a_crash_whose_restarts_fail_with_a_control_job_pending_is_left_to_the_crash_policy(tmp_path):
    """A failed restart with a force_next_turn pending answered the job and left the generation open, so
    the next failed restart was not counted as a crash: the game was stopped at the second attempt,
    without the crash policy's backoff and limit (found by review of d8dba6c; a49099f stopped it at the
    first)."""
    w = World(tmp_path, RTMANAGER_CRASH_LIMIT="5")
    rec = await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    w.backend.images.discard(rec.current_image_ref)  # every new unit now fails: the image is gone
    del w.backend.containers[rec.current_container_id]  # and the engine's unit vanished
    for _ in range(3):
        w.store.clock.advance(600)  # past any backoff
        try:
            await w.sync("g1")
        except Exception:  # noqa: BLE001 - a temporary failure is retried like the worker does
            pass
    rec = w.store.records["g1"]
    assert rec.desired_status is DesiredStatus.RUNNING, rec
    assert rec.crash_count >= 1 and rec.status is not Status.STOPPED


async def test_a_pause_pending_in_an_outage_is_answered_as_done_and_stays_in_effect(tmp_path):
    """A pause took effect when it was accepted (the turn clock skips the game): answered as a failure,
    Lobby would believe the game unpaused while no turn comes (found by review)."""
    w = World(tmp_path)
    await started(w)
    await w.job(JobKind.PAUSE, "g1")
    await overdue_in_an_outage(w)
    assert w.results("g1")[-1] == ("pause", "success", "")
    rec = w.store.records["g1"]
    assert rec.desired_status is DesiredStatus.RUNNING and rec.paused
    w.backend.down = False
    assert (await w.sync("g1")).converged and w.running("g1")


def test_a_rollback_flag_left_on_the_image_already_running_does_not_outlive_a_failed_turn():
    """A patch refused before the engine was touched rolls back to the image that already runs; a turn
    asked before the next look then failed (or its generation did) and left ``rolling_back`` set, so a
    later failure took the rollback's way (a stop, or no rollback for the next refused patch; found by
    review)."""
    from desired import transitions
    from tests.support.planning import NOW, record
    cur = record(Status.STARTING, DesiredStatus.RUNNING, converged=False, turn=4, desired_turn=5,
                 rolling_back=True, rollback_image_ref="galaxy/engine:1", current_image_ref="galaxy/engine:1",
                 current_container_id="c1")
    assert cur.current_image_ref == cur.desired_image_ref
    for new in (transitions.failed(cur, NOW, code=ErrorCode.DOCKER_UNAVAILABLE, message="away",
                                   asked={JobKind.FORCE_NEXT_TURN})[0],
                transitions.turn_failed(cur, NOW, code=ErrorCode.ENGINE_UNREACHABLE, message="no answer")):
        assert new.desired_status is DesiredStatus.RUNNING and new.converged
        assert not new.rolling_back and new.rollback_image_ref is None
