"""The health round's look at an engine: ``probe`` asks a running engine how it is (its health path,
then its admin status), ``observe`` writes what changed into the record (the periodic round,
controller/triggers.py), ``record_probe`` does the same for a probe taken while reconciling.

Never hold a pooled Postgres connection across a probe: every store call acquires its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controller.config import Settings
from controller.metrics import Metrics
from desired import model, transitions
from desired.clock import Clock
from desired.errors import Conflict, ContainerStartFailed
from desired.model import DesiredStatus, ErrorCode, RuntimeRecord, Status
from desired.ports import ReconcilerStore
from desired.transitions import Probe
from observed.backend import RuntimeBackend
from observed.engine import EngineClient
from observed.errors import EngineError, EngineRefused, EngineUnsupported
from observed.model import ObservedContainer

log = logging.getLogger("rtmanager.reconciler")


DEFERRALS_KEPT = 10_000  # games whose generated turn a health round left to the reconciler, remembered


def turn_reached(record: RuntimeRecord, probe: Probe) -> bool:
    """The engine is idle at (or past) the turn a generation in flight asked it for, and did not fail it:
    a turn the reconciler's poll records with the jobs' answers."""
    return (record.status is Status.GENERATION_IN_PROGRESS and not record.converged
            and record.desired_status is DesiredStatus.RUNNING and record.desired_turn is not None
            and record.desired_turn > (record.turn if record.turn is not None else -1)
            and probe.healthy and probe.phase == "idle" and probe.failed_turn is None
            and probe.turn is not None and probe.turn >= record.desired_turn)


class Health:
    def __init__(self, settings: Settings, store: ReconcilerStore, backend: RuntimeBackend, engine: EngineClient,
                 metrics: Metrics, clock: Clock, *, wake: Callable[[str], None]) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.engine = engine
        self.metrics = metrics
        self.clock = clock
        self._wake = wake  # let the reconciler look at a game (the work queue's add)
        # game -> the record (its row version, generation, last write) whose generated turn a round left to
        # the reconciler: the next round that finds the record unchanged writes it itself.
        self._deferred: dict[str, tuple[object, ...]] = {}
        # game -> when (the clock's monotonic seconds) the engine of which unit last answered the turn path's
        # status request (controller/turns.py)
        self._answered: dict[str, tuple[float, str | None]] = {}

    async def probe(self, record: RuntimeRecord, address: str | None, *, answered: bool = False) -> Probe:
        """Ask a running engine how it is: its health path, then (when it has one) its admin status.
        ``address`` is the backend's (None: the unit does not run); ``answered``: its health path has just
        answered (a start's wait), so only the status is asked."""
        if not address:
            return Probe(healthy=False)
        host = address
        if record.admin_api is not True:  # an engine known to have an admin API answers both at once
            ok = answered
            if not answered:
                ok, _ = await self.engine.check(host)
                self.metrics.probes.labels("healthy" if ok else "unreachable").inc()
            if not ok or record.admin_api is False:
                return Probe(healthy=ok)
        try:
            st = await self.engine.status(host, token=record.admin_token)
        except EngineUnsupported:
            self.metrics.engine_calls.labels("status", "unsupported").inc()
            return Probe(healthy=True, admin_api=False)
        except EngineRefused as exc:
            # It answers, so it is up; but not to us: a distinct error, neither a crash nor "no admin API".
            self.metrics.engine_calls.labels("status", "refused").inc()
            if record.last_error_code is not ErrorCode.ENGINE_REFUSED:
                log.error("engine refused rtmanager: %s", exc.message,
                          extra={"game_id": record.game_id, "error_code": ErrorCode.ENGINE_REFUSED.value})
            return Probe(healthy=True, refused=exc.message)
        except EngineError as exc:
            self.metrics.engine_calls.labels("status", "error").inc()
            log.info("engine status: %s", exc.message, extra={"game_id": record.game_id})
            if record.admin_api is True:  # the status did not answer: does the engine answer at all?
                ok, _ = await self.engine.check(host)
                self.metrics.probes.labels("healthy" if ok else "unreachable").inc()
                return Probe(healthy=ok)
            return Probe(healthy=True)
        if record.admin_api is True:
            self.metrics.probes.labels("healthy").inc()
        self.metrics.engine_calls.labels("status", "ok").inc()
        last = st.last_generation
        if last is None or last.ok:
            return Probe(healthy=True, admin_api=True, turn=st.turn, phase=st.phase)
        return Probe(healthy=True, admin_api=True, turn=st.turn, phase=st.phase,
                     failed_turn=last.turn, failed_error=last.error)

    def answered(self, record: RuntimeRecord) -> None:
        """The engine of the record's unit just answered the turn path's status request (the answer is
        written into the record as a probe's would be): for the health round, as good as a probe of it now.
        Kept only while a round runs to read it (no round: nothing to spare, and nothing kept). At most one
        small entry per engine that answered within an interval (``forget_answers``)."""
        if self.settings.engine.health_interval > 0:
            self._answered[record.game_id] = (self.clock.monotonic(), record.current_container_id)

    def unanswered(self, record: RuntimeRecord) -> None:
        """The turn path's request to the engine failed (no answer, a refusal, garbage): whatever it answered
        before, the next health round probes it."""
        self._answered.pop(record.game_id, None)

    def answered_within(self, record: RuntimeRecord, seconds: float) -> bool:
        """The round may leave this engine unprobed: the engine of the record's unit (not one it replaced)
        answered the turn path's status request within ``seconds``, and the record says it is well (no
        failed probe to clear, which only a probe of the round writes)."""
        at, unit = self._answered.get(record.game_id, (None, None))
        return (at is not None and self.clock.monotonic() - at < seconds and unit == record.current_container_id
                and record.health is model.Health.HEALTHY and record.probe_failures == 0)

    def forget_answers(self, older_than: float) -> None:
        """Let go of the answers older than ``older_than`` seconds (each round: the map holds at most
        the engines that answered within an interval)."""
        now = self.clock.monotonic()
        if any(now - at >= older_than for at, _ in self._answered.values()):
            self._answered = {g: a for g, a in self._answered.items() if now - a[0] < older_than}

    async def observe(self, record: RuntimeRecord, address: str | None) -> bool:
        """One periodic look at a running engine; the record is written only when something changed.
        An engine that does not run at all is a trigger, like an event: the reconciler is woken.
        True when the engine answered and nothing changed (controller/pacing.py: it may be steady)."""
        probe = await self.probe(record, address)
        s = self.settings
        new = transitions.observed(record, self.clock.now(), probe, unreachable_after=s.engine.unreachable_after,
                                   generation_timeout=s.engine.generation_timeout)
        changed = new is not record and new != record
        if changed and self._leave_to_reconciler(record, probe):
            # The turn the reconciler asked for is generated: its poll records it with the jobs' answers in
            # one write (a write here would make that two, and its poll would wait for its time). Wake it.
            self._wake(record.game_id)
            return False
        if changed:
            warn_turn_back(record, probe)
            if new.status is not record.status:
                log.warning("engine: %s -> %s", record.status.value, new.status.value,
                            extra={"game_id": record.game_id})
            try:
                await self.store.record_observation(record, probe, unreachable_after=s.engine.unreachable_after,
                                                    generation_timeout=s.engine.generation_timeout)
            except Conflict:
                pass  # the record moved on meanwhile; the next round looks again
        if not address:
            self._wake(record.game_id)  # not running at all: let the reconciler look
            return False
        return probe.healthy and not changed

    def _leave_to_reconciler(self, record: RuntimeRecord, probe: Probe) -> bool:
        """Whether this round leaves a generated turn to the reconciler: once per state of the record. If
        the next round finds the record as it was (the reconciler did not record the turn: it fails on
        this game, or runs dry), the round writes it, as it writes every other observation."""
        key = (record.row_version, record.generation, record.last_op_at)
        if self.settings.runtime.dry_run or not turn_reached(record, probe) \
                or self._deferred.get(record.game_id) == key:
            self._deferred.pop(record.game_id, None)
            return False
        if len(self._deferred) >= DEFERRALS_KEPT:
            self._deferred.clear()
        self._deferred[record.game_id] = key
        return True

    async def record_probe(self, record: RuntimeRecord, probe: Probe) -> RuntimeRecord:
        """A probe taken while reconciling, written when it changes the record (which is returned)."""
        s = self.settings
        new = transitions.observed(record, self.clock.now(), probe, unreachable_after=s.engine.unreachable_after,
                                   generation_timeout=s.engine.generation_timeout)
        if new is record or new == record:
            return record
        self.note_generated(record, probe)
        warn_turn_back(record, probe)
        return await self.store.record_observation(record, probe, unreachable_after=s.engine.unreachable_after,
                                                   generation_timeout=s.engine.generation_timeout)

    def note_generated(self, record: RuntimeRecord, probe: Probe) -> None:
        """The metrics of a turn the engine has generated since the record said it was generating."""
        if record.status is Status.GENERATION_IN_PROGRESS and probe.phase == "idle" and probe.turn is not None \
                and record.turn is not None and probe.turn > record.turn:
            self.metrics.turns.labels("generated").inc()
            if record.generation_started_at is not None:
                self.metrics.generation_seconds.observe((self.clock.now() - record.generation_started_at)
                                                        .total_seconds())

    async def exit_detail(self, seen: ObservedContainer, what: str, lines: int) -> tuple[str, str]:
        """Why an engine's unit ended, for a result or the operation log: its exit code, and its last lines."""
        tail = await self.backend.logs_tail(seen.id, lines)
        detail = f"engine {what} with code {seen.exit_code}"
        if seen.oom_killed:
            detail += " (OOM-killed)"
        if tail:
            detail += f"; last log lines: {tail[-600:]}"
        return detail, tail

    async def raise_exited(self, seen: ObservedContainer) -> None:
        detail, _ = await self.exit_detail(seen, "exited", 5)
        raise ContainerStartFailed(detail)


def warn_turn_back(record: RuntimeRecord, probe: Probe) -> None:
    """An engine reports a lower turn than the record's: say so (desired/transitions.py
    ``turn_gone_back``: the lost turns are not generated again)."""
    if probe.turn is not None and record.turn is not None and probe.turn < record.turn:
        log.warning("the engine reports turn %d, the record turn %d: it lost turns (a crash that lost saves, or "
                    "its state restored from an older copy); they are not generated again", probe.turn, record.turn,
                    extra={"game_id": record.game_id})
