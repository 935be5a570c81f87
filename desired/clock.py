"""Time as the database sees it.

Every timestamp written to a record comes from the database clock (``now()`` of
the writing transaction), so a failover to a replica whose wall clock is behind
cannot store ``stopped_at < started_at``. Decisions that compare stored times
with "now" (restart backoff, cleanup TTL, a turn's waits) use ``Clock.now()``: the
database clock at the last transaction that read it, plus the time since on this
host's monotonic clock. This host's wall clock plays no part once the database
was read: a step of it (ntpd after a VM was paused or moved) moves no decision.
Tests inject a ``ManualClock``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

# A reading of the database clock whose round trip took longer than this (a wait for a lock or a
# connection inside it) says little of where in it the database read its clock: it moves the clock
# only when no quicker reading came for KEEP_QUICK seconds.
SLOW_READING = 0.05
KEEP_QUICK = 60.0


class Clock:
    def __init__(self) -> None:
        self._db: datetime | None = None  # the database clock at the last reading taken
        self._at = 0.0  # this host's monotonic clock then
        self._quick_at: float | None = None  # monotonic time of the last quick reading

    def now(self) -> datetime:
        if self._db is None:
            return datetime.now(UTC)  # nothing read yet: this host's clock
        return self._db + timedelta(seconds=time.monotonic() - self._at)

    @property
    def offset(self) -> timedelta:
        """The database clock less this host's wall clock, now."""
        return self.now() - datetime.now(UTC)

    def monotonic(self) -> float:
        """Seconds that only go forward, for how long ago something happened in this process."""
        return time.monotonic()

    def observe_db(self, db_now: datetime, before: float, after: float) -> None:
        """``db_now`` was read between the two readings of this host's monotonic clock: the database clock
        is taken as ``db_now`` at their midpoint. The midpoint is off by up to half the round trip: a slow
        one (a lock waited for inside it: found by review, half the wait went into the clock) is kept only
        when no quick one is recent."""
        rtt = after - before
        if rtt > SLOW_READING:
            if self._quick_at is not None and after - self._quick_at < KEEP_QUICK:
                return
        else:
            self._quick_at = after
        self._db, self._at = db_now, before + rtt / 2


class ManualClock(Clock):
    """A clock for tests: moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        super().__init__()
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def observe_db(self, db_now: datetime, before: float, after: float) -> None:
        pass
