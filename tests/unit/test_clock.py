"""The database clock as this process reads it (desired/clock.py)."""

from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime, timedelta

import desired.clock as clock_module
from desired.clock import Clock
from desired.model import JobKind, Status
from tests.support.world import World, started

T = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def ms(n: float) -> timedelta:
    return timedelta(milliseconds=n)


class Monotonic:
    """A monotonic clock the test moves."""

    def __init__(self, monkeypatch) -> None:
        self.t = 1000.0
        monkeypatch.setattr(clock_module.time, "monotonic", lambda: self.t)

    def at(self, delta: timedelta) -> float:
        return 1000.0 + delta.total_seconds()


def test_a_quick_reading_is_taken_at_its_midpoint(monkeypatch):
    m = Monotonic(monkeypatch)
    c = Clock()
    c.observe_db(T + ms(105), m.at(ms(0)), m.at(ms(10)))  # read between the two, 5 ms in
    m.t = m.at(ms(10))
    assert c.now() == T + ms(105) + ms(5)


def test_a_slow_reading_does_not_move_a_clock_a_quick_one_set_recently(monkeypatch):
    """A round trip that waited 2 s for a lock: its midpoint is a second from when the database read its
    clock; taken, it would move the clock by a second."""
    m = Monotonic(monkeypatch)
    c = Clock()
    c.observe_db(T, m.at(ms(0)), m.at(ms(10)))
    c.observe_db(T + ms(1000), m.at(ms(1000)), m.at(ms(3000)))  # read at once, answered 2 s later
    m.t = m.at(ms(3000))
    assert c.now() == T + ms(3000) - ms(5)


def test_slow_readings_alone_still_set_the_clock(monkeypatch):
    m = Monotonic(monkeypatch)
    c = Clock()
    c.observe_db(T, m.at(ms(0)), m.at(ms(200)))  # nothing better yet
    m.t = m.at(ms(200))
    assert c.now() == T + ms(100)
    later = timedelta(minutes=5)
    c.observe_db(T + later + ms(900), m.at(later), m.at(later + ms(200)))  # no quick one at all: taken
    m.t = m.at(later + ms(200))
    assert c.now() == T + later + ms(900) + ms(100)


def test_a_slow_reading_long_after_the_last_quick_one_is_taken(monkeypatch):
    m = Monotonic(monkeypatch)
    c = Clock()
    c.observe_db(T, m.at(ms(0)), m.at(ms(10)))
    later = timedelta(minutes=5)
    c.observe_db(T + later + ms(700), m.at(later), m.at(later + ms(200)))  # the database's clock stepped
    m.t = m.at(later + ms(200))
    assert c.now() == T + later + ms(800)


def test_the_offset_is_the_database_clock_less_this_hosts(monkeypatch):
    m = Monotonic(monkeypatch)
    c = Clock()
    assert abs(c.offset.total_seconds()) < 1  # before any reading: this host's clock
    c.observe_db(datetime.now(UTC) + timedelta(seconds=100), m.t, m.t)
    assert abs((c.offset - timedelta(seconds=100)).total_seconds()) < 1


async def test_a_step_of_this_hosts_clock_does_not_move_the_decisions(tmp_path, monkeypatch):
    """Red-team, stop 44: ``now()`` was this host's wall clock plus the offset of the last write. A step of
    the host's clock (ntpd after a VM was paused or moved) moved every decision at once until the next write
    measured again: a game stopped 23 hours before (a 24-hour RTMANAGER_CLEANUP_TTL) was removed, for good,
    and a turn's wait could end early. Time since the last reading of the database is now counted on the
    monotonic clock: the wall clock of this host plays no part."""
    w = World(tmp_path, RTMANAGER_CLEANUP_TTL="86400")
    await started(w)
    await w.job(JobKind.STOP, "g1")
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED
    step = [timedelta(0)]

    class SteppingDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + step[0]

    monkeypatch.setattr(clock_module, "datetime", SteppingDatetime)
    clock = Clock()
    mono = clock_module.time.monotonic()
    clock.observe_db(rec.stopped_at + timedelta(hours=23), mono, mono)  # 23 h after the stop, by the database
    w.reconciler.clock = clock
    assert (await w.sync("g1")).status is Status.STOPPED
    step[0] = timedelta(hours=2)  # the host's clock is stepped forward
    rec = await w.sync("g1")
    assert rec.status is Status.STOPPED and w.backend.by_name("galaxy-game-g1") is not None
