"""The outbox's signal: raised once a transaction that wrote results or snapshots has committed,
for those who wait on them (the relay, the turn clock, REST callers waiting for their job's answer).

The store raises it in this process after COMMIT (a reader woken before it would not see the
rows) and, in the same transaction, NOTIFYs ``OUTBOX_CHANNEL`` with this signal's ``origin``: the
listener of another replica raises that replica's signal when the NOTIFY arrives (Postgres
delivers it at commit, or never), and a process does not hear its own writes twice. No I/O here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

OUTBOX_CHANNEL = "rtmanager_outbox"


class Signal:
    """Every raise wakes every subscriber, and every waiter that took ``next()`` before it."""

    def __init__(self) -> None:
        self.origin = uuid.uuid4().hex  # the NOTIFY payload of this process's writes
        self.raised = 0
        self._next = asyncio.Event()
        self._subscribers: list[Callable[[], None]] = []

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` at every raise (a loop sets its own wake-up event)."""
        self._subscribers.append(wake)

    def next(self) -> asyncio.Event:
        """An event the next raise sets: take it before looking for what you wait for, then wait on it."""
        return self._next

    def fire(self) -> None:
        """The outbox has new rows, committed."""
        self.raised += 1
        woken, self._next = self._next, asyncio.Event()  # later waiters take the fresh event
        woken.set()
        for wake in self._subscribers:
            wake()

    def heard(self, origin: str) -> None:
        """A NOTIFY on ``OUTBOX_CHANNEL``: raised unless it comes from this process (raised at its commit)."""
        if origin != self.origin:
            self.fire()
