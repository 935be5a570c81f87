"""Pure policies of the controller, next to the planner: no I/O, tested as tables.

* ``next_crash``: one more crash of a running game; how many in the window, how
  long to wait before the restart, and whether this one gives the game up.
* ``rollback_target``: when a job's new engine fails, the image the game ran
  before (to start again on the same state directory), or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from desired.model import RuntimeRecord, Status

CRASH_BACKOFF_BASE = 0.1  # seconds, doubled per crash like Docker's restart delay


@dataclass(frozen=True, kw_only=True)
class CrashPolicy:
    limit: int          # the limit-th crash within the window is terminal
    window: float       # seconds: a crash counts with the previous ones if it came within this
    backoff_max: float  # seconds: the restart delay doubles from 0.1 s up to this


@dataclass(frozen=True, kw_only=True)
class CrashVerdict:
    count: int
    give_up: bool
    delay: float  # seconds before the restart (0 when giving up)


def next_crash(record: RuntimeRecord, now: datetime, policy: CrashPolicy) -> CrashVerdict:
    recent = (record.last_crash_at is not None
              and (now - record.last_crash_at).total_seconds() < policy.window)
    count = record.crash_count + 1 if recent else 1
    if count >= policy.limit:
        return CrashVerdict(count=count, give_up=True, delay=0.0)
    return CrashVerdict(count=count, give_up=False,
                        delay=min(CRASH_BACKOFF_BASE * 2 ** (count - 1), policy.backoff_max))


def rollback_target(record: RuntimeRecord) -> str | None:
    """The image to start again when the engine a job asked for failed, or None (stop instead).

    Only a game that was running when the job came in is rolled back, and only once:
    the rollback generation's own failure stops the game. Never to the image the failed
    generation itself asked for: that would only wait for the same engine once more."""
    if record.rolling_back:
        return None
    target = None
    if record.status.is_up and record.current_container_id:
        target = record.current_image_ref  # failed before the running engine was touched
    elif record.status is Status.STARTING:
        target = record.rollback_image_ref
    return target if target != record.desired_image_ref else None
