"""Snapshot revisions after a restore of the database (red-team finding): revisions are numbered from the
record, so a database restored from an older backup numbered a game's next snapshots below those Lobby
was sent, and Lobby, which keeps the highest revision per game, dropped them: it went on believing a game
stopped that ran again. A new term raises every game's revision above the snapshot stream's first."""

from __future__ import annotations

import logging
import uuid

import pytest

from controller import snapshot_floor
from controller.snapshot_floor import raise_floor, revision_of
from desired.jobs import Job
from desired.model import JobKind, OpSource
from tests.fakes import FakeStore, FakeStreams, defaults

STREAM = "snapshots"
IMG = "galaxy/engine-stub:1.0"


async def world(tmp_path, games=("g1", "g2")):
    store, streams = FakeStore(), FakeStreams()
    for n, game in enumerate(games):
        await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMG,
                               stream="s", entry_id=f"{n + 1}-0"), defaults(str(tmp_path)))
    return store, streams


def sent(streams: FakeStreams, game: str, revision: int) -> None:
    """A snapshot the database does not know (published after its backup)."""
    streams.xadd(STREAM, {"game_id": game, "revision": str(revision), "status": "running",
                          "snapshot_id": str(uuid.uuid4())})


async def test_a_database_behind_the_stream_has_every_games_revisions_raised_above_it(tmp_path):
    store, streams = await world(tmp_path)
    for rev in range(1, 8):
        sent(streams, "g1", rev)
    sent(streams, "g2", 4)
    sent(streams, "g1", 9)  # the newest entry: above what the restored record holds
    assert store.records["g1"].snapshot_revision < 9
    assert await raise_floor(streams, store, STREAM) == 2
    assert store.records["g1"].snapshot_revision >= 9 and store.records["g2"].snapshot_revision >= 4
    # what was not published yet is numbered above the floor, in its order, and the next comes after it
    pending = [r["fields"]["revision"] for r in store.results if r["game_id"] == "g1" and r["kind"] == "snapshot"
               and not r["published"]]
    assert pending and pending == [str(10 + i) for i in range(len(pending))]
    assert store.records["g1"].snapshot_revision == 9 + len(pending)


async def test_a_database_that_is_not_behind_costs_two_reads_and_changes_nothing(tmp_path):
    store, streams = await world(tmp_path)
    [known] = [r for r in store.results if r["kind"] == "snapshot" and r["game_id"] == "g1"]
    streams.xadd(STREAM, dict(known["fields"]))  # the newest entry: a snapshot the database holds
    before = dict(store.records)
    streams.calls.clear()
    assert await raise_floor(streams, store, STREAM) == 0
    assert [c[0] for c in streams.calls] == ["recent"] and store.records == before


async def test_a_game_the_database_lost_counts_as_behind(tmp_path):
    store, streams = await world(tmp_path, games=("g1",))
    sent(streams, "g1", 3)
    sent(streams, "gone", 5)  # newest: a game with no record (an emptied database, its games adopted later)
    assert await raise_floor(streams, store, STREAM) == 1
    assert store.records["g1"].snapshot_revision >= 3


async def test_the_stream_is_read_whole_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot_floor, "BATCH", 3)
    store, streams = await world(tmp_path)
    sent(streams, "g2", 50)
    for rev in range(1, 11):
        sent(streams, "g1", rev)
    sent(streams, "g1", 11)
    assert await raise_floor(streams, store, STREAM) == 2
    assert store.records["g2"].snapshot_revision >= 50 and store.records["g1"].snapshot_revision >= 11


@pytest.mark.parametrize("fields", [
    {}, {"game_id": "g1"}, {"game_id": "g1", "revision": "x"}, {"game_id": "g1", "revision": "-3"},
    {"game_id": "g1", "revision": "٣"}, {"game_id": "g1", "revision": "9" * 19}, {"game_id": "", "revision": "1"},
    {"game_id": b"g1", "revision": "1"},
])
def test_an_entry_that_is_not_one_of_our_snapshots_is_no_revision(fields):
    assert revision_of(fields) is None


async def test_garbage_on_the_stream_is_passed_over(tmp_path):
    store, streams = await world(tmp_path)
    sent(streams, "g1", 6)
    streams.xadd(STREAM, {"game_id": "g1", "revision": "9" * 40})
    streams.xadd(STREAM, {"hello": "world"})
    sent(streams, "g2", 8)
    assert await raise_floor(streams, store, STREAM) == 2
    assert 6 <= store.records["g1"].snapshot_revision < 10**6


# --------------------------------------------------------------------------- in the relay (review findings)
SNAPSHOTS = "runtime:snapshots"


def relay_over(store: FakeStore, streams: FakeStreams):
    from controller.config import Settings
    from controller.metrics import Metrics
    from controller.relay import Relay

    settings = Settings.from_env({})
    assert settings.streams.snapshot_stream == SNAPSHOTS
    return Relay(settings.streams, streams, store, Metrics())


def published(streams: FakeStreams, game: str) -> list[int]:
    return [int(f["revision"]) for f in streams.fields_of(SNAPSHOTS) if f.get("game_id") == game]


async def test_the_relay_raises_the_floor_before_the_terms_first_publication(tmp_path):
    """Review: run before the term's tasks, the floor held the new leader's first lease renewal: a Redis
    slow to answer made every term lapse before it started. The relay does it instead, before it
    publishes anything, and retries it after a failure as it retries anything."""
    store, streams = await world(tmp_path, games=("g1",))
    for rev in range(1, 10):
        streams.xadd(SNAPSHOTS, {"game_id": "g1", "revision": str(rev), "snapshot_id": str(uuid.uuid4())})
    relay = relay_over(store, streams)
    streams.down = True
    with pytest.raises(Exception):  # noqa: B017 - an outage, whatever the fake raises
        await relay.flush()
    streams.down = False
    await relay.flush()
    assert published(streams, "g1")[9:] and min(published(streams, "g1")[9:]) > 9
    relay.reset()  # a new term: checked again (the newest entry), nothing to raise
    raised = []

    async def spy(floors, on_stream=frozenset()):
        raised.append(floors)
        return 0

    store.raise_snapshot_revisions = spy
    await relay.flush()
    assert raised == []


async def test_a_snapshot_already_on_the_stream_keeps_its_revision(tmp_path):
    """Review: a snapshot published and not marked yet (the relay's deferred marks, a kill) was numbered
    again: the same snapshot_id came twice with two revisions."""
    store, streams = await world(tmp_path, games=("g1",))
    [pending] = [r for r in store.results if r["kind"] == "snapshot"]
    streams.xadd(SNAPSHOTS, {**pending["fields"]})  # on the stream, not marked
    for rev in range(2, 9):
        streams.xadd(SNAPSHOTS, {"game_id": "g1", "revision": str(rev), "snapshot_id": str(uuid.uuid4())})
    assert await raise_floor(streams, store, SNAPSHOTS) == 1
    assert pending["fields"]["revision"] == "1"
    # Lobby's view of g1 came from what the database lost: a resync snapshot above the floor carries its state
    resync = [r["fields"] for r in store.results if r["kind"] == "snapshot" and r["fields"]["reason"] == "resync"]
    assert [f["revision"] for f in resync] == ["9"] and store.records["g1"].snapshot_revision == 9


async def test_a_game_the_database_lost_gets_its_floor_when_its_record_is_made_again(tmp_path):
    """Review: the floor raised only games with a record, once: a game created after the backup, started
    again by Lobby (or adopted) later, numbered its snapshots from 1, below what Lobby held."""
    store, streams = await world(tmp_path, games=("g1",))
    for rev in range(1, 13):
        streams.xadd(SNAPSHOTS, {"game_id": "g9", "revision": str(rev), "snapshot_id": str(uuid.uuid4())})
    await raise_floor(streams, store, SNAPSHOTS)
    await store.submit(Job(kind=JobKind.START, game_id="g9", source=OpSource.LOBBY, image_ref=IMG,
                           stream="s", entry_id="9-0"), defaults(str(tmp_path)))
    assert store.records["g9"].snapshot_revision == 13


async def test_an_entry_nobody_can_read_does_not_hold_the_results_back(tmp_path):
    """Review: an entry of bytes that are no UTF-8 on the snapshot stream (someone else's) made the floor's
    read raise, and with it the relay: nothing was published again, results included. Such bytes are read
    as replaced, and any other failure of the floor is logged and the term publishes without it."""
    from tests.support.world import answered

    store, streams = await world(tmp_path, games=("g1",))
    await answered(store, 2)
    streams.xadd(SNAPSHOTS, {b"game_id": b"\xff\xfe", b"revision": b"\xff", b"snapshot_id": b"\xfe"})
    relay = relay_over(store, streams)
    assert await relay.flush() > 0 and await store.unpublished_count() == 0


async def test_a_floor_that_fails_otherwise_is_logged_and_the_term_publishes(tmp_path, caplog):
    from tests.support.world import answered

    store, streams = await world(tmp_path, games=("g1",))
    await answered(store, 2)
    relay = relay_over(store, streams)

    async def broken(snapshot_ids):
        raise RuntimeError("a bug")

    store.floor_state = broken
    streams.xadd(SNAPSHOTS, {"game_id": "g1", "revision": "5", "snapshot_id": str(uuid.uuid4())})
    with caplog.at_level(logging.ERROR):
        assert await relay.flush() > 0 and await store.unpublished_count() == 0
    assert "publishing without it" in caplog.text


async def test_a_snapshot_numbered_before_the_floor_with_a_revision_lobby_holds_is_numbered_above_it(tmp_path):
    """Review: the database was taken for up to date when its record's revision equalled the stream's, though
    the term had numbered another snapshot of that game the same: Lobby dropped it. The stream's newest entry
    is looked for by its id, and a revision equal to the floor is raised too."""
    store, streams = await world(tmp_path, games=("g1",))
    [pending] = [r for r in store.results if r["kind"] == "snapshot"]
    number = int(pending["fields"]["revision"])
    streams.xadd(SNAPSHOTS, {"game_id": "g1", "revision": str(number), "snapshot_id": str(uuid.uuid4())})
    relay = relay_over(store, streams)
    await relay.flush()
    assert published(streams, "g1") == [number, number + 1]


@pytest.mark.parametrize("game", ["g\x001", "G1", "a" * 60, "-x"])
def test_a_game_id_that_is_none_is_no_revision(game):
    assert revision_of({"game_id": game, "revision": "3"}) is None


async def test_the_adapters_tail_read_replaces_bytes_that_are_no_utf8():
    """Review: the relay's tail check reads the newest entries' ids through a script, whose answers were
    decoded strictly: one such entry near the end of a stream stopped the relay for good."""
    from controller.streams import RedisStreams

    streams = RedisStreams("redis://127.0.0.1:1/0", group="g", consumer="c")

    async def script(script, key, *args):
        return [[b"5-0", b"\xfe"], [b"4-0", b"ok"]]

    streams._script = script
    assert await streams.recent_field("s", 2, "snapshot_id") == [("5-0", "\ufffd"), ("4-0", "ok")]
    await streams.close()


async def test_a_raise_that_failed_is_tried_again_though_the_term_published_meanwhile(tmp_path, monkeypatch):
    """Review: a raise that failed (not an outage) was given up for good: once the term had published, the
    stream's newest entry was its own, known, and the restore was never handled."""
    from controller import relay as relay_module

    store, streams = await world(tmp_path, games=("g1",))
    for rev in range(1, 6):
        streams.xadd(SNAPSHOTS, {"game_id": "g1", "revision": str(rev), "snapshot_id": str(uuid.uuid4())})
    relay = relay_over(store, streams)
    real, calls = store.raise_snapshot_revisions, []

    async def fails_once(floors, on_stream=frozenset()):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return await real(floors, on_stream)

    store.raise_snapshot_revisions = fails_once
    monkeypatch.setattr(relay_module, "FLOOR_RETRY", 0.0)
    await relay.flush()  # published without the floor, below what Lobby holds
    assert len(calls) == 1 and max(published(streams, "g1")[5:]) <= 5
    relay.reset()  # review: a new term (or another process) forgot it; the database remembers it
    await relay.flush()
    assert len(calls) == 2
    # and Lobby is sent the game's state above what it holds (a resync snapshot), not only a higher counter
    assert max(published(streams, "g1")) > 5


async def test_an_entry_that_only_looks_like_ours_makes_no_term_read_the_stream(tmp_path, monkeypatch):
    """Review: any entry whose id parsed as a UUID counted as ours, so a foreign one at the stream's end made
    every term write the marker and read the whole stream."""
    store, streams = await world(tmp_path, games=("g1",))
    [known] = [r for r in store.results if r["kind"] == "snapshot"]
    streams.xadd(SNAPSHOTS, dict(known["fields"]))
    streams.xadd(SNAPSHOTS, {"snapshot_id": str(uuid.uuid4()), "hello": "world"})
    relay = relay_over(store, streams)
    scans = []

    async def scan(*args):
        scans.append(args)
        return 0

    monkeypatch.setattr(snapshot_floor, "raise_above_stream", scan)
    for _ in range(3):
        relay.reset()
        await relay.flush()
    assert scans == [] and "" not in store.snapshot_floors


async def test_a_check_that_failed_is_done_whole_on_the_retry(tmp_path, monkeypatch):
    """Review: a check that failed before it could tell (not an outage) was retried against a stream whose
    newest entries were by then the term's own: a restore in that window went unseen for good."""
    from controller import relay as relay_module

    store, streams = await world(tmp_path, games=("g1",))
    for rev in range(1, 6):
        streams.xadd(SNAPSHOTS, {"game_id": "g1", "revision": str(rev), "snapshot_id": str(uuid.uuid4())})
    relay = relay_over(store, streams)
    real, failed = store.floor_state, []

    async def fails_once(ids):
        if not failed:
            failed.append(1)
            raise RuntimeError("a bug")
        return await real(ids)

    store.floor_state = fails_once
    monkeypatch.setattr(relay_module, "FLOOR_RETRY", 0.0)
    await relay.flush()  # published without the floor
    await relay.flush()
    assert failed and max(published(streams, "g1")) > 5
