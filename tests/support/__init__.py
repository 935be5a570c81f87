"""What the tests share, a module each; no test module imports another.

* ``waits``: waiting on a condition (``eventually``, ``eventually_sync``, ``wait_for``);
* ``services``: ``rtmanager`` as a process and its CLI, services of a test's own (Redis, Postgres,
  a private dockerd);
* ``local``: the shared services' addresses, admin SQL, a test's Docker objects removed;
* ``results``: the results stream as Lobby reads it; ``net``: ``free_port``; ``tiers``: the tiers
  run as steps of their own; ``http``: an ``rtmanager run`` process's /metrics;
* ``harness``: in-process controllers (``Harness``) and ``settled``; ``api``: their REST API
  (``Api``) and the stub images;
* the unit tier's: ``world`` (a ``Reconciler`` over the fakes, ``FakeLease``), ``planning``,
  ``job_records``, ``transition_records`` (record and container factories).

The in-memory fakes of the adapters stay in tests/fakes.py. The names below can be imported from
``tests.support`` itself."""

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
