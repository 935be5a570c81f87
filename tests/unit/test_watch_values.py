"""The watch API's pure parts: one Server-Sent Events block, and the filter."""

from __future__ import annotations

from desired.watch import WatchEvent, WatchFilter, sse


def test_an_event_block_has_its_id_name_and_one_data_line():
    assert sse("snapshot", '{"a":1}', 7) == b'id: 7\nevent: snapshot\ndata: {"a":1}\n\n'


def test_a_keepalive_is_a_comment_and_may_move_the_last_id_without_dispatching():
    assert sse(None, None, comment="keepalive") == b": keepalive\n\n"
    assert sse(None, None, 12, comment="keepalive") == b": keepalive\nid: 12\n\n"


def test_the_filter_passes_listed_games_and_statuses_only():
    ev = WatchEvent(position=1, game_id="g1", fields={"status": "running"})
    assert WatchFilter().passes(ev)
    assert WatchFilter(game_ids=frozenset({"g1"})).passes(ev)
    assert not WatchFilter(game_ids=frozenset({"g2"})).passes(ev)
    assert WatchFilter(statuses=frozenset({"running", "stopped"})).passes(ev)
    assert not WatchFilter(game_ids=frozenset({"g1"}), statuses=frozenset({"stopped"})).passes(ev)
