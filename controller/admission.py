"""Admission: the one path by which a job becomes desired state.

Every source of jobs (the stream intake of the start, stop and control streams,
the REST API, and the turn clock) calls ``submit`` or ``reject``. Desired state has a few other
writers, none of them a job: ``PUT /schedule`` (the turn clock's interval) and ``rtmanager adopt``
write it through the store directly, and the reconciler's named transitions change it where a
generation cannot converge (desired/transitions.py). ``submit`` commits the desired-state change and the operation
row in one transaction (desired/db/submissions.py), then wakes the reconciler for the
game. The results it writes at once (replays, rejections, superseded jobs) wake
the relay by themselves: the transaction that writes the outbox raises its
signal (desired/wakeup.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from desired.jobs import DecisionAction, Job, RecordDefaults
from desired.model import ErrorCode, JobKind, OpSource
from desired.ports import AdmissionStore
from desired.values import Rejection, SubmitOutcome

log = logging.getLogger("rtmanager.admission")


class Admission:
    def __init__(self, store: AdmissionStore, defaults: RecordDefaults, *, wake: Callable[[str], None],
                 registry: bool = False) -> None:
        self.store = store
        self.defaults = defaults
        self.registry = registry  # RTMANAGER_VERSION_POLICY=registry
        self._wake = wake

    def wake(self, game_id: str) -> None:
        """Wake the reconciler for a game whose desired state a job changed outside ``submit`` (the turn
        clock's statement, desired/db/transitions.py ``ask_due_turns``)."""
        self._wake(game_id)

    async def submit(self, job: Job) -> SubmitOutcome:
        """Desired state and an operation row (InvalidJob when the game_id cannot make a state path)."""
        outcome = await self.store.submit(job, self.defaults, registry=self.registry)
        if outcome.duplicate:
            return outcome
        decision = outcome.decision
        assert decision is not None
        if decision.action is DecisionAction.SKIP:
            return outcome  # nothing was recorded
        if decision.waits:
            self._wake(job.game_id)
        return outcome

    async def submit_many(self, items: list[Job | Rejection]) -> list[SubmitOutcome]:
        """``submit`` / ``reject`` of each item, in order, in one transaction (the intake's batches)."""
        outcomes = await self.store.submit_many(items, self.defaults, registry=self.registry)
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome.decision is not None and outcome.decision.waits:
                self._wake(item.game_id)
        return outcomes

    async def reject(self, *, kind: JobKind, game_id: str, stream: str, entry_id: str, code: ErrorCode,
                     message: str, source: OpSource = OpSource.LOBBY) -> SubmitOutcome:
        """A job that cannot be carried out: a failed operation and its result."""
        return await self.store.reject_entry(kind=kind, game_id=game_id, stream=stream, entry_id=entry_id,
                                             code=code, message=message, source=source)
