"""The store's signals, raised once a transaction has committed: ``outbox`` when it wrote results or
snapshots, for those who wait on them (the relay, REST callers waiting for their job's answer), and
``schedule`` when it changed what decides when a game's next turn is due (a new game, a converged
generation, a generated turn, a pause, a new interval), for the turn clock.

The store raises it in this process after COMMIT (a reader woken before it would not see the
rows). A store that does not lead (an operator's tool: no fence) also NOTIFYs ``OUTBOX_CHANNEL``
with this signal's ``origin`` in the same transaction, and the leader's listener raises the
leader's signal when it arrives (Postgres delivers it at commit, or never); a process does not
hear its own writes twice. The leader's own writes send no NOTIFY: its relay is in-process, and
every commit that sends one queues on one cluster-wide lock. No I/O here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

OUTBOX_CHANNEL = "rtmanager_outbox"


class Signal:
    """Every raise wakes every subscriber, and every waiter that took ``next()`` before it."""

    def __init__(self) -> None:
        self.origin = uuid.uuid4().hex  # the NOTIFY payload of this process's outbox writes
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
        """What this signal stands for was committed."""
        self.raised += 1
        woken, self._next = self._next, asyncio.Event()  # later waiters take the fresh event
        woken.set()
        for wake in self._subscribers:
            wake()

    def heard(self, origin: str) -> None:
        """A NOTIFY on ``OUTBOX_CHANNEL``: raised unless it comes from this process (raised at its commit)."""
        if origin != self.origin:
            self.fire()
