"""``Reconciler.sync(key)`` against in-memory fakes, the way sample-controller tests its syncHandler:
seed the world, run one sync, assert the actions taken and the record and results left."""

from __future__ import annotations

import asyncio

import pytest

from controller.admission import Admission
from controller.config import Settings
from controller.metrics import Metrics
from controller.triggers import TurnClock
from desired.errors import DockerUnavailable
from desired.jobs import Job
from desired.model import DesiredStatus, ErrorCode, JobKind, OpSource, Status
from observed.errors import BackendUnavailable, EngineUnreachable, Refused
from observed.model import LABEL_DATABASE, LABEL_EPOCH, LABEL_GAME_ID, LABEL_INSTANCE, LABEL_MANAGED_BY
from tests.fakes import FakeContainer
from tests.support.world import IMG, IMG2, World, started


@pytest.fixture
def w(tmp_path) -> World:
    return World(tmp_path)


async def test_a_start_creates_starts_and_answers_only_once_healthy(w):
    await w.job(JobKind.START, "g1", IMG)
    rec = await w.sync("g1")
    assert [c[0] for c in w.backend.ops("create", "start")] == ["create", "start"]
    assert rec.status is Status.RUNNING and rec.converged and rec.current_image_ref == IMG
    [res] = w.store.results_for("g1")
    assert res["outcome"] == "success" and res["container_id"] == rec.current_container_id
    assert res["engine_endpoint"] == "http://galaxy-game-g1:8080"
    labels = w.backend.containers[rec.current_container_id].labels
    assert labels[LABEL_DATABASE] == "db-1"  # provenance on every unit


async def test_an_engine_that_never_answers_is_not_answered_success(w):
    """Answering before convergence would tell Lobby a dead engine runs."""
    await w.job(JobKind.START, "g1", "galaxy/engine-stub:mute")
    rec = await w.sync("g1")
    assert w.results("g1") == [("start", "failure", "engine_unhealthy")]
    assert rec.desired_status is DesiredStatus.STOPPED and rec.status is Status.STOPPED and rec.converged
    assert w.running("g1") == [] and w.backend.graceful  # stopped, with SIGTERM first


async def test_a_sync_is_idempotent(w):
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    calls = len(w.backend.calls)
    await w.sync("g1")
    assert [c[0] for c in w.backend.calls[calls:]] == ["inspect"]  # looked, did nothing


async def test_a_job_accepted_during_convergence_is_not_answered_by_the_older_one(w):
    await w.job(JobKind.START, "g1", IMG)
    real = w.store.mark_running

    async def a_stop_arrives_first(rec, **kw):
        await w.job(JobKind.STOP, "g1")  # accepted while the start was converging
        return await real(rec, **kw)

    w.store.mark_running = a_stop_arrives_first
    rec = await w.sync("g1")
    assert w.results("g1") == [("start", "failure", "superseded"), ("stop", "success", "")]
    assert rec.status is Status.STOPPED and w.running("g1") == []


async def test_a_change_accepted_between_plan_and_create_is_not_converged_by_the_older_spec(w):
    """Chaos seeds 101, 303 and 606: a change accepted after the sync planned the previous change, before it
    created the unit, was answered success by a container of the previous image."""
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.START, "g1", IMG2)  # a change of image: the sync will recreate
    real = w.store.mark_starting
    patched: list[bool] = []

    async def a_patch_lands_first(rec, **kw):
        if not patched:
            patched.append(True)
            await w.job(JobKind.PATCH, "g1", IMG)
        return await real(rec, **kw)

    w.store.mark_starting = a_patch_lands_first
    for _ in range(3):
        rec = await w.sync("g1")
    [up] = w.running("g1")
    assert up.image == IMG and rec.current_image_ref == IMG and rec.converged
    res = w.store.results_for("g1")
    assert [(r["job"], r["outcome"]) for r in res][-2:] == [("start", "failure"), ("patch", "success")]
    assert res[-1]["container_id"] == up.id


async def test_an_answer_from_an_address_another_engine_took_over_is_not_this_engines(w):
    """Chaos seed 505: the new engine died as it was probed and the daemon gave its address to
    another game's engine, whose answer was taken for the new one's."""
    await w.job(JobKind.START, "other", IMG)
    await w.sync("other")
    [other] = w.running("other")
    real_ip, real_check = w.backend.ip_of, w.engine.check
    taken: list[str] = []

    async def dies_as_it_is_probed(host):
        c = w.backend.by_name("galaxy-game-g1")
        if c is not None and c.state == "running" and not taken:
            taken.append(real_ip(c))
            c.state, c.exit_code = "exited", 3
            w.backend.ip_of = lambda x: taken[0] if x is other else real_ip(x)  # type: ignore[method-assign]
        return await real_check(host)

    w.engine.check = dies_as_it_is_probed  # type: ignore[method-assign]
    await w.job(JobKind.START, "g1", IMG)
    rec = await w.sync("g1")
    assert taken, "the scenario did not happen"
    assert w.results("g1") == [("start", "failure", "container_start_failed")]
    assert rec.status is not Status.RUNNING


@pytest.mark.parametrize("image, code, touched", [
    ("galaxy/engine-stub:missing", "image_unavailable", False),
    ("galaxy/engine-stub:mute", "engine_unhealthy", True),
    ("galaxy/engine-stub:crash", "container_start_failed", True),
])
async def test_a_failed_patch_rolls_back_to_the_image_that_ran(w, image, code, touched):
    await w.job(JobKind.START, "g1", IMG)
    before = (await w.sync("g1")).current_container_id
    await w.job(JobKind.PATCH, "g1", image)
    rec = await w.sync("g1")
    assert w.results("g1")[-1] == ("patch", "failure", code)
    assert rec.status is Status.RUNNING and rec.current_image_ref == IMG and rec.converged
    assert rec.desired_image_ref == IMG and not rec.rolling_back
    assert len(w.running("g1")) == 1
    assert (w.running("g1")[0].id == before) is (not touched)
    assert any(o.params.get("event") == "rollback" for o in w.store.ops) is touched or code == "image_unavailable"


@pytest.mark.parametrize("image", ["galaxy/engine-stub:missing", "galaxy/engine-stub:banned-since"])
async def test_the_turn_clock_is_woken_when_a_failed_patch_has_converged_back(w, image):
    """A game is due for turns only once its generation converged. A refused patch answers its job
    (an outbox row) while the rollback generation is still open; the commit that converges the
    rollback later writes no outbox row and changes no status. It must still wake the turn clock,
    or the game's next turn waits up to a resync interval (the clock's longest sleep)."""
    await started(w)
    await w.store.set_schedule("g1", 60, OpSource.ADMIN)  # a game with no schedule is never due: no wake
    woken: list[bool] = []
    w.store.schedule.subscribe(lambda: woken.append(w.store.records["g1"].converged))
    await w.job(JobKind.PATCH, "g1", image)
    if image.endswith("banned-since"):
        w.settings.images.image_allowlist.patterns = (IMG,)  # banned after the job was accepted
    rec = await w.sync("g1")
    assert rec.converged and rec.desired_image_ref == IMG and rec.status is Status.RUNNING
    assert w.results("g1")[-1][:2] == ("patch", "failure")
    assert woken and woken[-1], "the clock was last woken before the game became due again"


async def test_the_rollback_generation_failing_too_stops_the_game(w):
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    w.backend.behaviour[IMG] = "mute"  # the old engine will not come back either
    await w.job(JobKind.PATCH, "g1", "galaxy/engine-stub:crash")
    rec = await w.sync("g1")
    assert rec.desired_status is DesiredStatus.STOPPED and rec.status is Status.STOPPED
    assert w.running("g1") == []


async def test_every_path_that_takes_an_engine_down_stops_it_gracefully_first(w):
    await w.job(JobKind.START, "g1", IMG)
    first = (await w.sync("g1")).current_container_id
    await w.job(JobKind.PATCH, "g1", IMG2)  # recreate on an image change
    second = (await w.sync("g1")).current_container_id
    await w.job(JobKind.RESTART, "g1")
    third = (await w.sync("g1")).current_container_id
    await w.job(JobKind.STOP, "g1")
    await w.sync("g1")
    assert w.backend.graceful == [first, second, third]
    removes = [c for c in w.backend.calls if c[0] == "remove"]
    assert all(c[2] == w.settings.runtime.stop_grace for c in removes)


async def test_a_crash_restarts_after_a_backoff_and_the_limit_gives_up(tmp_path):
    w = World(tmp_path, RTMANAGER_CRASH_LIMIT="3")
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    for n in (1, 2):
        w.backend.crash("g1", code=5)
        rec = await w.sync("g1")
        assert rec.crash_count == n and rec.status is Status.STARTING and rec.last_exit_code == 5
        assert rec.restart_not_before > w.store.clock.now()
        w.store.clock.advance(60)
        rec = await w.sync("g1")
        assert rec.status is Status.RUNNING and len(w.running("g1")) == 1
    w.backend.crash("g1", code=5)
    rec = await w.sync("g1")
    assert rec.crash_count == 3 and rec.desired_status is DesiredStatus.STOPPED and rec.status is Status.STOPPED
    assert "crash loop" in rec.last_error_message


async def test_a_crash_backoff_is_kept_when_a_later_step_of_the_same_sync_fails(w):
    """A counted crash asks for the game again after its backoff; Docker failing at the next look of
    the same sync must not drop that: the rate limiter's delay after an error (up to a minute for a
    game whose Docker calls flapped before) would hold the restart instead of the crash backoff."""
    await started(w)
    w.backend.crash("g1", code=5)
    record_crash = w.store.record_crash

    async def then_docker_goes(*a, **k):
        out = await record_crash(*a, **k)
        w.backend.down = True  # the next step's look fails
        return out
    w.store.record_crash = then_docker_goes
    with pytest.raises(DockerUnavailable):
        await w.reconciler.sync("g1")
    rec = w.store.records["g1"]
    assert rec.crash_count == 1
    backoff = (rec.restart_not_before - w.store.clock.now()).total_seconds()
    timer = w.queue._timers.get("g1")
    assert timer is not None, "the crash backoff's requeue was lost with the failing step"
    assert timer.when() - asyncio.get_running_loop().time() <= backoff + 0.5


async def test_a_crash_seen_for_an_older_generation_is_not_counted_against_a_newer_one(w):
    """A job accepted while the sync handled a crash (a stop here) moved the generation on: the
    crash belongs to the older one and is not counted (no restart, no crash loop), and the stop
    converges as asked."""
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    w.backend.crash("g1", code=5)
    real, real_look, finds = w.store.find, w.store.find_and_claim, []

    async def a_stop_lands_meanwhile(game_id):
        finds.append(game_id)
        if len(finds) == 2:  # the crash path looks at the record again before counting
            await w.job(JobKind.STOP, "g1")
        return await real(game_id)

    async def look(game_id):  # the sync's first look (it claims)
        finds.append(game_id)
        return await real_look(game_id)

    w.store.find, w.store.find_and_claim = a_stop_lands_meanwhile, look
    starts = len(w.backend.ops("start"))
    rec = await w.sync("g1")
    assert len(finds) >= 2, "the crash path no longer looks at the record again: rewrite this test"
    assert rec.crash_count == 0 and rec.last_exit_code != 5, rec
    w.store.find, w.store.find_and_claim = real, real_look
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and rec.desired_status is DesiredStatus.STOPPED and rec.crash_count == 0
    assert w.results("g1")[-1] == ("stop", "success", "")
    assert len(w.backend.ops("start")) == starts  # nothing restarted the crashed engine


async def test_an_image_banned_since_it_was_accepted_is_not_started_again(tmp_path):
    w = World(tmp_path)
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    w.reconciler.settings = w.reconciler.starts.settings = Settings.from_env({
        "RTMANAGER_IMAGE_ALLOWLIST": IMG2, "RTMANAGER_STATE_ROOT": w.settings.storage.state_root})
    w.backend.crash("g1")
    rec = await w.sync("g1")
    w.store.clock.advance(60)
    rec = await w.sync("g1")
    assert rec.desired_status is DesiredStatus.STOPPED and rec.last_error_code.value == "image_rejected"
    assert w.running("g1") == []


def orphan(w: World, game: str, *, database: str | None = "db-1", epoch: int = 1):
    labels = {LABEL_MANAGED_BY: "rtmanager", LABEL_INSTANCE: "default", LABEL_GAME_ID: game}
    if database is not None:
        labels.update({LABEL_DATABASE: database, LABEL_EPOCH: str(epoch)})
    c = FakeContainer(id=f"o-{game}", name=f"galaxy-game-{game}", image=IMG, labels=labels, state="running")
    w.backend.containers[c.id] = c
    return c


async def test_a_container_of_this_database_without_a_record_is_left_running_and_reported(w, caplog):
    """A database restored from an older backup of itself: containers created after the backup carry
    its identity and a term it knows, and have no record. They are games; nothing proves they may go."""
    c = orphan(w, "after-the-backup")
    with caplog.at_level("ERROR", logger="rtmanager.reconciler"):
        await w.sync("after-the-backup")
        await w.sync("after-the-backup")
    assert w.backend.containers[c.id].state == "running"
    assert [op[0] for op in w.backend.calls] == ["inspect", "inspect"]  # looked at, never touched
    assert c.id in w.reconciler.unowned
    reports = [r for r in caplog.records if r.levelname == "ERROR" and "after-the-backup" in r.getMessage()]
    assert len(reports) == 1  # loudly, once


@pytest.mark.parametrize("database, epoch", [(None, 0), ("another-db", 1), ("db-1", 99)],
                         ids=["no-label", "another-database", "a-later-term"])
async def test_a_container_not_provably_ours_is_never_destroyed(w, database, epoch):
    c = orphan(w, "theirs", database=database, epoch=epoch)
    await w.sync("theirs")
    assert w.backend.containers[c.id].state == "running"
    assert [op[0] for op in w.backend.calls] == ["inspect"]
    assert c.id in w.reconciler.unowned


async def test_removals_nobody_asked_for_are_rationed(tmp_path):
    w = World(tmp_path, RTMANAGER_MAX_REMOVALS="1", RTMANAGER_CLEANUP_TTL="60")
    for game in ("o1", "o2"):
        await w.job(JobKind.START, game, IMG)
        await w.sync(game)
        await w.job(JobKind.STOP, game)
        await w.sync(game)
    w.store.clock.advance(61)
    await w.sync("o1")
    await w.sync("o2")
    assert (w.backend.by_name("galaxy-game-o1"), w.backend.by_name("galaxy-game-o2") is not None) == (None, True)


async def test_docker_away_fails_a_waiting_job_only_after_the_job_timeout(tmp_path):
    w = World(tmp_path, RTMANAGER_JOB_TIMEOUT="60")
    await w.job(JobKind.START, "g1", IMG)
    w.backend.down = True
    await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, "away", 60)
    assert w.results("g1") == []
    w.store.clock.advance(61)
    await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, "away", 60)
    assert w.results("g1") == [("start", "failure", "docker_unavailable")]


async def test_an_overdue_cleanup_stays_a_removal(w):
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.STOP, "g1")
    await w.sync("g1")
    await w.job(JobKind.CLEANUP, "g1")
    w.store.clock.advance(400)
    await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, "away", 300)
    rec = w.store.records["g1"]
    assert rec.desired_status is DesiredStatus.REMOVED
    w.backend.down = False
    rec = await w.sync("g1")
    assert rec.status is Status.REMOVED and w.backend.by_name("galaxy-game-g1") is None


async def test_daemon_restarts_are_not_crashes(tmp_path):
    """Five restarts of the container daemon within the crash window give no game up."""
    w = World(tmp_path, RTMANAGER_CRASH_LIMIT="3")
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    for _ in range(5):
        w.backend.restart_daemon()
        rec = await w.sync("g1")
        assert rec.status is Status.RUNNING and rec.crash_count == 0 and len(w.running("g1")) == 1
    w.backend.crash("g1")  # a real crash still counts
    rec = await w.sync("g1")
    assert rec.crash_count == 1


# ----------------------------------------------------------------------- turns
async def test_a_forced_turn_asks_the_engine_once_and_answers_when_it_is_generated(w):
    rec = await started(w)
    assert rec.turn == 0 and rec.admin_api is True  # asked at confirm time
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")  # twice at once: the same turn
    rec = await w.sync("g1")  # asks, then polls later
    assert rec.status is Status.GENERATION_IN_PROGRESS
    rec = await w.sync("g1")  # the poll: generated
    assert w.engine.requests == [("galaxy-game-g1", 0)]
    assert rec.turn == 1 and rec.status is Status.RUNNING and rec.converged
    assert w.results("g1")[-2:] == [("force_next_turn", "success", "")] * 2


async def test_a_turn_already_generated_before_a_crash_is_not_asked_again(w):
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    w.engine.game("galaxy-game-g1").turn = 1  # asked, generated; the controller died before recording it
    rec = await w.sync("g1")
    # The short path may send its compare-and-swap for the turn the record knows (0): the engine, past it,
    # generates nothing; no request for turn 2 is ever made.
    assert set(w.engine.requests) <= {("galaxy-game-g1", 0)} and rec.turn == 1 and rec.converged
    assert w.engine.game("galaxy-game-g1").turn == 1


async def test_a_forced_turn_during_a_generation_waits_for_it(w):
    w.engine.admin[IMG] = "slow"
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    rec = await w.sync("g1")
    assert rec.status is Status.GENERATION_IN_PROGRESS and not rec.converged
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")  # during the generation: the same turn
    w.engine.finish_generation("galaxy-game-g1")
    rec = await w.sync("g1")
    assert rec.turn == 1 and rec.status is Status.RUNNING and len(w.engine.requests) == 1
    assert [r for r in w.results("g1") if r[0] == "force_next_turn"] == [("force_next_turn", "success", "")] * 2


async def test_a_failed_generation_answers_generation_failed_and_the_game_stays_up(w):
    w.engine.admin[IMG] = "fail"
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    rec = await w.sync("g1")  # asks
    rec = await w.sync("g1")  # sees the failure
    assert w.results("g1")[-1] == ("force_next_turn", "failure", "generation_failed")
    assert rec.status is Status.GENERATION_FAILED and rec.converged and len(w.running("g1")) == 1
    w.engine.admin[IMG] = "ok"
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")  # a force retries it
    await w.sync("g1")
    rec = await w.sync("g1")
    assert rec.turn == 1 and rec.status is Status.RUNNING
    assert w.results("g1")[-1] == ("force_next_turn", "success", "")


async def test_turns_on_an_engine_without_admin_api_are_engine_unsupported(w):
    w.engine.admin[IMG] = "none"
    rec = await started(w)
    assert rec.admin_api is False and rec.status is Status.RUNNING
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    rec = await w.sync("g1")
    assert w.results("g1")[-1] == ("force_next_turn", "failure", "engine_unsupported")
    assert rec.status is Status.RUNNING and rec.converged


async def test_pause_and_resume_are_answered_and_keep_the_engine_serving(w):
    await started(w)
    await w.job(JobKind.PAUSE, "g1")
    rec = await w.sync("g1")
    assert rec.paused and rec.converged and w.results("g1")[-1] == ("pause", "success", "")
    await w.job(JobKind.PAUSE, "g1")
    assert w.results("g1")[-1] == ("pause", "success", "replay_no_op")
    await w.job(JobKind.RESUME, "g1")
    rec = await w.sync("g1")
    assert not rec.paused and w.results("g1")[-1] == ("resume", "success", "")
    assert len(w.running("g1")) == 1 and not w.engine.requests


async def test_control_ops_on_a_game_that_does_not_run_are_invalid(w):
    for op in (JobKind.PAUSE, JobKind.RESUME, JobKind.FORCE_NEXT_TURN, JobKind.RECONCILE):
        await w.job(op, "ghost")
    assert {r[2] for r in w.results("ghost")} == {"invalid_request"}
    await started(w)
    await w.job(JobKind.STOP, "g1")
    await w.sync("g1")
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    assert w.results("g1")[-1] == ("force_next_turn", "failure", "invalid_request")


async def test_a_pause_does_not_supersede_a_start_that_is_still_converging(w):
    await w.job(JobKind.START, "g1", IMG)
    await w.job(JobKind.PAUSE, "g1")  # before the start converged
    rec = await w.sync("g1")
    assert rec.paused and rec.status is Status.RUNNING and rec.converged
    assert w.results("g1") == [("start", "success", ""), ("pause", "success", "")]


async def test_a_force_sent_while_starting_is_answered_only_once_the_turn_is_there(w):
    w.engine.admin[IMG] = "slow"
    await w.job(JobKind.START, "g1", IMG)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    rec = await w.sync("g1")
    assert rec.status is Status.GENERATION_IN_PROGRESS and w.results("g1") == []
    w.engine.finish_generation("galaxy-game-g1")
    rec = await w.sync("g1")
    assert rec.turn == 1 and w.results("g1") == [("start", "success", ""), ("force_next_turn", "success", "")]


async def test_control_ops_on_an_up_game_never_make_it_starting(w):
    await started(w)
    statuses = []
    real = w.store.mark_starting

    async def spy(rec, **kw):
        statuses.append("starting")
        return await real(rec, **kw)

    w.store.mark_starting = spy
    for op in (JobKind.PAUSE, JobKind.RESUME, JobKind.RECONCILE):
        await w.job(op, "g1")
        rec = await w.sync("g1")
        assert rec.status is Status.RUNNING and rec.converged
    assert statuses == []


async def test_a_failed_patch_of_a_game_whose_generation_failed_rolls_back(w):
    w.engine.admin[IMG] = "fail"
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")
    rec = await w.sync("g1")
    assert rec.status is Status.GENERATION_FAILED
    await w.job(JobKind.PATCH, "g1", "galaxy/engine-stub:crash")
    rec = await w.sync("g1")
    assert w.results("g1")[-1] == ("patch", "failure", "container_start_failed")
    assert rec.desired_image_ref == IMG and rec.status.is_up and len(w.running("g1")) == 1


# ------------------------------------------------- issue 21: unreachable engines, slow turns, failed starts
async def unreachable(w: World, game: str = "g1"):
    """The engine of a running game stops answering; the health rounds record it unreachable."""
    [c] = w.running(game)
    w.backend.behaviour[c.image] = "mute"
    for _ in range(w.settings.engine.unreachable_after):
        await w.reconciler.observe(w.store.records[game], w.backend.ip_of(c))
    rec = w.store.records[game]
    assert rec.status is Status.ENGINE_UNREACHABLE
    return rec


@pytest.mark.parametrize("kind", [JobKind.PAUSE, JobKind.RECONCILE, JobKind.START])
async def test_a_job_that_changes_nothing_that_runs_leaves_an_unreachable_engine_alone(w, kind):
    """Issue 21 #3: a pause on an engine that stopped answering waited for its health, failed,
    'rolled back' to the image it ran, failed again and stopped the game."""
    before = (await started(w)).current_container_id
    await unreachable(w)
    if kind is JobKind.START:  # a start that only changes the turn clock
        await w.store.submit(Job(kind=kind, game_id="g1", source=OpSource.LOBBY, image_ref=IMG, turn_interval=5,
                                 stream="s", entry_id="99-0"), w.defaults)
    else:
        await w.job(kind, "g1")
    probes, calls = w.engine.probes, len(w.backend.calls)
    rec = await w.sync("g1")
    assert w.results("g1")[-1] == (kind.value, "success", "")
    assert rec.converged and rec.desired_status is DesiredStatus.RUNNING and not rec.rolling_back
    assert rec.status is Status.ENGINE_UNREACHABLE and rec.current_container_id == before
    assert [c.id for c in w.running("g1")] == [before]
    assert [c[0] for c in w.backend.calls[calls:]] == ["inspect"] * 2  # looked; touched nothing
    assert w.engine.probes == probes  # and waited for no health answer


async def test_a_restart_whose_engine_fails_is_not_rolled_back_to_the_same_image(w):
    """A rollback to the image the failed unit itself runs would only wait for it once more."""
    await started(w)
    w.backend.behaviour[IMG] = "mute"
    await w.job(JobKind.RESTART, "g1")
    rec = await w.sync("g1")
    assert w.results("g1")[-1] == ("restart", "failure", "engine_unhealthy")
    assert "rolled back" not in w.store.results_for("g1")[-1]["error_message"]
    assert not any(o.params.get("event") == "rollback" for o in w.store.ops)
    assert rec.desired_status is DesiredStatus.STOPPED and rec.status is Status.STOPPED and w.running("g1") == []


async def test_a_slow_status_of_a_generating_engine_is_not_unreachable(w):
    """Issue 21 #9: one status timeout during a long generation failed the turn engine_unreachable,
    then the turn arrived (turn_generated)."""
    w.engine.admin[IMG] = "slow"
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    rec = await w.sync("g1")  # asked: the engine generates
    assert rec.status is Status.GENERATION_IN_PROGRESS
    real = w.engine.status

    async def too_busy(host, **_):
        raise EngineUnreachable("status: timed out")

    w.engine.status = too_busy  # type: ignore[method-assign]
    w.store.clock.advance(w.settings.engine.start_timeout + 1)  # the job waits longer than a start may take
    for _ in range(w.settings.engine.unreachable_after + 1):  # health rounds and turn polls see nothing
        await w.reconciler.observe(w.store.records["g1"], w.backend.ip_of(w.running("g1")[0]))
        rec = await w.sync("g1")
    assert rec.status is Status.GENERATION_IN_PROGRESS and not rec.converged
    assert w.results("g1") == [("start", "success", "")]
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")  # a retry meanwhile asks for the same turn
    w.engine.status = real  # type: ignore[method-assign]
    w.engine.finish_generation("galaxy-game-g1")
    rec = await w.sync("g1")
    assert rec.turn == 1 and rec.status is Status.RUNNING and rec.converged
    assert w.engine.requests == [("galaxy-game-g1", 0)] and w.engine.game("galaxy-game-g1").turn == 1
    assert w.results("g1")[1:] == [("force_next_turn", "success", "")] * 2


async def test_a_status_that_never_answers_past_the_generation_timeout_is_unreachable(tmp_path):
    w = World(tmp_path, RTMANAGER_GENERATION_TIMEOUT="60")
    w.engine.admin[IMG] = "slow"
    await started(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.sync("g1")

    async def too_busy(host, **_):
        raise EngineUnreachable("status: timed out")

    w.engine.status = too_busy  # type: ignore[method-assign]
    w.store.clock.advance(61)
    await w.sync("g1")
    assert w.results("g1")[-1] == ("force_next_turn", "failure", "engine_unreachable")


async def test_a_failed_start_is_answered_only_once_its_engine_is_stopped(w):
    """Issue 21 #10: the engine_unhealthy failure was written while the container still ran."""
    seen: list[tuple[str, list]] = []
    real = w.store._result

    def result(op, res):
        seen.append((res.outcome.value, [c.id for c in w.running("g1")]))
        real(op, res)

    w.store._result = result  # type: ignore[method-assign]
    await w.job(JobKind.START, "g1", "galaxy/engine-stub:mute")
    rec = await w.sync("g1")
    assert w.results("g1") == [("start", "failure", "engine_unhealthy")]
    assert seen == [("failure", [])]  # written when nothing ran any more
    assert rec.status is Status.STOPPED and rec.desired_status is DesiredStatus.STOPPED and rec.converged


async def test_a_failed_start_whose_engine_cannot_be_stopped_is_answered_after_the_job_timeout(tmp_path):
    w = World(tmp_path, RTMANAGER_JOB_TIMEOUT="60")

    async def daemon_gone(unit_id, grace):
        w.backend.down = True
        raise BackendUnavailable("docker stop: connection refused")

    w.backend.stop = daemon_gone  # type: ignore[method-assign]
    await w.job(JobKind.START, "g1", "galaxy/engine-stub:mute")
    with pytest.raises(DockerUnavailable):
        await w.sync("g1")
    assert w.results("g1") == [] and len(w.running("g1")) == 1  # not answered while it runs
    await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, "away", 60)
    assert w.results("g1") == []
    w.store.clock.advance(61)
    await w.reconciler.fail_if_overdue("g1", ErrorCode.DOCKER_UNAVAILABLE, "away", 60)
    assert w.results("g1") == [("start", "failure", "engine_unhealthy")]
    message = w.store.results_for("g1")[-1]["error_message"]
    assert "did not answer" in message and "gave up" in message and "not stopped" in message


async def test_a_stop_the_daemon_refuses_is_answered_and_retried_without_a_loop(tmp_path):
    """Found in review: a stop the daemon refuses for good was held like a failed start's answer,
    never answered, and bumped a new generation at every step."""
    w = World(tmp_path)
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")

    async def refuse(unit_id, grace):
        raise Refused("cannot stop container: permission denied")

    w.backend.stop = refuse  # type: ignore[method-assign]
    await w.job(JobKind.STOP, "g1")
    generation = w.store.records["g1"].generation
    for _ in range(3):
        await w.sync("g1")
    assert w.results("g1")[-1] == ("stop", "failure", "container_start_failed")
    assert w.store.records["g1"].generation <= generation + 3  # one try per pass, not a loop


async def test_a_failed_start_whose_engine_the_daemon_refuses_to_stop_is_answered(tmp_path):
    w = World(tmp_path)

    async def refuse(unit_id, grace):
        raise Refused("cannot stop container: permission denied")

    w.backend.stop = refuse  # type: ignore[method-assign]
    await w.job(JobKind.START, "g1", "galaxy/engine-stub:mute")
    await w.sync("g1")
    [(job, outcome, code)] = w.results("g1")
    assert (job, outcome, code) == ("start", "failure", "engine_unhealthy")
    assert "not stopped" in w.store.results_for("g1")[-1]["error_message"]


# ------------------------------------------------------- the turn clock against a pause or a force
async def scheduled(w: World, game: str = "g1", interval: int = 10):
    await w.store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMG,
                             turn_interval=interval, stream="s", entry_id=f"{len(w.store.ops) + 1}-0"), w.defaults)
    rec = await w.sync(game)
    assert rec.status is Status.RUNNING and rec.admin_api is True and rec.turn == 0
    return rec


class ReadThenRace:
    """The turn clock's due-time query, with something admitted between the read and the submit (the clock's
    game-by-game path: its one statement decides under the games' locks, tests/integration/test_turn_clock_store.py)."""

    def __init__(self, w: World, race) -> None:
        self.w = w
        self.race = race

    async def due_turns(self):
        due = [g for g, r in self.w.store.records.items() if r.turn_interval and not r.paused]  # read: due
        await self.race()
        return due, None


def turn_clock(w: World, race) -> TurnClock:
    admission = Admission(w.store, w.defaults, wake=w.queue.add)
    return TurnClock(store=ReadThenRace(w, race), admission=admission, metrics=Metrics(), max_sleep=60.0)


async def test_a_scheduled_turn_read_before_a_pause_is_not_generated_after_the_pause_is_answered(w):
    await scheduled(w)
    w.store.clock.advance(11)

    async def pause():
        await w.job(JobKind.PAUSE, "g1")
        await w.sync("g1")
        assert w.results("g1")[-1] == ("pause", "success", "")  # the pause is answered

    await turn_clock(w, pause)._tick_one_by_one()  # the clock read the record unpaused, then submits
    rec = await w.sync("g1")
    assert w.engine.requests == [] and rec.turn == 0 and rec.paused
    assert [r for r in w.results("g1") if r[0] == "turn"] == []  # nothing asked, nothing answered


async def test_a_scheduled_turn_read_before_a_force_gives_no_second_turn(w):
    await scheduled(w)
    w.store.clock.advance(11)

    async def force():
        await w.job(JobKind.FORCE_NEXT_TURN, "g1")
        await w.sync("g1")  # asks the engine
        await w.sync("g1")  # sees the turn generated
        assert w.results("g1")[-1] == ("force_next_turn", "success", "")

    await turn_clock(w, force)._tick_one_by_one()
    rec = await w.sync("g1")
    assert rec.turn == 1 and w.engine.requests == [("galaxy-game-g1", 0)]  # the forced turn only


async def test_a_pause_accepted_before_the_engine_is_asked_withdraws_a_scheduled_turn(w):
    await scheduled(w)
    w.store.clock.advance(11)
    await w.store.submit(Job(kind=JobKind.TURN, game_id="g1", source=OpSource.SCHEDULER), w.defaults)
    await w.job(JobKind.PAUSE, "g1")  # before the reconciler asked the engine for the turn
    rec = await w.sync("g1")
    assert w.engine.requests == [] and rec.turn == 0 and rec.paused and rec.converged
    assert w.results("g1")[-2:] == [("turn", "failure", "superseded"), ("pause", "success", "")]
    assert rec.last_error_code is None
    w.store.clock.advance(60)
    await w.sync("g1")
    assert w.engine.requests == []


async def test_a_turn_forced_before_a_pause_is_still_generated(w):
    await scheduled(w)
    await w.job(JobKind.FORCE_NEXT_TURN, "g1")
    await w.job(JobKind.PAUSE, "g1")  # the contract: a forced turn, paused or not
    await w.sync("g1")
    rec = await w.sync("g1")
    assert rec.turn == 1 and rec.paused and rec.converged
    assert w.results("g1")[-2:] == [("pause", "success", ""), ("force_next_turn", "success", "")]


async def test_a_start_admitted_while_our_own_stop_runs_is_not_counted_as_a_crash(w):
    """The stop rtmanager itself carries out is no crash, even when a new start is admitted while
    the engine is being stopped: the engine is started again, its crash count untouched."""
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    await w.job(JobKind.STOP, "g1")

    async def restart_requested():
        await w.job(JobKind.START, "g1", IMG)

    w.backend.while_stopping = restart_requested
    rec = await w.sync("g1")
    assert rec.crash_count == 0 and rec.last_exit_code is None
    assert rec.status is Status.RUNNING and rec.converged and len(w.running("g1")) == 1
    assert w.results("g1") == [("start", "success", ""), ("stop", "failure", "superseded"), ("start", "success", "")]
    assert len(w.backend.ops("stop")) == 1 and not w.backend.ops("remove")  # stopped once, started in place
