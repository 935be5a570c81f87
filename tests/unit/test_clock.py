"""The database clock as this process reads it (desired/clock.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from desired.clock import Clock

T = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def ms(n: float) -> timedelta:
    return timedelta(milliseconds=n)


def test_a_quick_reading_sets_the_offset_to_its_midpoint():
    c = Clock()
    c.observe_db(T + ms(105), T, T + ms(10))  # the database 100 ms ahead
    assert c.offset == ms(100)


def test_a_slow_reading_does_not_move_an_offset_a_quick_one_set_recently():
    """A round trip that waited 2 s for a lock: its midpoint is a second from when the database read its
    clock; taken, it would move the offset by a second."""
    c = Clock()
    c.observe_db(T + ms(105), T, T + ms(10))
    c.observe_db(T + ms(1000 + 100), T + ms(1000), T + ms(3000))  # read at once, answered 2 s later
    assert c.offset == ms(100)


def test_slow_readings_alone_still_set_the_offset():
    c = Clock()
    c.observe_db(T + ms(5000), T, T + ms(200))  # nothing better yet
    assert c.offset == ms(4900)
    later = T + timedelta(minutes=5)
    c.observe_db(later + ms(900), later, later + ms(200))  # no quick one at all: taken
    assert c.offset == ms(800)


def test_a_slow_reading_long_after_the_last_quick_one_is_taken():
    c = Clock()
    c.observe_db(T + ms(105), T, T + ms(10))
    later = T + timedelta(minutes=5)
    c.observe_db(later + ms(700), later, later + ms(200))  # the clock stepped; no quick reading since
    assert c.offset == ms(600)
