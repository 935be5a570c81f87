"""Property: any sequence of jobs through decide(), with convergence steps in between,
keeps every record valid, never moves generations back, and answers every job exactly once.

The "controller" here is a tiny simulation of what the reconciler and the store do
(desired/db/transitions.py): it walks the status machine to the desired status,
sets the timestamps of the destination, and copies generation to observed_generation.
It can also crash a running engine (RECOVER: running -> starting at the same generation)
and give a crashed game up (store.give_up: desired stopped at a new, converged generation,
its pending operations answered with a failure). Converging a running game generates the turn
desired state asks for, as the reconciler does before it answers (and only a turn some pending
job asked for: a superseded or failed forced turn is never generated later).
Operation bookkeeping follows the contract and desired/jobs.py: replay / reject answer
at once; join / change wait for their generation; a change of what runs (``replaces``)
supersedes pending operations of older generations, a control op or a turn supersedes nothing;
converging answers every operation waiting for that generation or an older one.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st

from desired import transitions
from desired.jobs import ImageAllowlist, RecordDefaults, decide, parse_job, replaces
from desired.model import (
    DesiredStatus,
    ErrorCode,
    Health,
    JobKind,
    RuntimeRecord,
    Status,
    StopReason,
    check_transition,
)

GAMES = ["a", "g1", "z-9"]
IMAGES = ["galaxy/engine:1", "galaxy/engine:2", "galaxy/engine-stub:1"]
ALLOW = ImageAllowlist("galaxy/engine:*,galaxy/engine-stub:*")
DEFAULTS = RecordDefaults(docker_network="galaxy-games", state_root="/var/lib/rtmanager/games", engine_port=8080)
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass
class Sim:
    now: datetime = T0
    records: dict[str, RuntimeRecord] = field(default_factory=dict)
    pending: list[tuple[int, str, int]] = field(default_factory=list)  # (job index, game, generation)
    answers: collections.Counter = field(default_factory=collections.Counter)
    outcomes: dict[int, str] = field(default_factory=dict)
    jobs: int = 0
    containers: int = 0
    kinds: dict[int, JobKind] = field(default_factory=dict)
    turns_generated: int = 0

    def tick(self, seconds: int = 1) -> None:
        self.now += timedelta(seconds=seconds)

    def answer(self, idx: int, how: str) -> None:
        assert self.answers[idx] == 0, f"job {idx} answered twice ({self.outcomes[idx]}, then {how})"
        self.answers[idx] += 1
        self.outcomes[idx] = how

    def store(self, gid: str, new: RuntimeRecord) -> None:
        new.validate()
        old = self.records.get(gid)
        if old is not None:
            assert new.generation >= old.generation
            assert new.observed_generation >= old.observed_generation
            assert new.created_at == old.created_at
            assert new.last_op_at >= old.last_op_at
        self.records[gid] = new

    def job(self, kind: JobKind, gid: str, image: str, reason: StopReason) -> None:
        idx = self.jobs
        self.jobs += 1
        self.kinds[idx] = kind
        fields = {b"game_id": gid.encode()}
        if kind in (JobKind.START, JobKind.PATCH):
            fields[b"image_ref"] = image.encode()
        if kind is JobKind.STOP:
            fields[b"reason"] = reason.value.encode()
        job = parse_job(kind, fields, ALLOW, entry_id=f"{idx}-0")
        old = self.records.get(gid)
        d = decide(old, job, self.now, DEFAULTS)
        if d.action in ("replay", "reject"):
            assert d.record is old
            assert d.error_code is (ErrorCode.REPLAY_NO_OP if d.action == "replay" else ErrorCode.INVALID_REQUEST)
            self.answer(idx, d.action)
        elif d.action == "skip":  # the clock's turn no longer due: nothing recorded, nobody waits for it
            assert kind is JobKind.TURN and old is not None and d.record is old
            self.answer(idx, "skip")
        elif d.action == "join":
            assert old is not None and d.record is old
            assert not settled(old), "a join on a settled record would never be answered"
            self.pending.append((idx, gid, old.generation))
        else:
            assert d.action == "change", d.action
            new = d.record
            assert new is not None
            assert new.generation == (old.generation + 1 if old else 1)
            assert new.observed_generation == (old.observed_generation if old else 0)
            if old is not None and replaces(old, new):  # control ops and turns replace nothing
                for op in [op for op in self.pending if op[1] == gid and op[2] < new.generation]:
                    self.pending.remove(op)
                    self.answer(op[0], "superseded")
            self.store(gid, new)
            self.pending.append((idx, gid, new.generation))

    def converge(self, gid: str) -> None:
        rec = self.records.get(gid)
        if rec is None:
            return
        if not settled(rec) or not transitions.turn_reached(rec):
            self.store(gid, self._converged(rec))
            rec = self.records[gid]
        for op in [op for op in self.pending if op[1] == gid]:
            assert op[2] <= rec.generation, f"op {op} ahead of generation {rec.generation}"
            self.pending.remove(op)
            self.answer(op[0], "converged")

    def crash(self, gid: str) -> None:
        """The engine exited on its own (reconciler RECOVER): starting again after a backoff."""
        rec = self.records.get(gid)
        if rec is None or rec.status is not Status.RUNNING:
            return
        check_transition(rec.status, Status.STARTING)
        self.store(gid, rec.replace(
            status=Status.STARTING, crash_count=rec.crash_count + 1, last_exit_code=1, last_crash_at=self.now,
            restart_not_before=self.now + timedelta(seconds=1), health=Health.UNREACHABLE,
            last_error_code=ErrorCode.CONTAINER_START_FAILED, last_error_message="exited",
            last_op_at=max(self.now, rec.last_op_at)))

    def give_up(self, gid: str) -> None:
        """The crash limit was reached (store.give_up): stop wanting the game running."""
        rec = self.records.get(gid)
        if rec is None or rec.status is not Status.STARTING or rec.crash_count == 0 \
                or rec.desired_status is not DesiredStatus.RUNNING:
            return
        check_transition(rec.status, Status.STOPPED)
        new = transitions.turn_unasked(rec).replace(
            desired_status=DesiredStatus.STOPPED, generation=rec.generation + 1,
            observed_generation=rec.generation + 1, status=Status.STOPPED, stopped_at=self.now,
            current_image_ref=rec.current_image_ref or rec.desired_image_ref, restart_not_before=None,
            health=Health.UNKNOWN, last_op_at=max(self.now, rec.last_op_at))
        for op in [op for op in self.pending if op[1] == gid]:
            assert op[2] <= rec.generation, f"op {op} ahead of generation {rec.generation}"
            self.pending.remove(op)
            self.answer(op[0], "gave_up")
        self.store(gid, new)

    def _converged(self, rec: RuntimeRecord) -> RuntimeRecord:
        status = rec.status

        def move(to: Status) -> None:
            nonlocal status
            check_transition(status, to)
            status = to

        changes: dict = {}
        target = rec.desired_status
        if target is DesiredStatus.RUNNING:
            assert status is not Status.REMOVED, "desired running on a removed record"
            if status in (Status.RUNNING, Status.STOPPED):
                move(Status.STARTING)  # recreate / start again
            move(Status.RUNNING)
            self.containers += 1
            changes = dict(current_container_id=f"c{self.containers}", current_image_ref=rec.desired_image_ref,
                           started_at=self.now, stopped_at=None, health=Health.HEALTHY, restart_not_before=None)
            if not transitions.turn_reached(rec):  # the reconciler asks the engine for it first
                assert rec.desired_turn is not None
                waiting = [op for op in self.pending if op[1] == rec.game_id
                           and self.kinds[op[0]] in (JobKind.FORCE_NEXT_TURN, JobKind.TURN)]
                assert waiting, f"turn {rec.desired_turn} generated for nobody: its jobs were answered"
                self.turns_generated += 1
                changes["turn"] = rec.desired_turn
        elif target is DesiredStatus.STOPPED:
            assert status is not Status.REMOVED, "desired stopped on a removed record"
            if status is not Status.STOPPED:
                move(Status.STOPPED)
                changes = dict(stopped_at=self.now, health=Health.UNKNOWN,
                               current_image_ref=rec.current_image_ref or rec.desired_image_ref)
        else:
            if status is not Status.REMOVED:
                move(Status.REMOVED)
                changes = dict(removed_at=self.now, current_container_id=None, health=Health.UNKNOWN)
        return rec.replace(status=status, observed_generation=rec.generation,
                           last_op_at=max(self.now, rec.last_op_at), **changes)


def settled(rec: RuntimeRecord) -> bool:
    """Converged, and the observed status is the desired one (not a crashed engine waiting to restart)."""
    return rec.converged and rec.status.value == rec.desired_status.value


job_step = st.tuples(st.just("job"), st.sampled_from(list(JobKind)), st.sampled_from(GAMES),
                     st.sampled_from(IMAGES), st.sampled_from(list(StopReason)))
converge_step = st.tuples(st.just("converge"), st.sampled_from(GAMES))
tick_step = st.tuples(st.just("tick"), st.integers(min_value=0, max_value=3600))
crash_step = st.tuples(st.sampled_from(["crash", "give_up"]), st.sampled_from(GAMES))
steps = st.lists(st.one_of(job_step, job_step, converge_step, tick_step, crash_step), max_size=40)


_START = ("job", JobKind.START, "a", IMAGES[0], StopReason.FINISHED)
_FORCE = ("job", JobKind.FORCE_NEXT_TURN, "a", IMAGES[0], StopReason.FINISHED)
_STOP = ("job", JobKind.STOP, "a", IMAGES[0], StopReason.CANCELLED)


@settings(max_examples=200, deadline=None)
@given(steps)
# Found on a fresh clone: a forced turn on a starting game, converged, then forced again.
@example([_START, _FORCE, ("converge", "a"), _START, _FORCE])
# A stop supersedes a waiting forced turn: a later start must not generate it for nobody.
@example([_START, _FORCE, _STOP, ("converge", "a"), _START, ("converge", "a"), _FORCE])
def test_jobs_keep_records_valid_and_answer_every_job_once(plan: list[tuple]) -> None:
    sim = Sim()
    for step in plan:
        sim.tick()
        if step[0] == "job":
            sim.job(*step[1:])
        elif step[0] == "converge":
            sim.converge(step[1])
        elif step[0] == "crash":
            sim.crash(step[1])
        elif step[0] == "give_up":
            sim.give_up(step[1])
        else:
            sim.tick(step[1])
    sim.tick()
    for gid in GAMES:
        sim.converge(gid)
    assert sim.pending == []
    assert set(sim.answers) == set(range(sim.jobs))
    assert all(n == 1 for n in sim.answers.values())
    for rec in sim.records.values():
        rec.validate()
        assert settled(rec)


def test_simulation_can_see_a_superseded_job() -> None:
    """The bookkeeping above is not vacuous: a stop before the start converged supersedes it."""
    sim = Sim()
    sim.job(JobKind.START, "g1", IMAGES[0], StopReason.FINISHED)
    sim.tick()
    sim.job(JobKind.START, "g1", IMAGES[0], StopReason.FINISHED)  # joins
    sim.tick()
    sim.job(JobKind.STOP, "g1", IMAGES[0], StopReason.CANCELLED)
    sim.tick()
    sim.converge("g1")
    sim.job(JobKind.STOP, "g1", IMAGES[0], StopReason.CANCELLED)  # replay
    assert sim.outcomes == {0: "superseded", 1: "superseded", 2: "converged", 3: "replay"}
    assert sim.records["g1"].status is Status.STOPPED


def test_simulation_generates_a_forced_turn_once_and_never_a_superseded_one() -> None:
    sim = Sim()
    sim.job(JobKind.START, "g1", IMAGES[0], StopReason.FINISHED)
    sim.job(JobKind.FORCE_NEXT_TURN, "g1", IMAGES[0], StopReason.FINISHED)
    sim.converge("g1")
    assert sim.records["g1"].turn == 1 and sim.turns_generated == 1
    sim.job(JobKind.FORCE_NEXT_TURN, "g1", IMAGES[0], StopReason.FINISHED)  # the next turn: a change
    assert sim.records["g1"].desired_turn == 2
    sim.job(JobKind.STOP, "g1", IMAGES[0], StopReason.CANCELLED)  # supersedes the forced turn
    assert sim.outcomes[2] == "superseded"
    assert sim.records["g1"].desired_turn == 1, "desired state must stop asking for the superseded turn"
    sim.converge("g1")
    sim.job(JobKind.START, "g1", IMAGES[0], StopReason.FINISHED)
    sim.converge("g1")
    assert sim.records["g1"].turn == 1 and sim.turns_generated == 1


def test_simulation_crash_then_start_joins_and_give_up_answers_it() -> None:
    sim = Sim()
    sim.job(JobKind.START, "g1", IMAGES[0], StopReason.FINISHED)
    sim.tick()
    sim.converge("g1")
    sim.crash("g1")
    rec = sim.records["g1"]
    assert rec.status is Status.STARTING and rec.converged
    sim.tick()
    sim.job(JobKind.START, "g1", IMAGES[0], StopReason.FINISHED)  # waits for the restart
    assert sim.pending == [(1, "g1", rec.generation)]
    sim.give_up("g1")
    assert sim.outcomes == {0: "converged", 1: "gave_up"}
    assert sim.records["g1"].status is Status.STOPPED and settled(sim.records["g1"])
