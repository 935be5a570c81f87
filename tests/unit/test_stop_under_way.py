"""Red-team, stop 45: a stop already under way was signalled again. A leader that took over while its
predecessor's stop was in its grace (or a stop retried after its call timed out) saw the engine still running
and stopped it again: a second SIGTERM into the engine's save, which many runtimes take as "exit now". A stop
begun less than its grace (and a margin) ago is now waited for, not repeated; one older than that is
repeated (the first may never have reached the daemon)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controller.engine_proxy import closed
from desired.model import DesiredStatus, ErrorCode, JobKind, Status
from observed.errors import BackendUnavailable
from tests.support.world import IMG, IMG2, World, started


async def test_a_stop_begun_by_a_predecessor_is_waited_for_not_signalled_again(tmp_path) -> None:
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    await w.job(JobKind.STOP, "g1")
    rec = w.store.records["g1"]
    # the previous leader wrote that its stop was under way 5 s ago, and died in the engine's grace
    w.store.records["g1"] = rec.replace(stopping_since=w.store.clock.now() - timedelta(seconds=5))
    rec = await w.sync("g1")
    assert w.backend.ops("stop") == [] and rec.desired_status is DesiredStatus.STOPPED
    assert len(w.running("g1")) == 1
    w.store.clock.advance(60)  # past its grace and the margin: that stop never came, or did not end it
    rec = await w.sync("g1")
    assert len(w.backend.ops("stop")) == 1 and rec.status is Status.STOPPED


async def _cut(w: World, call: str, exc: Exception, kind: JobKind, image: str | None = None):
    """A job whose first ``call`` of the backend (``stop`` or ``remove``) raises ``exc`` (recorded as made):
    one sync, as the worker runs it, then the backend as it was. The record as it is then."""
    real = getattr(w.backend, call)

    async def failing(unit_id, grace):
        w.backend.calls.append((call, unit_id, grace))
        raise exc

    setattr(w.backend, call, failing)
    await w.job(kind, "g1", image)
    try:
        await w.sync("g1")
    except Exception:  # noqa: BLE001 - a temporary error: the worker tries again later
        pass
    setattr(w.backend, call, real)
    return w.store.records["g1"]


async def _as_the_worker(w: World) -> None:
    """One sync; a temporary error is what the worker makes of it: an overdue job answered."""
    try:
        await w.sync("g1")
    except Exception as e:  # noqa: BLE001 - what the worker does with a temporary error
        await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, str(e),
                                           w.settings.runtime.job_timeout)


async def _a_stop_that_raised(w: World, exc: Exception):
    await started(w)
    return await _cut(w, "stop", exc, JobKind.STOP)


async def test_a_stop_that_did_not_happen_does_not_close_the_pass_through_of_a_game_started_again(tmp_path) -> None:
    """Review of the fix (125): a stop whose call raised (a timeout, a refusal), then a start: the game was
    recorded running with stopping_since still set, so the pass-through answered 409 for good. A running game
    wanted running waits out a stop that may still be under way, then is recorded without it."""
    from controller.engine_proxy import closed
    from observed.errors import BackendUnavailable, NotSent, Refused
    from tests.support.world import IMG

    for exc in (BackendUnavailable("timeout"), Refused("no"), NotSent("docker stop: connection refused")):
        w = World(tmp_path / type(exc).__name__, RTMANAGER_STOP_GRACE="30")
        rec = await _a_stop_that_raised(w, exc)
        # a refusal, or a call the daemon never got (review 126; stop 46), says no signal went out: no mark; a
        # timeout may have sent it: marked
        sent = type(exc) is BackendUnavailable
        assert (rec.stopping_since is not None) is sent and rec.status is Status.RUNNING, exc
        await w.job(JobKind.START, "g1", IMG)
        rec = await w.sync("g1")
        w.store.clock.advance(46)  # its grace and the margin
        rec = await w.sync("g1")
        assert rec.status is Status.RUNNING and rec.converged and len(w.running("g1")) == 1, rec
        assert closed(rec) is None, closed(rec)


async def test_a_predecessors_stop_that_ends_the_engine_after_a_start_is_no_crash(tmp_path) -> None:
    """Review of the fix (125): a predecessor's stop under way, then a start: the start was recorded at once
    and the engine's exit (its save done) was counted as a crash."""
    from tests.support.world import IMG

    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    await w.job(JobKind.STOP, "g1")
    rec = w.store.records["g1"]
    w.store.records["g1"] = rec.replace(stopping_since=w.store.clock.now() - timedelta(seconds=5))
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    [c] = w.running("g1")
    c.state, c.exit_code = "exited", 0  # the predecessor's SIGTERM ends it
    for _ in range(3):
        w.store.clock.advance(20)
        rec = await w.sync("g1")
    assert rec.crash_count == 0 and rec.status is Status.RUNNING and w.results("g1")[-1][:2] == ("start", "success")


async def test_a_replacements_removal_under_way_is_not_signalled_again(tmp_path) -> None:
    """Review of the fix (125): a predecessor inside a patch's removal (its grace) died; the next leader removed
    the engine again at once: a second SIGTERM into its save."""
    from desired import transitions
    from tests.support.world import IMG2

    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    await w.job(JobKind.PATCH, "g1", IMG2)
    rec = w.store.records["g1"]
    # its predecessor had begun the replacement and sent the removal (marked right before it), then died
    w.store.records["g1"] = transitions.starting(rec, w.store.clock.now(), rollback_image=rec.current_image_ref
                                                 ).replace(stopping_since=w.store.clock.now())
    w.backend.calls.clear()
    await w.sync("g1")
    assert w.backend.ops("remove") == [], "a removal in its grace signalled again at once"
    w.store.clock.advance(46)
    rec = await w.sync("g1")
    assert len(w.backend.ops("remove")) == 1 and rec.current_image_ref == IMG2


async def test_a_replacement_cut_before_its_removal_was_sent_is_tried_again_soon(tmp_path) -> None:
    """Review 126: the mark was written when the replacement began (starting()), before anything was signalled,
    so a replacement cut before its removal was sent (here the read of its stop grace failed) was waited out
    for the whole grace (615 s) with the game starting and the pass-through closed. The mark is written right
    before the signal."""
    from desired.errors import StoreUnavailable
    from tests.support.world import IMG2

    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    starts, failed = w.reconciler.starts, []
    real = starts.stop_grace

    async def stop_grace(record, unit):
        if not failed:
            failed.append(1)
            raise StoreUnavailable("postgres: connection lost")
        return await real(record, unit)

    starts.stop_grace = stop_grace
    await w.job(JobKind.PATCH, "g1", IMG2)
    try:
        await w.sync("g1")
    except StoreUnavailable:
        pass
    assert failed and w.backend.ops("remove") == []
    w.store.clock.advance(5)
    rec = await w.sync("g1")
    assert len(w.backend.ops("remove")) == 1 and rec.current_image_ref == IMG2, rec


async def test_a_removal_signalled_again_is_marked_again(tmp_path) -> None:
    """Review 126: a removal sent again after its wait ran out kept the first mark, so if that call timed out
    too, the next attempt signalled at once, a third SIGTERM into the save."""
    from observed.errors import BackendUnavailable
    from tests.support.world import IMG2

    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    real, sent = w.backend.remove, []

    async def remove(unit_id, grace):
        sent.append(w.store.clock.now())
        if len(sent) <= 2:
            raise BackendUnavailable("docker remove: read timeout (SIGTERM sent, the engine saves)")
        await real(unit_id, grace)

    w.backend.remove = remove
    await w.job(JobKind.PATCH, "g1", IMG2)
    for step in (0, 46, 1, 1):
        w.store.clock.advance(step)
        try:
            await w.sync("g1")
        except Exception:  # noqa: BLE001 - the temporary error: the worker tries again
            pass
    assert len(sent) == 2, [(s - sent[0]).total_seconds() for s in sent]


async def test_a_stop_refused_for_an_hour_is_still_closed_to_the_pass_through_when_it_goes_through(tmp_path) -> None:
    """Review 126: the mark written at the first (refused) attempt was never refreshed, so when the stop went
    through 70 minutes later the pass-through took the mark for stale and was open during the save."""
    from controller.engine_proxy import closed
    from observed.errors import Refused

    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    real, refuse = w.backend.stop, [True]

    async def stop(unit_id, grace):
        if refuse[0]:
            raise Refused("cannot stop container: permission denied")
        await real(unit_id, grace)

    w.backend.stop = stop
    await w.job(JobKind.STOP, "g1")
    for _ in range(14):
        await w.sync("g1")
        w.store.clock.advance(300)
    seen = []

    async def during() -> None:
        seen.append(closed(w.store.records["g1"], w.store.clock.now()))

    refuse[0] = False
    w.backend.while_stopping = during
    await w.sync("g1")
    assert seen and seen[0] is not None


async def test_an_oom_kill_after_a_stop_began_is_a_crash(tmp_path) -> None:
    """Review 126: any exit within a stop's window was taken for that stop's: an OOM kill was not counted."""
    from tests.support.world import IMG

    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    await _a_stop_timed_out(w)
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    [c] = w.running("g1")
    c.state, c.exit_code = "exited", 137
    c.oom_killed = True
    w.store.clock.advance(10)
    rec = await w.sync("g1")
    assert rec.crash_count == 1, rec


async def _a_stop_timed_out(w: World) -> None:
    await _cut(w, "stop", BackendUnavailable("timeout"), JobKind.STOP)


async def test_the_end_of_a_stop_with_no_exit_code_is_no_crash(tmp_path):
    """Review 127: on a Swarm the end of a stop leaves no exit code (its tasks are forgotten): it was counted
    as a crash."""
    # Swarm: a stop is a scale to 0; its tasks are forgotten -> exit_code None
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    await _a_stop_timed_out(w)
    assert w.store.records["g1"].stopping_since is not None
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    [c] = w.running("g1")
    c.state, c.exit_code = "exited", None  # the stop's end, tasks forgotten
    w.store.clock.advance(10)
    rec = await w.sync("g1")
    assert rec.crash_count == 0, rec.crash_count


async def test_a_rollback_does_not_take_over_an_engine_its_replacement_already_signalled(tmp_path):
    """Review 127: a replacement's removal timed out (SIGTERM sent), its retry failed for good before the wait,
    and the rollback confirmed the engine still saving: recorded running, the pass-through open, its exit a
    crash. A start of the record's engine waits out a removal under way too."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    [old] = w.running("g1")
    await _cut(w, "remove", BackendUnavailable("docker remove: read timeout (SIGTERM sent, the engine saves)"),
               JobKind.PATCH, IMG2)
    w.backend.images.discard(IMG2)  # the next pull of IMG2 fails (registry away): ImageUnavailable, permanent
    w.store.clock.advance(5)
    try:
        await w.sync("g1")
    except Exception:  # noqa: BLE001
        pass
    rec = w.store.records["g1"]
    assert closed(rec, w.store.clock.now()) is not None  # not recorded running while it saves
    # the engine, SIGTERMed by the timed-out removal, finishes its save and exits 143
    old.state, old.exit_code = "exited", 143
    w.store.clock.advance(30)
    rec = await w.sync("g1")
    assert rec.crash_count == 0


async def test_a_stop_during_a_replacements_removal_waits_for_it(tmp_path):
    """Review 127: a stop during a replacement whose removal timed out signalled the engine again at once."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    await _cut(w, "remove", BackendUnavailable("docker remove: read timeout (SIGTERM sent, the engine saves)"),
               JobKind.PATCH, IMG2)
    await w.job(JobKind.STOP, "g1")
    w.store.clock.advance(5)
    await w.sync("g1")
    assert w.backend.ops("stop") == [], "a second SIGTERM 5 s into the removal's 600 s grace"


async def test_a_start_waiting_out_a_stop_is_not_failed_as_overdue(tmp_path):
    """Review 127: a start waiting out a stop that may be under way (up to its grace) was failed as overdue
    by a short outage, and the healthy game stopped."""

    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    await _a_stop_timed_out(w)   # the stop's call timed out before the daemon got it: the engine runs on
    await w.job(JobKind.START, "g1", IMG)
    rec = await w.sync("g1")
    w.store.clock.advance(301)
    w.backend.down = True  # a Docker blip during the wait
    await _as_the_worker(w)
    w.backend.down = False
    rec = await w.sync("g1")
    assert rec.desired_status is DesiredStatus.RUNNING


async def test_a_job_is_held_only_for_the_stops_own_grace(tmp_path):
    """Review 128: the overdue exemption of a job waiting out a stop mark held it for an hour whatever the
    grace (10 s here, job timeout 300 s): it is bounded by the stop's grace."""
    w = World(tmp_path)
    await started(w)
    await _a_stop_timed_out(w)
    await w.job(JobKind.START, "g1", IMG)
    w.backend.down = True
    w.store.clock.advance(400)
    await _as_the_worker(w)
    assert w.results("g1")[-1] == ("start", "failure", "docker_unavailable"), w.results("g1")

async def test_a_restart_waiting_out_its_removal_is_not_failed_by_a_blip(tmp_path):
    """Review 128: a replacement waiting out its removal (starting) was not covered by the exemption: a blip
    failed the restart and stopped the engine."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    [old] = w.running("g1")
    await _cut(w, "remove", BackendUnavailable("read timeout"), JobKind.RESTART)
    w.store.clock.advance(30)
    await w.sync("g1")
    w.store.clock.advance(280)
    w.backend.down = True
    await _as_the_worker(w)
    w.backend.down = False
    rec = await w.sync("g1")
    w.store.clock.advance(400)
    rec = await w.sync("g1")
    assert rec.desired_status is DesiredStatus.RUNNING


async def test_the_unreachable_restart_does_not_signal_into_a_save(tmp_path):
    """Review 128: the unreachable restart stopped an engine that did not answer because it was saving on its
    way out of a stop whose call had timed out."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600", RTMANAGER_UNREACHABLE_RESTART_AFTER="60")
    await started(w)
    await _a_stop_timed_out(w)  # SIGTERM may have reached it: the engine saves, answers nothing
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")  # RECORD waits out the mark (_stop_over)
    n = len(w.backend.ops("stop"))
    w.engine.healthy_after[IMG] = 1e9  # saving: no answer
    now = w.store.clock.now()
    w.store.clock.advance(70)
    w.store.records["g1"] = w.store.records["g1"].replace(status=Status.ENGINE_UNREACHABLE, probe_failures=3,
                                                          unreachable_since=now)
    await w.sync("g1")
    assert len(w.backend.ops("stop")) == n, "a second SIGTERM 70 s into a 600 s grace"


async def test_the_unreachable_restarts_own_stop_is_marked(tmp_path):
    """Review 132: the unreachable restart stopped the engine without a mark: when that call timed out (the
    engine saving), the next look probed it, found it silent, and stopped it again 5 s into its grace."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600", RTMANAGER_UNREACHABLE_RESTART_AFTER="60")
    await started(w)
    [c] = w.running("g1")
    w.engine.healthy_after[c.image] = 1e9  # no answer
    now = w.store.clock.now()
    w.store.clock.advance(70)
    w.store.records["g1"] = w.store.records["g1"].replace(status=Status.ENGINE_UNREACHABLE, probe_failures=3,
                                                          unreachable_since=now)
    rec = await _cut(w, "stop", BackendUnavailable("docker stop: read timeout (SIGTERM sent, the engine saves)"),
                     JobKind.RECONCILE)
    assert w.backend.ops("stop") and rec.stopping_since is not None, rec
    for _ in range(3):
        w.store.clock.advance(5)
        await _as_the_worker(w)
    assert len(w.backend.ops("stop")) == 1, "a second SIGTERM 15 s into a 600 s grace"


def test_a_crash_clears_the_stop_mark() -> None:
    """Review 128: a crash kept the mark on the starting record, so the restart's next confirm of a fresh
    process waited out a stop of the engine that had exited."""
    from desired import transitions
    from desired.policy import CrashVerdict
    from tests.support.job_records import NOW, rec

    up = rec(Status.RUNNING, DesiredStatus.RUNNING, gen=1, obs=1, game_id="g1", current_container_id="c1",
             current_image_ref=IMG, started_at=NOW).replace(stopping_since=NOW)
    verdict = CrashVerdict(count=1, give_up=False, delay=0.1)
    crashed = transitions.crashed(up, NOW + timedelta(seconds=1), verdict=verdict,
                                  code=ErrorCode.CONTAINER_START_FAILED, detail="exit 1", exit_code=1,
                                  oom_killed=False, window=600)
    assert crashed.status is Status.STARTING and crashed.stopping_since is None


@pytest.mark.parametrize("stops_first", [False, True])
async def test_a_restart_whose_removal_keeps_failing_is_answered(tmp_path, stops_first) -> None:
    """Review 129: each attempt of a failing removal wrote a fresh mark, so the exemption from the overdue
    answer never ran out: the restart was never answered. It now ends past the job timeout, a turn's wait
    (RTMANAGER_DISRUPTION_WAIT, which may have come before the first signal: review 132), a grace and 15 s."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)

    async def remove(unit_id, grace):
        w.backend.calls.append(("remove", unit_id, grace))
        if stops_first:
            await w.backend.stop(unit_id, grace)  # the stop goes through, the removal fails
        raise BackendUnavailable("remove: 500 device or resource busy")

    w.backend.remove = remove
    await w.job(JobKind.RESTART, "g1")
    for _ in range(50):  # 1,000 s; job timeout 300 s, disruption wait 600 s, grace 30 s
        await _as_the_worker(w)
        w.store.clock.advance(20)
    assert any(r[0] == "restart" for r in w.results("g1")), "the restart was never answered"


async def test_a_replacements_removal_the_daemon_never_got_leaves_no_stop_to_wait_out(tmp_path):
    """Stop 46: a restart whose removal of the engine found dockerd's socket refusing connections (a daemon
    restarting) kept the stop mark: the retry, once dockerd was back, waited the engine's grace and 15 s
    before it signalled, and the pass-through was closed that long, for a SIGTERM that never went out."""
    from observed.errors import NotSent

    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    rec = await _cut(w, "remove", NotSent("docker stop: connection refused"), JobKind.RESTART)
    assert rec.stopping_since is None, rec
    w.store.clock.advance(5)
    rec = await w.sync("g1")
    assert w.backend.ops("remove"), "the retry waited out a stop that never went out"
    assert rec.status is Status.RUNNING and rec.converged, rec


async def test_a_restart_that_waited_for_a_turn_is_not_failed_by_one_timed_out_removal(tmp_path):
    """Review 132 of b40a660: the overdue exemption was bounded by the job's whole age, which a wait for a turn
    (RTMANAGER_DISRUPTION_WAIT) had used before the removal was first signalled: one timed-out removal then
    answered the restart docker_unavailable and stopped the game."""
    from tests.support.world import turn_engine

    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    eng = turn_engine(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    assert (await w.sync("g1")).status is Status.GENERATION_IN_PROGRESS
    await w.job(JobKind.RESTART, "g1")
    for _ in range(25):  # 500 s waiting for the turn to end
        await _as_the_worker(w)
        w.store.clock.advance(20)
    assert w.backend.ops("remove") == []
    eng["turn"], eng["phase"] = 1, "idle"
    real = w.backend.remove

    async def once(unit_id, grace):
        w.backend.calls.append(("remove", unit_id, grace))
        w.backend.remove = real
        raise BackendUnavailable("docker remove: read timeout (SIGTERM sent, the engine saves)")

    w.backend.remove = once
    await _as_the_worker(w)  # marked, then the removal times out
    for _ in range(5):
        w.store.clock.advance(20)
        await _as_the_worker(w)
    rec = w.store.records["g1"]
    assert w.results("g1")[-1] == ("restart", "success", ""), w.results("g1")
    assert rec.desired_status is DesiredStatus.RUNNING and rec.status is Status.RUNNING, rec


@pytest.mark.parametrize("job", [JobKind.STOP, JobKind.RECONCILE])
async def test_a_mark_dated_ahead_of_the_clock_holds_nothing(tmp_path, job) -> None:
    """Review 132: a mark written by a clock that has since gone back (a database primary a day ahead of its
    successor) was waited out until the clocks caught up: the stop was not sent, the job not answered and the
    pass-through closed for a day. A mark more than MARK_AHEAD ahead of now is taken for no stop under way."""
    from desired.transitions import MARK_AHEAD

    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    now = w.store.clock.now()
    w.store.records["g1"] = w.store.records["g1"].replace(stopping_since=now + timedelta(days=1))
    assert closed(w.store.records["g1"], now) is None
    await w.job(job, "g1")
    for _ in range(3):
        await _as_the_worker(w)
        w.store.clock.advance(20)
    assert w.results("g1")[-1][:2] == (job.value, "success"), w.results("g1")
    assert bool(w.backend.ops("stop")) is (job is JobKind.STOP)
    # within the clocks' part it is a mark like any
    rec = w.store.records["g1"].replace(stopping_since=w.store.clock.now() + MARK_AHEAD - timedelta(seconds=1),
                                        status=Status.RUNNING, started_at=now)
    assert closed(rec, w.store.clock.now()) is not None


class _Killed(BaseException):
    """kill -9 of the process, as a test can make it."""


@pytest.mark.parametrize(("kind", "image", "back"), [(JobKind.PATCH, IMG2, IMG), (JobKind.RESTART, None, None)],
                         ids=["patch", "restart"])
async def test_a_replacements_new_unit_cut_before_it_was_recorded_is_not_removed_twice_in_its_grace(
        tmp_path, kind, image, back):
    """Review 132: a kill after a patch's new unit started (before it was recorded running), then another
    patch: only the record's engine was marked, so the new unit's removal whose call timed out was sent again
    at once, a second SIGTERM into its save. The mark names the unit it is of. A restart's new unit the same
    (it runs the same image, on the same state)."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    starts = w.reconciler.starts
    real_confirm = starts.confirm

    async def killed(*a, **k):
        raise _Killed()

    starts.confirm = killed
    await w.job(kind, "g1", image)
    try:
        await w.sync("g1")
    except _Killed:
        pass
    starts.confirm = real_confirm
    [new] = w.running("g1")
    assert new.image == (image or IMG) and w.store.records["g1"].current_container_id != new.id
    n = len(w.backend.ops("remove"))  # then another job of the kind (a patch: Lobby goes back)
    await _cut(w, "remove", BackendUnavailable("docker remove: read timeout (SIGTERM sent, the engine saves)"),
               kind, back)
    w.store.clock.advance(5)
    await _as_the_worker(w)
    assert len([r for r in w.backend.ops("remove")[n:] if r[1] == new.id]) == 1, w.backend.ops("remove")


async def test_a_failed_restarts_new_unit_is_not_stopped_twice_in_its_grace(tmp_path):
    """Review 132: a restart whose new engine is slow to answer its health path fails (start timeout), the game
    goes to stopped, and that unit (which the record does not name) was stopped unmarked: a stop call that
    timed out was sent again 5 s later."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600", RTMANAGER_START_TIMEOUT="0.2")
    await started(w)
    [old] = w.running("g1")
    real = w.backend.stop
    failed = []

    async def stop(unit_id, grace):
        if unit_id != old.id and not failed:
            failed.append(unit_id)
            w.backend.calls.append(("stop", unit_id, grace))
            raise BackendUnavailable("docker stop: read timeout (SIGTERM sent, the engine saves)")
        await real(unit_id, grace)

    w.backend.stop = stop
    w.engine.healthy_after[IMG] = 1e9  # the new engine loads a big state: no health answer in time
    await w.job(JobKind.RESTART, "g1")
    await _as_the_worker(w)
    assert failed
    w.store.clock.advance(5)
    await _as_the_worker(w)
    assert len([r for r in w.backend.ops("stop") if r[1] == failed[0]]) == 1, w.backend.ops("stop")


async def test_a_users_stop_then_start_of_an_unreachable_game_is_no_crash(tmp_path):
    """Review 134 (of a change since reverted, 887aeaa): an exit of an engine_unreachable game after a stop was
    counted as the unreachable restart's crash, whoever's stop it was: Lobby's stop then start counted a crash
    nobody had, and at the crash limit gave up the game Lobby had just started. An exit after a stop began is no
    crash (these three guard that)."""
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30", RTMANAGER_UNREACHABLE_RESTART_AFTER="600")
    await started(w)
    [c] = w.running("g1")
    w.engine.healthy_after[c.image] = 1e9
    w.store.records["g1"] = w.store.records["g1"].replace(status=Status.ENGINE_UNREACHABLE, probe_failures=3,
                                                          unreachable_since=w.store.clock.now())
    await _cut(w, "stop", BackendUnavailable("docker stop: read timeout"), JobKind.STOP)
    await w.job(JobKind.START, "g1", IMG)   # Lobby starts it again
    w.backend.crash("g1", 143)              # the STOP's SIGTERM ends it
    w.engine.healthy_after[c.image] = 0
    w.store.clock.advance(5)
    await _as_the_worker(w)
    rec = w.store.records["g1"]
    assert rec.crash_count == 0, rec.last_error_message


async def test_a_users_stop_then_start_does_not_give_up_the_game(tmp_path):
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30", RTMANAGER_UNREACHABLE_RESTART_AFTER="600",
              RTMANAGER_CRASH_LIMIT="1")
    await started(w)
    [c] = w.running("g1")
    w.engine.healthy_after[c.image] = 1e9
    w.store.records["g1"] = w.store.records["g1"].replace(status=Status.ENGINE_UNREACHABLE, probe_failures=3,
                                                          unreachable_since=w.store.clock.now())
    await _cut(w, "stop", BackendUnavailable("docker stop: read timeout"), JobKind.STOP)
    await w.job(JobKind.START, "g1", IMG)
    w.backend.crash("g1", 143)
    w.engine.healthy_after[c.image] = 0
    w.store.clock.advance(5)
    for _ in range(3):
        await _as_the_worker(w)
        w.store.clock.advance(1)
    rec = w.store.records["g1"]
    assert rec.desired_status is DesiredStatus.RUNNING


async def test_a_stop_whose_save_made_the_engine_unreachable_then_a_start_is_no_crash(tmp_path):
    w = World(tmp_path, RTMANAGER_STOP_GRACE="300", RTMANAGER_UNREACHABLE_RESTART_AFTER="600")
    await started(w)
    [c] = w.running("g1")
    rec = await _cut(w, "stop", BackendUnavailable("docker stop: read timeout"), JobKind.STOP)
    assert rec.status is Status.RUNNING and rec.stopping_since is not None
    w.engine.healthy_after[c.image] = 1e9  # saving: no answer to the health probe
    for _ in range(5):
        w.store.clock.advance(5)
        rec = w.store.records["g1"]
        await w.reconciler.observe(rec, w.backend.ip_of(w.running("g1")[0]))
    rec = w.store.records["g1"]
    await w.job(JobKind.START, "g1", IMG)
    w.backend.crash("g1", 0)   # the save is done; the engine exits
    w.engine.healthy_after[c.image] = 0
    w.store.clock.advance(5)
    await _as_the_worker(w)
    rec = w.store.records["g1"]
    assert rec.crash_count == 0


async def test_a_start_that_lands_during_a_patchs_removal_is_not_answered_with_the_patchs_engine(tmp_path):
    """The fixed-seed chaos run (seed 25), stop 46: a patch to 1.1 removed the 1.0 engine; a start of 1.0 landed
    during that removal (a new generation); clearing the removal's stop mark returned the record as it then was,
    at the start's generation, and the patch went on with it: the 1.1 engine it made answered the start of 1.0.
    A mark is written and cleared only at the generation it was read at."""
    from tests.support.world import IMG2

    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)

    async def start_lands() -> None:
        await w.job(JobKind.START, "g1", IMG)  # Lobby goes back to 1.0 while the removal runs

    w.backend.while_stopping = start_lands
    await w.job(JobKind.PATCH, "g1", IMG2)
    for _ in range(6):
        await _as_the_worker(w)
        w.store.clock.advance(5)
    rec = w.store.records["g1"]
    [unit] = w.running("g1")
    answered = [r for r in w.store.results_for("g1") if r["job"] == "start"][-1]
    assert unit.image == IMG and rec.current_image_ref == IMG and rec.converged, (unit.image, rec)
    assert answered["outcome"] == "success" and answered["container_id"] == unit.id, answered


def _land_then_raise(w: World, call: str, exc: Exception, job) -> None:
    """The first ``call`` of the backend (stop or remove): a job lands while it is in flight, then it raises."""
    real = getattr(w.backend, call)
    done: list[int] = []

    async def failing(unit_id, grace):
        if not done:
            done.append(1)
            w.backend.calls.append((call, unit_id, grace))
            await job()
            raise exc
        await real(unit_id, grace)

    setattr(w.backend, call, failing)


@pytest.mark.parametrize("refusal", ["Refused", "NotSent"])
async def test_a_stop_that_sent_nothing_clears_its_mark_whatever_job_landed_meanwhile(tmp_path, refusal):
    """Review 136 of 0e83569: a stop refused (or never received) while a start landed kept its mark, the clear
    refused for the new generation: RECORD then waited a grace and 15 s, the pass-through closed, for a SIGTERM
    that never went out. A mark that dates no signal is cleared whatever the generation."""
    from observed.errors import NotSent, Refused

    exc = Refused("no") if refusal == "Refused" else NotSent("docker stop: connection refused")
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    _land_then_raise(w, "stop", exc, lambda: w.job(JobKind.START, "g1", IMG))
    await w.job(JobKind.STOP, "g1")
    await _as_the_worker(w)
    w.store.clock.advance(5)
    rec = await w.sync("g1")
    assert rec.stopping_since is None and rec.converged and closed(rec, w.store.clock.now()) is None, rec


async def test_a_replacement_whose_removal_a_job_overtook_stops_there(tmp_path):
    """Review 136: after a removal a job overtook (a start landed meanwhile), the replacement went on with its
    older plan (the state's backup, the new unit's preparation) until a later guard stopped it; its removal's
    mark stayed, so the next unit's removal went unmarked and was signalled twice. The mark is cleared (the
    unit is gone) and the replacement is planned again from the record as it is."""
    from observed.errors import BackendUnavailable

    mute = "galaxy/engine-stub:mute"
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30")
    await started(w)
    generations: list[tuple[int, int]] = []
    real_backup = w.reconciler.states.backup

    async def backup(record):
        generations.append((record.generation, w.store.records["g1"].generation))
        await real_backup(record)

    w.reconciler.states.backup = backup

    async def lands() -> None:
        await w.job(JobKind.START, "g1", mute)  # an engine that never answers: its unit is removed again

    w.backend.while_stopping = lands
    real_remove, removals = w.backend.remove, []

    async def remove(unit_id, grace):
        c = w.backend.containers.get(unit_id)
        rec = w.store.records["g1"]
        removals.append((c.image if c else None, rec.stopping_unit == unit_id, w.store.clock.now()))
        if c is not None and c.image == mute and sum(1 for r in removals if r[0] == mute) == 1:
            w.backend.calls.append(("remove", unit_id, grace))
            raise BackendUnavailable("docker remove: read timeout (SIGTERM sent, the engine saves)")
        await real_remove(unit_id, grace)

    w.backend.remove = remove
    await w.job(JobKind.PATCH, "g1", IMG2)
    for _ in range(4):
        await _as_the_worker(w)
        w.store.clock.advance(2)
    assert all(read == now for read, now in generations), generations  # no backup for a superseded plan
    muted = [r for r in removals if r[0] == mute]
    assert muted and muted[0][1], "the mute unit's removal went out unmarked"
    assert len(muted) == 1 or (muted[1][2] - muted[0][2]).total_seconds() >= 45, muted


async def test_a_restarts_removal_never_sent_while_a_patch_landed_is_sent_again_at_once(tmp_path):
    """Review 136: the same for a removal the daemon never got: its mark stayed, and the next attempt waited."""
    from observed.errors import NotSent

    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    await started(w)
    _land_then_raise(w, "remove", NotSent("docker stop: connection refused"), lambda: w.job(JobKind.PATCH, "g1", IMG2))
    await w.job(JobKind.RESTART, "g1")
    await _as_the_worker(w)
    w.store.clock.advance(5)
    await _as_the_worker(w)
    rec = w.store.records["g1"]
    assert len(w.backend.ops("remove")) == 2 and rec.current_image_ref == IMG2, (w.backend.ops("remove"), rec)


@pytest.mark.parametrize("how", ["timeout_but_gone", "clear_outage"])
async def test_a_gone_units_mark_does_not_leave_the_next_units_removal_unmarked(tmp_path, how):
    """Review 137: a removal whose call timed out after the daemon had removed the unit (or whose mark's clearing
    write failed) left a young mark of a unit that is gone; the next unit's removal was then left unmarked (the
    record holds one mark), timed out, and was signalled again 2 s later, into its save. A mark of a unit that
    is gone dates nothing: the next stop takes the mark."""
    from desired.errors import StoreUnavailable
    from observed.errors import BackendUnavailable

    mute = "galaxy/engine-stub:mute"
    w = World(tmp_path, RTMANAGER_STOP_GRACE="30", RTMANAGER_START_TIMEOUT="5")
    await started(w)
    real_remove, removals = w.backend.remove, []

    async def remove(unit_id, grace):
        c = w.backend.containers.get(unit_id)
        removals.append((c.image if c else None, w.store.records["g1"].stopping_unit == unit_id, w.store.clock.now()))
        if c is not None and c.image == IMG and how == "timeout_but_gone":
            await real_remove(unit_id, grace)  # the daemon removed it; the client's call timed out
            raise BackendUnavailable("docker remove: read timeout")
        if c is not None and c.image == mute and sum(1 for r in removals if r[0] == mute) == 1:
            w.backend.calls.append(("remove", unit_id, grace))
            raise BackendUnavailable("docker remove: read timeout (SIGTERM sent, the engine saves)")
        await real_remove(unit_id, grace)

    w.backend.remove = remove
    if how == "clear_outage":
        real_clear, failed = w.store.clear_stopping, []

        async def clear(rec, **kw):
            if not failed:
                failed.append(1)
                raise StoreUnavailable("postgres: a blip")
            return await real_clear(rec, **kw)

        w.store.clear_stopping = clear
    await w.job(JobKind.PATCH, "g1", mute)
    for _ in range(6):
        await _as_the_worker(w)
        w.store.clock.advance(2)
    muted = [r for r in removals if r[0] == mute]
    assert muted and muted[0][1], "the mute unit's removal went out unmarked"
    assert len(muted) == 1 or (muted[1][2] - muted[0][2]).total_seconds() >= 45, muted


async def test_a_rollback_overtaken_keeps_the_mark_of_the_engine_it_takes_over(tmp_path):
    """Review 137: a stop of the rollback's engine timed out (SIGTERM sent, it saves), then a start of another
    image overtook the rollback: taking the engine over cleared every mark, also this engine's own, and the
    replacement removed it 5 s into its 600 s grace."""
    from observed.errors import BackendUnavailable

    mute = "galaxy/engine-stub:mute"
    w = World(tmp_path, RTMANAGER_STOP_GRACE="600", RTMANAGER_START_TIMEOUT="5")
    first = (await started(w)).current_container_id
    real_check, sent = w.engine.check, []

    async def check(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.image == IMG and w.store.records["g1"].rolling_back and not sent:
            sent.append(1)
            await w.job(JobKind.STOP, "g1")  # Lobby stops the game during the rollback's health wait
        return await real_check(host)

    w.engine.check = check
    signals: list[tuple[str, str, object]] = []
    real_stop, real_remove = w.backend.stop, w.backend.remove

    async def stop(unit_id, grace):
        c = w.backend.containers.get(unit_id)
        if c is not None and c.image == IMG and c.state == "running" and unit_id != first:
            signals.append(("stop", unit_id, w.store.clock.now()))
            if len(signals) == 1:
                w.backend.calls.append(("stop", unit_id, grace))
                await w.job(JobKind.START, "g1", IMG2)  # and starts it again, with 1.1
                raise BackendUnavailable("docker stop: read timeout (SIGTERM sent, the engine saves)")
        await real_stop(unit_id, grace)

    async def remove(unit_id, grace):
        c = w.backend.containers.get(unit_id)
        if c is not None and c.image == IMG and c.state == "running" and unit_id != first:
            signals.append(("remove", unit_id, w.store.clock.now()))
        await real_remove(unit_id, grace)

    w.backend.stop, w.backend.remove = stop, remove
    await w.job(JobKind.PATCH, "g1", mute)
    for _ in range(8):
        await _as_the_worker(w)
        w.store.clock.advance(5)
    assert signals, "the rollback's engine was never stopped"
    later = [s for s in signals[1:] if s[1] == signals[0][1]]
    assert not later or (later[0][2] - signals[0][2]).total_seconds() >= 600, signals


async def test_a_refused_stop_of_another_unit_does_not_clear_the_engines_mark(tmp_path):
    """Final read of this stop's change: the record holds one mark, which Starts.mark keeps for the engine in its
    save while another unit is stopped unmarked; a refusal of that other stop (or its removal) cleared the
    engine's mark, opening the pass-through in the middle of the save. Only the signalled unit's mark is cleared."""
    from observed.errors import NotSent

    w = World(tmp_path, RTMANAGER_STOP_GRACE="600")
    rec = await started(w)
    rec = await w.store.mark_stopping(rec)  # the engine's stop under way (its call timed out)
    starts = w.reconciler.starts
    other = "d" * 64

    async def refused() -> None:
        raise NotSent("docker stop: connection refused")

    kept = await starts.mark(rec, other, 600)
    assert kept.stopping_unit == rec.current_container_id  # the other unit goes unmarked
    with pytest.raises(NotSent):
        await starts.signal(kept, other, refused())
    assert w.store.records["g1"].stopping_since == rec.stopping_since, "the engine's mark was cleared"

    async def removed() -> None:
        return None

    assert (await starts.signal(kept, other, removed(), over=True)).stopping_since == rec.stopping_since
    assert w.store.records["g1"].stopping_since == rec.stopping_since
