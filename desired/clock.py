"""Time as the database sees it.

Every timestamp written to a record comes from the database clock (``now()`` of
the writing transaction), so a failover to a replica whose wall clock is behind
cannot store ``stopped_at < started_at``. Decisions that compare stored times
with "now" (restart backoff, cleanup TTL) use ``Clock.now()``: the local clock
corrected by the offset measured at the last transaction. Tests inject a
``ManualClock``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

# A reading of the database clock whose round trip took longer than this (a wait for a lock or a
# connection inside it) says little of where in it the database read its clock: it moves the offset only
# when no quicker reading came for KEEP_QUICK seconds.
SLOW_READING = timedelta(seconds=0.05)
KEEP_QUICK = timedelta(seconds=60)


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)
        self._quick_at: datetime | None = None  # local time of the last quick reading

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        """Seconds that only go forward, for how long ago something happened in this process."""
        return time.monotonic()

    def observe_db(self, db_now: datetime, local_before: datetime, local_after: datetime) -> None:
        """``db_now`` was read between the two local readings: keep the offset to the midpoint. The
        midpoint is off by up to half the round trip: a slow one (a lock waited for inside it: found by
        review, half the wait went into the offset) is kept only when no quick one is recent."""
        rtt = local_after - local_before
        if rtt > SLOW_READING:
            if self._quick_at is not None and local_after - self._quick_at < KEEP_QUICK:
                return
        else:
            self._quick_at = local_after
        self.offset = db_now - (local_before + rtt / 2)


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

    def observe_db(self, db_now: datetime, local_before: datetime, local_after: datetime) -> None:
        pass
