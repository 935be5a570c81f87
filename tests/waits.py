"""Waiting on a condition, the tests' one way to wait (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import inspect
import time


async def eventually(check, timeout: float = 30.0, what: str = "condition", interval: float = 0.1):
    """Call ``check`` (plain or async) until it gives something truthy, and return that. An
    AssertionError from ``check`` counts as "not yet"; the last answer is in the failure."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s (last: {last!r})")
        await asyncio.sleep(interval)


def eventually_sync(check, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    """``eventually`` for code outside an event loop."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = check()
            if last:
                return last
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s (last: {last!r})")
        time.sleep(interval)
