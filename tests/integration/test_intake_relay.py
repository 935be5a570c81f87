"""Intake and relay against real Redis and Postgres (no Docker: the intake never touches it)."""

from __future__ import annotations

import asyncio

import pytest

import controller.streams as streams_module
from controller.admission import Admission
from controller.config import Settings
from controller.intake import Intake
from controller.metrics import Metrics
from controller.relay import Relay
from controller.streams import Entry, RedisStreams, StreamsError, StreamsUnavailable
from desired.db.store import Store
from desired.errors import StoreUnavailable
from desired.values import Rejection
from tests.support import read_results


@pytest.fixture
def settings(database_url, redis_url, unique, tmp_path):
    return Settings.from_env({
        "RTMANAGER_DATABASE_URL": database_url, "RTMANAGER_REDIS_URL": redis_url,
        "RTMANAGER_STATE_ROOT": str(tmp_path), "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*",
        "RTMANAGER_START_STREAM": f"t{unique}:start_jobs", "RTMANAGER_STOP_STREAM": f"t{unique}:stop_jobs",
        "RTMANAGER_CONTROL_STREAM": f"t{unique}:control_jobs", "RTMANAGER_SNAPSHOT_STREAM": f"t{unique}:snapshots",
        "RTMANAGER_RESULTS_STREAM": f"t{unique}:job_results", "RTMANAGER_CONSUMER_NAME": "c1",
    })


@pytest.fixture
async def wired(settings, pool, redis_client, unique):
    store = Store(pool)
    changed: list[str] = []
    streams = RedisStreams(settings.streams.redis_url, group=settings.streams.consumer_group,
                           consumer=settings.streams.consumer_name)
    admission = Admission(store, settings.record_defaults, wake=changed.append)
    intake = Intake(settings.streams, streams, store, admission, Metrics(), allowlist=settings.images.image_allowlist)
    relay = Relay(settings.streams, streams, store, Metrics())
    yield intake, relay, store, changed
    await streams.close()
    keys = [k async for k in redis_client.scan_iter(match=f"t{unique}:*")]
    if keys:
        await redis_client.delete(*keys)


def unpatched_submit(store: Store):
    """The store's own submit, taken before patch_submit replaces its batches: Store.submit is the
    one-item case of submit_many, which patch_submit routes back through the patched submit."""
    real_many = store.submit_many

    async def submit(job, defaults, *, registry=False):
        return (await real_many([job], defaults, registry=registry))[0]

    return submit


def patch_submit(monkeypatch, store: Store, submit) -> None:
    """Replace the store's submit, and route its batches through it entry by entry, as the intake's
    batches call submit_many: a batch that meets a failing entry fails as a whole."""
    monkeypatch.setattr(store, "submit", submit)
    real_reject = store.reject_entry

    async def submit_many(items, defaults, registry=False):
        out = []
        for item in items:
            if isinstance(item, Rejection):
                out.append(await real_reject(kind=item.kind, game_id=item.game_id, stream=item.stream,
                                             entry_id=item.entry_id, code=item.code, message=item.message))
            else:
                out.append(await submit(item, defaults, registry=registry))
        return out

    monkeypatch.setattr(store, "submit_many", submit_many)


def with_settings(intake: Intake, settings: Settings) -> Settings:
    intake.config = settings.streams
    return settings


async def drain(intake: Intake) -> None:
    await intake.ensure_groups()
    await intake.pending_pass()
    await intake.read_round(block_ms=None)


BAD_ENTRIES = [
    ("start", {"image_ref": "galaxy/engine-stub:1.0"}, "field game_id is missing", ""),
    ("start", {"game_id": "", "image_ref": "galaxy/engine-stub:1.0"}, "field game_id is empty", ""),
    ("start", {"game_id": "../../etc", "image_ref": "galaxy/engine-stub:1.0"}, "game_id must match", "../../etc"),
    ("start", {"game_id": "g;rm -rf /", "image_ref": "galaxy/engine-stub:1.0"}, "game_id must match", "g;rm -rf /"),
    ("start", {"game_id": "x" * 5000, "image_ref": "galaxy/engine-stub:1.0"}, "longer than", "x" * 64),
    ("start", {"game_id": b"\xff\xfe", "image_ref": "galaxy/engine-stub:1.0"}, "not valid UTF-8", "\ufffd\ufffd"),
    ("start", {"game_id": "g1"}, "field image_ref is missing", "g1"),
    ("start", {"game_id": "g1", "image_ref": "evil/miner:latest"}, "not allowed", "g1"),
    ("start", {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0 --privileged"}, "not a valid image", "g1"),
    ("stop", {"game_id": "g1", "reason": "because"}, "field reason must be one of", "g1"),
    ("stop", {"game_id": "g1"}, "field reason is missing", "g1"),
]


async def test_bad_entries_get_failure_results_and_are_acknowledged(wired, redis_client, settings):
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    ids = []
    for kind, fields, _, _ in BAD_ENTRIES:
        stream = settings.streams.start_stream if kind == "start" else settings.streams.stop_stream
        ids.append((await redis_client.xadd(stream, fields)).decode())
    good = (await redis_client.xadd(settings.streams.start_stream, {"game_id": "ok-1",
                                                                    "image_ref": "galaxy/engine-stub:1.0",
                                                            "extra": "ignored"})).decode()
    await drain(intake)
    assert await relay.flush() == len(BAD_ENTRIES) + 1  # and the snapshot of the game the good entry starts
    # Entry ids are unique per stream only: key results by (job, entry id).
    results = {(r["job"], r["job_entry_id"]): r for r in await read_results(redis_client,
                                                                            settings.streams.results_stream)}
    for entry_id, (kind, _, message, shown_id) in zip(ids, BAD_ENTRIES, strict=True):
        res = results[(kind, entry_id)]
        expected_code = "image_rejected" if message == "not allowed" else "invalid_request"
        assert (res["outcome"], res["error_code"], res["job"]) == ("failure", expected_code, kind)
        assert message in res["error_message"]
        assert res["game_id"] == shown_id
        assert res["container_id"] == "" and res["engine_endpoint"] == ""
    assert ("start", good) not in results and changed == ["ok-1"]
    for stream in (settings.streams.start_stream, settings.streams.stop_stream):
        pending = await redis_client.xpending(stream, settings.streams.consumer_group)
        assert pending["pending"] == 0


async def test_redelivered_entry_is_one_operation(wired, redis_client, settings, pool):
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    entry = (await redis_client.xadd(settings.streams.start_stream,
                                     {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})).decode()
    # Read without acknowledging, as a controller killed before XACK would.
    await redis_client.xreadgroup(settings.streams.consumer_group, settings.streams.consumer_name,
                                  {settings.streams.start_stream: ">"})
    await intake.handle(Entry(stream=settings.streams.start_stream, id=entry,
                              fields={b"game_id": b"g1", b"image_ref": b"galaxy/engine-stub:1.0"}))
    await drain(intake)  # the pending entry is delivered again, from id 0
    assert await pool.fetchval("SELECT count(*) FROM runtime_operations") == 1
    assert (await redis_client.xpending(settings.streams.start_stream, settings.streams.consumer_group))["pending"] == 0


async def test_start_then_stop_in_one_read_are_applied_in_sent_order(wired, redis_client, settings, pool):
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    # Entry ids order the two streams only to the millisecond: space the adds.
    async def add(stream, fields):
        await asyncio.sleep(0.003)
        return (await redis_client.xadd(stream, fields)).decode()

    stop_first = await add(settings.streams.stop_stream, {"game_id": "g2", "reason": "cancelled"})
    await add(settings.streams.start_stream, {"game_id": "g2", "image_ref": "galaxy/engine-stub:1.0"})
    start = await add(settings.streams.start_stream, {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})
    stop = await add(settings.streams.stop_stream, {"game_id": "g1", "reason": "cancelled"})
    await drain(intake)
    await relay.flush()
    results = {(r["job"], r["job_entry_id"]): r for r in await read_results(redis_client,
                                                                            settings.streams.results_stream)}
    assert results[("stop", stop_first)]["error_code"] == "replay_no_op"  # stop of an unknown game
    assert results[("start", start)]["error_code"] == "superseded"        # the later stop replaced it
    assert ("stop", stop) not in results                                  # waits for convergence
    assert (await store.get("g1")).desired_status.value == "stopped"
    assert (await store.get("g2")).desired_status.value == "running"


async def test_relay_resumes_after_redis_errors(wired, redis_client, settings, pool, monkeypatch):
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    await redis_client.xadd(settings.streams.stop_stream, {"game_id": "g9", "reason": "nope"})
    await drain(intake)
    real_add = relay.redis.add_many
    calls = {"n": 0}

    async def flaky_add(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            from controller.streams import StreamsUnavailable
            raise StreamsUnavailable("redis: simulated outage")
        return await real_add(*args, **kwargs)

    monkeypatch.setattr(relay.redis, "add_many", flaky_add)
    task = asyncio.create_task(relay.run())
    try:
        for _ in range(100):
            if await store.unpublished_count() == 0:
                break
            await asyncio.sleep(0.1)
        assert await store.unpublished_count() == 0
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
    assert calls["n"] == 3
    assert len(await read_results(redis_client, settings.streams.results_stream)) == 1


async def test_entries_of_a_dead_consumer_are_claimed_once(wired, redis_client, settings, pool, unique):
    intake, relay, store, changed = wired
    settings = with_settings(intake, Settings.from_env({**_env(settings, unique), "RTMANAGER_CLAIM_IDLE": "1"}))
    intake.claim_everything_once = False  # a running leader, not a new one
    await intake.ensure_groups()
    entry = (await redis_client.xadd(settings.streams.start_stream,
                                     {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})).decode()
    # Another consumer reads it and dies (or is deposed) without acknowledging. Only the leader
    # reads, so the leader takes it over at once, however briefly idle: it may be older than
    # entries the leader is about to apply.
    await redis_client.xreadgroup(settings.streams.consumer_group, "dead-consumer",
                                  {settings.streams.start_stream: ">"})
    await intake.pending_pass()
    await intake.pending_pass()
    await intake.read_round(block_ms=None)
    ops = await store.operations("g1")
    assert [o.entry_id for o in ops] == [entry]
    assert (await redis_client.xpending(settings.streams.start_stream, settings.streams.consumer_group))["pending"] == 0


async def test_an_entry_that_keeps_failing_is_dead_lettered_not_dropped(wired, redis_client, settings, pool,
                                                                      unique, monkeypatch):
    intake, relay, store, changed = wired
    settings = with_settings(intake, Settings.from_env({**_env(settings, unique), "RTMANAGER_MAX_DELIVERIES": "2"}))
    await intake.ensure_groups()
    intake.claim_everything_once = False

    async def broken_submit(*args, **kwargs):
        raise RuntimeError("simulated bug")

    patch_submit(monkeypatch, store, broken_submit)
    entry = (await redis_client.xadd(settings.streams.start_stream,
                                     {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})).decode()
    other = (await redis_client.xadd(settings.streams.stop_stream, {"game_id": "g2", "reason": "bogus"})).decode()
    await intake.read_round(block_ms=None)  # attempt 1: fails, stays pending; the next entry is still handled
    assert (await redis_client.xpending(settings.streams.start_stream, settings.streams.consumer_group))["pending"] == 1
    await intake.pending_pass()  # attempt 2: fails again
    await intake.pending_pass()  # a third attempt would exceed 2: dead-lettered
    assert (await redis_client.xpending(settings.streams.start_stream, settings.streams.consumer_group))["pending"] == 0
    await relay.flush()
    results = {(r["job"], r["job_entry_id"]): r for r in await read_results(redis_client,
                                                                            settings.streams.results_stream)}
    assert results[("stop", other)]["error_code"] == "invalid_request"
    dead = results[("start", entry)]
    assert (dead["outcome"], dead["error_code"], dead["game_id"]) == ("failure", "internal_error", "g1")
    [(_, copy)] = await redis_client.xrange(settings.streams.dead_letter_stream)
    assert copy[b"rtm_entry_id"].decode() == entry and copy[b"image_ref"] == b"galaxy/engine-stub:1.0"
    await redis_client.delete(settings.streams.dead_letter_stream)


def _env(settings: Settings, unique: str) -> dict[str, str]:
    return {
        "RTMANAGER_DATABASE_URL": settings.database.database_url, "RTMANAGER_REDIS_URL": settings.streams.redis_url,
        "RTMANAGER_STATE_ROOT": settings.storage.state_root, "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*",
        "RTMANAGER_START_STREAM": settings.streams.start_stream, "RTMANAGER_STOP_STREAM": settings.streams.stop_stream,
        "RTMANAGER_CONTROL_STREAM": settings.streams.control_stream,
        "RTMANAGER_SNAPSHOT_STREAM": settings.streams.snapshot_stream,
        "RTMANAGER_RESULTS_STREAM": settings.streams.results_stream,
        "RTMANAGER_CONSUMER_NAME": settings.streams.consumer_name,
        "RTMANAGER_DEAD_LETTER_STREAM": f"t{unique}:dead",
    }


async def test_a_result_already_on_the_stream_is_marked_not_added_again(wired, redis_client, settings, pool):
    """XADD went through but the outbox row was not marked (crash or outage in between)."""
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    await redis_client.xadd(settings.streams.stop_stream, {"game_id": "g1", "reason": "nope"})
    await drain(intake)
    [pending] = await store.unpublished()
    entry_id = (await redis_client.xadd(settings.streams.results_stream, pending.fields)).decode()
    assert relay._suspect  # a fresh relay does not trust the outbox alone
    assert await relay.flush() == 0
    assert await store.unpublished_count() == 0
    assert await pool.fetchval("SELECT stream_entry_id FROM job_results") == entry_id
    assert len(await read_results(redis_client, settings.streams.results_stream)) == 1


async def test_an_outage_never_pushes_a_good_entry_to_the_dead_letters(wired, redis_client, settings, pool, unique,
                                                                     monkeypatch):
    intake, relay, store, changed = wired
    settings = with_settings(intake, Settings.from_env({**_env(settings, unique), "RTMANAGER_MAX_DELIVERIES": "2"}))
    await intake.ensure_groups()
    real_submit, calls = unpatched_submit(store), {"n": 0}

    async def read_only_then_fine(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 5:  # a fail-over: the server answers but takes no writes (what the store raises)
            raise StoreUnavailable("postgres: ReadOnlySQLTransactionError: cannot execute INSERT")
        return await real_submit(*args, **kwargs)

    patch_submit(monkeypatch, store, read_only_then_fine)
    entry = (await redis_client.xadd(settings.streams.start_stream,
                                     {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})).decode()
    with pytest.raises(StoreUnavailable):
        await intake.read_round(block_ms=None)
    for _ in range(4):  # deliveries 2..5, all beyond RTMANAGER_MAX_DELIVERIES, all during the outage
        with pytest.raises(StoreUnavailable):
            await intake.pending_pass()
    await intake.pending_pass()  # the outage is over
    assert [o.entry_id for o in await store.operations("g1")] == [entry]
    assert (await store.get("g1")).desired_status.value == "running"
    assert await redis_client.xlen(settings.streams.dead_letter_stream) == 0


async def test_after_a_failed_entry_later_entries_of_that_game_wait(wired, redis_client, settings, pool, monkeypatch):
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    real_submit, failed = unpatched_submit(store), []

    async def fail_first_start(job, *args, **kwargs):
        if job.kind.value == "start" and len(failed) < 2:  # in its batch, then on its own
            failed.append(job)
            raise RuntimeError("simulated bug")
        return await real_submit(job, *args, **kwargs)

    patch_submit(monkeypatch, store, fail_first_start)
    await redis_client.xadd(settings.streams.start_stream, {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})
    await asyncio.sleep(0.003)
    await redis_client.xadd(settings.streams.stop_stream, {"game_id": "g1", "reason": "cancelled"})
    await redis_client.xadd(settings.streams.stop_stream, {"game_id": "other", "reason": "cancelled"})
    await intake.read_round(block_ms=None)
    assert [o.game_id for o in await store.operations("g1")] == []  # the stop waits behind the failed start
    assert len(await store.operations("other")) == 1                 # other games carry on
    await intake.pending_pass()
    ops = sorted(await store.operations("g1"), key=lambda o: o.id)
    assert [o.op.value for o in ops] == ["start", "stop"]            # Lobby's order
    assert (await store.get("g1")).desired_status.value == "stopped"


async def test_a_start_a_deposed_leader_read_late_is_applied_before_a_later_stop(wired, redis_client, settings, pool):
    """The new leader has claimed everything at its election; then the deposed leader, still alive,
    reads the start (its last read). The new leader reads the stop: it takes the start over from the
    other consumer's list first, on real Redis, and applies the two in order."""
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    await intake.pending_pass()  # the election: nothing to claim yet
    start = (await redis_client.xadd(settings.streams.start_stream,
                                     {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})).decode()
    await redis_client.xreadgroup(settings.streams.consumer_group, "deposed", {settings.streams.start_stream: ">"})
    stop = (await redis_client.xadd(settings.streams.stop_stream, {"game_id": "g1", "reason": "cancelled"})).decode()
    await intake.read_round(block_ms=None)
    ops = sorted(await store.operations("g1"), key=lambda o: o.id)  # in the order admitted
    assert [(o.op.value, o.entry_id) for o in ops] == [("start", start), ("stop", stop)]
    for stream in (settings.streams.start_stream, settings.streams.stop_stream):
        assert (await redis_client.xpending(stream, settings.streams.consumer_group))["pending"] == 0


async def test_the_ids_of_a_range_are_the_entries_ids_without_their_fields(redis_url, redis_client, unique):
    """The relay's check of a stream after a Redis restart reads ids only (a script); the same ids as
    XRANGE, page by page, and XRANGE's when the server refuses scripts."""
    streams = RedisStreams(redis_url, group="g", consumer="c")
    stream = f"{unique}:ids"
    try:
        added = await streams.add_many([(stream, {"result_id": str(i), "game_id": "g"}) for i in range(25)])
        assert await streams.range_ids(stream, "-", "+", 1000) == added
        assert await streams.range_ids(stream, added[10], "+", 5) == added[10:15]
        assert await streams.range_ids(f"{unique}:none", "-") == []
        newest = [(eid, str(i)) for i, eid in enumerate(added)][::-1]
        assert await streams.recent_field(stream, 4, "result_id") == newest[:4]
        assert await streams.recent_field(stream, 2, "nothing") == [(eid, "") for eid, _ in newest[:2]]
        streams._scripts = False  # as after a refused script
        assert await streams.range_ids(stream, added[3], added[6]) == added[3:7]
        assert await streams.recent_field(stream, 4, "result_id") == newest[:4]
    finally:
        await redis_client.delete(stream)
        await streams.close()


async def test_an_entry_deleted_while_pending_is_answered_with_a_failure_and_acknowledged(wired, redis_client,
                                                                                          settings, pool):
    """An entry read and then deleted from its stream (XDEL, or a MAXLEN trim by its producer) before it
    was acknowledged has nothing left to carry out, but its sender waits for an answer: a failure naming
    its entry id, whichever way it comes back. Read again from this consumer's list, Redis gives it
    without fields (redis-py: an empty map, never None); in another consumer's list, a claim would drop
    it (Redis 7), so it is answered unclaimed and acknowledged there. Before: the first was answered as
    a start with no game_id, the other two never (found by reviews, 2026-12-05)."""
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    stream, group = settings.streams.start_stream, settings.streams.consumer_group
    job = {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"}
    mine = (await redis_client.xadd(stream, job)).decode()
    await redis_client.xreadgroup(group, settings.streams.consumer_name, {stream: ">"})  # read, then killed
    dead = (await redis_client.xadd(stream, job)).decode()
    await redis_client.xreadgroup(group, "dead-consumer", {stream: ">"})  # a dead leader's: XAUTOCLAIM
    assert await redis_client.xdel(stream, mine, dead) == 2
    await intake.pending_pass()
    deposed = (await redis_client.xadd(stream, job)).decode()
    await redis_client.xreadgroup(group, "deposed-leader", {stream: ">"})  # taken over at the next read: XCLAIM
    assert await redis_client.xdel(stream, deposed) == 1
    await intake.read_round(block_ms=None)
    assert await relay.flush() == 3
    results = await read_results(redis_client, settings.streams.results_stream)
    assert sorted(r["job_entry_id"] for r in results) == sorted([mine, dead, deposed])
    for r in results:
        assert (r["outcome"], r["error_code"], r["job"], r["game_id"]) == ("failure", "invalid_request", "start", "")
        assert "deleted from its stream" in r["error_message"]
    assert intake.metrics.jobs.labels(stream, "deleted")._value.get() == 3
    assert await pool.fetchval("SELECT count(*) FROM runtime_operations") == 3
    assert (await redis_client.xpending(stream, group))["pending"] == 0
    assert changed == []


async def test_the_adapter_hands_over_an_own_pending_entry_deleted_from_its_stream_without_fields(
        wired, redis_client, settings):
    """The adapter's own word, apart from the intake (whose pending pass also learns it from XAUTOCLAIM):
    Redis answers a re-read of a deleted pending entry with a nil, which redis-py makes an empty map."""
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    stream, group = settings.streams.start_stream, settings.streams.consumer_group
    gone = (await redis_client.xadd(stream, {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})).decode()
    kept = (await redis_client.xadd(stream, {"game_id": "g2", "image_ref": "galaxy/engine-stub:1.0"})).decode()
    await redis_client.xreadgroup(group, settings.streams.consumer_name, {stream: ">"})
    await redis_client.xdel(stream, gone)
    entries = await intake.redis_streams.read_own_pending(stream, 10)
    assert [(e.id, e.fields is None) for e in entries] == [(gone, True), (kept, False)]


async def test_a_deleted_entry_taken_over_is_still_answered_after_an_outage_cut_the_take_over(
        wired, redis_client, settings, monkeypatch):
    """A dead or deposed consumer's entry that was deleted from its stream: the take-over must not drop
    it from the pending list before its answer is committed. Before, XAUTOCLAIM and XCLAIM dropped it
    there themselves (Redis 7), so a database outage (or a crash, or a lost term) between the claim and
    the commit lost the answer for good (the loss window the contract named, 2026-12-05)."""
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    stream, group = settings.streams.start_stream, settings.streams.consumer_group
    job = {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"}
    real_reject, refused = intake.admission.reject, []
    monkeypatch.setattr(streams_module, "DELETED_RETRY", 0.3)

    async def down(**kwargs):
        refused.append(kwargs["entry_id"])
        raise StoreUnavailable("postgres: connection refused")

    async def pending() -> int:
        return (await redis_client.xpending(stream, group))["pending"]

    async def deleted_in(consumer: str) -> str:
        entry = (await redis_client.xadd(stream, job)).decode()
        await redis_client.xreadgroup(group, consumer, {stream: ">"})
        assert await redis_client.xdel(stream, entry) == 1
        return entry

    dead = await deleted_in("dead-consumer")  # the pending pass takes it over (XAUTOCLAIM before)
    deposed = None
    for step, take_over in enumerate((intake.pending_pass, lambda: intake.read_round(block_ms=None))):
        if step:
            deposed = await deleted_in("deposed-leader")  # a read takes it over at once (XCLAIM before)
        monkeypatch.setattr(intake.admission, "reject", down)
        with pytest.raises(StoreUnavailable):
            await take_over()
        assert refused[-1] == (deposed or dead)
        assert await pending() == 1  # not dropped from the pending list
        monkeypatch.setattr(intake.admission, "reject", real_reject)  # the database is back
        if step:  # a read hands a deleted entry over again only DELETED_RETRY later
            await intake.read_round(block_ms=None)
            assert await pending() == 1
        deadline = asyncio.get_running_loop().time() + 10
        while await pending() and asyncio.get_running_loop().time() < deadline:  # the intake's loop
            await asyncio.sleep(0.05)
            await intake.pending_pass()
            await intake.read_round(block_ms=None)
        assert await pending() == 0
    assert await relay.flush() == 2
    results = await read_results(redis_client, settings.streams.results_stream)
    assert [r["job_entry_id"] for r in results] == [dead, deposed]
    assert {(r["outcome"], r["error_code"], r["game_id"]) for r in results} == {("failure", "invalid_request", "")}
    assert await pending() == 0
    assert changed == []


async def test_a_batch_redis_refuses_in_part_is_published_whole_or_not_at_all(wired, redis_client, settings, pool,
                                                                            unique, redis_url):
    """Results and snapshots go out in commit order. A batch Redis refuses in part (here an ACL that lets
    the relay write results but not snapshots; in the field a write refusal that clears while a batch of
    1,000 is being read: MISCONF after a good save, OOM after memory was freed, READONLY after a
    promotion) must not publish its later entries before the earlier ones. Before, the relay's pipeline
    was not a transaction: the results after the refused snapshot went out, and the snapshot after them
    (found by a red-team reading)."""
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    stream = settings.streams.start_stream
    bad1 = (await redis_client.xadd(stream, {"image_ref": "galaxy/engine-stub:1.0"})).decode()
    await redis_client.xadd(stream, {"game_id": "g1", "image_ref": "galaxy/engine-stub:1.0"})  # its snapshot
    bad2 = (await redis_client.xadd(stream, {"image_ref": "galaxy/engine-stub:1.0"})).decode()
    await intake.read_round(block_ms=None)
    user = f"relay{unique}"
    results, snapshots = settings.streams.results_stream, settings.streams.snapshot_stream
    await redis_client.execute_command("ACL", "SETUSER", user, "on", "nopass", "+@all", "resetkeys",
                                       f"~{results}", f"%R~{snapshots}")
    host = redis_url.split("://", 1)[1]
    limited = RedisStreams(f"redis://{user}:x@{host}", group=settings.streams.consumer_group,
                           consumer=settings.streams.consumer_name)
    try:
        relay.redis = limited
        with pytest.raises(StreamsError):
            await relay.flush()
        assert await redis_client.xlen(results) == 0 and await redis_client.xlen(snapshots) == 0
        await redis_client.execute_command("ACL", "SETUSER", user, f"~{snapshots}")  # the operator's fix
        relay.reset()
        assert await relay.flush() == 3
    finally:
        await limited.close()
        await redis_client.execute_command("ACL", "DELUSER", user)
    assert [r["job_entry_id"] for r in await read_results(redis_client, results)] == [bad1, bad2]
    assert await redis_client.xlen(snapshots) == 1
    assert await pool.fetchval("SELECT count(*) FROM job_results WHERE published_at IS NULL") == 0


async def test_a_batch_refused_for_want_of_replicas_is_an_outage_and_writes_nothing(redis_client, redis_url,
                                                                                      unique):
    """A transaction's refused command (here NOREPLICAS, as MISCONF, OOM or READONLY would be) comes back
    from redis-py as that command's error: still an outage to wait out, not a bug."""
    streams = RedisStreams(redis_url, group="g", consumer="c")
    key = f"t{unique}:refused"
    await redis_client.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(StreamsUnavailable):
            await streams.add_many([(key, {"a": "1"}), (key, {"a": "2"})])
    finally:
        await redis_client.config_set("min-replicas-to-write", 0)
        await streams.close()
    assert await redis_client.exists(key) == 0


async def test_results_redis_lost_right_before_a_long_outage_are_published_again(wired, redis_client, settings,
                                                                                 pool):
    """Redis acknowledged a result, lost it (append-only file ``everysec``, a power cut) and came back only
    12 minutes later. The check of the streams covered the 10 minutes before the check, so that result was
    never published again (found by a red-team reading). It covers those 10 minutes plus the time since
    the relay last got through."""
    intake, relay, store, changed = wired
    await intake.ensure_groups()
    await redis_client.xadd(settings.streams.start_stream, {"image_ref": "galaxy/engine-stub:1.0"})
    await intake.read_round(block_ms=None)
    assert await relay.flush() == 1
    [(entry_id, fields)] = await redis_client.xrange(settings.streams.results_stream)
    now = relay.monotonic()
    relay.monotonic = lambda: now + 720  # 12 minutes without Redis
    await pool.execute("UPDATE job_results SET published_at = published_at - interval '720 seconds'")
    assert await redis_client.xdel(settings.streams.results_stream, entry_id) == 1  # what the crash lost
    relay._suspect = relay._verify = True  # what the relay's loop sets after its failures: Redis is back
    assert await relay.flush() == 1
    assert relay.republished == 1
    [(_, again)] = await redis_client.xrange(settings.streams.results_stream)
    assert again[b"result_id"] == fields[b"result_id"]


async def test_a_redis_that_lost_its_streams_and_whose_clock_is_behind_the_mark_loses_no_job(wired, redis_client,
                                                                                         settings, pool):
    """Red-team finding: Redis restarted empty (no persistence, a lost disk) on a clock behind the handled
    mark (a clock stepped back, another host's). Each stream's group was created again from the mark, and
    every entry Lobby added got an automatic id at or below it: never delivered, never answered, until the
    clock passed the mark. The stream's last id is now raised to the mark first, so Redis gives ids above it."""
    intake, relay, store, changed = wired
    start_stream = settings.streams.start_stream
    await intake.ensure_groups()
    ahead = int((await redis_client.time())[0]) * 1000 + 3_600_000  # the mark an hour ahead of this clock
    for stream in intake.stream_names:
        await store.advance_mark(stream, (ahead, 5))
    # An entry handled after the mark was stored: its id is in the operation log, above the mark.
    handled = f"{ahead}-9"
    await redis_client.xadd(start_stream, {"game_id": "before-loss", "image_ref": "galaxy/engine-stub:1.0"},
                            id=handled)
    await intake.read_round(block_ms=None)
    assert changed == ["before-loss"]
    await redis_client.delete(*intake.stream_names)  # Redis came back empty
    await intake.ensure_groups()
    entry = (await redis_client.xadd(start_stream, {"game_id": "after-loss",
                                                    "image_ref": "galaxy/engine-stub:1.0"})).decode()
    assert tuple(int(x) for x in entry.split("-")) > (ahead, 9)
    await intake.pending_pass()
    await intake.read_round(block_ms=None)
    assert changed == ["before-loss", "after-loss"]
    assert await pool.fetchval("SELECT count(*) FROM runtime_operations WHERE entry_id = $1", entry) == 1
    # A stream whose newest entry is past the mark already is left as it is.
    newer = f"{ahead + 10}-0"
    await redis_client.xadd(settings.streams.stop_stream, {"game_id": "x", "reason": "finished"}, id=newer)
    await intake.ensure_groups()
    info = await redis_client.xinfo_stream(settings.streams.stop_stream)
    assert info["last-generated-id"].decode() == newer
