"""What one start costs in backend and engine calls (issue 25: CPU per start, one game's overhead). The plain
docker-py loop the benchmark compares with makes three daemon calls a start (create, start, inspect); a start
of rtmanager made eight (a look, an image check, the create and an inspect after it, the start, an inspect for
the address, one after the health answer, and the next look's), then one more look for the echo of its own
start on the event stream, and asked the engine's health path again right after it had answered."""

from __future__ import annotations

import asyncio

import pytest

from desired.model import JobKind, Status
from observed.model import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY
from tests.support.waits import eventually
from tests.support.world import IMG, World, started


def names(calls: list[tuple]) -> list[str]:
    return [c[0] for c in calls]


async def test_a_start_costs_a_create_a_start_and_two_inspects_and_its_next_look_none(tmp_path):
    w = World(tmp_path)
    w.reconciler.units.stream = lambda: 1  # an event stream connected without a break
    record = await started(w)
    assert record.status is Status.RUNNING
    calls = names(w.backend.calls)
    # The look before it, then no image check (a create of a missing image fails and pulls), the address
    # after the start, and the unit once more after the health answer (the address may have been handed on).
    assert calls == ["inspect", "prepare", "make_state_dir", "create", "start", "inspect", "inspect"], calls
    n = len(w.backend.calls)
    await w.sync("g1")  # the unit inspected after the health answer vouches for the next looks
    assert names(w.backend.calls[n:]) == []


async def test_without_an_event_stream_the_look_after_a_start_inspects(tmp_path):
    w = World(tmp_path)  # no event stream: nothing vouches for a unit between looks
    await started(w)
    n = len(w.backend.calls)
    await w.sync("g1")
    assert names(w.backend.calls[n:]) == ["inspect"]


async def test_a_missing_image_still_fails_the_start_with_image_unavailable(tmp_path):
    w = World(tmp_path)
    await w.job(JobKind.START, "g1", "galaxy/engine-stub:absent")
    record = await w.sync("g1")
    assert ("start", "failure", "image_unavailable") in w.results("g1")
    assert record.status is not Status.RUNNING
    assert not w.backend.containers


async def test_the_health_path_is_not_asked_again_right_after_it_answered(tmp_path):
    w = World(tmp_path)
    await started(w)
    assert w.engine.probes == 1  # the answer that ended the wait, not a second one before the status


async def test_while_the_event_stream_vouches_a_slow_start_is_not_inspected_every_half_second(tmp_path):
    """A start waits for the health path up to RTMANAGER_ENGINE_START_TIMEOUT; the unit was inspected every
    0.5 s meanwhile to see it had not exited. With an event stream connected, an exit is an event that
    touches the game: only then is it inspected."""
    w = World(tmp_path)
    w.reconciler.units.stream = lambda: 1
    w.engine.healthy_after[IMG] = 1.3  # seconds after its start before the health path answers
    await started(w)
    assert names(w.backend.calls).count("inspect") == 3  # the look, the address, after the health answer


async def test_an_exit_during_a_slow_start_is_seen_through_the_event_stream(tmp_path):
    w = World(tmp_path)
    w.reconciler.units.stream = lambda: 1
    w.engine.healthy_after[IMG] = 30.0

    async def crash_soon() -> None:
        await eventually(lambda: bool(w.running("g1")), 5, "the engine started", interval=0.01)
        await asyncio.sleep(0.2)  # the start is waiting for the health path by now
        w.backend.crash("g1", code=7)
        w.reconciler.units.touch("g1")  # what the event stream's ``die`` does

    await w.job(JobKind.START, "g1", IMG)
    crash = asyncio.create_task(crash_soon())
    await asyncio.wait_for(w.sync("g1"), 10)  # not the 30 s the health path would take
    await crash
    assert ("start", "failure", "container_start_failed") in w.results("g1")


async def test_a_unit_that_exists_though_the_record_never_created_one_is_adopted_not_duplicated(tmp_path):
    """A database restored from before the unit was made: the record is a new game's, the unit runs. The
    start's create finds the name taken and goes on with the unit that holds it."""
    w = World(tmp_path)
    await started(w)
    [unit] = w.running("g1")
    w.store.records.pop("g1")  # the record as a backup from before the start has it: none, then the job
    await w.job(JobKind.START, "g1", IMG)
    assert w.store.records["g1"].admin_token == "" and w.store.records["g1"].current_container_id is None
    record = await w.sync("g1")
    assert record.status is Status.RUNNING and record.current_container_id == unit.id
    assert [c.id for c in w.backend.containers.values()] == [unit.id]
    assert w.results("g1")[-1][:2] == ("start", "success")


async def test_a_name_held_by_a_container_not_ours_still_fails_the_start_and_is_left_alone(tmp_path):
    from tests.fakes import FakeContainer

    w = World(tmp_path)
    w.backend.containers["x1"] = FakeContainer(id="x1", name="galaxy-game-g1", image="other/app:1", labels={},
                                               state="running")
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    assert ("start", "failure", "container_start_failed") in w.results("g1")
    assert list(w.backend.containers) == ["x1"] and w.backend.containers["x1"].state == "running"
    assert not [c for c in w.backend.calls if c[0] in ("stop", "remove", "start")]


async def test_a_stop_admitted_before_the_first_look_is_looked_at_not_assumed(tmp_path):
    """A start then a stop before any look, and a unit of ours running (a restored database): the plan without
    a unit is not a create, so the look inspects, and the unit is stopped."""
    w = World(tmp_path)
    await started(w)
    w.store.records.pop("g1")
    await w.job(JobKind.START, "g1", IMG)
    await w.job(JobKind.STOP, "g1")
    await w.sync("g1")
    assert w.running("g1") == []


async def test_a_dry_run_looks_before_it_says_what_it_would_do(tmp_path):
    w = World(tmp_path, RTMANAGER_DRY_RUN="true")
    await w.job(JobKind.START, "g1", IMG)
    await w.sync("g1")
    assert names(w.backend.calls) == ["inspect"]


@pytest.mark.parametrize("job_before_the_look", [False, True])
async def test_an_adopted_unit_is_confirmed_as_it_runs_not_created_again(tmp_path, job_before_the_look):
    """``rtmanager adopt`` writes a record that looks new (starting, no unit, no token). 3b7746a let a look
    that claimed a job of such a record go straight to a create, without an inspect; a create checks the
    allowlist, so a unit running an image no longer allowed was stopped by its own adoption (two reviews:
    the adoption's own wake, then any job queued before the first look). Reverted: every look at a game
    with no unit in the cache inspects, and an adopted unit is confirmed as it runs."""
    from controller.config import Settings
    from desired.model import DesiredStatus

    w = World(tmp_path)
    await started(w)
    [unit] = w.running("g1")
    rec = w.store.records["g1"]
    # What the adoption writes: a record that wants the unit running, on its image, knowing nothing else.
    w.store.records["g1"] = rec.replace(status=Status.STARTING, current_container_id=None, current_image_ref=None,
                                        admin_token="", generation=rec.generation + 1,
                                        observed_generation=rec.generation, desired_status=DesiredStatus.RUNNING)
    w.reconciler.starts.settings = Settings.from_env({
        "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:9.*", "RTMANAGER_STATE_ROOT": str(tmp_path / "games"),
        "RTMANAGER_ORPHAN_GRACE": "0"})  # its image is no longer allowed for new starts
    if job_before_the_look:
        await w.job(JobKind.RECONCILE, "g1")
    w.reconciler.job_admitted("g1")  # the adoption's NOTIFY (or the job's wake)
    record = await w.sync("g1")
    assert record.status is Status.RUNNING and record.current_container_id == unit.id
    assert record.desired_status is DesiredStatus.RUNNING
    assert unit.state == "running"


async def test_a_name_held_by_a_unit_being_removed_is_waited_for_not_started(tmp_path):
    """A holder of the name in state ``removing`` (an operator's removal still running) is waited for; with no
    look before the create (3b7746a, reverted) it was started, which the daemon refuses: a failed start. A
    unit a create returns that it did not make is planned for from a real look too (39a164e)."""
    from tests.fakes import FakeContainer

    w = World(tmp_path)
    await w.job(JobKind.START, "g1", IMG)
    w.reconciler.job_admitted("g1")
    spec = w.reconciler.specs.build(w.store.records["g1"], w.reconciler.epoch)
    w.backend.containers["x1"] = FakeContainer(id="x1", name="galaxy-game-g1", image=IMG, labels=spec.all_labels(),
                                               state="removing")
    await w.sync("g1")
    assert ("start", "x1") not in w.backend.calls
    assert not [r for r in w.results("g1") if r[1] == "failure"]
    assert ("inspect", "galaxy-game-g1") in w.backend.calls  # planned from a real look after the create


@pytest.mark.parametrize("holder", ["not ours", "another instance's"])
async def test_after_a_full_list_a_name_held_by_a_unit_not_listed_is_refused_before_any_side_effect(tmp_path,
                                                                                                   holder):
    """The resync's list shows this instance's units only, and the event stream only their events: a game the
    list showed no unit of may still have its name held, by a container of nobody's or by another instance's
    unit. Its start must be refused from a real look, before a state directory or a token is made (a look
    skipped on the strength of the list made both, then failed at the create)."""
    from controller.triggers import Resync
    from tests.fakes import FakeContainer

    async def ready() -> bool:
        return True

    w = World(tmp_path)
    w.reconciler.units.stream = lambda: 1  # an event stream connected without a break
    labels = {} if holder == "not ours" else {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: "other"}
    w.backend.containers["x1"] = FakeContainer(id="x1", name="galaxy-game-g1", image=IMG, labels=labels,
                                               state="running")
    await Resync(store=w.store, backend=w.backend, reconciler=w.reconciler, queue=w.queue,
                 metrics=w.reconciler.metrics, interval=30, retention_days=7, ready_check=ready).once()
    await w.job(JobKind.START, "g1", IMG)
    record = await w.sync("g1")
    assert ("start", "failure", "container_start_failed") in w.results("g1")
    assert not (tmp_path / "games" / "g1").exists() and not record.admin_token
    assert [c[0] for c in w.backend.calls if c[0] in ("prepare", "make_state_dir", "create")] == []
    assert w.backend.containers["x1"].state == "running"
