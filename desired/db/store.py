"""The store: runtime records, the operation log and the results outbox, in PostgreSQL.

Two writers share ``runtime_records`` and never step on each other's columns:

* admission (jobs from a stream, REST, an operator) writes only the *desired*
  columns and ``generation`` (submissions.py);
* the reconciler writes only the *observed* columns through the named
  transitions (transitions.py), each a compare-and-swap.

Every operation ends in the same transaction that writes its result into
``job_results``; the relay publishes from there (outbox.py). Either the whole
step is committed, or none of it is: a crash at any point loses nothing.

Every timestamp written comes from the database clock (``now()`` of the
transaction), read together with the leadership fence (desired/leader.py) in the
first statement of each write transaction (base.py ``_tx``).

``Store`` is a facade: it only composes the parts, each a class over the same pool. Its consumers
see it through the narrower ports of desired/ports.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from desired.db.drains import Drains
from desired.db.identity import Identities
from desired.db.marks import Marks
from desired.db.outbox import Outbox
from desired.db.records import Records
from desired.db.registry import Registry
from desired.db.rollouts import Rollouts
from desired.db.submissions import Submissions
from desired.db.transitions import Transitions
from desired.db.watch import Watch

if TYPE_CHECKING:
    from desired.ports import (
        AdmissionStore,
        DrainStore,
        HealthStore,
        IntakeStore,
        ReconcilerStore,
        RelayStore,
        ResyncStore,
        RolloutAdminStore,
        RolloutStore,
        StorageStore,
        SurfaceStore,
        TurnClockStore,
        WatchStore,
    )


class Store(Records, Transitions, Submissions, Outbox, Registry, Marks, Identities, Rollouts, Drains, Watch):
    """Every part of the store over one pool (and, for the leader, one fence and clock)."""


if TYPE_CHECKING:  # mypy holds the store to every port of desired/ports.py
    def _ports(store: Store) -> None:
        ports: tuple[ReconcilerStore, RelayStore, AdmissionStore, IntakeStore, SurfaceStore, TurnClockStore,
                     ResyncStore, HealthStore, StorageStore, RolloutStore, RolloutAdminStore, DrainStore,
                     WatchStore] = (
            store, store, store, store, store, store, store, store, store, store, store, store, store)
        del ports
