"""Odd values in the daemon's answers fail nothing (red-team finding). An exit code outside 32 bits (a
Windows-style 3221225477, a string) made the crash's record invalid, and a FinishedAt far in the future or
without a time zone made the daemon-restart check raise: the crashed engine was never restarted, for
ever, with no crash counted. One malformed entry of a list (a network of null, a name of null, a
creation time of 1e20) failed every resync and health round, for every game."""

from __future__ import annotations

import pytest

from observed.model import from_inspect, from_list_entry
from tests.support.world import World, started


def inspected(**state) -> dict:
    return {"Id": "c1", "Name": "/galaxy-game-g1", "Config": {"Image": "x", "Labels": {}},
            "State": {"Status": "exited", **state}}


@pytest.mark.parametrize("code", [2**31, 3221225477, -2**31 - 1, -2**40, "1", 1.5, True, None])
def test_an_exit_code_outside_32_bits_is_unknown(code):
    seen = from_inspect(inspected(ExitCode=code))
    assert seen.exit_code is None


@pytest.mark.parametrize("code", [0, 1, 137, -1, 2**31 - 1, -2**31])
def test_an_exit_code_in_32_bits_is_kept(code):
    assert from_inspect(inspected(ExitCode=code)).exit_code == code


@pytest.mark.parametrize("when", ["9999-12-31T23:59:59Z", "2024-01-02T03:04:05", "garbage", 10**20, -10**20, "Z"])
def test_an_odd_finish_time_is_unknown(when):
    seen = from_inspect(inspected(ExitCode=1, FinishedAt=when, StartedAt=when))
    assert seen.finished_at is None and seen.started_at is None


def test_a_normal_finish_time_is_read():
    seen = from_inspect(inspected(ExitCode=1, FinishedAt="2026-12-05T10:00:00.123456789Z"))
    assert seen.finished_at is not None and seen.finished_at.tzinfo is not None


@pytest.mark.parametrize("entry", [
    {"Id": "x", "NetworkSettings": {"Networks": {"n": None}}},
    {"Id": "x", "NetworkSettings": {"Networks": ["n"]}},
    {"Id": "x", "Names": [None]},
    {"Id": "x", "Names": "galaxy-game-g1"},
    {"Id": "x", "Status": 7},
    {"Id": "x", "Created": 10**20},
    {"Id": "x", "Status": "Exited (99999999999999999999) 3 s ago"},
])
def test_a_malformed_list_entry_is_read_as_far_as_it_goes(entry):
    seen = from_list_entry(entry, "galaxy-games")
    assert seen.id == "x" and seen.created_at is None and seen.ip_address is None and seen.exit_code is None


async def test_a_crash_with_an_exit_code_outside_32_bits_is_counted_and_restarted(tmp_path):
    w = World(tmp_path)
    await started(w)
    w.backend.crash("g1", code=2**31)
    rec = await w.sync("g1")
    assert rec.crash_count == 1 and rec.last_exit_code is None


@pytest.mark.parametrize("raw, epoch", [("3", 3), ("²", 0), ("٣", 0), ("9" * 40, 0), ("", 0)])
def test_an_epoch_label_is_ascii_digits_or_none(raw, epoch):
    from observed.model import LABEL_EPOCH
    seen = from_inspect({"Id": "c1", "Config": {"Labels": {LABEL_EPOCH: raw}}, "State": {"Status": "running"}})
    assert seen.epoch == epoch


def test_swarm_tasks_with_times_without_a_zone_fail_nothing():
    """Review: Swarm's own parser kept a time without a zone as a naive datetime: tasks with both kinds
    raised in the sort that picks the newest, failing every resync and health round."""
    from observed.swarm import _latest, _when

    assert _when("2024-01-02T03:04:05") is None and _when("2024-01-02T03:04:05Z") is not None
    tasks = [{"CreatedAt": "2024-01-02T03:04:05", "DesiredState": "running"},
             {"CreatedAt": "2024-01-02T03:04:06Z", "DesiredState": "running"}]
    assert _latest(tasks) == tasks[1]
