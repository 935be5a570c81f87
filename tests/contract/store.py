"""The store contract: what the consumers of the store rely on, as one suite run twice.

tests/unit/test_store_contract.py runs it on the in-memory fake (no services), and
tests/integration/test_store_contract.py on the real store over the test Postgres (it fails,
never skips, without it). Both import the ``test_*`` functions below and give them a ``store``
fixture: a store with no fence, holding nothing yet. When the fake drifts from the real store,
one half fails.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from desired.clock import ManualClock
from desired.errors import Conflict, NotFound, UniqueViolation
from desired.jobs import Job, RecordDefaults
from desired.model import ErrorCode, JobKind, OpSource, OpStatus, Outcome, Status, StopReason
from desired.transitions import Probe
from desired.values import VersionInUse
from desired.versions import VersionStatus

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMG = "galaxy/engine-stub:1.0"


def start(game: str, entry: str, image: str = IMG) -> Job:
    return Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=image, stream="s:start",
               entry_id=entry)


def stop(game: str, entry: str) -> Job:
    return Job(kind=JobKind.STOP, game_id=game, source=OpSource.LOBBY, reason=StopReason.FINISHED,
               stream="s:stop", entry_id=entry)


async def outbox(store: Any, kind: str) -> list[dict[str, str]]:
    return [p.fields for p in await store.unpublished(1000) if p.kind == kind]


async def test_a_submitted_job_is_claimed_once_by_its_generation(store):
    out = await store.submit(start("g1", "1-0"), DEFAULTS)
    assert out.decision is not None and out.decision.action == "change" and not out.duplicate
    again = await store.submit(start("g1", "1-0"), DEFAULTS)
    assert again.duplicate and again.operation_id == out.operation_id
    record = await store.find("g1")
    assert record is not None and record.generation == 1 and record.status is Status.STARTING
    [pending] = await store.pending_operations("g1")
    assert (pending.id, pending.op, pending.status) == (out.operation_id, JobKind.START, OpStatus.QUEUED)
    claimed = await store.claim("g1", record.generation)
    assert [(c.id, c.op) for c in claimed] == [(out.operation_id, JobKind.START)]
    assert await store.claim("g1", record.generation) == []
    assert [o.status for o in await store.pending_operations("g1")] == [OpStatus.RUNNING]


async def test_a_look_that_claims_reads_the_record_and_claims_its_generations_queued_operations(store):
    """The reconciler's first look at a woken game (controller/reconciler.py): one statement."""
    assert await store.find_and_claim("nope") == (None, [])
    out = await store.submit(start("g1", "1-0"), DEFAULTS)
    record, claimed = await store.find_and_claim("g1")
    assert record == await store.find("g1") and record.row_version == (await store.find("g1")).row_version
    assert [(c.id, c.op) for c in claimed] == [(out.operation_id, JobKind.START)]
    assert [o.status for o in await store.pending_operations("g1")] == [OpStatus.RUNNING]
    again, claimed = await store.find_and_claim("g1")
    assert again == record and claimed == []


async def test_the_games_with_a_queued_operation_are_those_with_one_not_claimed_yet(store):
    """The resync forgets the claim memo of these games only (controller/triggers.py)."""
    assert await store.games_with_queued_operations() == set()
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await store.submit(start("g2", "2-0"), DEFAULTS)
    assert await store.games_with_queued_operations() == {"g1", "g2"}
    await store.claim("g1", (await store.find("g1")).generation)
    assert await store.games_with_queued_operations() == {"g2"}


async def test_a_transition_writes_a_snapshot_to_the_outbox_and_answers_the_generation(store):
    await store.submit(start("g1", "1-0"), DEFAULTS)
    assert [(s["status"], s["reason"], s["revision"]) for s in await outbox(store, "snapshot")] == [
        ("starting", "started", "1")]
    rec = await store.mark_starting(await store.get("g1"), rollback_image=None)
    rec = await store.mark_running(rec, container_id="c1", image=IMG)
    assert rec.status is Status.RUNNING and rec.observed_generation == rec.generation
    snapshots = await outbox(store, "snapshot")
    assert [(s["status"], s["previous_status"], s["reason"], s["revision"]) for s in snapshots] == [
        ("starting", "", "started", "1"), ("running", "starting", "started", "2")]
    assert snapshots[-1]["container_id"] == "c1"
    [result] = await outbox(store, "result")
    assert (result["game_id"], result["job"], result["outcome"], result["container_id"]) == (
        "g1", "start", "success", "c1")
    assert await store.pending_operations("g1") == []


async def test_the_outbox_is_published_in_order_and_can_be_published_again(store):
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await store.submit(start("g2", "2-0"), DEFAULTS)
    await store.submit(Job(kind=JobKind.STOP, game_id="nobody", source=OpSource.LOBBY,
                           reason=StopReason.FINISHED, stream="s:stop", entry_id="3-0"), DEFAULTS)
    pending = await store.unpublished(1000)
    seqs = [p.seq for p in pending]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [(p.kind, p.game_id) for p in pending] == [("snapshot", "g1"), ("snapshot", "g2"), ("result", "nobody")]
    assert await store.unpublished_count() == 3
    assert [p.seq for p in await store.unpublished(2)] == seqs[:2]
    first, *rest = pending
    await store.mark_published(first.seq, "100-0")
    await store.mark_published_many([(p.seq, f"{101 + i}-0") for i, p in enumerate(rest)])
    assert await store.unpublished(1000) == [] and await store.unpublished_count() == 0
    recent = await store.recently_published("snapshot", 600)
    assert sorted(recent) == [(first.seq, "100-0", first.result_id), (rest[0].seq, "101-0", rest[0].result_id)]
    assert await store.recently_published("result", 600) == [(rest[1].seq, "102-0", rest[1].result_id)]
    await store.mark_unpublished([first.seq])
    [again] = await store.unpublished(1000)
    assert (again.seq, again.result_id, again.fields) == (first.seq, first.result_id, first.fields)


def control(kind: JobKind, game: str, entry: str) -> Job:
    return Job(kind=kind, game_id=game, source=OpSource.LOBBY, stream="s:control", entry_id=entry)


async def test_the_control_jobs_of_a_turn_still_to_come_are_answered_before_it(store):
    """The reconciler, when the unit is right and only the turn is to come (controller/reconciler.py): a pause,
    a resume, a reconcile are answered now, the turn's jobs wait; a new version of the row. With a start
    that joined the turn, they wait with it. Conflict once another generation took over."""
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await store.mark_running(await store.find("g1"), container_id="c1", image=IMG)
    await store.submit(control(JobKind.FORCE_NEXT_TURN, "g1", "2-0"), DEFAULTS)
    rec = await store.turn_requested(await store.find("g1"))
    for i, kind in enumerate((JobKind.PAUSE, JobKind.RECONCILE, JobKind.RESUME)):
        await store.submit(control(kind, "g1", f"{3 + i}-0"), DEFAULTS)
    rec, _ = await store.find_and_claim("g1")
    await store.mark_published_many([(p.seq, f"{100 + i}-0") for i, p in enumerate(await store.unpublished(1000))])
    answered = await store.answer_during_turn(rec)
    assert answered is not None and answered.generation == rec.generation and not answered.converged
    assert rec.row_version is None or answered.row_version not in (None, rec.row_version)  # the fake keeps none
    results = [(r["job"], r["outcome"], r["error_code"], r["container_id"]) for r in await outbox(store, "result")]
    assert results == [(k, "success", "", "c1") for k in ("pause", "reconcile", "resume")]
    assert [o.op.value for o in await store.pending_operations("g1")] == ["force_next_turn"]
    assert await store.answer_during_turn(answered) is None  # nothing left to answer
    await store.submit(start("g1", "6-0"), DEFAULTS)  # joins the turn's generation: the same image
    await store.submit(control(JobKind.PAUSE, "g1", "7-0"), DEFAULTS)
    rec = await store.find("g1")
    assert await store.answer_during_turn(rec) is None  # the pause waits with the start, as for any start
    assert sorted(o.op.value for o in await store.pending_operations("g1")) == ["force_next_turn", "pause", "start"]
    await store.submit(stop("g1", "8-0"), DEFAULTS)
    with pytest.raises(Conflict):
        await store.answer_during_turn(answered)


async def test_a_restore_of_a_games_state_is_in_the_operation_log(store):
    """controller/storage.py notes a restore that is not a rollback's before it is done."""
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await store.find("g1")
    await store.note_state_restore(rec, "c0ffee000000", "the game was stopped before the replacement's engine answered")
    [note] = [o for o in await store.operations("g1") if o.params.get("event") == "state_restore"]
    assert (note.op, note.source.value, note.status, note.params["copy"]) == (
        JobKind.RECONCILE, "reconciler", OpStatus.SUCCEEDED, "c0ffee000000")
    assert [o.op for o in await store.pending_operations("g1")] == [JobKind.START]  # nothing answered or queued


async def test_a_rollback_overtaken_names_the_rollbacks_engine_and_no_longer_rolls_back(store):
    """controller/reconciler.py, a job during a rollback's health wait: the record names the rollback's engine
    (its state is the one a failure goes back to), guarded on the job's generation."""
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await store.mark_starting(await store.get("g1"), rollback_image=None)
    rec = await store.mark_running(rec, container_id="a" * 64, image=IMG)
    await store.submit(Job(kind=JobKind.PATCH, game_id="g1", source=OpSource.LOBBY, image_ref=IMG + "-b",
                           stream="s:control", entry_id="2-0"), DEFAULTS)
    rec = await store.mark_starting(await store.get("g1"), rollback_image=IMG)
    rec = await store.fail_generation("g1", rec.generation, ErrorCode.ENGINE_UNHEALTHY, "no answer")
    assert rec.rolling_back and rec.desired_image_ref == IMG
    stale = rec
    await store.submit(Job(kind=JobKind.PATCH, game_id="g1", source=OpSource.LOBBY, image_ref=IMG + "-c",
                           stream="s:control", entry_id="3-0"), DEFAULTS)
    with pytest.raises(Conflict):
        await store.mark_rollback_overtaken(stale, container_id="b" * 64)  # the job's generation is newer
    rec = await store.mark_rollback_overtaken(await store.get("g1"), container_id="b" * 64)
    assert (rec.current_container_id, rec.rolling_back, rec.rollback_image_ref, rec.desired_image_ref) == (
        "b" * 64, False, IMG, IMG + "-c")
    assert (await store.get("g1")) == rec


async def test_snapshot_revisions_are_raised_above_a_floor_with_the_unpublished_ones_numbered_after_it(store):
    """controller/snapshot_floor.py after a restore of the database: a game behind its floor gets its
    unpublished snapshots numbered above it, in order, and its next snapshot after them; a game at or
    above its floor, or without a record, is left as it is."""
    await store.submit(start("g1", "1-0"), DEFAULTS)
    await store.submit(start("g2", "2-0"), DEFAULTS)
    g2 = (await store.get("g2")).snapshot_revision
    g2_ids = frozenset(p.fields["snapshot_id"] for p in await store.unpublished(1000) if p.game_id == "g2")
    assert await store.raise_snapshot_revisions({"g1": 40, "g2": g2, "nobody": 7}, g2_ids) == 1  # g2: on the stream
    revs = {g: (await store.get(g)).snapshot_revision for g in ("g1", "g2")}
    pending = [p.fields["revision"] for p in await store.unpublished(1000) if p.kind == "snapshot"
               and p.game_id == "g1"]
    assert pending and pending == [str(41 + i) for i in range(len(pending))]
    assert revs == {"g1": 40 + len(pending), "g2": g2}
    rec = await store.mark_starting(await store.get("g1"), rollback_image=None)
    await store.mark_running(rec, container_id="c" * 64, image=IMG)  # a status change: a snapshot
    newest = [p.fields["revision"] for p in await store.unpublished(1000) if p.kind == "snapshot"
              and p.game_id == "g1"][-1]
    assert int(newest) == 41 + len(pending)


async def test_a_snapshot_numbered_again_at_the_floor_is_numbered_above_it(store):
    """A term that numbered a snapshot before the floor was raised gave it a revision Lobby already holds
    (the record said less): equal to the floor is below it."""
    await store.submit(start("g1", "1-0"), DEFAULTS)
    g1 = (await store.get("g1")).snapshot_revision
    assert await store.raise_snapshot_revisions({"g1": g1}) == 1
    [pending] = [p for p in await store.unpublished(1000) if p.kind == "snapshot" and p.game_id == "g1"]
    assert pending.fields["revision"] == str(g1 + 1) and (await store.get("g1")).snapshot_revision == g1 + 1


async def test_a_floor_of_a_game_without_a_record_is_kept_for_its_record(store):
    """A game the restored database lost: its record, made again later, numbers its snapshots above the floor."""
    assert await store.raise_snapshot_revisions({"g9": 12}) == 0
    await store.submit(start("g9", "9-0"), DEFAULTS)
    assert (await store.get("g9")).snapshot_revision == 13
    await store.submit(start("g8", "8-0"), DEFAULTS)  # a game with no floor starts at 1
    assert (await store.get("g8")).snapshot_revision == 1


async def test_a_snapshot_already_on_the_stream_is_not_numbered_again(store):
    await store.submit(start("g1", "1-0"), DEFAULTS)
    [first] = [p for p in await store.unpublished(1000) if p.kind == "snapshot" and p.game_id == "g1"]
    assert await store.raise_snapshot_revisions({"g1": 30}, frozenset({first.fields["snapshot_id"]})) == 1
    [again, resync] = [p for p in await store.unpublished(1000) if p.kind == "snapshot" and p.game_id == "g1"]
    assert again.fields["revision"] == first.fields["revision"]
    # nothing of g1 left to publish above the floor: a resync snapshot carries its state to Lobby
    assert (resync.fields["reason"], resync.fields["revision"]) == ("resync", "31")
    assert (await store.get("g1")).snapshot_revision == 31


async def test_a_pause_withdrawing_a_scheduled_turn_not_asked_yet_waits_for_the_withdrawal(store):
    """controller/turns.py asks the engine, then answers the turn superseded and the pause in one transaction."""
    await store.submit(Job(kind=JobKind.START, game_id="g1", source=OpSource.LOBBY, image_ref=IMG, turn_interval=1,
                           stream="s:start", entry_id="1-0"), DEFAULTS)
    rec = await store.mark_running(await store.find("g1"), container_id="c1", image=IMG,
                                   probe=Probe(healthy=True, admin_api=True, turn=0, phase="idle"))
    if isinstance(store.clock, ManualClock):
        store.clock.advance(2)
    else:
        await asyncio.sleep(1.1)  # the real store's clock is the database's: the 1 s interval passes
    out = await store.submit(Job(kind=JobKind.TURN, game_id="g1", source=OpSource.SCHEDULER), DEFAULTS)
    assert out.decision is not None and out.decision.action == "change"
    await store.submit(control(JobKind.PAUSE, "g1", "2-0"), DEFAULTS)
    rec, _ = await store.find_and_claim("g1")
    assert rec.paused and rec.generation_started_at is None
    assert await store.answer_during_turn(rec) is None
    assert sorted(o.op.value for o in await store.pending_operations("g1")) == ["pause", "turn"]


async def test_a_newer_job_supersedes_the_pending_job_of_a_stale_generation(store):
    first = await store.submit(start("g1", "1-0"), DEFAULTS)
    await store.claim("g1", 1)
    out = await store.submit(stop("g1", "2-0"), DEFAULTS)
    assert out.decision is not None and out.decision.action == "change"
    record = await store.get("g1")
    assert record.generation == 2
    [superseded] = [r for r in await outbox(store, "result")]
    assert (superseded["job"], superseded["outcome"], superseded["error_code"]) == (
        "start", Outcome.FAILURE.value, ErrorCode.SUPERSEDED.value)
    assert superseded["error_message"] == "replaced by a newer job (generation 2) before it converged"
    ops = {o.id: o for o in await store.operations("g1")}
    assert ops[first.operation_id].status is OpStatus.FAILED
    assert ops[out.operation_id].status is OpStatus.QUEUED
    # The reconciler's view of the old generation no longer holds: it cannot answer it.
    assert await store.fail_generation("g1", 1, ErrorCode.CONTAINER_START_FAILED, "late") is None


async def test_the_version_registry_creates_updates_and_refuses_to_delete_a_version_in_use(store):
    created = await store.create_version("1.0", IMG, VersionStatus.ACTIVE, "first")
    assert (created.version, created.image_ref, created.status, created.notes) == (
        "1.0", IMG, VersionStatus.ACTIVE, "first")
    with pytest.raises(UniqueViolation) as same_version:
        await store.create_version("1.0", "galaxy/engine-stub:other", VersionStatus.ACTIVE, "")
    assert same_version.value.constraint == "engine_versions_version_key"
    with pytest.raises(UniqueViolation) as same_image:
        await store.create_version("1.0b", IMG, VersionStatus.ACTIVE, "")
    assert same_image.value.constraint == "engine_versions_image_ref_key"
    updated = await store.update_version("1.0", status=VersionStatus.DISABLED, notes=None, stop_grace=30)
    assert (updated.status, updated.notes, updated.stop_grace) == (VersionStatus.DISABLED, "first", 30)
    kept = await store.update_version("1.0", status=None, notes="kept")
    assert (kept.status, kept.notes, kept.stop_grace) == (VersionStatus.DISABLED, "kept", 30)
    with pytest.raises(NotFound):
        await store.update_version("9.9", status=None, notes="x")
    assert [v.version for v in await store.list_versions()] == ["1.0"]
    assert await store.list_versions(VersionStatus.ACTIVE) == []
    await store.submit(start("g1", "1-0"), DEFAULTS)
    entry, live = await store.get_version("1.0")
    assert (entry.version, live) == ("1.0", 1)
    assert (await store.engine_version_of(IMG)) == entry
    with pytest.raises(VersionInUse):
        await store.delete_version("1.0")
    with pytest.raises(NotFound):
        await store.delete_version("9.9")
    await store.create_version("2.0", "galaxy/engine-stub:2.0", VersionStatus.ACTIVE, "")
    await store.delete_version("2.0")
    with pytest.raises(NotFound):
        await store.get_version("2.0")


async def test_stream_marks_only_advance(store):
    assert await store.stream_marks() == {}
    assert await store.advance_mark("s:start", (5, 1)) == (5, 1)
    assert await store.advance_mark("s:start", (5, 0)) == (5, 1)  # never lowered
    assert await store.advance_mark("s:start", (4, 9)) == (5, 1)
    assert await store.advance_mark("s:start", (6, 0)) == (6, 0)
    assert await store.advance_mark("s:stop", (1, 0)) == (1, 0)
    assert await store.stream_marks() == {"s:start": (6, 0), "s:stop": (1, 0)}
    assert await store.count_attempt("s:start", "1-0", "boom") == 1
    assert await store.count_attempt("s:start", "1-0") == 2
    await store.uncount_attempt("s:start", "1-0")
    assert await store.count_attempt("s:start", "1-0") == 2
    await store.forget_attempts("s:start", "1-0")
    assert await store.count_attempt("s:start", "1-0") == 1


async def test_a_commit_that_moves_the_turn_clock_raises_its_signal_and_a_plain_probe_does_not(store):
    """The turn clock sleeps until the next due game; the store wakes it after every commit that can
    change a due time, whether or not the commit wrote the outbox (an interval set by an operator
    writes no outbox row), and not after a probe that changed nothing the clock reads."""
    await store.submit(start("g1", "1-0"), DEFAULTS)
    assert store.schedule.raised == 0  # a new game is due once it runs
    rec = await store.mark_starting(await store.get("g1"), rollback_image=None)
    rec = await store.mark_running(rec, container_id="c1", image=IMG)
    probe = Probe(healthy=True, admin_api=True, turn=3, phase="idle")
    rec = await store.record_observation(rec, probe, unreachable_after=3, generation_timeout=600)
    raised, written = store.schedule.raised, store.outbox.raised
    rec = await store.record_observation(rec, probe, unreachable_after=3, generation_timeout=600)
    assert store.schedule.raised == raised  # the same engine, seen again
    await store.set_schedule("g1", 60, OpSource.ADMIN)
    assert store.schedule.raised == raised + 1 and store.outbox.raised == written
    if isinstance(store.clock, ManualClock):
        store.clock.advance(1)  # the turn is generated later than the one before: its due time moves
    rec = await store.record_observation(await store.get("g1"), Probe(healthy=True, admin_api=True, turn=4,
                                                                     phase="idle"),
                                         unreachable_after=3, generation_timeout=600)
    assert store.schedule.raised == raised + 2  # a generated turn: the next one counts from it


async def test_a_lost_node_is_recorded_without_a_crash_then_the_game_moves_or_stops(store):
    for game, entry in (("g1", "1-0"), ("g2", "2-0")):
        await store.submit(start(game, entry), DEFAULTS)
        rec = await store.mark_starting(await store.get(game), rollback_image=None)
        await store.mark_running(rec, container_id=f"c-{game}", image=IMG, node="n2")
    lost = await store.record_node_loss(await store.get("g1"), "lost", node="n2")
    assert lost.status is Status.NODE_LOST and lost.node_lost_since is not None and lost.crash_count == 0
    assert lost.current_container_id == "c-g1" and lost.node_id == "n2" and lost.converged
    [snap] = [s for s in await outbox(store, "snapshot") if s["game_id"] == "g1" and s["reason"] == "node_lost"]
    assert (snap["status"], snap["previous_status"], snap["error_code"]) == ("node_lost", "running", "")
    assert "n2" in snap["error_message"]
    moved = await store.record_node_loss(lost, "move", node="n2")
    assert moved.node_id is None and moved.avoid_nodes == ("n2",) and moved.status is Status.NODE_LOST
    assert moved.spec_revision == lost.spec_revision + 1 and moved.generation == lost.generation  # no job
    assert (await store.get("g1")).avoid_nodes == ("n2",)
    rec = await store.mark_starting(moved, rollback_image=None)
    assert rec.node_lost_since is None
    rec = await store.mark_running(rec, container_id="c-g1b", image=IMG, node="n1")
    assert rec.node_id == "n1" and rec.avoid_nodes == ("n2",) and rec.status is Status.RUNNING

    lost = await store.record_node_loss(await store.get("g2"), "lost", node="n2")
    with pytest.raises(Conflict):  # compare-and-swap: a stale record is refused
        await store.record_node_loss(lost.replace(generation=lost.generation - 1), "stop", node="n2")
    stopped = await store.record_node_loss(lost, "stop", node="n2", message="stopped: node lost")
    assert stopped.desired_status.value == "stopped" and stopped.generation == lost.generation + 1
    assert stopped.crash_count == 0 and stopped.last_error_message == "stopped: node lost"
    rec = await store.mark_stopped(stopped, container_id="c-g2")
    assert rec.status is Status.STOPPED and rec.node_lost_since is None


async def test_an_overdue_job_of_a_node_lost_game_is_answered_and_desired_state_stays(store):
    """answer_overdue (a job waited too long for a lost node): the jobs of that generation get the failure;
    desired state stays what they asked for (the node-loss policy decides the game's fate)."""
    await store.submit(start("g1", "1-0"), DEFAULTS)
    rec = await store.mark_starting(await store.get("g1"), rollback_image=None)
    await store.mark_running(rec, container_id="c-g1", image=IMG, node="n2")
    lost = await store.record_node_loss(await store.get("g1"), "lost", node="n2")
    await store.submit(Job(kind=JobKind.RESTART, game_id="g1", source=OpSource.LOBBY, stream="s:control",
                           entry_id="2-0"), DEFAULTS)
    wanted = await store.get("g1")
    assert wanted.generation == lost.generation + 1 and not wanted.converged
    assert await store.answer_overdue("g1", wanted.generation - 1, ErrorCode.DOCKER_UNAVAILABLE, "late") == 0
    assert await store.answer_overdue("g1", wanted.generation, ErrorCode.DOCKER_UNAVAILABLE, "node n2 lost") == 1
    assert await store.pending_operations("g1") == []
    rec = await store.get("g1")
    assert (rec.desired_status.value, rec.generation, rec.status) == ("running", wanted.generation, Status.NODE_LOST)
    assert rec.last_error_code is ErrorCode.DOCKER_UNAVAILABLE
    [res] = [r for r in await outbox(store, "result") if r.get("job") == "restart"]
    assert (res["outcome"], res["error_code"]) == ("failure", "docker_unavailable")
