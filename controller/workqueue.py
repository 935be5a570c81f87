"""A keyed work queue in the manner of client-go's workqueue, for asyncio.

* a key added while it waits is merged (``dirty``): it is worked on once;
* a key is never handed to two workers at once (``processing``); added while
  being processed, it is handed out again after ``done``;
* ``add_rate_limited`` re-adds a key after a per-key exponential backoff
  (``base * 2**failures``, capped); ``forget`` resets it after a success;
* ``add_after`` re-adds a key later (health checks, grace periods); one timer per
  key, the earliest wins, and a replaced timer is cancelled.

Timers come from ``timers`` (the running loop by default; tests inject a manual clock).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol


class ShutDown(Exception):
    """The queue was shut down; the worker should return."""


class Timers(Protocol):
    def time(self) -> float: ...
    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle: ...


class WorkQueue:
    def __init__(self, *, base_delay: float = 0.1, max_delay: float = 60.0,
                 on_change: Callable[[WorkQueue], None] | None = None,
                 on_timing: Callable[[str, float], None] | None = None,
                 timers: Timers | None = None) -> None:
        self._timer_source = timers
        self._queue: collections.deque[Hashable] = collections.deque()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._shutting_down = False
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.adds = 0
        self.retries = 0
        self._on_change = on_change
        self._on_timing = on_timing  # ("queued" | "work", seconds)
        self._added_at: dict[Hashable, float] = {}
        self._started_at: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def processing(self) -> int:
        return len(self._processing)

    def add(self, key: Hashable) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self.adds += 1
        self._dirty.add(key)
        self._added_at.setdefault(key, time.monotonic())
        if key not in self._processing:
            self._queue.append(key)
            self._notify()
        self._changed()

    def add_after(self, key: Hashable, delay: float) -> None:
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        timers = self._timer_source or asyncio.get_running_loop()
        old = self._timers.get(key)
        when = timers.time() + delay
        if old is not None:
            if old.when() <= when:
                return  # an earlier wake-up is already planned
            old.cancel()
        self._timers[key] = timers.call_at(when, self._fire, key)

    def due_within(self, key: Hashable, seconds: float) -> bool:
        """Whether ``key`` will be handed to a worker within ``seconds`` without another ``add``: it waits in
        the queue (or to go back in after the work under way), or a delayed add fires by then."""
        if key in self._dirty:
            return True
        timer = self._timers.get(key)
        if timer is None:
            return False
        timers = self._timer_source or asyncio.get_running_loop()
        return timer.when() <= timers.time() + seconds

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def backoff(self, key: Hashable) -> float:
        n = self._failures.get(key, 0)
        return float(min(self.base_delay * (2 ** n), self.max_delay))

    def add_rate_limited(self, key: Hashable) -> float:
        delay = self.backoff(key)
        self._failures[key] = self._failures.get(key, 0) + 1
        self.retries += 1
        self.add_after(key, delay)
        return delay

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    async def get(self) -> Hashable:
        while not self._queue:
            if self._shutting_down:
                raise ShutDown()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and self._queue:
                    self._notify()  # pass the wake-up on instead of losing it
                raise
        key = self._queue.popleft()
        self._processing.add(key)
        self._dirty.discard(key)
        now = time.monotonic()
        self._started_at[key] = now
        if self._on_timing is not None:
            self._on_timing("queued", now - self._added_at.pop(key, now))
        self._changed()
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        started = self._started_at.pop(key, None)
        if started is not None and self._on_timing is not None:
            self._on_timing("work", time.monotonic() - started)
        if key in self._dirty:
            self._queue.append(key)
            self._notify()
        self._changed()

    def shut_down(self) -> None:
        self._shutting_down = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._notify(all_waiters=True)

    def reset(self) -> None:
        """Empty and open again (a new leadership term starts from a fresh resync)."""
        self.shut_down()
        self._queue.clear()
        self._dirty.clear()
        self._processing.clear()
        self._failures.clear()
        self._added_at.clear()
        self._started_at.clear()
        self._waiters.clear()
        self._shutting_down = False
        self._changed()

    def _notify(self, all_waiters: bool = False) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_waiters:
                    return

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
