"""The events our own actions cause (observed/events.py ``Echoes``): a start of a unit, a stop, a removal
each made the event stream report it, and each report woke one more look of the game (issue 25: a start
cost two syncs). An echo is an event of the unit acted on, of the kinds the action makes, while it runs or
within ECHO_WINDOW after; anything else is news."""

from __future__ import annotations

import pytest

from observed import events
from observed.events import ECHO_WINDOW, REMOVING, STARTING, STOPPING, Echoes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_event_a_start_causes_is_an_echo_and_nothing_else_is():
    clock = Clock()
    echoes = Echoes(clock)
    with echoes.expect("u1", STARTING):
        assert echoes.is_echo("u1", "start")
        assert not echoes.is_echo("u1", "die")  # the engine exited while it started: news
        assert not echoes.is_echo("u1", "oom")
        assert not echoes.is_echo("u2", "start")  # another unit's
    clock.now += ECHO_WINDOW - 0.1
    assert echoes.is_echo("u1", "start")  # the stream is a little late
    clock.now += 0.2
    assert not echoes.is_echo("u1", "start")  # late beyond the window: taken as news


def test_a_stop_inside_a_removal_keeps_the_removal_s_echoes():
    clock = Clock()
    echoes = Echoes(clock)
    with echoes.expect("u1", REMOVING):
        with echoes.expect("u1", STOPPING):
            clock.now += 30  # a long grace period
            assert echoes.is_echo("u1", "kill") and echoes.is_echo("u1", "die")
        clock.now += ECHO_WINDOW + 1  # the removal still runs
        assert echoes.is_echo("u1", "destroy")
        assert not echoes.is_echo("u1", "start")
    clock.now += ECHO_WINDOW + 1
    assert not echoes.is_echo("u1", "destroy")


def test_a_new_action_after_the_window_does_not_inherit_the_old_one_s_kinds():
    clock = Clock()
    echoes = Echoes(clock)
    with echoes.expect("u1", STOPPING):
        pass
    clock.now += ECHO_WINDOW + 1
    with echoes.expect("u1", STARTING):
        assert echoes.is_echo("u1", "start")
        assert not echoes.is_echo("u1", "die")  # the old stop's kind: news now


def test_a_failed_action_still_expects_its_echo_and_the_error_goes_through():
    echoes = Echoes(Clock())
    with pytest.raises(RuntimeError), echoes.expect("u1", STARTING):
        raise RuntimeError("the daemon refused")
    assert echoes.is_echo("u1", "start")


def test_what_is_remembered_is_bounded(monkeypatch):
    monkeypatch.setattr(events, "ECHOES_KEPT", 10)
    clock = Clock()
    echoes = Echoes(clock)
    for i in range(10):
        with echoes.expect(f"old{i}", STARTING):
            pass
    clock.now += ECHO_WINDOW + 1
    for i in range(25):
        with echoes.expect(f"new{i}", STARTING):
            pass
    assert len(echoes._live) <= 10
    assert echoes.is_echo("new24", "start")
    assert not echoes.is_echo("old0", "start")


def test_a_die_during_a_start_soon_after_our_stop_is_news():
    """Review of the first version: a start of the unit within the window of our stop kept the stop's kinds,
    so the engine's exit during the start's health wait was dropped as an echo, and the start waited out its
    whole timeout (or the unit cache kept a unit that had exited)."""
    clock = Clock()
    echoes = Echoes(clock)
    with echoes.expect("u1", STOPPING):
        pass
    clock.now += 0.5
    with echoes.expect("u1", STARTING):
        assert not echoes.is_echo("u1", "die")
        assert echoes.is_echo("u1", "start")
