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

from datetime import datetime, timedelta

from desired.model import DesiredStatus, ErrorCode, Health, RuntimeRecord, Status
from desired.policy import CrashVerdict, rollback_target


def _at_least(now: datetime, *floors: datetime | None) -> datetime:
    return max([now, *(f for f in floors if f is not None)])


def _touch(cur: RuntimeRecord, now: datetime) -> datetime:
    return _at_least(now, cur.last_op_at)


def starting(cur: RuntimeRecord, now: datetime, *, rollback_image: str | None) -> RuntimeRecord:
    """About to create or start the engine (a job's change, or a restart after a crash)."""
    return cur.replace(status=Status.STARTING, health=Health.UNKNOWN, last_op_at=_touch(cur, now),
                       rollback_image_ref=rollback_image if cur.status is not Status.STARTING
                       else cur.rollback_image_ref)


def running(cur: RuntimeRecord, now: datetime, *, container_id: str, image: str) -> RuntimeRecord:
    """The engine answers its health path: the generation has converged."""
    started = cur.started_at if cur.status is Status.RUNNING and cur.started_at else _at_least(now, cur.created_at)
    return cur.replace(status=Status.RUNNING, current_container_id=container_id, current_image_ref=image,
                       started_at=started, stopped_at=None, health=Health.HEALTHY, health_checked_at=now,
                       observed_generation=cur.generation, restart_not_before=None, rollback_image_ref=None,
                       rolling_back=False, last_op_at=_touch(cur, now))


def stopped(cur: RuntimeRecord, now: datetime, *, container_id: str | None) -> RuntimeRecord:
    """Nothing runs (stopped by us, or found so): the generation has converged."""
    when = cur.stopped_at if (cur.status is Status.STOPPED and cur.stopped_at) else _at_least(
        now, cur.started_at, cur.created_at)
    return cur.replace(status=Status.STOPPED, current_container_id=container_id,
                       current_image_ref=cur.current_image_ref or cur.desired_image_ref, stopped_at=when,
                       health=Health.UNKNOWN, observed_generation=cur.generation, restart_not_before=None,
                       rollback_image_ref=None, rolling_back=False, last_op_at=_touch(cur, now))


def removed(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """The unit is gone; the record stays for audit."""
    return cur.replace(status=Status.REMOVED, current_container_id=None,
                       removed_at=cur.removed_at or _at_least(now, cur.created_at), health=Health.UNKNOWN,
                       observed_generation=cur.generation, restart_not_before=None, rollback_image_ref=None,
                       rolling_back=False, last_op_at=_touch(cur, now))


def health(cur: RuntimeRecord, now: datetime, *, healthy: bool) -> RuntimeRecord:
    return cur.replace(health=Health.HEALTHY if healthy else Health.UNREACHABLE, health_checked_at=now,
                       last_op_at=_touch(cur, now))


def crashed(cur: RuntimeRecord, now: datetime, *, verdict: CrashVerdict, code: ErrorCode, detail: str,
            exit_code: int | None, oom_killed: bool, window: float) -> RuntimeRecord:
    """The engine of a running game exited on its own (or its restart failed): count it; restart
    after the verdict's delay, or give the game up (desired stopped, a new generation)."""
    if verdict.give_up:
        detail = f"crash loop: {verdict.count} crashes within {window:g}s; last: {detail}"
    crash = dict(crash_count=verdict.count, last_crash_at=now, last_error_code=code, last_error_message=detail,
                 last_op_at=_touch(cur, now))
    if exit_code is not None:
        crash.update(last_exit_code=exit_code, last_oom_killed=oom_killed)
    if verdict.give_up:
        return cur.replace(desired_status=DesiredStatus.STOPPED, generation=cur.generation + 1,
                           health=Health.UNKNOWN, restart_not_before=None, rolling_back=False, **crash)
    return cur.replace(status=Status.STARTING, health=Health.UNREACHABLE,
                       restart_not_before=now + timedelta(seconds=verdict.delay), **crash)


def failed(cur: RuntimeRecord, now: datetime, *, code: ErrorCode, message: str) -> tuple[RuntimeRecord, str | None]:
    """The current generation cannot converge: its jobs get this failure, and a new generation asks
    for what is safe now. Returns the new record and the image rolled back to (or None).

    * a game being removed stays on its way to removal (removal is final once asked for);
    * a game a job was replacing while it ran goes back to the image it ran (once);
    * anything else is no longer wanted running: Lobby was told the job failed, so the
      controller must not later run a game Lobby believes dead.
    """
    common = dict(generation=cur.generation + 1, last_error_code=code, last_error_message=message,
                  restart_not_before=None, last_op_at=_touch(cur, now))
    if cur.desired_status is DesiredStatus.REMOVED:
        return cur.replace(**common), None
    target = rollback_target(cur) if cur.desired_status is DesiredStatus.RUNNING else None
    if target:
        return cur.replace(desired_image_ref=target, rolling_back=True, **common), target
    return cur.replace(desired_status=DesiredStatus.STOPPED, rolling_back=False, **common), None


def cleaned_up(cur: RuntimeRecord, now: datetime) -> RuntimeRecord:
    """The cleanup TTL removed a stopped unit: the record becomes removed, for audit."""
    return removed(cur.replace(desired_status=DesiredStatus.REMOVED, generation=cur.generation + 1), now)
