"""The intake against in-memory streams and store: order across streams and reads, held games,
attempts that are not deliveries, dead letters, marks and trimming. Milliseconds, no services."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.admission import Admission
from controller.config import Settings
from controller.intake import READ_COUNT, Intake
from controller.metrics import Metrics
from controller.streams import StreamsUnavailable, entry_key
from desired.errors import StoreUnavailable
from desired.model import JobKind
from tests.fakes import FakeStore, FakeStreams, defaults

START, STOP, DEAD = "runtime:start_jobs", "runtime:stop_jobs", "runtime:dead_letters"
IMG = "galaxy/engine-stub:1.0"


def make(**env: str) -> tuple[Intake, FakeStreams, FakeStore, list[str]]:
    settings = Settings.from_env({"RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*", **env})
    streams, store, woken = FakeStreams(), FakeStore(), []
    admission = Admission(store, defaults(), wake=woken.append)
    return (Intake(settings.streams, streams, store, admission, Metrics(), allowlist=settings.images.image_allowlist),
            streams, store, woken)


async def run_once(intake: Intake) -> None:
    await intake.ensure_groups()
    await intake.pending_pass()
    while await intake.read_round(block_ms=None):
        pass


def start(streams: FakeStreams, game: str, image: str = IMG) -> str:
    return streams.xadd(START, {"game_id": game, "image_ref": image})


def stop(streams: FakeStreams, game: str) -> str:
    return streams.xadd(STOP, {"game_id": game, "reason": "cancelled"})


def ops_of(store: FakeStore, game: str) -> list[tuple[str, str]]:
    return [(o.op.value, o.entry_id) for o in store.ops if o.game_id == game]


@pytest.mark.parametrize("backlog", [0, 1, READ_COUNT - 1, READ_COUNT, READ_COUNT + 10, 3 * READ_COUNT + 7])
async def test_one_games_entries_take_effect_in_entry_order_whatever_the_backlog(backlog):
    """A stop of another stream must never overtake an earlier start that a read did not reach yet."""
    intake, streams, store, _ = make()
    for _ in range(backlog):
        start(streams, "filler")
    s = start(streams, "target")
    p = stop(streams, "target")
    await run_once(intake)
    assert ops_of(store, "target") == [("start", s), ("stop", p)]
    rec = store.records["target"]
    assert rec.desired_status.value == "stopped"
    assert [r["error_code"] for r in store.results_for("target")] == ["superseded"]  # the start, replaced


async def test_within_one_millisecond_a_stop_never_goes_before_a_start():
    """Redis numbers each stream on its own: a start 5000-3 and a stop 5000-0 were sent in one
    millisecond in an order the ids cannot tell. The stop goes last."""
    intake, streams, store, _ = make()
    s = streams.xadd(START, {"game_id": "g1", "image_ref": IMG}, entry_id="5000-3")
    p = streams.xadd(STOP, {"game_id": "g1", "reason": "cancelled"}, entry_id="5000-0")
    await run_once(intake)
    assert ops_of(store, "g1") == [("start", s), ("stop", p)]


async def test_a_same_millisecond_start_that_lands_just_after_the_read_still_goes_first():
    """The blocking read wakes for the stop alone; the start Lobby sent in the same millisecond
    lands on the other stream a moment later (chaos seed 707). The round looks again before it
    orders, so the start still goes first."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    p = streams.xadd(STOP, {"game_id": "g1", "reason": "cancelled"}, entry_id="5000-0")
    real = streams.read_new
    late: list[str] = []

    async def read_then_start_lands(names, count, block_ms):
        got = await real(names, count, block_ms)
        if not late:
            late.append(streams.xadd(START, {"game_id": "g1", "image_ref": IMG}, entry_id="5000-1"))
        return got

    streams.read_new = read_then_start_lands  # type: ignore[method-assign]
    await intake.read_round(block_ms=None)
    assert ops_of(store, "g1") == [("start", late[0]), ("stop", p)]


async def test_a_start_that_lands_while_another_stream_is_refilled_is_not_overtaken():
    """A backlog on the stop stream takes two reads. Between them Lobby starts and stops g1; the
    second read of the stop stream brings the stop, and the start stream, empty since the round
    began, must be read again before the stop is applied."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    for i in range(READ_COUNT):
        stop(streams, f"filler{i}")
    real = streams.read_new
    sent: list[tuple[str, str]] = []

    async def lobby_acts_during_the_refill(names, count, block_ms):
        if names == [STOP] and not sent:
            sent.append(("start", start(streams, "g1")))
            sent.append(("stop", stop(streams, "g1")))
        return await real(names, count, block_ms)

    streams.read_new = lobby_acts_during_the_refill  # type: ignore[method-assign]
    await intake.read_round(block_ms=None)
    assert ops_of(store, "g1") == sent


async def test_a_stream_emptied_by_the_merge_is_read_again_before_a_later_head_is_taken():
    """Chaos seed 25: the round had one stop, read alone; while it looked at the other streams, a
    stop and then a start landed. The start was taken before the second stop, which the stop
    stream, emptied by the merge, had not been asked for."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    first = streams.xadd(STOP, {"game_id": "g1", "reason": "cancelled"}, entry_id="5000-0")
    real = streams.read_new
    sent: list[tuple[str, str]] = [("stop", first)]

    async def lobby_goes_on(names, count, block_ms):
        if len(sent) == 1 and START in names and STOP not in names:
            sent.append(("stop", streams.xadd(STOP, {"game_id": "g1", "reason": "cancelled"}, entry_id="5010-0")))
            sent.append(("start", streams.xadd(START, {"game_id": "g1", "image_ref": IMG}, entry_id="5012-0")))
        return await real(names, count, block_ms)

    streams.read_new = lobby_goes_on  # type: ignore[method-assign]
    await intake.read_round(block_ms=None)
    assert len(sent) == 3, "the scenario did not happen"
    assert ops_of(store, "g1") == sent


async def test_entries_interleaved_over_three_reads_keep_each_games_order():
    intake, streams, store, _ = make()
    sent: dict[str, list] = {}
    for i in range(2 * READ_COUNT + 30):
        game = f"g{i % 7}"
        sent.setdefault(game, []).append(("start", start(streams, game)) if i % 3 else ("stop", stop(streams, game)))
    await run_once(intake)
    for game, entries in sent.items():
        assert ops_of(store, game) == entries, game


async def test_a_flood_is_admitted_in_batches_of_one_transaction_each():
    intake, streams, store, _ = make()
    for i in range(1000):
        stop(streams, f"unknown-{i}")  # replays: no Docker work
    for _ in range(500):
        streams.xadd(START, {"game_id": "BAD GAME", "image_ref": IMG})
    await run_once(intake)
    assert len(store.results) == 1500 and store.batches <= 1500 // 200 + 3
    assert all(not s.pending for s in streams.streams.values())


async def test_a_batch_that_fails_is_handled_entry_by_entry_and_only_the_failing_game_waits():
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    await intake.pending_pass()
    real = store.submit

    async def broken_for_g1(job, *args, **kwargs):
        if job.game_id == "g1":
            raise RuntimeError("simulated bug")
        return await real(job, *args, **kwargs)

    store.submit = broken_for_g1
    a = stop(streams, "a")
    g1 = start(streams, "g1")
    b = stop(streams, "b")
    g1_later = stop(streams, "g1")
    await intake.read_round(block_ms=None)
    assert ops_of(store, "a") == [("stop", a)] and ops_of(store, "b") == [("stop", b)]
    assert ops_of(store, "g1") == [] and b"g1" in intake.held
    store.submit = real
    await intake.pending_pass()
    assert ops_of(store, "g1") == [("start", g1), ("stop", g1_later)]


async def test_a_failed_entry_holds_the_later_entries_of_its_game_across_reads():
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    await intake.pending_pass()
    store.fail_submit = RuntimeError("simulated bug")
    s = start(streams, "g1")
    await intake.read_round(block_ms=None)                     # fails: g1 is held
    store.fail_submit = None
    p = stop(streams, "g1")
    other = stop(streams, "other")
    await intake.read_round(block_ms=None)                     # a later read: the stop of g1 still waits
    assert ops_of(store, "g1") == [] and len(ops_of(store, "other")) == 1
    await intake.pending_pass()                                # retried in order
    assert ops_of(store, "g1") == [("start", s), ("stop", p)]
    assert streams.streams[START].pending == {} and streams.streams[STOP].pending == {}
    assert other


async def test_outage_retries_are_not_attempts_and_never_dead_letter_a_good_entry():
    intake, streams, store, _ = make(RTMANAGER_MAX_DELIVERIES="2")
    await intake.ensure_groups()
    await intake.pending_pass()
    s = start(streams, "g1")
    store.fail_submit = StoreUnavailable("postgres: fake lock timeout")  # the store answers, the write times out
    with pytest.raises(StoreUnavailable):
        await intake.read_round(block_ms=None)
    for _ in range(10):  # far past RTMANAGER_MAX_DELIVERIES re-reads, all during the outage
        with pytest.raises(StoreUnavailable):
            await intake.pending_pass()
    assert streams.streams[START].pending[s].deliveries > 10  # Redis counted every re-read
    store.fail_submit = None
    await intake.pending_pass()
    assert ops_of(store, "g1") == [("start", s)]
    assert streams.fields_of(DEAD) == []


async def test_an_entry_that_keeps_failing_is_dead_lettered_after_the_attempt_limit():
    intake, streams, store, _ = make(RTMANAGER_MAX_DELIVERIES="2")
    await intake.ensure_groups()
    await intake.pending_pass()
    store.fail_submit = RuntimeError("simulated bug")
    s = start(streams, "g1")
    await intake.read_round(block_ms=None)  # attempt 1
    await intake.pending_pass()             # attempt 2
    assert streams.fields_of(DEAD) == []
    await intake.pending_pass()             # over the limit: dead-lettered, answered, acknowledged
    [copy] = streams.fields_of(DEAD)
    assert copy["rtm_entry_id"] == s and copy["image_ref"] == IMG
    [res] = store.results_for("g1")
    assert (res["outcome"], res["error_code"], res["job_entry_id"]) == ("failure", "internal_error", s)
    assert streams.streams[START].pending == {}


async def failed_once():
    """An entry whose first attempt failed (a bug), with one attempt allowed: the next pass dead-letters it."""
    intake, streams, store, _ = make(RTMANAGER_MAX_DELIVERIES="1")
    await intake.ensure_groups()
    await intake.pending_pass()
    store.fail_submit = RuntimeError("simulated bug")
    s = start(streams, "g1")
    await intake.read_round(block_ms=None)  # attempt 1
    return intake, streams, store, s


async def test_a_dead_letter_copy_redis_refused_once_is_written_at_the_next_attempt():
    """Red-team finding: the answer was committed first; when Redis then refused the copy (MISCONF, OOM),
    the next attempt found the answer there, skipped the copy and acknowledged the entry: its fields were
    nowhere any more. The copy now goes first (at least once)."""
    intake, streams, store, s = await failed_once()
    real = streams.add

    async def refused_once(stream, fields, maxlen=None):
        streams.add = real
        raise StreamsUnavailable("redis: MISCONF")

    streams.add = refused_once
    with pytest.raises(StreamsUnavailable):
        await intake.pending_pass()  # over the limit: the copy is refused
    await intake.pending_pass()
    copies = streams.fields_of(DEAD)
    assert [c["rtm_entry_id"] for c in copies] == [s] and copies[0]["image_ref"] == IMG
    assert [(r["outcome"], r["error_code"]) for r in store.results_for("g1")] == [("failure", "internal_error")]
    assert streams.streams[START].pending == {}


async def test_a_dead_letter_whose_answer_keeps_failing_is_copied_once():
    """Review: with the copy first, an answer that kept failing (a bug in its insert, Postgres flapping)
    added a copy at every pass, pushing other entries' copies out of the capped stream."""
    intake, streams, store, s = await failed_once()
    real = store.reject_entry

    async def broken(**kwargs):
        raise RuntimeError("the answer's insert fails")

    store.reject_entry = broken
    for _ in range(4):
        await intake.pending_pass()  # logged; the entry stays pending and holds its game only
        assert s in streams.streams[START].pending
    store.reject_entry = real
    await intake.pending_pass()
    assert [c["rtm_entry_id"] for c in streams.fields_of(DEAD)] == [s]
    assert [(r["outcome"], r["error_code"]) for r in store.results_for("g1")] == [("failure", "internal_error")]


async def test_a_dead_letter_redis_refuses_for_good_holds_its_game_only():
    """Red-team, stop 43: a dead-letter stream Redis refuses for good (an ACL without it, a key of another
    type) raised out of the pending pass at the first entry past its attempts; every pass then stopped at
    that entry and no entry after it, of any game, was admitted. The entry now stays pending (its game
    held, as any failing entry's) and the others go on."""
    from controller.streams import StreamsError
    intake, streams, store, s = await failed_once()
    store.fail_submit = None
    real = streams.add

    async def refused(stream, fields, maxlen=None):
        if stream == DEAD:
            raise StreamsError("redis: NOPERM this user has no permissions to access the key")
        return await real(stream, fields, maxlen)

    streams.add = refused
    later_g1, other = stop(streams, "g1"), start(streams, "g2")
    for _ in range(3):
        await intake.pending_pass()
        while await intake.read_round(block_ms=None):
            pass
    assert ops_of(store, "g2") == [("start", other)]
    assert ops_of(store, "g1") == []  # held behind its first entry, in order
    assert s in streams.streams[START].pending and later_g1 in streams.streams[STOP].pending
    streams.add = real  # the operator fixes the ACL: the entry is dead-lettered and its game goes on
    await run_once(intake)
    assert [c["rtm_entry_id"] for c in streams.fields_of(DEAD)] == [s]
    assert [o[0] for o in ops_of(store, "g1")] == ["start", "stop"]
    assert [(r["outcome"], r["error_code"]) for r in store.results_for("g1")][0] == ("failure", "internal_error")


async def test_a_game_whose_record_another_session_holds_locked_holds_only_that_game():
    """Red-team, stop 43: an operator's transaction left open on one game's record (a manual fix in a SQL
    client) made every admission that included that game wait for the statement timeout, which counted as
    Postgres being away: the whole batch was read again and again, and no game was admitted until the lock
    was released. A lock the store could not have in time (StoreBusy) is now that game's alone: its entries
    stay pending, not counted as attempts, and the others are admitted."""
    from desired.errors import StoreBusy
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    await intake.pending_pass()
    real = store.submit

    async def submit(job, defaults, *, registry=False):
        if job.game_id == "locked":
            raise StoreBusy("postgres: LockNotAvailableError: canceling statement due to lock timeout")
        return await real(job, defaults, registry=registry)

    store.submit = submit
    first = start(streams, "g0")
    held = [start(streams, "locked"), stop(streams, "locked")]
    rest = [start(streams, "g1"), stop(streams, "g0")]
    for _ in range(3):
        await run_once(intake)
    assert ops_of(store, "g0") == [("start", first), ("stop", rest[1])]
    assert ops_of(store, "g1") == [("start", rest[0])]
    assert ops_of(store, "locked") == []
    assert held[0] in streams.streams[START].pending and held[1] in streams.streams[STOP].pending
    assert not [a for a in store.attempts.values() if a]  # no attempt counted: it is not the entry's fault
    store.submit = real  # the lock is released: the game's entries are admitted, in order
    await run_once(intake)
    assert ops_of(store, "locked") == [("start", held[0]), ("stop", held[1])]


async def test_an_entry_that_kills_the_process_counts_as_an_attempt():
    """Re-read entries are counted before they run: a crash mid-handling still counts."""
    intake, streams, store, _ = make(RTMANAGER_MAX_DELIVERIES="1")
    await intake.ensure_groups()
    s = start(streams, "g1")
    streams.deliver_to("c1", START)  # read by this consumer, then the process died
    store.fail_submit = KeyboardInterrupt()  # dies again, before answering
    with pytest.raises(KeyboardInterrupt):
        await intake.pending_pass()
    store.fail_submit = None
    await intake.pending_pass()  # the next process: one attempt already spent: dead-lettered
    assert streams.fields_of(DEAD)[0]["rtm_entry_id"] == s


async def test_a_new_leader_claims_everything_its_predecessor_left_before_reading_new_entries():
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    s = start(streams, "g1")
    streams.deliver_to("dead-leader", START)
    p = stop(streams, "g1")
    await run_once(intake)
    assert ops_of(store, "g1") == [("start", s), ("stop", p)]


async def test_marks_recreate_a_lost_group_and_never_apply_an_entry_twice():
    intake, streams, store, _ = make()
    first = start(streams, "g1")
    await run_once(intake)
    await intake.maintain()
    assert store.marks[START] >= tuple(int(x) for x in first.split("-"))
    # The group vanishes (Redis restored from an older snapshot, or deleted by hand)...
    streams.streams[START].has_group = False
    later = start(streams, "g2")
    store.ops.clear()  # ...and retention already forgot the operation of the first entry
    await run_once(intake)
    assert [o.entry_id for o in store.ops] == [later]  # created again from the mark
    # and an entry at or below the mark that is delivered anyway is acknowledged, not applied
    streams.streams[START].last_delivered = "0-0"
    await run_once(intake)
    assert [o.entry_id for o in store.ops] == [later] and intake.skipped_below_mark >= 1


async def test_a_stream_redis_lost_numbers_its_new_entries_above_the_mark():
    """A Redis that restarted empty, on a clock behind the mark, numbered new entries at or below it: the
    group made again from the mark never delivered them (tests/integration/test_intake_relay.py has it
    on a real Redis)."""
    intake, streams, store, _ = make()
    start(streams, "g1")
    await run_once(intake)
    ahead = (next(streams._ms) + 10**6, 3)
    store.marks[START] = ahead
    del streams.streams[START]  # Redis lost the stream and its group
    await run_once(intake)
    later = start(streams, "g2")
    assert entry_key(later) > ahead
    await run_once(intake)
    assert [o.entry_id for o in store.ops if o.game_id == "g2"] == [later]


async def test_after_the_loss_new_entries_never_take_the_id_of_one_handled_before():
    """Review: raised to the mark only, Redis gave the next entry the id of one handled after the mark was
    stored (the mark lags behind): the new job was taken for that one again, acknowledged and dropped."""
    intake, streams, store, _ = make()
    await run_once(intake)
    base = next(streams._ms) + 10**6
    store.marks[START] = (base, 0)
    handled = streams.xadd(START, {"game_id": "g1", "image_ref": IMG}, entry_id=f"{base}-1")
    await run_once(intake)  # handled after the mark was stored
    del streams.streams[START]
    await run_once(intake)
    new = start(streams, "g2")
    assert entry_key(new) > entry_key(handled)
    await run_once(intake)
    assert [o.entry_id for o in store.ops if o.game_id == "g2"] == [new]


async def test_after_the_loss_the_job_streams_share_one_floor():
    """Review: each stream raised to its own mark numbered every stop of the lag window before every start
    sent earlier, when the stop stream's mark was lower. One floor for the three: a start then a stop of
    a game, sent after the loss, are applied in that order."""
    intake, streams, store, _ = make()
    await run_once(intake)
    base = next(streams._ms) + 10**6
    store.marks[START], store.marks[STOP] = (base + 4000, 0), (base, 0)
    for name in (START, STOP):
        del streams.streams[name]
    await run_once(intake)
    s, p = start(streams, "g1"), stop(streams, "g1")
    assert entry_key(s) > (base + 4000, 0) and entry_key(p) > (base + 4000, 0)
    await run_once(intake)
    assert ops_of(store, "g1") == [("start", s), ("stop", p)]


async def test_a_redis_refusing_xsetid_is_not_renumbered_at_every_pass():
    """Review: with XSETID refused, a stream stayed below its mark, and every pending pass read the whole
    operation log again for a floor it could not set."""
    intake, streams, store, _ = make()
    await run_once(intake)
    store.marks[START] = (next(streams._ms) + 10**6, 0)
    del streams.streams[START]
    refused = []

    async def raise_last_id(stream, floor):
        refused.append(stream)
        return False

    streams.raise_last_id = raise_last_id
    streams.sets_ids = False
    scans = []
    real = store.highest_entries

    async def highest_entries():
        scans.append(1)
        return await real()

    store.highest_entries = highest_entries
    for _ in range(5):
        await intake.ensure_groups()
    assert len(scans) == 1 and refused


async def test_a_stream_gone_during_the_renumbering_does_not_end_it_for_the_process():
    """Review: a stream that vanished between its read and its XSETID (Redis flushed mid-pass) was taken
    for a refusal of XSETID, and no later loss was renumbered. Only a real refusal ends it."""
    intake, streams, store, _ = make()
    await run_once(intake)
    store.marks[START] = (next(streams._ms) + 10**6, 0)
    del streams.streams[START]
    real, gone = streams.raise_last_id, []

    async def vanished(stream, floor):
        gone.append(stream)
        return False  # "no such key": the streams went meanwhile (Redis flushed mid-pass)

    streams.raise_last_id = vanished
    await intake.ensure_groups()
    streams.raise_last_id = real
    await intake.ensure_groups()
    later = start(streams, "g2")
    assert gone and entry_key(later) > store.marks[START]


async def test_job_streams_are_trimmed_only_below_what_was_handled():
    intake, streams, store, _ = make(RTMANAGER_STREAM_KEEP="0")
    await intake.ensure_groups()
    await intake.pending_pass()
    store.fail_submit = RuntimeError("simulated bug")
    held = start(streams, "g1")
    await intake.read_round(block_ms=None)  # stays pending
    store.fail_submit = None
    for i in range(5):
        start(streams, f"h{i}")
    await intake.read_round(block_ms=None)
    await intake.maintain()
    kept = [eid for eid, _ in streams.streams[START].entries]
    assert held in kept  # pending: never trimmed
    assert store.marks[START] < tuple(int(x) for x in held.split("-"))


async def test_an_outage_of_redis_pauses_without_losing_the_entry():
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    s = start(streams, "g1")
    streams.down = True
    from controller.streams import StreamsUnavailable
    with pytest.raises(StreamsUnavailable):
        await intake.read_round(block_ms=None)
    streams.down = False
    await run_once(intake)
    assert ops_of(store, "g1") == [("start", s)]


async def test_bad_entries_are_answered_and_acknowledged_and_the_intake_goes_on():
    intake, streams, store, woken = make()
    bad = streams.xadd(START, {"game_id": "../etc", "image_ref": IMG})
    bad2 = streams.xadd(START, {"game_id": b"\xff", "image_ref": IMG})
    good = start(streams, "g1")
    await run_once(intake)
    codes = {r["job_entry_id"]: r["error_code"] for r in store.results_for()}
    assert codes[bad] == codes[bad2] == "invalid_request"
    assert ops_of(store, "g1") == [("start", good)] and woken == ["g1"]
    assert all(not s.pending for s in streams.streams.values())


@st.composite
def lobby_traffic(draw):
    """What Lobby appends before each of the intake's reads: a few entries per read, for 3 games, on
    the start and stop streams; entries of one read's batch may share a millisecond."""
    batches = draw(st.lists(st.lists(st.tuples(st.sampled_from([START, STOP]), st.sampled_from(["a", "b", "c"]),
                                               st.booleans()), max_size=6), min_size=1, max_size=25))
    count = draw(st.sampled_from([2, 3, READ_COUNT]))
    return batches, count


@settings(max_examples=80, deadline=None)
@given(lobby_traffic())
def test_any_interleaving_of_lobby_and_reads_keeps_each_games_order(traffic):
    """Entries land between any two reads (as they do in production); each game's entries take
    effect in the contract's order: entry id, then start stream before stop stream within one
    millisecond."""
    batches, count = traffic

    async def scenario() -> None:
        intake, streams, store, _ = make()
        await intake.ensure_groups()
        real = streams.read_new
        sent: dict[str, list[tuple[tuple[int, int, int], str, str]]] = {}
        pending = list(batches)
        ms = [10_000]
        seq = {START: 0, STOP: 0}

        async def lobby_then_read(names, n, block_ms):
            if pending:
                ms[0] += 5
                seq[START] = seq[STOP] = 0
                for stream, game, same_ms in pending.pop(0):
                    if not same_ms:
                        ms[0] += 1
                        seq[START] = seq[STOP] = 0
                    eid = f"{ms[0]}-{seq[stream]}"
                    seq[stream] += 1
                    if stream == START:
                        streams.xadd(START, {"game_id": game, "image_ref": IMG}, entry_id=eid)
                    else:
                        streams.xadd(STOP, {"game_id": game, "reason": "cancelled"}, entry_id=eid)
                    rank = 0 if stream == START else 2
                    sent.setdefault(game, []).append(((ms[0], rank, seq[stream] - 1), stream, eid))
            return await real(names, n, block_ms)

        streams.read_new = lobby_then_read  # type: ignore[method-assign]
        for _ in range(len(batches) + 3):
            await intake.read_round(block_ms=None)
        while pending:
            await intake.read_round(block_ms=None)
        while await intake.read_round(block_ms=None):
            pass
        for game, entries in sent.items():
            want = [("start" if stream == START else "stop", eid) for _, stream, eid in sorted(entries)]
            assert ops_of(store, game) == want, game

    import controller.intake as intake_module

    saved = intake_module.READ_COUNT
    intake_module.READ_COUNT = count  # small reads: streams that need several per round
    try:
        asyncio.run(scenario())
    finally:
        intake_module.READ_COUNT = saved


# ---------------------------------------------------------------- rounds cut short
CONTROL = "runtime:control_jobs"


def backlog_with_a_late_stop(streams: FakeStreams) -> tuple[str, str]:
    """The recipe: 2.5 reads (READ_COUNT) of starts of other games, a start of target, half a read
    less one more, then a stop of target. The first read of a round takes READ_COUNT starts and the
    stop, far behind its start."""
    for i in range(5 * READ_COUNT // 2):
        start(streams, f"filler{i}")
    s = start(streams, "target")
    for i in range(READ_COUNT // 2 - 1):
        start(streams, f"late{i}")
    return s, stop(streams, "target")


async def test_a_round_cut_by_an_outage_does_not_apply_the_delivered_stop_before_its_unread_start():
    """A Postgres statement timeout cuts the round after the first reads: the stop was delivered
    (pending), the start not yet. The pending pass must read on before it applies the stop."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    await intake.pending_pass()
    s, p = backlog_with_a_late_stop(streams)
    store.fail_submit = StoreUnavailable("postgres: statement timeout")
    with pytest.raises(StoreUnavailable):
        await intake.read_round(block_ms=None)
    assert p in streams.streams[STOP].pending and s not in streams.streams[START].pending
    store.fail_submit = None
    await run_once(intake)
    assert ops_of(store, "target") == [("start", s), ("stop", p)]
    assert store.records["target"].desired_status.value == "stopped"
    assert all(not st_.pending for st_ in streams.streams.values())


async def test_a_process_killed_after_its_first_read_does_not_apply_the_stop_before_its_start():
    """kill -9 (or a SIGTERM for a deploy) right after the first read of a round: the next process
    finds the stop in its pending list and the start still unread."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    s, p = backlog_with_a_late_stop(streams)
    await streams.read_new([START, CONTROL, STOP], READ_COUNT, None)  # then the process died
    intake, *_ = make()
    intake.redis_streams, intake.store = streams, store
    intake.admission = Admission(store, defaults(), wake=lambda g: None)
    await run_once(intake)
    assert ops_of(store, "target") == [("start", s), ("stop", p)]


async def test_a_new_leader_orders_what_its_predecessor_left_pending_with_what_it_never_read():
    """A failover: the old leader read 100 starts and the stop, and died (or was deposed). The new
    leader claims them and must still not apply the stop before the unread start."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    s, p = backlog_with_a_late_stop(streams)
    streams.deliver_to("old-leader", START)
    streams.deliver_to("old-leader", STOP)
    await run_once(intake)
    assert ops_of(store, "target") == [("start", s), ("stop", p)]


async def test_entries_a_deposed_leader_reads_late_are_taken_over_before_anything_newer_is_applied():
    """A deposed leader that is still alive (SIGSTOP / SIGCONT) read the start after the new leader
    claimed everything at its election. The new leader reads the stop: it must take the start over
    from the other consumer's list first, not 60 s later."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    await intake.pending_pass()  # the election: nothing to claim yet
    s = start(streams, "target")
    streams.deliver_to("old-leader", START)  # the deposed leader's last read
    p = stop(streams, "target")
    await intake.read_round(block_ms=None)
    assert ops_of(store, "target") == [("start", s), ("stop", p)]


async def test_no_read_without_a_valid_leadership_fence():
    """A deposed leader (its term lapsed during a SIGSTOP, or Postgres away) must not read: whatever
    it read would sit in its pending list, out of the new leader's order."""
    from desired.leader import Fence, Fenced

    intake, streams, store, _ = make()
    await intake.ensure_groups()
    start(streams, "g1")
    intake.fence = Fence(instance="i", holder="c1", ttl=10, epoch=3, deadline=0.0)  # lapsed
    streams.calls.clear()
    with pytest.raises(Fenced):
        await intake.read_round(block_ms=None)
    with pytest.raises(Fenced):
        await intake.pending_pass()
    assert not [c for c in streams.calls if c[0] in ("read_new", "read_own_pending", "claim_idle", "claim_others")]
    assert streams.streams[START].pending == {}


class _Killed(BaseException):
    """kill -9, a SIGTERM for a deploy, a failover: the process is gone, its pending list stays."""


@settings(max_examples=120, deadline=None)
@given(entries=st.lists(st.tuples(st.sampled_from([START, STOP]), st.sampled_from(["a", "b", "c"]),
                                  st.booleans()), min_size=1, max_size=30),
       count=st.sampled_from([2, 3, 5]),
       outages=st.sets(st.integers(0, 40), max_size=8),
       kills=st.sets(st.integers(0, 40), max_size=4),
       commit_kills=st.sets(st.integers(0, 40), max_size=3),
       failover=st.booleans())
def test_rounds_cut_at_any_point_keep_each_games_order(entries, count, outages, kills, commit_kills, failover):
    """A backlog read a few entries at a time, with rounds cut at arbitrary points: Postgres away
    for one admission (a statement timeout), the process killed right after a read or right after a
    commit, before its XACK (the next one is the same consumer, or another replica after a
    failover). Each game's entries still take
    effect in entry order, each exactly once, and nothing stays pending."""

    async def scenario() -> None:
        intake, streams, store, _ = make()
        sent: dict[str, list[tuple[str, str]]] = {}
        ms, seq = 10_000, {START: 0, STOP: 0}
        for stream, game, same_ms in entries:
            if not same_ms:
                ms, seq = ms + 1, {START: 0, STOP: 0}
            eid = f"{ms}-{seq[stream]}"
            seq[stream] += 1
            if stream == START:
                streams.xadd(START, {"game_id": game, "image_ref": IMG}, entry_id=eid)
            else:
                streams.xadd(STOP, {"game_id": game, "reason": "cancelled"}, entry_id=eid)
            sent.setdefault(game, []).append(((ms, 0 if stream == START else 2, seq[stream] - 1),
                                              "start" if stream == START else "stop", eid))
        calls = {"read": 0, "admit": 0}
        real_read, real_many, real_one = streams.read_new, store.submit_many, store.submit

        async def read_then_maybe_die(names, n, block_ms):
            got = await real_read(names, n, block_ms)
            calls["read"] += 1
            if calls["read"] - 1 in kills:
                raise _Killed()
            return got

        def failing(real):
            async def admit(*args, **kwargs):
                calls["admit"] += 1
                if calls["admit"] - 1 in outages:
                    raise StoreUnavailable("postgres: canceling statement due to statement timeout")
                out = await real(*args, **kwargs)
                if calls["admit"] - 1 in commit_kills:
                    raise _Killed()
                return out
            return admit

        streams.read_new = read_then_maybe_die  # type: ignore[method-assign]
        store.submit_many, store.submit = failing(real_many), failing(real_one)  # type: ignore[method-assign]
        consumers = iter(f"replica-{i}" for i in range(100))
        for _ in range(200):
            try:
                await run_once(intake)
                if all(not s.pending and not [e for e, _ in s.entries
                                              if entry_key(e) > entry_key(s.last_delivered)]
                       for s in streams.streams.values()):
                    break
            except StoreUnavailable:
                continue
            except _Killed:
                if failover:
                    streams.consumer = next(consumers)
                fresh = Intake(intake.config, streams, store, intake.admission, intake.metrics,
                               allowlist=intake.allowlist)
                intake = fresh
        for game, want in sent.items():
            assert ops_of(store, game) == [(kind, eid) for _, kind, eid in sorted(want)], game
        assert all(not s.pending for s in streams.streams.values())

    import controller.intake as intake_module

    saved = intake_module.READ_COUNT
    intake_module.READ_COUNT = count
    try:
        asyncio.run(scenario())
    finally:
        intake_module.READ_COUNT = saved


async def test_a_blocking_read_ends_before_the_term_could_lapse():
    """A read that blocks past the term's end could deliver entries to a replica no longer leading."""
    import time as _time

    from desired.leader import Fence

    intake, streams, store, _ = make()
    await intake.ensure_groups()
    blocks: list[int | None] = []
    real = streams.read_new

    async def record_block(names, count, block_ms):
        blocks.append(block_ms)
        return await real(names, count, block_ms)

    streams.read_new = record_block  # type: ignore[method-assign]
    intake.fence = Fence(instance="i", holder="c1", ttl=10, epoch=3, deadline=_time.monotonic() + 0.8)
    await intake.read_round(block_ms=1000)
    intake.fence.deadline = _time.monotonic() + 0.3  # inside the margin: no blocking at all
    await intake.read_round(block_ms=1000)
    assert blocks[0] is not None and 0 < blocks[0] <= 300 and blocks[1] is None


async def test_a_reread_stop_stays_held_when_its_start_admitted_just_before_it_fails():
    """Found in review: the pending pass admitted the batch holding the game's start, which failed
    (not an outage) and put the game on hold, then applied the re-read stop all the same."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    await intake.pending_pass()
    s, p = backlog_with_a_late_stop(streams)
    store.fail_submit = StoreUnavailable("postgres: statement timeout")  # the round is cut
    with pytest.raises(StoreUnavailable):
        await intake.read_round(block_ms=None)
    store.fail_submit = None
    real_one, real_many = store.submit, store.submit_many

    def target_start(job) -> bool:
        return getattr(job, "game_id", None) == "target" and job.kind is JobKind.START

    async def one(job, *a, **k):
        if target_start(job):
            raise RuntimeError("a bug in the start of target")
        return await real_one(job, *a, **k)

    async def many(items, *a, **k):
        if any(target_start(i) for i in items):
            raise RuntimeError("a bug in the start of target")
        return await real_many(items, *a, **k)

    store.submit, store.submit_many = one, many
    await intake.pending_pass()
    assert ops_of(store, "target") == []  # the stop waits behind its failed start
    store.submit, store.submit_many = real_one, real_many
    await intake.pending_pass()
    assert ops_of(store, "target") == [("start", s), ("stop", p)]


async def test_the_last_entry_a_deposed_leader_read_late_is_taken_over_at_once():
    """Found in review: when nothing new came, the leader did not look at other consumers' pending
    entries, so the last entry a deposed leader took waited for the idle claim (a minute)."""
    intake, streams, store, _ = make()
    await intake.ensure_groups()
    await intake.pending_pass()
    s = start(streams, "target")
    streams.deliver_to("old-leader", START)
    await intake.read_round(block_ms=None)
    assert ops_of(store, "target") == [("start", s)]


async def test_an_entry_id_past_a_bigint_fails_nothing_but_the_mark():
    """Red-team finding: Redis takes an explicit id of 2**63 ms, and every automatic id after it follows.
    Storing that as the stream's handled mark (a bigint) failed every maintenance pass, and the intake
    backed off up to 10 s each time for every game. The entries are handled; the mark stays where a
    bigint can hold it (lower is safe: an entry above it is deduplicated if ever delivered again)."""
    intake, streams, store, _ = make()
    await run_once(intake)
    await intake.maintain()
    before = store.marks.get(START)
    hostile = streams.xadd(START, {"game_id": "g1", "image_ref": IMG}, entry_id=f"{2**63}-0")
    await run_once(intake)
    await intake.maintain()  # no exception
    assert store.marks.get(START) == before
    assert ops_of(store, "g1") == [("start", hostile)]
    later = stop(streams, "g2")
    await run_once(intake)
    await intake.maintain()
    assert ops_of(store, "g2") == [("stop", later)]
