"""The measurements the alert rules (deploy/prometheus/alerts.yml) read, against the real Postgres
and Redis: how late the turns are, and how far behind the intake is on each stream."""

from __future__ import annotations

import time
import uuid

import asyncpg

from controller.config import Settings
from controller.intake import Intake
from controller.metrics import Metrics
from controller.streams import RedisStreams, entry_key
from desired.db.store import Store
from desired.jobs import Job, RecordDefaults
from desired.model import JobKind, OpSource
from desired.transitions import Probe

DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMAGE = "galaxy/engine-stub:1.0"


async def running(store: Store, game: str, interval: int) -> None:
    await store.submit(Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMAGE,
                           turn_interval=interval), DEFAULTS)
    rec = await store.mark_starting(await store.get(game), rollback_image=None)
    await store.mark_running(rec, container_id=f"c-{game}", image=IMAGE,
                             probe=Probe(healthy=True, admin_api=True, turn=0, phase="idle"))


async def last_turn_ago(pool: asyncpg.Pool, game: str, seconds: int) -> None:
    await pool.execute("UPDATE runtime_records SET clock_from = now() - make_interval(secs => $2),"
                       " last_turn_at = now() - make_interval(secs => $2) WHERE game_id = $1", game, seconds)


async def test_turn_lateness_counts_games_whose_turn_is_asked_and_not_generated(pool):
    store = Store(pool)
    assert await store.turn_lateness() == (0.0, 0)  # no game

    await running(store, "on-time", 100)
    await running(store, "late", 10)
    await running(store, "asked", 10)
    await running(store, "paused", 10)
    await last_turn_ago(pool, "on-time", 50)   # due in 50 s
    await last_turn_ago(pool, "late", 35)      # due 25 s ago: 2.5 intervals late
    await last_turn_ago(pool, "asked", 30)     # 2 intervals late, its turn asked (not in due_turns)
    await last_turn_ago(pool, "paused", 3600)  # paused: its clock stands still
    await store.turn_requested(await store.get("asked"))
    await store.submit(Job(kind=JobKind.PAUSE, game_id="paused", source=OpSource.LOBBY), DEFAULTS)
    due, _ = await store.due_turns()
    assert "asked" not in due and "paused" not in due

    worst, late = await store.turn_lateness()
    assert 2.5 <= worst < 2.6
    assert late == 2


async def test_group_info_says_how_far_behind_the_intake_is(database_url, redis_url, redis_client):
    u = uuid.uuid4().hex[:8]
    settings = Settings.from_env({
        "RTMANAGER_DATABASE_URL": database_url, "RTMANAGER_REDIS_URL": redis_url, "RTMANAGER_STATE_ROOT": "/tmp/x",
        "RTMANAGER_START_STREAM": f"a{u}:start", "RTMANAGER_STOP_STREAM": f"a{u}:stop",
        "RTMANAGER_RESULTS_STREAM": f"a{u}:results", "RTMANAGER_CONTROL_STREAM": f"a{u}:control",
        "RTMANAGER_SNAPSHOT_STREAM": f"a{u}:snapshots", "RTMANAGER_CONSUMER_NAME": "alerts"})
    start = settings.streams.start_stream
    streams = RedisStreams(redis_url, group=settings.streams.consumer_group, consumer="alerts")
    try:
        await streams.ensure_group(start)
        info = await streams.group_info(start)
        assert info is not None and info.lag == 0 and info.pending == 0 and info.oldest_unread is None

        old_ms = int(time.time() * 1000) - 60_000  # an entry added a minute ago
        first = (await redis_client.xadd(start, {"game_id": "g1"}, id=f"{old_ms}-0")).decode()
        for n in range(3):
            await redis_client.xadd(start, {"game_id": f"g{n + 2}"})
        info = await streams.group_info(start)
        assert info is not None and info.lag == 4 and info.pending == 0 and info.oldest_unread == first

        got = await streams.read_new([start], count=2, block_ms=None)  # read, not acknowledged
        assert [e.id for e in got][0] == first
        info = await streams.group_info(start)
        assert info is not None and info.lag == 2 and info.pending == 2 and info.oldest_pending == first
        assert info.oldest_unread is not None and entry_key(info.oldest_unread) > entry_key(first)

        metrics = Metrics()
        intake = Intake(settings.streams, streams, Store.__new__(Store), None, metrics,  # type: ignore[arg-type]
                        allowlist=settings.images.image_allowlist)
        intake._measure(start, info)
        assert metrics.stream_lag.labels(start)._value.get() == 2
        assert metrics.stream_pending.labels(start)._value.get() == 2
        assert 59 <= metrics.stream_oldest_seconds.labels(start)._value.get() < 120
    finally:
        await redis_client.delete(start)
        await streams.close()
