"""A planned disruption of a running engine never cuts a turn in half: the planner's decisions as a
table, and the turn clock, which asks for no new turn while a disruption waits."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controller.planner import ActionKind, plan
from controller.spec import Specs
from desired import transitions
from desired.jobs import turn_due
from desired.model import DesiredStatus, Status
from tests.support.planning import HASH, KW, NOW, OLD_HASH, RM, ST, T0, R, ours, record

A = ActionKind
LIMIT = 600.0
GEN = Status.GENERATION_IN_PROGRESS


def waiting(ago: float) -> dict:
    return {"disruption_wait_since": NOW - timedelta(seconds=ago)}


# (id, status, desired, container, record extras, limit, expected kind, check_engine, overdue)
TABLE = [
    # the engine is known to be generating: wait (and look again), whatever the disruption
    ("stop waits", GEN, ST, ours(), {"admin_api": True, "turn": 4}, LIMIT, A.WAIT, True, False),
    ("removal waits", GEN, RM, ours(), {"admin_api": True, "turn": 4}, LIMIT, A.WAIT, True, False),
    ("restart waits", GEN, R, ours(spec_hash=OLD_HASH), {"admin_api": True, "turn": 4}, LIMIT, A.WAIT, True, False),
    ("wait counted from its start", GEN, ST, ours(), {"admin_api": True, **waiting(599)}, LIMIT, A.WAIT, True,
     False),
    # the limit ran out: go ahead, and say so
    # (asked once more: a generation begun since the wait began has a wait of its own; stop 45)
    ("limit reached: stop", GEN, ST, ours(), {"admin_api": True, **waiting(600)}, LIMIT, A.STOP, True, True),
    ("limit reached: recreate", GEN, R, ours(spec_hash=OLD_HASH), {"admin_api": True, **waiting(900)}, LIMIT,
     A.RECREATE, True, True),
    # not known to generate: go ahead, but ask the engine right before (the probe may be stale)
    ("idle: stop asks first", Status.RUNNING, ST, ours(), {"admin_api": True}, LIMIT, A.STOP, True, False),
    ("idle: recreate asks first", Status.RUNNING, R, ours(spec_hash=OLD_HASH), {"admin_api": True}, LIMIT,
     A.RECREATE, True, False),
    ("admin API not asked yet: ask", Status.RUNNING, ST, ours(), {}, LIMIT, A.STOP, True, False),
    ("unreachable: not generating", Status.ENGINE_UNREACHABLE, ST, ours(),
     {"admin_api": True, "phase": "generating"}, LIMIT, A.STOP, True, False),
    # no wait at all
    ("no admin API", Status.RUNNING, ST, ours(), {"admin_api": False}, LIMIT, A.STOP, False, False),
    ("limit 0", GEN, ST, ours(), {"admin_api": True}, 0.0, A.STOP, False, False),
    ("forced generation", GEN, ST, ours(), {"admin_api": True, "force_generation": 5}, LIMIT, A.STOP, False,
     False),
    ("an older generation's force", GEN, ST, ours(), {"admin_api": True, "force_generation": 4}, LIMIT, A.WAIT,
     True, False),
    ("crash: not planned", GEN, R, ours("exited"), {"admin_api": True}, LIMIT, A.RECOVER, False, False),
    ("recreate of a paused-from-outside engine that runs", GEN, R, ours("paused"), {"admin_api": True}, LIMIT,
     A.WAIT, True, False),
    ("stopped container: cleanup does not wait", Status.STOPPED, ST, ours("exited"), {"admin_api": True}, LIMIT,
     A.NOOP, False, False),
]


@pytest.mark.parametrize("status,desired,container,extra,limit,kind,check,overdue",
                         [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_planned_disruption(status, desired, container, extra, limit, kind, check, overdue):
    converged = desired is R and container.spec_hash == HASH
    rec = record(status, desired, converged=converged or status is Status.STOPPED, **extra)
    action = plan(rec, container, **KW, disruption_wait=limit)
    assert action.kind is kind, action
    assert action.check_engine is check, action
    assert (action.overdue is not None) is overdue, action
    if kind is A.WAIT:
        assert 0 < action.delay <= 1.0
    if overdue:
        assert "RTMANAGER_DISRUPTION_WAIT" in action.reason


def test_the_wait_never_outlasts_the_limit():
    rec = record(GEN, ST, converged=False, admin_api=True, **waiting(599.7))
    action = plan(rec, ours(), **KW, disruption_wait=LIMIT)
    assert action.kind is A.WAIT and action.delay == pytest.approx(0.3, abs=0.01)


def test_a_recreate_of_a_unit_that_is_not_the_running_engine_does_not_wait():
    rec = record(GEN, R, converged=False, admin_api=True, cid="other")
    assert plan(rec, ours(spec_hash=OLD_HASH), **KW, disruption_wait=LIMIT).kind is A.RECREATE


def test_a_start_after_a_waiting_stop_withdraws_the_disruption():
    # desired running again with the same spec: nothing to disrupt, the game converges as it is
    rec = record(GEN, R, converged=False, admin_api=True, **waiting(30))
    assert plan(rec, ours(), **KW, disruption_wait=LIMIT).kind is A.RECORD


# ------------------------------------------------------------------ the record's wait
def test_the_wait_begins_once_and_ends_with_the_generation_or_the_disruption():
    rec = record(GEN, ST, converged=False, admin_api=True, turn=4, phase="generating")
    first = transitions.disruption_waiting(rec, NOW)
    assert first.disruption_wait_since == NOW
    assert transitions.disruption_waiting(first, NOW + timedelta(seconds=5)).disruption_wait_since == NOW
    idle = transitions.observed(first, NOW, transitions.Probe(healthy=True, admin_api=True, turn=5, phase="idle"),
                                unreachable_after=3, generation_timeout=600)
    assert idle.disruption_wait_since is None and idle.status is Status.RUNNING
    still = transitions.observed(first, NOW, transitions.Probe(healthy=True, admin_api=True, turn=4,
                                                               phase="generating"),
                                 unreachable_after=3, generation_timeout=600)
    assert still.disruption_wait_since == NOW
    assert transitions.stopped(first, NOW, container_id="c1").disruption_wait_since is None
    assert transitions.starting(first, NOW, rollback_image=None).disruption_wait_since is None
    assert transitions.removed(first, NOW).disruption_wait_since is None


# ------------------------------------------------------------------ the turn clock
def _due(**extra):
    kw = dict(admin_api=True, turn=4, phase="idle", turn_interval=60, last_turn_at=T0, clock_from=T0)
    kw.update(extra)
    return kw


def test_the_turn_clock_asks_for_a_turn_of_an_idle_game():
    assert turn_due(record(Status.RUNNING, R, **_due()), NOW)


@pytest.mark.parametrize("desired,converged,extra", [
    (DesiredStatus.STOPPED, False, {}),                 # a stop is pending
    (DesiredStatus.RUNNING, False, {"spec_revision": 1}),  # a restart is pending
    (DesiredStatus.RUNNING, True, waiting(3)),          # a drift recreate waits for the engine
], ids=["stop pending", "restart pending", "drift recreate waiting"])
def test_the_turn_clock_asks_for_no_turn_while_a_disruption_is_pending(desired, converged, extra):
    assert not turn_due(record(Status.RUNNING, desired, converged=converged, **_due(**extra)), NOW)


# ------------------------------------------------------------------ the reconciler, with fakes
NAME = "galaxy-game-g1"


@pytest.fixture
def w(tmp_path):
    from tests.support.world import World
    return World(tmp_path, RTMANAGER_DISRUPTION_WAIT="60")


async def generating(w):
    """g1 runs; its engine generates turn 1 while the record still says idle (a stale probe)."""
    from tests.support.world import started
    w.engine.admin["galaxy/engine-stub:1.0"] = "slow"
    rec = await started(w)
    assert rec.status is Status.RUNNING and rec.admin_api is True
    w.engine.game(NAME).phase = "generating"  # the engine's own schedule, or a turn asked since the probe


async def job(w, kind, image=None, force=False):
    from desired.jobs import Job
    from desired.model import OpSource, StopReason
    await w.store.submit(Job(kind=kind, game_id="g1", source=OpSource.ADMIN if force else OpSource.LOBBY,
                             image_ref=image, reason=StopReason.CANCELLED if kind.value == "stop" else None,
                             force=force), w.defaults)


def stops(w):
    return w.backend.ops("stop")  # a removal stops first


async def waits_its_limit_then_stops(w):
    """Three looks within RTMANAGER_DISRUPTION_WAIT, no stop and the wait's start recorded; then one past
    it: the record after that look."""
    for _ in range(3):
        rec = await w.sync("g1")
        assert stops(w) == [] and rec.disruption_wait_since is not None
        w.store.clock.advance(w.settings.runtime.disruption_wait / 3 - 1)
    w.store.clock.advance(4)
    return await w.sync("g1")


@pytest.mark.parametrize("kind,image", [("stop", None), ("restart", None), ("patch", "galaxy/engine-stub:1.1"),
                                        ("cleanup", None)])
async def test_a_disruption_asks_the_engine_first_and_waits_for_its_generation(w, kind, image):
    from desired.model import JobKind
    await generating(w)
    if kind == "cleanup":
        await job(w, JobKind.STOP)
    await job(w, JobKind(kind), image)
    rec = await w.sync("g1")
    assert stops(w) == [] and rec.status is Status.GENERATION_IN_PROGRESS
    assert rec.disruption_wait_since is not None and not rec.converged
    since = rec.disruption_wait_since
    w.store.clock.advance(30)
    rec = await w.sync("g1")  # still generating: still waiting, from the same start
    assert stops(w) == [] and rec.disruption_wait_since == since
    w.engine.finish_generation(NAME)
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.turn == 1 and rec.disruption_wait_since is None and rec.converged
    assert all(r[1] == "success" and r[2] == "" for r in w.results("g1") if r[0] == kind), w.results("g1")
    assert all(r["error_message"] == "" for r in w.store.results_for("g1") if r["job"] == kind)


async def test_force_does_not_wait_and_a_later_generation_without_force_waits_again(w):
    from desired.model import JobKind
    await generating(w)
    await job(w, JobKind.RESTART, force=True)
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.converged  # cut at once, as asked
    assert w.store.ops[-1].params == {"force": True}
    w.engine.game(NAME).phase = "generating"
    await job(w, JobKind.RESTART)
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.disruption_wait_since is not None


async def test_a_forced_stop_joining_a_waiting_stop_cuts_at_once(w):
    from desired.model import JobKind
    await generating(w)
    await job(w, JobKind.STOP)
    assert (await w.sync("g1")).disruption_wait_since is not None and stops(w) == []
    await job(w, JobKind.STOP, force=True)  # joins the same generation, now forced
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED and rec.converged


async def test_after_the_limit_the_disruption_goes_ahead_and_says_so(w):
    from desired.model import JobKind
    await generating(w)
    await job(w, JobKind.STOP)
    await w.sync("g1")
    w.store.clock.advance(61)
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED
    (stop,) = [o for o in w.store.ops if o.op.value == "stop"]
    assert stop.params["disruption"] == "stop" and stop.params["disruption_waited_seconds"] >= 60
    (res,) = [r for r in w.store.results_for("g1") if r["job"] == "stop"]
    assert res["outcome"] == "success" and res["error_code"] == ""
    assert "RTMANAGER_DISRUPTION_WAIT" in res["error_message"] and res["error_message"] == stop.params[
        "disruption_note"]


async def test_a_drift_recreate_waits_too_and_the_operation_log_says_when_it_ran_out(w):
    await generating(w)
    import dataclasses

    drifted = dataclasses.replace(w.settings.engine, engine_pids=999)  # the spec drifts
    w.reconciler.settings = dataclasses.replace(w.settings, engine=drifted)
    w.reconciler.specs = Specs(w.reconciler.settings, w.reconciler.specs.database)
    rec = await w.sync("g1")
    assert stops(w) == [] and rec.disruption_wait_since is not None
    assert not turn_due(rec.replace(status=Status.RUNNING, turn_interval=1), NOW + timedelta(days=9))
    w.store.clock.advance(61)
    await w.sync("g1")
    assert len(stops(w)) == 1
    (note,) = [o for o in w.store.ops if o.source.value == "reconciler" and "disruption" in o.params]
    assert note.params["disruption"] == "recreate"


@pytest.mark.parametrize("failure", ["unreachable", "garbage", "unsupported"])
async def test_an_engine_that_does_not_answer_its_status_is_not_generating(w, failure):
    from desired.model import JobKind
    from observed.errors import EngineError, EngineUnreachable, EngineUnsupported
    await generating(w)
    w.engine.fail[NAME] = {"unreachable": EngineUnreachable("no answer"),
                           "garbage": EngineError("turn is not an integer from 0 to 2147483647"),
                           "unsupported": EngineUnsupported("404")}[failure]
    await job(w, JobKind.STOP)
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED


async def test_a_start_while_a_stop_waits_withdraws_the_stop(w):
    from desired.model import JobKind
    await generating(w)
    await job(w, JobKind.STOP)
    await w.sync("g1")
    await job(w, JobKind.START, "galaxy/engine-stub:1.0")
    rec = await w.sync("g1")
    assert stops(w) == [] and rec.converged and rec.status is Status.GENERATION_IN_PROGRESS
    assert [r[:2] for r in w.results("g1")][-2:] == [("stop", "failure"), ("start", "success")]


# ------------------------------------------------------------------ a version's stop grace
def version(image: str, grace: int | None):
    from datetime import UTC, datetime

    from desired.versions import EngineVersion, VersionStatus
    t = datetime(2026, 1, 1, tzinfo=UTC)
    return EngineVersion(version=image.rsplit(":", 1)[1], image_ref=image, status=VersionStatus.ACTIVE, notes="",
                         created_at=t, updated_at=t, stop_grace=grace)


async def test_the_stop_of_an_engine_takes_the_grace_of_the_version_it_runs(tmp_path):
    from desired.model import JobKind
    from tests.support.world import World, started
    w = World(tmp_path)  # RTMANAGER_VERSION_POLICY is allowlist: the registry still gives the grace
    w.store.versions["galaxy/engine-stub:1.0"] = version("galaxy/engine-stub:1.0", 45)
    w.store.versions["galaxy/engine-stub:1.1"] = version("galaxy/engine-stub:1.1", None)
    await started(w)
    assert w.backend.specs[-1].stop_grace == 45.0  # a Swarm service is created with it
    await job(w, JobKind.PATCH, "galaxy/engine-stub:1.1")
    await w.sync("g1")  # the engine it runs is 1.0: 45 s, not the new image's (none: the global 10 s)
    assert [c[2] for c in w.backend.ops("stop")] == [45.0]
    assert w.backend.specs[-1].stop_grace == w.settings.runtime.stop_grace and w.backend.specs[-1].spec_hash
    await job(w, JobKind.STOP)
    await w.sync("g1")
    assert [c[2] for c in w.backend.ops("stop")] == [45.0, w.settings.runtime.stop_grace]


def test_a_grace_is_not_part_of_the_spec_hash(tmp_path):
    import dataclasses

    from controller.spec import build_spec
    from tests.support.world import World
    spec = build_spec(World(tmp_path).settings, record(Status.RUNNING, R))
    assert dataclasses.replace(spec, stop_grace=300.0).spec_hash == spec.spec_hash  # no recreate for a new grace


@pytest.mark.parametrize("failure", ["unreachable", "garbage"])
async def test_an_engine_that_stops_answering_while_a_stop_waits_is_stopped(w, failure):
    """A status that fails while the health path answers may be a busy engine: the wait goes on.
    Once the engine answers nothing at all, it may still be busy generating (stop 45: it was taken for
    one that is not, and the turn cut): the wait goes on until RTMANAGER_DISRUPTION_WAIT, then the stop
    goes ahead."""
    from desired.model import JobKind
    from observed.errors import EngineError, EngineUnreachable
    await generating(w)
    await job(w, JobKind.STOP)
    rec = await w.sync("g1")
    assert stops(w) == [] and rec.status is Status.GENERATION_IN_PROGRESS and rec.disruption_wait_since
    w.engine.fail[NAME] = {"unreachable": EngineUnreachable("no answer"),
                           "garbage": EngineError("turn is not an integer from 0 to 2147483647")}[failure]
    w.store.clock.advance(2)
    rec = await w.sync("g1")  # the health path still answers: maybe busy generating, not a reason
    assert stops(w) == [] and rec.status is Status.GENERATION_IN_PROGRESS
    [c] = w.running("g1")
    w.backend.behaviour[c.image] = "mute"  # now it answers nothing at all
    w.store.clock.advance(2)
    rec = await w.sync("g1")
    assert stops(w) == [] and rec.status is Status.GENERATION_IN_PROGRESS
    w.store.clock.advance(60)  # RTMANAGER_DISRUPTION_WAIT (60 s) from the first look that waited
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED


async def test_a_stale_recorded_token_does_not_cut_a_generation(w):
    """A restored database recorded another token than the unit's: the wait asks with the unit's."""
    from desired.model import JobKind
    await generating(w)
    rec = w.store.records["g1"]
    w.store.records["g1"] = rec.replace(admin_token="older-token")
    await job(w, JobKind.STOP)
    await w.sync("g1")
    assert stops(w) == []


@pytest.mark.parametrize("grace,expected", [(45.0, 45), (None, 7)])
def test_a_swarm_service_is_created_with_its_versions_grace(tmp_path, grace, expected):
    import dataclasses

    from controller.spec import build_spec
    from observed.swarm import SwarmBackend
    from tests.support.world import World
    spec = dataclasses.replace(build_spec(World(tmp_path).settings, record(Status.RUNNING, R)), stop_grace=grace)
    body = SwarmBackend(instance="default", network="galaxy-games", stop_grace=7.0)._service_spec(spec)
    assert body["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] == expected * 10**9


async def test_the_time_a_stop_waited_for_a_generation_does_not_count_against_the_job_timeout(tmp_path):
    from desired.model import ErrorCode, JobKind
    from tests.support.world import World
    w = World(tmp_path, RTMANAGER_DISRUPTION_WAIT="600", RTMANAGER_JOB_TIMEOUT="60")
    await generating(w)
    await job(w, JobKind.STOP)
    await w.sync("g1")
    w.store.clock.advance(400)  # waited for the generation, within RTMANAGER_DISRUPTION_WAIT
    w.engine.finish_generation(NAME)
    w.backend.down = True  # then Docker is away for a moment when the stop is due
    await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, "away", w.settings.runtime.job_timeout)
    assert [r for r in w.results("g1") if r[0] == "stop"] == []
    w.store.clock.advance(w.settings.runtime.disruption_wait)  # past the wait and the job timeout together: answered
    await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, "away", w.settings.runtime.job_timeout)
    assert [r for r in w.results("g1") if r[0] == "stop"] == [("stop", "failure", "docker_unavailable")]


async def test_a_disruption_of_an_engine_the_record_does_not_know_as_up_is_bounded_too(w):
    """A replacement cut half-way left the record `starting` while the old engine runs and says it
    generates: a stop waits for it (no cut), but not for ever: once the job is older than the
    limit, it goes ahead and is answered."""
    from desired.model import JobKind
    await generating(w)
    w.store.records["g1"] = w.store.records["g1"].replace(status=Status.STARTING)
    await job(w, JobKind.STOP)
    await w.sync("g1")
    assert stops(w) == []  # the engine generates: no cut yet
    w.store.clock.advance(w.settings.runtime.disruption_wait + 1)
    rec = await w.sync("g1")
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED


async def test_a_wait_on_an_engine_that_only_answers_its_health_path_is_bounded_too(w):
    """The record says a turn is generated (the engine took the request), but the engine answers its
    health path and not its status (busy on a lock, a phase it does not know, garbage): the stop waits,
    bounded by RTMANAGER_DISRUPTION_WAIT from the first look. Before, the wait's start was written only
    when the engine said it generated, so the limit was counted from now at every look and the stop
    waited for ever, its job never answered (found by a red-team reading)."""
    from desired.model import JobKind
    from observed.errors import EngineError
    from tests.support.world import started
    rec = await started(w)
    w.store.records["g1"] = rec.replace(status=Status.GENERATION_IN_PROGRESS, phase="generating",
                                        generation_started_at=w.store.clock.now())
    w.engine.fail[NAME] = EngineError("phase is not one of idle, generating")
    await job(w, JobKind.STOP)
    rec = await waits_its_limit_then_stops(w)
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED
    assert w.results("g1")[-1] == ("stop", "success", "")


async def test_a_stop_with_no_job_of_an_engine_the_record_does_not_know_as_up_is_bounded(w):
    """The same, but no job waits to bound it: the game was stopped by the controller itself (a
    node lost for longer than its grace under RTMANAGER_NODE_LOSS=stop, a crash loop given up) and
    its engine is seen again, running and saying it generates, for ever. The stop waits for the
    turn, bounded by RTMANAGER_DISRUPTION_WAIT from the first look. Before, with no pending job the
    bound was zero and the stop waited for ever (found by a red-team reading)."""
    await generating(w)
    cur = w.store.records["g1"]
    w.store.records["g1"] = cur.replace(status=Status.NODE_LOST, desired_status=DesiredStatus.STOPPED,
                                        generation=cur.generation + 1)
    rec = await waits_its_limit_then_stops(w)
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED and rec.converged


async def test_an_engine_whose_status_flips_is_stopped_at_its_first_idle_answer(w):
    """Red-team finding: an engine that says 'generating' and 'idle' in turn held a stop for ever. Each
    idle answer changed the record, so the stop was planned again with a fresh look, which heard
    'generating' and began the wait anew; the job was never answered. An idle answer now lets the
    disruption go ahead at once, on the record that answer wrote."""
    from desired.model import JobKind
    from observed.engine import EngineStatus
    from tests.support.world import started
    rec = await started(w)
    looks = {"n": 0}

    async def status(host, *, token=""):
        looks["n"] += 1
        return EngineStatus(turn=5, phase="generating" if looks["n"] % 2 else "idle")

    w.engine.status = status
    await job(w, JobKind.STOP)
    for _ in range(3):
        rec = await w.sync("g1")
        if stops(w):
            break
        w.store.clock.advance(1)
    assert len(stops(w)) == 1 and rec.status is Status.STOPPED
    assert ("stop", "success", "") in w.results("g1")
    assert looks["n"] <= 4
