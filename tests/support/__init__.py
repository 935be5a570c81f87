"""What the tests share: waits on conditions (``waits``), services and processes of a test's own
(``services``), the results stream (``results``), in-process controllers (``harness``), free ports
(``net``) and the separate tiers (``tiers``). In-memory fakes of the adapters stay in tests/fakes.py.

Import from here (``from tests.support import eventually, free_port``) or from the module."""

from tests.support.harness import Harness, settled
from tests.support.net import free_port
from tests.support.results import ResultReader, read_results, xrange_json_results
from tests.support.services import (
    ROOT,
    ControllerProcess,
    PostgresCluster,
    PrivateDockerd,
    RedisServer,
    cli,
    migrate,
    running,
)
from tests.support.tiers import separate_tier
from tests.support.waits import eventually, eventually_sync, wait_for

__all__ = [
    "ROOT", "ControllerProcess", "Harness", "PostgresCluster", "PrivateDockerd", "RedisServer", "ResultReader",
    "cli", "eventually", "eventually_sync", "free_port", "migrate", "read_results", "running", "separate_tier",
    "settled", "wait_for", "xrange_json_results",
]
