"""What one reconcile step asks for next, as a value (controller-runtime's ``Result``).

Every handler of the reconciler returns a ``Step``; only ``Reconciler.sync`` talks to
the work queue. ``DONE``: nothing more to do until something changes (an event, a job,
the resync). ``AGAIN``: look again now, in the same sync (the action changed the world:
plan again from what is). ``requeue(after, reason)``: come back after ``after`` seconds
(a poll while the engine generates, a crash backoff, a refused stop); the sync ends unless the step
says ``again`` too. The steps of one sync are merged: the earliest requeue wins.

Errors are not steps: the worker requeues a failed sync with its rate limiter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from desired.model import RuntimeRecord

MIN_REQUEUE = 0.05  # seconds: a requeue is never a busy loop


@dataclass(frozen=True)
class Step:
    again: bool = False          # plan again now, in this sync
    after: float | None = None   # come back after this many seconds at the latest (None: when something changes)
    reason: str = ""
    # With ``again``: the record the step's transition just committed (RETURNING what it wrote, under the
    # record's lock), which the next step plans on instead of reading it again. A change committed after it
    # wakes the game as it would after any read (every writer of a record wakes its game).
    record: RuntimeRecord | None = field(default=None, compare=False, repr=False)

    @property
    def done(self) -> bool:
        return not self.again and self.after is None

    @property
    def requeues(self) -> bool:
        return self.after is not None


DONE = Step()
AGAIN = Step(again=True)


def again_on(record: RuntimeRecord) -> Step:
    """Plan again now, on ``record`` (just written by this step's transition)."""
    return Step(again=True, record=record)


def requeue(after: float, reason: str, *, again: bool = False) -> Step:
    """Come back after ``after`` seconds (at least ``MIN_REQUEUE``); with ``again``, plan again now as
    well (a crash recorded with its backoff: what the plan says now may be more than a wait)."""
    return Step(again=again, after=max(after, MIN_REQUEUE), reason=reason)


def merge(*steps: Step) -> Step:
    """One step for several (the steps of one sync): again when any says again, and the earliest
    requeue wins (a wake-up planned is never lost, and never put off by a later one)."""
    again = any(s.again for s in steps)
    timed = [s for s in steps if s.after is not None]
    if not timed:
        return AGAIN if again else DONE
    first = min(timed, key=lambda s: s.after if s.after is not None else 0.0)
    return Step(again=again, after=first.after, reason=first.reason)
