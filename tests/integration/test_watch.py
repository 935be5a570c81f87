"""The watch API (GET /api/v1/events) against a real Postgres and the real aiohttp server: positions
in commit order (a snapshot that commits after a newer-numbered one is not skipped), resume with the
last id on another replica after a leader change, filters, the reset after retention, the cap on
readers, and a reader that never reads being cut off with a bounded buffer."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest

from controller.config_table import HttpSettings
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from desired.db.store import Store
from desired.jobs import ImageAllowlist, Job, RecordDefaults
from desired.model import JobKind, OpSource
from tests.support import eventually
from tests.support.net import free_port

TOKEN = "watch-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
IMG = "galaxy/engine-stub:1.0"


def start(game: str) -> Job:
    return Job(kind=JobKind.START, game_id=game, source=OpSource.LOBBY, image_ref=IMG)


async def _ready() -> dict[str, str]:
    return {}


@dataclass
class Replica:
    """One controller's HTTP surface over its own pool and store, as a replica serves it."""

    pool: asyncpg.Pool
    store: Store
    server: HttpServer
    base: str

    @classmethod
    async def up(cls, database_url: str) -> Replica:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
        store = Store(pool)
        port = free_port()
        server = HttpServer(HttpDeps(
            http=HttpSettings(http_port=port, http_host="127.0.0.1", api_token=TOKEN, api_tokens_file=""),
            allowlist=ImageAllowlist("galaxy/*"), store=store, admission=None,  # type: ignore[arg-type]
            metrics=Metrics(), is_leader=lambda: True, readiness=_ready, results_changed=store.outbox.next,
            watch=store))
        await server.start()
        return cls(pool, store, server, f"http://127.0.0.1:{port}")

    async def down(self) -> None:
        if not self.pool.is_closing():
            await self.server.stop()
            await self.pool.close()


@pytest.fixture
async def replicas(database_url):
    made: list[Replica] = []

    async def make() -> Replica:
        made.append(await Replica.up(database_url))
        return made[-1]

    yield make
    for r in made:
        await r.down()


@dataclass
class Event:
    id: int | None
    event: str
    data: dict = field(default_factory=dict)


async def read_events(resp: aiohttp.ClientResponse, until=None) -> list[Event]:
    """The SSE events of a response, until it ends or ``until(events)`` says enough."""
    events: list[Event] = []
    block: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(": ")
                block[name] = value
            continue
        if "event" in block:
            events.append(Event(int(block["id"]) if "id" in block else None, block["event"],
                                json.loads(block.get("data", "{}"))))
        block = {}
        if until is not None and until(events):
            break
    return events


async def fetch(base: str, query: str = "", headers: dict[str, str] | None = None) -> list[Event]:
    """One ``follow=0`` read: everything after the position, then the end."""
    async with aiohttp.ClientSession() as s, s.get(f"{base}/api/v1/events?follow=0{query}",
                                                    headers={**AUTH, **(headers or {})}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await read_events(resp)


def snapshots(events: list[Event]) -> list[Event]:
    return [e for e in events if e.event == "snapshot"]


async def all_snapshot_ids(pool: asyncpg.Pool) -> list[str]:
    return [r[0] for r in await pool.fetch("SELECT fields->>'snapshot_id' FROM job_results WHERE kind = 'snapshot'")]


async def insert_snapshot(conn: asyncpg.Connection, game: str, status: str = "running", pad: int = 0) -> str:
    """A snapshot row as the store writes it (the watch reads only these columns)."""
    sid = str(uuid.uuid4())
    body = {"snapshot_id": sid, "game_id": game, "status": status, "revision": "1", "reason": "test",
            "pad": "x" * pad}
    await conn.execute("INSERT INTO job_results (result_id, game_id, fields, kind) VALUES ($1, $2, $3::jsonb,"
                       " 'snapshot')", uuid.UUID(sid), game, json.dumps(body))
    return sid


async def test_without_the_token_the_stream_is_refused(replicas):
    a = await replicas()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a.base}/api/v1/events") as resp:
            assert resp.status == 401
        async with s.get(f"{a.base}/api/v1/events", headers={"Authorization": "Bearer wrong-token-0123456"}) as resp:
            assert resp.status == 401
        for bad in ("since=-1", "since=x", f"since={2**63}", "status=nope", "game_id=a%20b", "follow=2"):
            async with s.get(f"{a.base}/api/v1/events?{bad}", headers=AUTH) as resp:
                assert resp.status == 400, bad


async def test_resume_with_the_last_id_misses_nothing_across_a_leader_change(replicas):
    """A snapshot whose transaction took its seq first but commits last is still delivered, after
    the ones that committed before it, to a reader that resumes on the other replica."""
    a = await replicas()
    for n in range(5):
        await a.store.submit(start(f"g{n}"), DEFAULTS)
    first = await fetch(a.base, "&since=0")
    assert first[0].event == "ready" and first[0].id == 0
    got = snapshots(first)
    assert len(got) == 5 and [e.data["game_id"] for e in got] == [f"g{n}" for n in range(5)]

    # A transaction that inserts its snapshot (the smaller seq) and commits after a newer one.
    slow = await a.pool.acquire()
    tx = slow.transaction()
    await tx.start()
    late = await insert_snapshot(slow, "late")
    await a.store.snapshot_resync("g1")  # a larger seq, committed first
    middle = await fetch(a.base, "", {"Last-Event-ID": str(got[-1].id)})
    assert [e.data["game_id"] for e in snapshots(middle)] == ["g1"]
    last_id = snapshots(middle)[-1].id
    await tx.commit()
    await a.pool.release(slow)

    # The leader changes: replica A goes away; B (its own pool and store) writes and serves.
    await a.down()
    replicas_a_gone = a
    b = await replicas()
    await b.store.snapshot_resync()  # every game once more
    resumed = await fetch(b.base, "", {"Last-Event-ID": str(last_id)})
    assert resumed[0].event == "ready" and resumed[0].id == last_id
    after = snapshots(resumed)
    assert after[0].data["snapshot_id"] == late, "the snapshot committed last is not skipped"
    assert {e.data["game_id"] for e in after[1:]} == {f"g{n}" for n in range(5)}

    # Over the three reads: every snapshot once, in increasing positions, each game's revisions in order.
    seen = got + snapshots(middle) + after
    ids = [e.data["snapshot_id"] for e in seen]
    assert sorted(ids) == sorted(await all_snapshot_ids(b.pool)) and len(set(ids)) == len(ids)
    positions = [e.id for e in seen]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    for game in {e.data["game_id"] for e in seen if e.data["game_id"] != "late"}:
        revs = [int(e.data["revision"]) for e in seen if e.data["game_id"] == game]
        assert revs == sorted(revs) and len(set(revs)) == len(revs), (game, revs)
    assert replicas_a_gone.base != b.base


async def test_a_live_reader_hears_a_commit_and_a_standby_polls(replicas):
    a = await replicas()
    standby = await replicas()
    await a.store.submit(start("g1"), DEFAULTS)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a.base}/api/v1/events", headers=AUTH) as live, \
                s.get(f"{standby.base}/api/v1/events", headers=AUTH) as polled:
            ready = await read_events(live, until=lambda ev: len(ev) >= 1)
            assert ready[0].event == "ready" and ready[0].id > 0  # starts at the newest position
            await read_events(polled, until=lambda ev: len(ev) >= 1)
            await a.store.snapshot_resync("g1")
            here, there = await asyncio.wait_for(asyncio.gather(
                read_events(live, until=lambda ev: len(ev) >= 1),
                read_events(polled, until=lambda ev: len(ev) >= 1)), 5)
            assert here[0].event == there[0].event == "snapshot"
            assert here[0].data["reason"] == "resync" and here[0].id == there[0].id > ready[0].id


async def test_filters_by_game_and_status(replicas):
    a = await replicas()
    async with a.pool.acquire() as conn:
        for game, status in (("g1", "running"), ("g2", "stopped"), ("g1", "engine_unreachable"),
                             ("g3", "running"), ("g2", "running")):
            await insert_snapshot(conn, game, status)
    by_game = snapshots(await fetch(a.base, "&since=0&game_id=g1"))
    assert [e.data["status"] for e in by_game] == ["running", "engine_unreachable"]
    by_status = snapshots(await fetch(a.base, "&since=0&status=running"))
    assert [e.data["game_id"] for e in by_status] == ["g1", "g3", "g2"]
    both = snapshots(await fetch(a.base, "&since=0&game_id=g2&game_id=g3&status=running"))
    assert [e.data["game_id"] for e in both] == ["g3", "g2"]
    assert [e.id for e in both] == sorted(e.id for e in both)


async def test_a_position_older_than_retention_gets_a_reset(replicas):
    a = await replicas()
    async with a.pool.acquire() as conn:
        for n in range(4):
            await insert_snapshot(conn, f"g{n}")
        # the first two published long ago: retention takes them
        await conn.execute("UPDATE job_results SET published_at = now() - interval '40 days'"
                           " WHERE seq IN (SELECT seq FROM job_results ORDER BY seq LIMIT 2)")
    await a.store.prune(30)
    events = await fetch(a.base, "&since=0")
    assert [e.event for e in events] == ["ready", "reset", "snapshot", "snapshot"]
    assert events[1].data["reason"] == "expired" and events[1].id == events[1].data["oldest"] == 2
    assert [e.data["game_id"] for e in events[2:]] == ["g2", "g3"]
    assert [e.event for e in await fetch(a.base, "&since=2")] == ["ready", "snapshot", "snapshot"]
    ahead = await fetch(a.base, "&since=999")
    assert [e.event for e in ahead] == ["ready", "reset"] and ahead[1].data["reason"] == "unknown"
    assert ahead[1].id == 4


async def test_readers_are_capped(replicas):
    a = await replicas()
    a.server.watch.max_clients = 1
    async with aiohttp.ClientSession() as s, s.get(f"{a.base}/api/v1/events", headers=AUTH) as first:
        await read_events(first, until=lambda ev: len(ev) >= 1)
        async with s.get(f"{a.base}/api/v1/events", headers=AUTH) as second:
            assert second.status == 503 and "Retry-After" in second.headers


async def test_a_reader_that_never_reads_is_cut_off_and_its_buffer_stays_small(replicas):
    a = await replicas()
    watch = a.server.watch
    watch.write_timeout = 0.5
    port = int(a.base.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(f"GET /api/v1/events?since=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                     .encode())
        await eventually(lambda: watch.clients == 1, 5, "the reader connected")
        total = 0
        async with a.pool.acquire() as conn:  # 8 MB of snapshots the reader never reads
            await conn.execute(
                "INSERT INTO job_results (result_id, game_id, fields, kind) SELECT gen_random_uuid(), 'g' || n,"
                " jsonb_build_object('game_id', 'g' || n, 'status', 'running', 'pad', repeat('x', 4000)), 'snapshot'"
                " FROM generate_series(1, 2000) n")
            total = 2000 * 4000
        a.store.outbox.fire()
        await eventually(lambda: watch.clients == 0, 10, "the reader was cut off")
        cut = a.server.deps.metrics.watch_closed.labels("slow")._value.get()
        assert cut == 1
        assert watch.peak_buffered < 256 * 1024 < total, watch.peak_buffered
    finally:
        sock.close()


async def test_stopping_the_server_ends_every_stream_at_once(replicas):
    a = await replicas()
    a.server.watch.poll = a.server.watch.heartbeat = 60.0  # nothing but the shutdown ends the wait
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s, s.get(f"{a.base}/api/v1/events", headers=AUTH) as live:
        await read_events(live, until=lambda ev: len(ev) >= 1)
        t0 = loop.time()
        await asyncio.wait_for(a.down(), 5)
        assert await asyncio.wait_for(read_events(live), 5) == []  # the stream ended
        assert loop.time() - t0 < 3


async def test_concurrent_writers_and_a_reader_hopping_between_replicas_miss_nothing(replicas):
    a, b = await replicas(), await replicas()
    games = [f"c{n}" for n in range(6)]
    for game in games:
        await a.store.submit(start(game), DEFAULTS)
    done = asyncio.Event()

    async def writer(store: Store, game: str) -> None:
        for _ in range(15):
            await store.snapshot_resync(game)

    async def write_all() -> None:
        await asyncio.gather(*(writer(a.store if n % 2 else b.store, g) for n, g in enumerate(games)))
        done.set()

    seen: list[Event] = []
    last = 0
    hops = 0
    task = asyncio.ensure_future(write_all())
    while True:  # each read on the other replica, resuming with the last id
        finished = done.is_set()
        replica = (a, b)[hops % 2]
        events = await fetch(replica.base, "", {"Last-Event-ID": str(last)})
        assert events[0].event == "ready" and events[0].id == last
        seen += snapshots(events)
        last = seen[-1].id if seen else last
        hops += 1
        if finished:
            break
    await task
    ids = [e.data["snapshot_id"] for e in seen]
    assert len(set(ids)) == len(ids) and sorted(ids) == sorted(await all_snapshot_ids(a.pool))
    for game in games:
        revs = [int(e.data["revision"]) for e in seen if e.data["game_id"] == game]
        assert revs == list(range(1, 17)), (game, revs)
    assert hops > 2
