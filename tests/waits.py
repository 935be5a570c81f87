"""Moved to tests/support/waits.py; this name stays for imports written before the move."""

from tests.support.waits import eventually, eventually_sync, wait_for

__all__ = ["eventually", "eventually_sync", "wait_for"]
