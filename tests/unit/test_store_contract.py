"""The store contract (tests/contract/store.py) on the in-memory fake of the unit tier."""

from __future__ import annotations

import pytest

from tests.contract.store import *  # noqa: F403 - the contract's tests, collected here
from tests.fakes import FakeStore


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()
