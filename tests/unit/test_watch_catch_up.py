"""Red-team 130: a filtered watch reader from position 0 over a long history wrote nothing while nothing
matched, so nothing slowed it: window after window of 20,000 positions, back to back, each a query on the pool
the reconciler and the relay use, and up to 64 such readers at once. Readers catching up read at most
CATCH_UP_READS at a time, and each scanned window tells the reader its position (a keepalive with an id), so
that a reader that does not read is held back as one that is sent events."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from controller import watch_http
from desired.watch import WatchPage
from tests.support.waits import eventually
from tests.unit.test_http_edges import READER, server

WINDOW = 20_000


class Windowed:
    """The store's paging for a filter nothing matches: each read scans one window; it takes a moment."""

    def __init__(self, head: int) -> None:
        self.head, self.reads, self.inflight, self.most = head, 0, 0, 0

    async def unsequenced(self) -> bool:
        return False

    async def sequence(self) -> int:
        return 0

    async def watch_head(self) -> tuple[int, int]:
        return self.head, 0

    async def watch_read(self, after: int, flt: object, limit: int = 200) -> WatchPage:
        self.reads += 1
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        try:
            await asyncio.sleep(0.002)  # the query's time, so that readers overlap
        finally:
            self.inflight -= 1
        return WatchPage(after=after, scanned=min(self.head, after + WINDOW), head=self.head, events=[])


async def test_readers_catching_up_share_a_few_reads_and_hear_how_far_they_got(tmp_path: Path) -> None:
    srv = server(tmp_path)
    store = Windowed(head=10_000_000)
    srv.watch.store = store  # type: ignore[assignment]
    client = TestClient(TestServer(srv.app))
    await client.start_server()
    try:
        readers = [await client.get("/api/v1/events?since=0&game_id=no-such-game",
                                    headers={"Authorization": f"Bearer {READER}"}) for _ in range(8)]
        await eventually(lambda: store.reads >= 80, 30, "the readers scanning")
        assert 1 < store.most <= watch_http.CATCH_UP_READS, store.most
        first = readers[0]
        lines = [await asyncio.wait_for(first.content.readline(), 10) for _ in range(12)]
        ids = [int(line[4:]) for line in lines if line.startswith(b"id: ")]
        assert ids[0] == 0 and ids[1:] == sorted(ids[1:]) and ids[-1] >= 2 * WINDOW, lines  # ready, then progress
        assert b": keepalive\n" in lines, lines
        for r in readers:
            r.close()
    finally:
        await client.close()
