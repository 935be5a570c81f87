"""``GET /api/v1/runtimes`` a page at a time against a real Postgres, while games are created.

The page is a keyset on game_id: a walk sees every game that existed when it began exactly once,
whatever is inserted meanwhile (before the cursor: not seen; after it: seen once), and the filters
are applied by the database.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
from aiohttp.test_utils import TestServer

from controller.admission import Admission
from controller.config import HttpSettings
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from desired.db.store import Store
from desired.jobs import ImageAllowlist, Job, RecordDefaults
from desired.model import JobKind, OpSource, Status
from desired.paging import PageRequest, RuntimeFilter, decode_cursor

TOKEN = "p" * 32
DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)


def start(game: str, image: str = "galaxy/engine-stub:1.0") -> Job:
    return Job(kind=JobKind.START, game_id=game, source=OpSource.ADMIN, image_ref=image)


async def _ready() -> dict[str, str]:
    return {}


async def test_a_walk_sees_every_game_once_while_games_are_inserted(pool):
    store = Store(pool)
    initial = [f"g{i:04d}" for i in range(0, 600, 2)]  # gaps where games are inserted during the walk
    await store.submit_many([start(g) for g in initial], DEFAULTS)
    deps = HttpDeps(http=HttpSettings(http_port=0, http_host="127.0.0.1", api_token=TOKEN, api_tokens_file=""),
                    allowlist=ImageAllowlist("galaxy/*"), store=store,
                    admission=Admission(store, DEFAULTS, wake=lambda game: None), metrics=Metrics(),
                    is_leader=lambda: True, readiness=_ready, results_changed=asyncio.Event)
    server = TestServer(HttpServer(deps).app, host="127.0.0.1")
    await server.start_server()
    seen: collections.Counter[str] = collections.Counter()
    behind: list[str] = []  # inserted before the cursor: never seen by this walk
    ahead: list[str] = []   # inserted after it: seen once
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            cursor = None
            pages = 0
            while True:
                query = {"limit": "23", **({"cursor": cursor} if cursor else {})}
                async with http.get(server.make_url("/api/v1/runtimes"), params=query) as resp:
                    assert resp.status == 200, await resp.text()
                    body = await resp.json()
                ids = [r["game_id"] for r in body["runtimes"]]
                assert ids == sorted(ids) and len(ids) <= 23
                seen.update(ids)
                cursor = body["next"]
                if cursor is None:
                    break
                assert decode_cursor(cursor) == ids[-1]
                pages += 1
                # between two pages: a game below the cursor, one just above it, and one at the end
                new = [f"a{pages:04d}", f"{ids[-1]}x", f"z{pages:04d}"]
                await store.submit_many([start(g) for g in new], DEFAULTS)
                behind.append(new[0])
                ahead += new[1:]
    finally:
        await server.close()
    assert max(seen.values()) == 1, [g for g, n in seen.items() if n > 1]
    assert set(initial) <= set(seen)
    assert set(ahead) <= set(seen)
    assert not set(behind) & set(seen)
    assert pages >= len(initial) // 23


async def test_filters_and_bounds_are_the_databases(pool):
    store = Store(pool)
    await store.submit_many([start(f"f{i:03d}", "galaxy/engine-stub:1.0" if i % 2 else "galaxy/engine-stub:1.1")
                             for i in range(40)], DEFAULTS)
    await pool.execute("UPDATE runtime_records SET engine_version = CASE WHEN desired_image_ref LIKE '%1.0'"
                       " THEN '1.0' ELSE '1.1' END, node_id = CASE WHEN game_id < 'f020' THEN 'n1' ELSE 'n2' END")
    await pool.execute("UPDATE runtime_records SET status = 'stopped', stopped_at = now(),"
                       " current_image_ref = desired_image_ref WHERE game_id IN ('f001', 'f021', 'f022')")

    async def walk(f: RuntimeFilter, limit: int) -> list[str]:
        out: list[str] = []
        after = None
        while True:
            records, more = await store.page(PageRequest(filter=f, after=after, limit=limit))
            out += [r.game_id for r in records]
            if not more:
                return out
            after = records[-1].game_id

    assert await walk(RuntimeFilter(), 7) == [f"f{i:03d}" for i in range(40)]
    assert await walk(RuntimeFilter(engine_version="1.0", node="n2"), 3) == [f"f{i:03d}" for i in range(21, 40, 2)]
    assert await walk(RuntimeFilter(status=Status.STOPPED), 1) == ["f001", "f021", "f022"]
    assert await walk(RuntimeFilter(status=Status.STOPPED, node="n1", engine_version="1.0"), 5) == ["f001"]
    records, more = await store.page(PageRequest(filter=RuntimeFilter(), after="f039", limit=5))
    assert (records, more) == ([], False)
