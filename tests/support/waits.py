"""Waiting on a condition, the tests' one way to wait (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


class _Wait:
    """One wait's deadline and last answer; ``check`` may raise one of ``retry_on`` for "not yet"."""

    def __init__(self, timeout: float, what: str, retry_on: tuple[type[BaseException], ...],
                 detail: Callable[[], str] | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline = clock() + timeout
        self.timeout, self.what, self.retry_on, self.detail = timeout, what, retry_on, detail
        self.last: object = None

    def over(self) -> bool:
        if self.clock() < self.deadline:
            return False
        extra = f"\n{self.detail()}" if self.detail else ""
        raise AssertionError(f"{self.what} not reached within {self.timeout:g}s (last: {self.last!r}){extra}")


async def eventually(check, timeout: float = 30.0, what: str = "condition", interval: float = 0.1, *,
                     retry_on: tuple[type[BaseException], ...] = (AssertionError,),
                     detail: Callable[[], str] | None = None):
    """Call ``check`` (plain or async) until it gives something truthy, and return that. An
    exception of ``retry_on`` (by default AssertionError) from ``check`` counts as "not yet"; the
    last answer, and ``detail()`` when given, are in the failure. The timeout is on the event loop's
    clock: the same as time.monotonic(), or virtual time in a test run with looptime."""
    wait = _Wait(timeout, what, retry_on, detail, asyncio.get_running_loop().time)
    while True:
        try:
            wait.last = check()
            if inspect.isawaitable(wait.last):
                wait.last = await wait.last
            if wait.last:
                return wait.last
        except retry_on as exc:
            wait.last = exc
        wait.over()
        await asyncio.sleep(interval)


def eventually_sync(check, timeout: float = 30.0, what: str = "condition", interval: float = 0.05, *,
                    retry_on: tuple[type[BaseException], ...] = (AssertionError,),
                    detail: Callable[[], str] | None = None):
    """``eventually`` for code outside an event loop."""
    wait = _Wait(timeout, what, retry_on, detail)
    while True:
        try:
            wait.last = check()
            if wait.last:
                return wait.last
        except retry_on as exc:
            wait.last = exc
        wait.over()
        time.sleep(interval)


def wait_for(what: str, check, timeout: float, interval: float = 0.5, detail: Callable[[], str] | None = None):
    """``eventually_sync`` for slow outside systems (a compose stack, a swarm): any exception from
    ``check`` counts as "not yet" and is kept for the failure message."""
    return eventually_sync(check, timeout, what, interval, retry_on=(Exception,), detail=detail)
