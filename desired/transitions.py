"""Every change the reconciler makes to a runtime record, as pure functions.

Each takes the current record and ``now`` (the database clock of the writing
transaction, see desired/clock.py) and returns the new record; the store checks
the transition against the status machine and the invariants, then writes only
the columns that changed. Nothing here does I/O, so the rules (in particular the
timestamp rules) are tested as tables.

Timestamp rules: ``last_op_at`` never goes backwards; ``started_at`` is set when
the game becomes running, ``stopped_at`` when it becomes stopped (and cleared
when it runs again), ``removed_at`` when it is removed; each is at least the
timestamp it must not precede, so a clock that steps back cannot break an
invariant.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from desired.model import MAX_TURN, DesiredStatus, ErrorCode, Health, JobKind, RuntimeRecord, Status
from desired.policy import CrashVerdict, rollback_target

TURN_ASKS = frozenset({JobKind.TURN, JobKind.FORCE_NEXT_TURN})  # the jobs that ask an engine for a turn
# The jobs that change nothing about what runs (which image, whether at all): the turn asks, a pause or a
# resume of the turn clock, a reconcile.
KEEP_RUNNING = TURN_ASKS | {JobKind.PAUSE, JobKind.RESUME, JobKind.RECONCILE}
# Those of them answered while the turn desired state asks for is still to come (they never touch the engine):
# the turn's own jobs wait for it (desired/db/transitions.py ``answer_during_turn``).
ANSWERED_DURING_TURN = KEEP_RUNNING - TURN_ASKS


def _at_least(now: datetime, *floors: datetime | None) -> datetime:
    return max([now, *(f for f in floors if f is not None)])


def _touch(cur: RuntimeRecord, now: datetime) -> datetime:
    return _at_least(now, cur.last_op_at)


def starting(cur: RuntimeRecord, now: datetime, *, rollback_image: str | None) -> RuntimeRecord:
    """About to create or start the engine (a job's change, or a restart after a crash)."""
    return cur.replace(status=Status.STARTING, health=Health.UNKNOWN, last_op_at=_touch(cur, now), admin_api=None,
                       node_lost_since=None, stopping_since=None, stopping_unit=None,
                       probe_failures=0, unreachable_since=None, generation_started_at=None,
                       disruption_wait_since=None,
                       rollback_image_ref=rollback_image if cur.status is not Status.STARTING
                       else cur.rollback_image_ref)


def rollback_overtaken(cur: RuntimeRecord, now: datetime, *, container_id: str) -> RuntimeRecord:
    """A job asked for another image while the rollback's engine (the replaced image, started again on its
    restored state) had not answered healthy yet. The rollback's restore is done and that engine wrote
    since: its state is the one to keep now. It is the engine the job replaces: the record names it and no
    longer rolls back, so its state is copied before the new image starts (a rollback goes back to that
    copy), and the older copy is not put back over what it wrote."""
    mine = cur.stopping_unit == container_id  # a stop of this engine under way (a job's, whose call timed out)
    return cur.replace(current_container_id=container_id, rolling_back=False, last_op_at=_touch(cur, now),
                       # a mark of the engine replaced before is not this one's; this one's stays (its save)
                       stopping_since=cur.stopping_since if mine else None,
                       stopping_unit=container_id if mine else None)


def running(cur: RuntimeRecord, now: datetime, *, container_id: str, image: str,
            node: str | None = None) -> RuntimeRecord:
    """The engine answers its health path: the generation has converged. A game that was already up
    keeps what its engine last said of itself (finished, generating, ...); an unreachable one that
    answers again is running."""
    up = cur.status.is_up and cur.current_container_id == container_id
    status = cur.status if up and cur.status is not Status.ENGINE_UNREACHABLE else Status.RUNNING
    started = cur.started_at if up and cur.started_at else _at_least(now, cur.created_at)
    return cur.replace(status=status, current_container_id=container_id, current_image_ref=image,
                       started_at=started, stopped_at=None, health=Health.HEALTHY, health_checked_at=now,
                       observed_generation=cur.generation, restart_not_before=None, rollback_image_ref=None,
                       rolling_back=False, probe_failures=0, unreachable_since=None, last_op_at=_touch(cur, now),
                       node_id=cur.node_id or node, node_lost_since=None, stopping_since=None, stopping_unit=None,
                       disruption_wait_since=cur.disruption_wait_since if up else None)


def recorded(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """The unit that runs already is what the generation asks for (it changed nothing about what
    runs): the generation has converged. Status and health stay what was last observed."""
    return cur.replace(observed_generation=cur.generation, restart_not_before=None, rollback_image_ref=None,
                       rolling_back=False, last_op_at=_touch(cur, now))


def stopped(cur: RuntimeRecord, now: datetime, *, container_id: str | None,
            converged: bool = True, stopped_now: bool = False) -> RuntimeRecord:
    """Nothing runs (stopped by us, or found so): the generation has converged -- unless
    ``converged`` is False: a stop of ours that a newer generation overtook is only a fact about the
    unit (that generation, a start say, still has its own work to do).

    ``stopped_at`` is when the engine stopped: now when this process stopped a running one
    (``stopped_now``), even under a record that already said stopped (an engine started by hand, or a
    record older than what ran: a database restored from a backup), so that the cleanup TTL counts
    from that stop, not from an older one; kept when a stopped record only finds it so."""
    when = cur.stopped_at if (cur.status is Status.STOPPED and cur.stopped_at and not stopped_now) else _at_least(
        now, cur.started_at, cur.created_at)
    return cur.replace(status=Status.STOPPED, current_container_id=container_id,
                       current_image_ref=cur.current_image_ref or cur.desired_image_ref, stopped_at=when,
                       health=Health.UNKNOWN,
                       observed_generation=cur.generation if converged else cur.observed_generation,
                       restart_not_before=None,
                       rollback_image_ref=None, rolling_back=False, last_op_at=_touch(cur, now),
                       disruption_wait_since=None, node_lost_since=None, stopping_since=None, stopping_unit=None)


def disruption_wait_restarted(cur: RuntimeRecord, now: datetime, *, turn: int) -> RuntimeRecord:
    """The engine generates the turn after ``turn``, a later one than the one a planned disruption's wait began
    for (that turn ended unseen, or the record was restored from an older backup): the wait counts from now,
    for this one."""
    return cur.replace(disruption_wait_since=now, disruption_wait_turn=turn, last_op_at=_touch(cur, now))


STOP_SLACK = 15.0  # seconds past its grace before a stop under way (not seen to end) is over, or tried again
# A stop mark further ahead of now than this was written by a clock that has since gone back (or a database
# primary whose clock ran ahead of its successor's): it dates nothing, and is taken for no stop under way.
MARK_AHEAD = timedelta(seconds=120)


def mark_ahead(since: datetime, now: datetime) -> bool:
    return since > now + MARK_AHEAD


def stop_mark_of(cur: RuntimeRecord, unit_id: str | None) -> datetime | None:
    """When a stop of unit ``unit_id`` was marked, or None when the record's one mark is not of that unit. A
    mark with no unit (written before marks named one) is of the record's engine."""
    if cur.stopping_since is None:
        return None
    return cur.stopping_since if (cur.stopping_unit or cur.current_container_id) == unit_id else None


def stop_left(cur: RuntimeRecord, now: datetime, grace: float, unit_id: str | None = None) -> float:
    """Seconds a stop of the record's engine (or of unit ``unit_id``) begun at its mark (a predecessor's, or
    a call that timed out) may still be under way: its grace and STOP_SLACK; 0 when none is, or it is over,
    or the mark is dated ahead of now (``MARK_AHEAD``: waited out, it held the game's jobs and its
    pass-through until the clocks caught up)."""
    since = stop_mark_of(cur, cur.current_container_id if unit_id is None else unit_id)
    if since is None or mark_ahead(since, now):
        return 0.0
    return max(0.0, grace + STOP_SLACK - (now - since).total_seconds())


def not_stopping(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """A stop that was under way is over and the engine still runs (it never reached the daemon, or it was
    refused), and the game is wanted running: the pass-through is open again."""
    return cur.replace(stopping_since=None, stopping_unit=None, last_op_at=_touch(cur, now))


def stopping(cur: RuntimeRecord, now: datetime, unit_id: str | None = None) -> RuntimeRecord:
    """A unit of the game (the record's engine when ``unit_id`` is None) is about to be asked to stop
    (SIGTERM, its save, the grace): the gateway's pass-through sends the record's engine nothing more from
    now on, and the stop is not signalled again within its grace."""
    return cur.replace(stopping_since=now, stopping_unit=unit_id or cur.current_container_id,
                       last_op_at=_touch(cur, now))


def removed(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """The unit is gone; the record stays for audit."""
    return cur.replace(status=Status.REMOVED, current_container_id=None,
                       removed_at=cur.removed_at or _at_least(now, cur.created_at), health=Health.UNKNOWN,
                       observed_generation=cur.generation, restart_not_before=None, rollback_image_ref=None,
                       rolling_back=False, last_op_at=_touch(cur, now), disruption_wait_since=None,
                       node_lost_since=None, stopping_since=None, stopping_unit=None)


@dataclass(frozen=True, kw_only=True)
class Probe:
    """One look at a running engine: its health path, and (when it has one) its admin API's status."""

    healthy: bool
    admin_api: bool | None = None   # None: not asked, or no answer
    turn: int | None = None
    phase: str | None = None        # idle | generating | finished
    failed_turn: int | None = None  # last_generation.turn when last_generation.ok is false
    failed_error: str = ""          # and its error
    refused: str = ""               # the admin API refused rtmanager (401: not the token it was given)


def busy_generating(cur: RuntimeRecord, now: datetime, generation_timeout: float) -> bool:
    """The engine is known to be generating a turn, for less than ``generation_timeout`` seconds: it
    may be too busy to answer, and a probe or a status poll it does not answer says nothing yet."""
    return (cur.status is Status.GENERATION_IN_PROGRESS and cur.generation_started_at is not None
            and (now - cur.generation_started_at).total_seconds() < generation_timeout)


def observed(cur: RuntimeRecord, now: datetime, probe: Probe, *, unreachable_after: int,
             generation_timeout: float) -> RuntimeRecord:
    """What one probe changes on an up game (the store writes only when something did).

    * ``engine_unreachable`` after ``unreachable_after`` failed probes in a row; the first
      success returns it to what the engine says (running, generating, ...);
    * failures while a generation runs count only after ``generation_timeout`` seconds;
    * the engine's phase decides between running, generation_in_progress,
      generation_failed (its last generation failed) and finished.
    """
    if not cur.status.is_up:
        return cur
    if not probe.healthy:
        if busy_generating(cur, now, generation_timeout):
            return cur  # a generating engine may be too busy to answer
        failures = cur.probe_failures + 1
        changes: dict[str, object] = dict(probe_failures=failures, health=Health.UNREACHABLE)
        if failures >= unreachable_after and cur.status is not Status.ENGINE_UNREACHABLE:
            changes.update(status=Status.ENGINE_UNREACHABLE, unreachable_since=now, health_checked_at=now,
                           last_op_at=_touch(cur, now), last_error_code=ErrorCode.ENGINE_UNREACHABLE,
                           last_error_message=f"the engine did not answer {failures} health probes in a row")
        return cur.replace(**changes)
    changes = dict(probe_failures=0, unreachable_since=None, health=Health.HEALTHY)
    status = Status.RUNNING if cur.status is Status.ENGINE_UNREACHABLE else cur.status
    if probe.admin_api is not None:
        changes["admin_api"] = probe.admin_api
    if probe.refused and cur.last_error_code is not ErrorCode.ENGINE_REFUSED:
        changes.update(last_error_code=ErrorCode.ENGINE_REFUSED, last_error_message=probe.refused)
    if probe.phase is not None:
        changes.update(turn=probe.turn, phase=probe.phase)
        if probe.phase == "finished":
            status = Status.FINISHED
        elif probe.phase == "generating":
            status = Status.GENERATION_IN_PROGRESS
            changes["generation_started_at"] = cur.generation_started_at or now
        elif probe.failed_turn is not None and probe.turn is not None and probe.failed_turn == probe.turn + 1:
            status = Status.GENERATION_FAILED
            changes["generation_started_at"] = None
            if cur.status is not Status.GENERATION_FAILED:
                changes.update(last_error_code=ErrorCode.GENERATION_FAILED,
                               last_error_message=f"the engine failed to generate turn {probe.failed_turn}"
                                                  + (f": {probe.failed_error}" if probe.failed_error else ""))
        else:
            status = Status.RUNNING
            changes["generation_started_at"] = None
        if probe.phase != "generating":
            changes["disruption_wait_since"] = None  # the generation a disruption waited for is over
        if probe.turn is not None and cur.turn is not None and probe.turn > cur.turn:
            changes["last_turn_at"] = now
        elif probe.turn is not None and cur.turn is not None and probe.turn < cur.turn:
            # A generation under way now is not the one asked before the loss: its time counts from now.
            changes.update(desired_turn=turn_gone_back(cur, probe.turn),
                           generation_started_at=now if probe.phase == "generating" else None)
        elif cur.turn is None and probe.turn is not None:
            changes["last_turn_at"] = cur.last_turn_at or now
    changes["status"] = status
    if all(getattr(cur, k) == v for k, v in changes.items()):
        return cur  # the usual probe: nothing changed, and no copy of the record is made
    return cur.replace(**changes, health_checked_at=now, last_op_at=_touch(cur, now))


def turn_gone_back(cur: RuntimeRecord, turn: int) -> int | None:
    """The desired turn once the engine reports ``turn``, lower than the record's (it lost its last
    saves, or its state was restored from an older copy): the lost turns are not generated again with
    no job asking for them; a turn asked for and not yet generated is still one turn, past ``turn``."""
    if cur.desired_turn is None or cur.turn is None:
        return cur.desired_turn
    return min(cur.desired_turn, turn + 1 if cur.desired_turn > cur.turn else turn)


def probe_predates(read: RuntimeRecord, cur: RuntimeRecord, probe: Probe) -> bool:
    """Whether a probe that reports a lower turn than the record's (``cur``) may be older than the write
    of that turn: the turn moved since the record the probe's taker read (``read``, before it probed).
    Written, it would take the record, its snapshot and desired state back to a turn the engine has
    left; refused, the next look decides. Unmoved, the lower turn came after it: it is the engine's."""
    # The turn and when it last went up: a turn that went back and up again meanwhile (the same number,
    # a later time) moved too.
    return (probe.turn is not None and cur.turn is not None and probe.turn < cur.turn
            and (read.turn, read.last_turn_at) != (cur.turn, cur.last_turn_at))


def crashed(cur: RuntimeRecord, now: datetime, *, verdict: CrashVerdict, code: ErrorCode, detail: str,
            exit_code: int | None, oom_killed: bool, window: float) -> RuntimeRecord:
    """The engine of a running game exited on its own (or its restart failed): count it; restart
    after the verdict's delay, or give the game up (desired stopped, a new generation)."""
    if verdict.give_up:
        detail = f"crash loop: {verdict.count} crashes within {window:g}s; last: {detail}"
    crash = dict(crash_count=verdict.count, last_crash_at=now, last_error_code=code, last_error_message=detail,
                 last_op_at=_touch(cur, now), disruption_wait_since=None,
                 stopping_since=None, stopping_unit=None)  # the engine has exited: no stop of it is under way any more
    if exit_code is not None:
        # An exit code the record's column cannot hold (a daemon's odd answer) is unknown, not a crash unrecorded.
        known = exit_code if exit_code is None or -2**31 <= exit_code <= 2**31 - 1 else None
        crash.update(last_exit_code=known, last_oom_killed=oom_killed)
    if verdict.give_up:
        return turn_unasked(cur.replace(desired_status=DesiredStatus.STOPPED, generation=cur.generation + 1,
                                        health=Health.UNKNOWN, restart_not_before=None, rolling_back=False,
                                        **crash))
    return cur.replace(status=Status.STARTING, health=Health.UNREACHABLE, node_lost_since=None,
                       restart_not_before=now + timedelta(seconds=verdict.delay), **crash)


def keeps_running(cur: RuntimeRecord, asked: Collection[JobKind]) -> bool:
    """Whether a failure of the current generation only answers its jobs (``failed``): they (of the kinds
    ``asked``) change nothing about what runs, and the game is wanted running."""
    return bool(asked) and set(asked) <= KEEP_RUNNING and cur.desired_status is DesiredStatus.RUNNING


def failed(cur: RuntimeRecord, now: datetime, *, code: ErrorCode, message: str,
           asked: Collection[JobKind] = (), kept_revision: int | None = None) -> tuple[RuntimeRecord, str | None]:
    """The current generation cannot converge: its jobs (of the kinds ``asked``) get this failure, and
    a new generation asks for what is safe now. Returns the new record and the image rolled back to
    (or None).

    * a game being removed stays on its way to removal (removal is final once asked for);
    * a game whose pending jobs change nothing about what runs (``keeps_running``: a turn, a pause, a
      resume, a reconcile) has them answered (the store answers the turn asks and the reconcile with
      the failure, a pause or a resume as done, since it took effect when it was accepted) and stays
      wanted running: such a failure, a Docker outage longer than the job timeout included, says
      nothing against running the game, which no job asked to change. Nothing else was unconverged,
      so the generation ends as a failed turn's does (``turn_failed``), and a failed restart of a
      crashed engine after it is a crash for the crash policy; but a rollback still to carry out (the
      engine is not on the image rolled back to) goes on (``answered_unconverged``), and its own
      failure stops the game as below;
    * a game a job was replacing while it ran goes back to the image it ran (once);
    * a game whose running engine the failed replacement never touched (``kept_revision``: that engine is the
      unit at this spec revision; a restart refused before it began, say) goes back to that engine: its
      image and spec revision, so the engine that runs is the one asked for;
    * anything else is no longer wanted running: Lobby was told the job failed, so the
      controller must not later run a game Lobby believes dead.
    """
    if keeps_running(cur, asked):
        if cur.rolling_back and cur.current_image_ref != cur.desired_image_ref:
            return answered_unconverged(cur, now, code=code, message=message), None  # a rollback still to do
        return turn_failed(cur, now, code=code, message=message), None
    common = dict(generation=cur.generation + 1, last_error_code=code, last_error_message=message,
                  restart_not_before=None, last_op_at=_touch(cur, now))
    cur = turn_unasked(cur)  # the jobs that asked for a turn are answered with this failure
    if cur.desired_status is DesiredStatus.REMOVED:
        return cur.replace(**common), None
    target = rollback_target(cur) if cur.desired_status is DesiredStatus.RUNNING else None
    if target:
        return cur.replace(desired_image_ref=target, rolling_back=True, **common), target
    if (kept_revision is not None and cur.desired_status is DesiredStatus.RUNNING and cur.current_container_id
            and cur.current_image_ref):
        return cur.replace(desired_image_ref=cur.current_image_ref, spec_revision=kept_revision, rolling_back=False,
                           **common), None
    return cur.replace(desired_status=DesiredStatus.STOPPED, rolling_back=False, **common), None


def answers_during_turn(record: RuntimeRecord, pending: Iterable[JobKind]) -> bool:
    """Whether the pending pause, resume and reconcile jobs of an up game whose turn is still to come may
    be answered before it (desired/db/transitions.py ``answer_during_turn``). Not while a job that changes
    what runs waits with the turn (a start that joined it, a patch): they wait with it, as for any start.
    Not while a pause is to withdraw a scheduled turn the engine was not asked for (controller/turns.py
    asks the engine first): the withdrawal answers them in its own transaction, so that no resume sent on
    seeing the pause answered can bring that turn back."""
    kinds = set(pending)
    if kinds - KEEP_RUNNING:
        return False
    return not (record.paused and record.generation_started_at is None
                and JobKind.TURN in kinds and JobKind.FORCE_NEXT_TURN not in kinds)


def turn_reached(record: RuntimeRecord) -> bool:
    """Desired state asks for no turn the engine has not reached."""
    return record.desired_turn is None or (record.turn is not None and record.turn >= record.desired_turn)


# The games the turn clock's due query returns at most, the earliest due first (a page): a page
# full of games due now may leave more due games behind it (controller/triggers.py looks again).
DUE_PAGE = 200


def clock_due_at(record: RuntimeRecord) -> tuple[datetime, int] | None:
    """When the turn clock's due query (desired/db/transitions.py ``due_turns``, whose filter this repeats)
    counts the game's next turn from, and its interval; None when the query does not return the game."""
    if not (record.turn_interval > 0 and not record.paused and record.desired_status is DesiredStatus.RUNNING
            and record.status is Status.RUNNING and record.admin_api is True
            and (record.desired_turn is None or (record.turn is not None and record.desired_turn <= record.turn))
            and (record.turn is None or record.turn < MAX_TURN)
            and record.observed_generation == record.generation and record.disruption_wait_since is None):
        return None
    since = record.clock_from or record.created_at
    return max(record.last_turn_at or since, since), record.turn_interval


def moves_the_clock(cur: RuntimeRecord | None, new: RuntimeRecord) -> bool:
    """Whether writing ``new`` over ``cur`` makes the game due at a time it was not due at before (it
    became due-able, or its due time or interval moved): the store raises the turn clock's signal after
    such a commit, and only then. A game that stops being due (a turn asked, a pause, a stop) wakes
    nothing: the clock's next look, at the latest when it would have been due, finds it gone. So neither
    a probe that changed nothing the clock reads nor a forced turn of a game with no schedule wakes it."""
    due = clock_due_at(new)
    return due is not None and (cur is None or clock_due_at(cur) != due)


def turn_unasked(record: RuntimeRecord) -> RuntimeRecord:
    """Desired state stops asking for a turn the engine has not reached: the jobs that asked for it
    were answered (superseded, failed, given up), and a turn nobody waits for must not be generated
    later, nor a later force_next_turn join it."""
    return record if turn_reached(record) else record.replace(desired_turn=record.turn)


def disruption_waiting(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """A planned disruption found the engine generating a turn: it waits, counted from the first
    time it found so (kept across restarts and failovers of the controller)."""
    if cur.disruption_wait_since is not None:
        return cur
    return cur.replace(disruption_wait_since=now, disruption_wait_turn=cur.turn)


def turn_requested(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """The engine took the request (202): it generates the next turn."""
    return cur.replace(status=Status.GENERATION_IN_PROGRESS, phase="generating", generation_started_at=now,
                       last_op_at=_touch(cur, now))


def turn_failed(cur: RuntimeRecord, now: datetime, *, code: ErrorCode, message: str) -> RuntimeRecord:
    """The turn desired state asked for cannot be had (the generation failed, the engine has no admin
    API or does not answer): its jobs get the failure, and desired state stops asking (the game
    stays up; a force_next_turn asks again)."""
    status = Status.GENERATION_FAILED if code is ErrorCode.GENERATION_FAILED and cur.status.is_up else cur.status
    # A scheduled turn a pause withdrew (superseded) is nobody's error: the last error stays.
    error = {} if code is ErrorCode.SUPERSEDED else {"last_error_code": code, "last_error_message": message}
    # The generation ends converged: a rollback flag left from before (a patch refused before the engine was
    # touched rolls back to the image already running) is over, as when a look records the game.
    return cur.replace(status=status, desired_turn=cur.turn, generation=cur.generation + 1,
                       observed_generation=cur.generation + 1, generation_started_at=None,
                       rolling_back=False, rollback_image_ref=None, last_op_at=_touch(cur, now), **error)


def cleaned_up(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """The cleanup TTL removed a stopped unit: the record becomes removed, for audit."""
    return removed(cur.replace(desired_status=DesiredStatus.REMOVED, generation=cur.generation + 1), now)


def node_lost(cur: RuntimeRecord, now: datetime, *, node: str) -> RuntimeRecord:
    """The node of the game's engine is lost: its engine's fate is unknown. Not a crash: no crash is
    counted and no restart is due; the node-loss policy decides after its grace period. The record
    keeps its unit and its pin (the state is on that node)."""
    return cur.replace(status=Status.NODE_LOST, node_lost_since=cur.node_lost_since or now, health=Health.UNKNOWN,
                       probe_failures=0, unreachable_since=None, generation_started_at=None,
                       restart_not_before=None, disruption_wait_since=None, last_op_at=_touch(cur, now),
                       last_error_message=f"node {node[:12]} is down or unreachable; the engine's fate is unknown")


def answered_unconverged(cur: RuntimeRecord, now: datetime, *, code: ErrorCode, message: str) -> RuntimeRecord:
    """The jobs of a generation that cannot converge now (the game's node is lost, or Docker is away and
    they changed nothing about what runs) were answered after the job timeout; desired state stays what
    it was (the node-loss policy, the crash policy, a rollback decide the game's fate), but no longer asks
    for a turn nobody waits for."""
    return turn_unasked(cur).replace(last_error_code=code, last_error_message=message,
                                     last_op_at=_touch(cur, now))


def moved_off(cur: RuntimeRecord, now: datetime, *, node: str) -> RuntimeRecord:
    """The game leaves its lost node: the pin is cleared, its next units avoid that node, and the spec
    revision changes, so the planner recreates the unit elsewhere (the node recorded where it then runs).
    No new generation: like a crash's restart, nobody asked for it."""
    return cur.replace(node_id=None, avoid_nodes=(node,) if node else (), spec_revision=cur.spec_revision + 1,
                       last_op_at=_touch(cur, now))


def drain_moved(cur: RuntimeRecord, now: datetime, *, node: str | None, forced: bool,
                deadline: datetime | None) -> RuntimeRecord:
    """A drain moves the game off ``node``: like a restart (a new generation; a turn older jobs asked for
    is no longer asked), the pin cleared, the node avoided from now on (so that a unit there that is out of
    reach is the move's to replace, not a node loss to wait for), and a new spec revision, so the planner
    recreates the unit elsewhere. Unless ``forced``, the replacement waits for a turn boundary until the
    drain's ``deadline`` (its own, carried by later jobs of the game: desired/jobs.py)."""
    avoid = tuple(sorted(set(cur.avoid_nodes) | {node})) if node else cur.avoid_nodes
    return turn_unasked(cur.replace(
        node_id=None, avoid_nodes=avoid, spec_revision=cur.spec_revision + 1, generation=cur.generation + 1,
        last_op_at=_touch(cur, now), force_generation=cur.generation + 1 if forced else cur.force_generation,
        disruption_until=None if forced else deadline,
        disruption_generation=None if forced else cur.generation + 1))


def stopped_for_node_loss(cur: RuntimeRecord, now: datetime, *, message: str) -> RuntimeRecord:
    """The node-loss policy stops the game: desired stopped, a new generation (as a crash loop's). Its error is
    the stop's own, never one an earlier failure left on the record (a canary's rollout would read that
    history as this stop's cause): docker_unavailable, the node out of reach, not the engine's failure."""
    return turn_unasked(cur.replace(desired_status=DesiredStatus.STOPPED, generation=cur.generation + 1,
                                    rolling_back=False, restart_not_before=None,
                                    last_error_code=ErrorCode.DOCKER_UNAVAILABLE,
                                    last_error_message=message, last_op_at=_touch(cur, now)))
