"""File work on the state directories has threads of its own (red-team, stop 44).

Copies, restores, archives and the size walk ran in asyncio's default thread pool (6 threads on a 2-core
host), the pool that also resolves host names for asyncpg's connects (the lease's own connection after a
blip) and aiohttp (engines probed by name). A burst of copies during a rollout or a drain then held the
lease's reconnect until a copy ended: the leader lost its term over a one-second Postgres blip. They run
in a pool of their own now."""

from __future__ import annotations

import asyncio
import threading

from controller import storage


async def test_name_lookups_are_not_held_behind_file_work() -> None:
    release = threading.Event()
    busy = [asyncio.ensure_future(storage.in_thread(release.wait, 30)) for _ in range(40)]
    try:
        await asyncio.sleep(0.2)  # every file thread is taken, more file work waits for one
        found = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo("localhost", 5432), 5)
        assert found
    finally:
        release.set()
        await asyncio.gather(*busy, return_exceptions=True)
