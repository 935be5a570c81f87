"""The turn protocol with a running engine: ask for the turn desired state wants, poll while it is
generated, record it or fail it (``Turns.turn``); and, right before a planned disruption, ask the
engine whether it is generating one (``Turns.engine_generating``).

Level-triggered like the rest: the engine is looked at first, and turn N+1 is asked for only when it
is idle at N (its compare-and-swap on ``expected_turn`` makes a repeated request harmless).
"""

from __future__ import annotations

import enum
import logging
from datetime import datetime

from controller.config import Settings
from controller.health import Health, warn_turn_back
from controller.metrics import Metrics
from controller.step import AGAIN, Step, again_on, requeue
from desired import transitions
from desired.clock import Clock
from desired.errors import Conflict
from desired.leader import Fence, Fenced
from desired.model import ErrorCode, JobKind, RuntimeRecord, Status, container_name
from desired.ports import ReconcilerStore
from desired.transitions import Probe
from observed.engine import EngineClient
from observed.errors import EngineAnswerLost, EngineConflict, EngineError, EngineRefused, EngineUnsupported
from observed.model import ObservedContainer

log = logging.getLogger("rtmanager.reconciler")

TURN_POLL = 0.5  # seconds between looks at an engine while a turn is generated
REASK_POLL = 5.0  # seconds before asking again an engine that took a request and is idle short of the turn
REFUSAL_GAP = 60.0  # seconds without a refusal that end a span of them (or RTMANAGER_START_TIMEOUT, if longer)
TURNS_KEPT = 100_000  # games whose refusal span this process remembers (pruned past it)


class Look(str, enum.Enum):
    """What the engine said right before a planned disruption."""
    GENERATING = "generating"  # it generates a turn: the disruption waits
    CHANGED = "changed"        # its answer changed the record: plan again
    IDLE = "idle"              # it says it is not generating, and that answer changed the record (written)
    UNKNOWN = "unknown"        # it answers its health path but not its status: it may be generating
    GO = "go"                  # not generating (or no answer at all): disrupt it now


def probe_host(game_id: str, address: str | None) -> str:
    return address or container_name(game_id)


def _asking(record: RuntimeRecord, container: ObservedContainer) -> RuntimeRecord:
    """The record to ask a unit's engine with: with the unit's own admin token when it carries another
    than the record (a restored database), or a refusal would read as "not generating" and cut a turn."""
    if container.admin_token and container.admin_token != record.admin_token:
        return record.replace(admin_token=container.admin_token)
    return record


def asks_at_once(record: RuntimeRecord) -> bool:
    """Whether a turn may be asked for with no status request first: the engine was last seen idle at
    the turn the record knows, with an admin API, nothing was asked of it in this generation yet (so no
    failed generation of ours to read), and the game is not paused (a pause before the engine was asked
    withdraws a scheduled turn: the full path reads the pending jobs). The engine's compare-and-swap on
    ``expected_turn`` refuses the request if the record is stale."""
    return (record.admin_api is True and record.phase == "idle" and record.turn is not None
            and record.generation_started_at is None and not record.paused
            and record.desired_turn is not None and record.turn < record.desired_turn)


class Turns:
    def __init__(self, settings: Settings, store: ReconcilerStore, engine: EngineClient, metrics: Metrics, clock: Clock,
                 health: Health, fence: Fence | None) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.clock = clock
        self.health = health
        self.fence = fence
        # game -> (turn asked for, first refusal, last refusal) of the engine's current span of refusals, idle
        # short of the turn (in this process): ``_not_taken``. One entry a game at most; a span not refused
        # again within REFUSAL_GAP is over, whatever ended it (the engine generated, the turn was reached or
        # answered another way, the engine was busy or restarted).
        self._refused: dict[str, tuple[int, datetime, datetime, str]] = {}
        # game -> (turn asked for, first lost answer) while the answers to its turn requests are lost
        # (``_maybe_taken``): bounded from the first, whatever came between (in this process).
        self._lost: dict[str, tuple[int, datetime]] = {}
        # (game, generation) whose planned disruption's wait was restarted for a later turn (``engine_generating``)
        self._waits_restarted: set[tuple[str, int]] = set()

    def _took(self, record: RuntimeRecord) -> None:
        """The engine is seen generating, or at the turn: whatever it refused before is over. (A 202 alone is
        not proof: an engine that takes every request and never generates answers 202.)"""
        self._refused.pop(record.game_id, None)
        self._lost.pop(record.game_id, None)

    def _prune(self, now: datetime, older_than: float) -> None:
        """Forget spans that are over (no refusal for ``older_than``); if none is, the oldest one (that game
        gets one more span)."""
        old = [g for g, (_, _, last, _) in self._refused.items() if (now - last).total_seconds() > older_than]
        for game in old or [next(iter(self._refused))]:
            del self._refused[game]

    async def _not_taken(self, record: RuntimeRecord, turn: int, what: str, *, decide: bool = True) -> Step | None:
        """The engine is idle short of the turn and did not take the request (200, 409, a failed request), or
        lost one it had taken. Once it has kept so for RTMANAGER_START_TIMEOUT, refusal after refusal with no
        gap over REFUSAL_GAP (a blip of a restarted or busy engine is not this; generating in between ends
        the span), and the game's oldest pending job has waited RTMANAGER_START_TIMEOUT +
        RTMANAGER_GENERATION_TIMEOUT (the database's count), the turn's jobs are answered
        engine_unreachable; the game stays up. The span is kept per turn asked for, so a pause, a resume or
        a reconcile meanwhile (a new generation) does not start it again; a restart of the controller does,
        once. An engine that says it generates is never failed here: a long turn is a turn.

        ``decide``: False after a request the engine may have taken (its answer lost, or a 202): the refusal
        is counted, and the bound is checked before the next request (``_bound_run_out``), never on the
        look that sent one the engine could now be generating."""
        now = self.clock.now()
        target = record.desired_turn if record.desired_turn is not None else turn + 1
        span = self._refused.get(record.game_id)
        e = self.settings.engine
        gap = max(e.start_timeout, REFUSAL_GAP)
        if span is None or span[0] != target or (now - span[2]).total_seconds() > gap:
            if span is None and len(self._refused) >= TURNS_KEPT:
                self._prune(now, gap)
            self._refused[record.game_id] = (target, now, now, what)
            return None
        self._refused[record.game_id] = (target, span[1], now, what)
        return await self._bound_run_out(record, turn) if decide else None

    async def _bound_run_out(self, record: RuntimeRecord, turn: int) -> Step | None:
        """Before a turn request: whether the turn's bounds ran out (``_not_taken``'s span of refusals, or
        ``_maybe_taken``'s lost answers), its oldest job having waited as long; if so the turn is answered
        engine_unreachable and no request is sent."""
        now, e = self.clock.now(), self.settings.engine
        target = record.desired_turn if record.desired_turn is not None else turn + 1
        limit = e.start_timeout + e.generation_timeout
        why = None
        span = self._refused.get(record.game_id)
        if (span is not None and span[0] == target and (now - span[2]).total_seconds() <= max(e.start_timeout,
                                                                                              REFUSAL_GAP)
                and (now - span[1]).total_seconds() >= e.start_timeout):
            why = f"the engine has not taken the request for turn {target} for " \
                  f"{(now - span[1]).total_seconds():.0f}s ({span[3]})"
        lost = self._lost.get(record.game_id)
        if why is None and lost is not None and lost[0] == target and (now - lost[1]).total_seconds() >= limit:
            # Answers lost for longer than a start and a generation, the engine never seen generating nor at
            # the turn: the status timeouts each lost answer excused do not go on for ever.
            why = (f"the answers to the requests for turn {target} have been lost for "
                   f"{(now - lost[1]).total_seconds():.0f}s, and the engine was never seen generating it")
        if why is None:
            return None
        age = await self.store.oldest_pending_age(record.game_id) or 0.0
        if age < limit:  # an earlier job's refusals or lost answers are not this one's
            return None
        self._refused.pop(record.game_id, None)
        return await self.fail_turn(record, ErrorCode.ENGINE_UNREACHABLE, f"{why}; the oldest job waited {age:.0f}s")

    async def turn(self, record: RuntimeRecord, container: ObservedContainer) -> Step:
        """Ask the engine for the turn desired state wants; poll while it generates."""
        host = probe_host(record.game_id, container.address)
        target = record.desired_turn or 0
        polling = requeue(TURN_POLL, "the engine generates the turn, or may")
        if asks_at_once(record):
            asked = await self._ask(record, host, record.turn or 0)
            if asked is not None:
                return asked
            # The engine is not where the record says (it moved, or it is busy): look at it first.
        try:
            st = await self.engine.status(host, token=record.admin_token)
        except EngineError as exc:
            # No status: the health round probes this engine, whatever it answered before.
            self.health.unanswered(record)
            return await self._status_failed(record, exc, polling)
        self.metrics.engine_calls.labels("status", "ok").inc()
        self.health.answered(record)
        last = st.last_generation
        failed_turn = last.turn if last is not None and not last.ok else None
        asked_before = record.generation_started_at is not None
        probe = Probe(healthy=True, admin_api=True, turn=st.turn, phase=st.phase, failed_turn=failed_turn,
                      failed_error=last.error if failed_turn is not None and last is not None else "")
        if st.turn >= target:
            # Reached: the engine just answered, so the generation converges here, with its jobs.
            self._took(record)
            s = self.settings
            new = await self.store.mark_running(record, container_id=container.id,
                                                image=record.current_image_ref or "", probe=probe,
                                                unreachable_after=s.engine.unreachable_after,
                                                generation_timeout=s.engine.generation_timeout)
            self.health.note_generated(record, probe)
            return again_on(new)  # planned on as written: no read of the record to find it converged
        record = await self.health.record_probe(record, probe)
        if st.phase == "generating":
            self._took(record)
            return polling
        if st.phase == "finished":
            return await self.fail_turn(record, ErrorCode.INVALID_REQUEST, f"the game finished at turn {st.turn}")
        if asked_before and failed_turn == st.turn + 1:
            self.metrics.turns.labels("failed").inc()
            error = last.error if last else ""
            return await self.fail_turn(record, ErrorCode.GENERATION_FAILED,
                                        f"the engine failed to generate turn {failed_turn}: {error}")
        if record.paused and not any(op.op is JobKind.FORCE_NEXT_TURN
                                     for op in await self.store.pending_operations(record.game_id)):
            # A pause accepted before the engine was asked: only a forced turn is generated paused
            # or not; a scheduled one is withdrawn (its job answered superseded, the pause success).
            why = ("the game was paused, and the engine lost the turn it was generating" if asked_before
                   else "the game was paused before the engine was asked for the turn")
            log.info("turn %d: %s; the scheduled turn is withdrawn", target, why, extra={"game_id": record.game_id})
            self._lost.pop(record.game_id, None)
            try:
                await self.store.fail_turn(record, ErrorCode.SUPERSEDED, why)
            except Conflict:
                pass  # a newer job took over: plan again
            return AGAIN
        overdue = await self._bound_run_out(record, st.turn)
        if overdue is not None:
            return overdue
        if self.fence is not None and not self.fence.valid_locally:
            raise Fenced("the leadership term lapsed before a turn request")
        try:
            started = await self.engine.request_turn(host, st.turn, token=record.admin_token)
        except EngineConflict:  # busy, or its turn moved: look again
            return await self._not_taken(record, st.turn, f"idle at turn {st.turn}, it answers 409") or polling
        except EngineRefused as exc:
            self.health.unanswered(record)
            self.metrics.engine_calls.labels("turns", "refused").inc()
            return await self.fail_turn(record, ErrorCode.ENGINE_REFUSED, exc.message)
        except EngineAnswerLost as exc:
            if not asked_before:
                return await self._maybe_taken(record, exc)
            # Taken as asked for before, and found idle short of the turn since: it did not take that one,
            # and this one may share its fate. Counted toward the bound of requests not taken (the span does
            # not start again with a generation), or the job would never be answered; still taken as a
            # generation that may be under way, so that an engine that did take it and is too busy to answer
            # its status is not failed for that.
            await self._not_taken(record, st.turn, f"its turn requests lose their answers: {exc.message}",
                                  decide=False)
            await self._maybe_taken(record, exc)
            return requeue(REASK_POLL, "the engine's answers to turn requests are lost; asked again")
        except EngineError as exc:
            self.health.unanswered(record)
            log.warning("turn request: %s", exc.message, extra={"game_id": record.game_id})
            return await self._not_taken(record, st.turn, f"its turn request fails: {exc.message}") or polling
        self.metrics.engine_calls.labels("turns", "ok").inc()
        log.info("asked the engine for turn %d", st.turn + 1, extra={"game_id": record.game_id})
        if not started:  # a 200: it says it is past that turn, while its status says it is at it
            return await self._not_taken(record, st.turn, f"idle at turn {st.turn}, it answers 200") or polling
        await self.store.turn_requested(record)
        if asked_before:
            # It took a request of this generation's before and is idle short of the turn with no failure
            # reported (it lost the request, or drops every one): not every half second.
            await self._not_taken(record, st.turn, "it takes the request and does not generate", decide=False)
            return requeue(REASK_POLL, "the engine lost a turn request it had taken; asked again")
        return polling

    async def _ask(self, record: RuntimeRecord, host: str, at: int) -> Step | None:
        """The short path: the compare-and-swap POST of turn ``at + 1`` with no status request first, as
        the record knows the engine idle at ``at``. None when the engine is not there (a conflict, or it
        is already past it): the full path looks at it and decides."""
        if self.fence is not None and not self.fence.valid_locally:
            raise Fenced("the leadership term lapsed before a turn request")
        try:
            started = await self.engine.request_turn(host, at, token=record.admin_token)
        except EngineConflict:
            return None
        except EngineRefused as exc:
            self.health.unanswered(record)
            self.metrics.engine_calls.labels("turns", "refused").inc()
            return await self.fail_turn(record, ErrorCode.ENGINE_REFUSED, exc.message)
        except EngineAnswerLost as exc:
            return await self._maybe_taken(record, exc)
        except EngineError as exc:
            self.health.unanswered(record)
            log.warning("turn request: %s", exc.message, extra={"game_id": record.game_id})
            return None
        self.metrics.engine_calls.labels("turns", "ok").inc()
        if not started:
            return None
        log.info("asked the engine for turn %d", at + 1, extra={"game_id": record.game_id})
        await self.store.turn_requested(record)
        return requeue(TURN_POLL, "the engine generates the turn")

    async def _maybe_taken(self, record: RuntimeRecord, exc: EngineAnswerLost) -> Step:
        """The request went out and its answer did not come: the engine may be generating the turn. It is
        taken as asked for (a generation under way): status requests it is too busy to answer count only
        after RTMANAGER_GENERATION_TIMEOUT, as for a request it answered 202; if it did not take it, its
        status says so (idle short of the turn) and it is asked again (``expected_turn`` keeps a second
        request from generating twice)."""
        self.health.unanswered(record)
        self.metrics.engine_calls.labels("turns", "error").inc()
        now = self.clock.now()
        target = record.desired_turn if record.desired_turn is not None else (record.turn or 0) + 1
        first = self._lost.get(record.game_id)
        if first is None or first[0] != target:  # the bound from the first is checked before each request
            if first is None and len(self._lost) >= TURNS_KEPT:
                self._lost.pop(next(iter(self._lost)))
            self._lost[record.game_id] = (target, now)
        log.warning("turn request: %s; taken as asked for", exc.message, extra={"game_id": record.game_id})
        await self.store.turn_requested(record)
        return requeue(TURN_POLL, "the engine may generate the turn: its answer to the request was lost")

    async def _status_failed(self, record: RuntimeRecord, exc: EngineError, polling: Step) -> Step:
        """The engine's status did not come: what that means for the turn."""
        if isinstance(exc, EngineUnsupported):
            self.metrics.engine_calls.labels("status", "unsupported").inc()
            return await self.fail_turn(record, ErrorCode.ENGINE_UNSUPPORTED, exc.message)
        if isinstance(exc, EngineRefused):
            self.metrics.engine_calls.labels("status", "refused").inc()
            return await self.fail_turn(record, ErrorCode.ENGINE_REFUSED, exc.message)
        self.metrics.engine_calls.labels("status", "error").inc()
        if transitions.busy_generating(record, self.clock.now(), self.settings.engine.generation_timeout):
            # A slow or timed-out poll of an engine generating the turn is not unreachable:
            # the health round and the generation timeout decide that (transitions.observed).
            return polling
        age = await self.store.oldest_pending_age(record.game_id) or 0
        if record.status is Status.ENGINE_UNREACHABLE or age > self.settings.engine.start_timeout:
            return await self.fail_turn(record, ErrorCode.ENGINE_UNREACHABLE, exc.message)
        return polling

    async def fail_turn(self, record: RuntimeRecord, code: ErrorCode, message: str) -> Step:
        self._lost.pop(record.game_id, None)  # the turn is answered: its lost answers count for no later job
        log.warning("turn failed: %s", message, extra={"game_id": record.game_id, "error_code": code.value})
        try:
            await self.store.fail_turn(record, code, message)
        except Conflict:
            pass  # a newer job took over: it decides
        return AGAIN

    async def unit_generating(self, record: RuntimeRecord, container: ObservedContainer) -> bool:
        """Whether a unit the record does not name says it generates a turn (nothing is written: what it
        says is not the record's engine's). No answer, or a garbage one, is not generating."""
        if not container.running or not container.address:
            return False
        probe = await self.health.probe(_asking(record, container).replace(admin_api=None), container.address)
        return probe.healthy and probe.phase == "generating"

    async def engine_generating(self, record: RuntimeRecord, container: ObservedContainer, *,
                                overdue: bool = False) -> tuple[Look, RuntimeRecord]:
        """Right before a planned disruption: is the engine generating a turn? Its answer is recorded,
        with when the wait began (so that a restart of the controller does not reset the limit), and
        returned with the record as it is now. No answer, a garbage answer or no admin API is not
        generating, unless the record knows it generates: the disruption goes ahead.

        ``overdue``: the wait has run out. A later turn than the one the wait began for (that turn ended
        unseen, or the record was restored from an older backup and its wait is not this turn's) gets a wait
        of its own, once per generation of the record (in this process): an engine whose turn flips, or
        that generates back to back, cannot hold the disruption for ever."""
        if not container.running:
            return Look.GO, record
        if not container.address:  # it cannot be asked (no address on its node): the record's word stands
            if record.status is not Status.GENERATION_IN_PROGRESS:
                return Look.GO, record
            return await self._unanswered(record)
        probe = await self.health.probe(_asking(record, container), container.address)
        s = self.settings
        try:
            if probe.healthy and probe.phase == "generating":
                log.info("the engine is generating turn %s: the disruption waits for it", (probe.turn or 0) + 1,
                         extra={"game_id": record.game_id})
                warn_turn_back(record, probe)
                seen = await self.store.record_observation(record, probe, unreachable_after=s.engine.unreachable_after,
                                                           generation_timeout=s.engine.generation_timeout,
                                                           disruption_waits=True)
                key = (record.game_id, record.generation)
                # The turn the wait began after (a record from before that was kept: its own turn then)
                base = record.disruption_wait_turn if record.disruption_wait_turn is not None else record.turn
                if (overdue and probe.turn is not None and base is not None and probe.turn > base
                        and key not in self._waits_restarted):
                    if len(self._waits_restarted) > 10_000:
                        self._waits_restarted.clear()
                    self._waits_restarted.add(key)
                    log.warning("the engine generates turn %d, a later one than the wait began for (turn %d): "
                                "the disruption waits for it too", probe.turn + 1, base + 1,
                                extra={"game_id": record.game_id})
                    return Look.CHANGED, await self.store.restart_disruption_wait(seen, probe.turn)
                return Look.GENERATING, record
            if probe.healthy:
                seen = await self.health.record_probe(record, probe)
                if seen is not record:
                    return (Look.IDLE if probe.phase is not None else Look.CHANGED), seen
        except Conflict:
            return Look.CHANGED, record  # the record moved on meanwhile: plan again before disrupting anything
        if probe.healthy and probe.phase is None and record.status is not Status.GENERATION_IN_PROGRESS:
            return Look.UNKNOWN, record
        if (probe.healthy and probe.phase is None) or record.status is Status.GENERATION_IN_PROGRESS:
            # It answers its health path but not its status (busy, slow, refusing us, garbage), or nothing at all
            # while the record knows it generates (rtmanager asked for the turn): a generation can keep an engine
            # too busy to answer.
            return await self._unanswered(record)
        return Look.GO, record

    async def _unanswered(self, record: RuntimeRecord) -> tuple[Look, RuntimeRecord]:
        """The engine of a record that says it generates a turn cannot say otherwise now: the wait goes on,
        bounded from the first such look as from the first "generating" (or no limit would ever run out)."""
        if record.disruption_wait_since is None:
            try:
                await self.store.note_disruption_wait(record)
            except Conflict:
                return Look.CHANGED, record
        return Look.UNKNOWN, record
