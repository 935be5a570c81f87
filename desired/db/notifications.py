"""The LISTEN side of the desired-state NOTIFY (admission sends it in its transaction)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from desired.wakeup import OUTBOX_CHANNEL, Signal

log = logging.getLogger("rtmanager.store")

NOTIFY_CHANNEL = "rtmanager_desired"


class Notifications:
    """NOTIFY from other processes (REST on another replica, operators' tools) on a connection of its own:
    the games to look at (whose desired state changed there, which also raises ``schedule``: a due
    time may have moved), and (with ``outbox``) the outbox written elsewhere, which raises ``outbox``.

    Best effort: asyncpg does not notice a dead listener by itself, so the connection is pinged,
    and reconnected with backoff; the periodic resync (and the relay's poll) is the fallback for what is missed."""

    def __init__(self, database_url: str, on_notify: Callable[[str], None], outbox: Signal | None = None,
                 schedule: Signal | None = None) -> None:
        self.database_url = database_url
        self.on_notify = on_notify
        self.outbox = outbox
        self.schedule = schedule

    def _desired(self, game_id: str) -> None:
        self.on_notify(game_id)
        if self.schedule is not None:
            self.schedule.fire()

    async def run(self, stopping: asyncio.Event) -> None:
        delay = 0.5
        while not stopping.is_set():
            conn = None
            try:
                conn = await asyncpg.connect(self.database_url, timeout=5)
                await conn.add_listener(NOTIFY_CHANNEL, lambda *args: self._desired(args[3]))
                if self.outbox is not None:
                    await conn.add_listener(OUTBOX_CHANNEL, lambda *args: self.outbox.heard(args[3]))
                delay = 0.5
                while not stopping.is_set() and not conn.is_closed():
                    await conn.execute("SELECT 1", timeout=5)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stopping.wait(), 5)
            except Exception as exc:  # noqa: BLE001 - best effort: the resync is the fallback
                log.warning("listener lost Postgres, retrying in %.1fs: %s", delay, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 10)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close()
