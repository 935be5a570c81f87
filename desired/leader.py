"""Leader election with a lease row and fencing epochs.

Several replicas may run with the same RTMANAGER_INSTANCE; exactly one (the
holder of an unexpired lease) reconciles, reads jobs and publishes results.

* ``acquire`` takes the lease only when it has expired, and bumps ``epoch``:
  each term has a larger epoch than every term before it.
* ``renew`` extends the lease only if this replica still holds *this* epoch.
* Every write transaction of the leader first runs ``check`` (``Fence``): the
  lease row must still name this holder and epoch and be unexpired, read
  ``FOR KEY SHARE``. A take-over (``acquire`` locks the row FOR UPDATE)
  therefore waits for the writes in flight and every later write of the old
  term fails with Fenced, while the holder's own renewal never waits for them.
  A leader paused inside a transaction cannot block a take-over for long:
  the pool sets ``idle_in_transaction_session_timeout`` to the lease TTL.
* Besides, the leader keeps a local deadline (last renewal + 0.8 TTL, on the
  monotonic clock) and takes no Docker action once it has passed: a process
  that was paused (SIGSTOP, a VM stall) wakes up knowing it may be deposed.

The fence and its term are pure values here; the lease and the fence's check are SQL, in
desired/db/lease.py. All times are the database's ``now()``; replicas' clocks never matter. A lost
term is not the end of the process: the replica steps down (stops acting at
once), stays up as a standby and campaigns again (controller/leadership.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from desired.errors import RtmError


class Fenced(RtmError):
    """This replica's leadership term is over: it must not write or act any more."""


@dataclass
class Fence:
    instance: str
    holder: str
    ttl: float
    epoch: int = 0
    deadline: float = 0.0  # monotonic; actions are allowed before it

    @property
    def valid_locally(self) -> bool:
        return self.epoch > 0 and time.monotonic() < self.deadline
