"""Hypothesis-generated entries through the real intake: it never crashes, and every entry is
acknowledged with exactly one result."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from controller.admission import Admission
from controller.config import Settings
from controller.intake import Intake
from controller.metrics import Metrics
from controller.relay import Relay
from controller.streams import RedisStreams
from desired.db.store import Store

NAMES = st.sampled_from([b"game_id", b"image_ref", b"reason", b"extra", b"GAME_ID", b""])
VALUES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"g1", b"game-2", b"galaxy/engine-stub:1.0", b"cancelled", b"finished", b"../x", b"",
                     b"a" * 2000, "é".encode(), b"\xff", b"g1\n", b"galaxy/engine-stub:1.0\x00"]),
)
ENTRY = st.dictionaries(NAMES, VALUES, min_size=1, max_size=4)
BATCH = st.lists(st.tuples(st.sampled_from(["start", "stop"]), ENTRY), min_size=1, max_size=6)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=BATCH)
def test_any_entry_gets_one_result_and_is_acked(batch, database_url, redis_url, tmp_path):
    asyncio.run(_run(batch, database_url, redis_url, str(tmp_path)))


async def _run(batch, database_url: str, redis_url: str, state_root: str) -> None:
    import asyncpg
    import redis.asyncio as aioredis

    u = uuid.uuid4().hex[:8]
    settings = Settings.from_env({
        "RTMANAGER_DATABASE_URL": database_url, "RTMANAGER_REDIS_URL": redis_url, "RTMANAGER_STATE_ROOT": state_root,
        "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*", "RTMANAGER_START_STREAM": f"f{u}:start",
        "RTMANAGER_STOP_STREAM": f"f{u}:stop", "RTMANAGER_RESULTS_STREAM": f"f{u}:results",
        "RTMANAGER_CONTROL_STREAM": f"f{u}:control", "RTMANAGER_SNAPSHOT_STREAM": f"f{u}:snapshots",
        "RTMANAGER_CONSUMER_NAME": "fuzz"})
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    client = aioredis.Redis.from_url(redis_url)
    streams = RedisStreams(redis_url, group=settings.consumer_group, consumer=settings.consumer_name)
    try:
        store = Store(pool)
        admission = Admission(store, settings.record_defaults, wake=lambda g: None)
        intake = Intake(settings.streams, streams, store, admission, Metrics(),
                        allowlist=settings.images.image_allowlist)
        await intake.ensure_groups()
        added = []
        for kind, fields in batch:
            stream = settings.start_stream if kind == "start" else settings.stop_stream
            added.append((kind, (await client.xadd(stream, fields)).decode()))
        await intake.pending_pass()
        await intake.read_round(block_ms=None)
        await Relay(settings.streams, streams, store, Metrics()).flush()
        for stream in (settings.start_stream, settings.stop_stream):
            assert (await client.xpending(stream, settings.consumer_group))["pending"] == 0
        # Every entry has an operation; those answered at once have exactly one result each.
        for kind, entry in added:
            stream = settings.start_stream if kind == "start" else settings.stop_stream
            op_ids = await pool.fetch("SELECT id, status FROM runtime_operations WHERE stream = $1 AND entry_id = $2",
                                      stream, entry)
            assert len(op_ids) == 1
            n_results = await pool.fetchval("SELECT count(*) FROM job_results WHERE operation_id = $1",
                                            op_ids[0]["id"])
            assert n_results == (0 if op_ids[0]["status"] in ("queued", "running") else 1)
        published = await client.xrange(settings.results_stream)
        keys = [(f[b"job"], f[b"job_entry_id"]) for _, f in published]
        assert len(keys) == len(set(keys))
        assert all(set(f) == {b"game_id", b"outcome", b"container_id", b"engine_endpoint", b"error_code",
                              b"error_message", b"job", b"job_entry_id", b"result_id"} for _, f in published)
    finally:
        keys = [k async for k in client.scan_iter(match=f"f{u}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await streams.close()
        await pool.close()
