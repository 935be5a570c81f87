"""Moved to tests/support/harness.py; this name stays for imports written before the move."""

from tests.support.harness import Harness

__all__ = ["Harness"]
