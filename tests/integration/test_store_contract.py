"""The store contract (tests/contract/store.py) on the real store, over the test Postgres."""

from __future__ import annotations

import pytest

from desired.db.store import Store
from tests.contract.store import *  # noqa: F403 - the contract's tests, collected here


@pytest.fixture
def store(pool) -> Store:
    return Store(pool)
