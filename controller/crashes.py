"""Crashes of a running game nobody asked to change: an engine that exited on its own, or stopped
answering for too long (RECOVER), or a start the controller made by itself that failed. Each is
recorded, and the store applies the crash policy (desired/policy.py): a restart after a backoff, or,
past the limit, the game given up.
"""

from __future__ import annotations

import logging

from controller.config import Settings
from controller.health import Health
from controller.metrics import Metrics
from controller.start import Starts
from controller.step import AGAIN, Step, requeue
from desired import transitions
from desired.model import ErrorCode, RuntimeRecord
from desired.policy import CrashPolicy
from desired.ports import ReconcilerStore
from desired.values import Crash
from observed.backend import RuntimeBackend
from observed.model import ObservedContainer

log = logging.getLogger("rtmanager.reconciler")
# An engine's exit after SIGTERM: done, by the signal, or SIGKILLed at the grace's end (no code: a Swarm service
# scaled to 0 whose tasks are forgotten).
STOP_EXITS = (0, 143, 137)
EXIT_SEEN = 60.0  # seconds after a stop's grace within which the engine's exit is still taken for that stop's


class Crashes:
    def __init__(self, settings: Settings, store: ReconcilerStore, backend: RuntimeBackend, metrics: Metrics,
                 health: Health, starts: Starts) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self.health = health
        self.starts = starts
        self.policy = CrashPolicy(limit=settings.engine.crash_limit, window=settings.engine.crash_window,
                                  backoff_max=settings.engine.crash_backoff_max)

    async def recover(self, record: RuntimeRecord, container: ObservedContainer) -> Step:
        """The engine of a running game exited on its own: record why, restart after a backoff.

        An engine stopped by a daemon restart did not crash: it starts again at once and does
        not count toward the crash limit (five daemon restarts must not give every game up)."""
        seen = await self.backend.inspect(container.id) or container
        if seen.node and seen.node in await self.backend.lost_nodes():
            return AGAIN  # not a crash: its node is lost (the next look sees the unit so and says node_lost)
        if seen.running:  # not an exit: an engine that stopped answering for too long
            grace = await self.starts.stop_grace(record, seen)
            left = transitions.stop_left(record, self.health.clock.now(), grace)
            if left > 0:
                # A stop of it may be under way (a call that timed out, then a start): it does not answer because
                # it saves on its way out. Not signalled again, nor counted, until that stop's grace is over.
                return requeue(min(left, 5.0), "a stop of the engine may still be under way")
            # Asked first: the record's word may be stale (an engine busy past the generation timeout that
            # answers again, a record restored from before a short blip). One that answers is not restarted:
            # what it says is written (running, generating, ...), and the next look plans from that.
            probe = await self.health.probe(
                record.replace(admin_token=seen.admin_token) if seen.admin_token else record, seen.address)
            if probe.healthy:
                log.warning("the engine answers again after being unreachable: not restarted",
                            extra={"game_id": record.game_id})
                await self.health.record_probe(record, probe)
                return AGAIN
            # Marked as every stop of an engine is: a stop call that times out (the engine saving) is waited
            # out above, not signalled again at the next look.
            record = await self.starts.mark(record, seen.id, grace)
            await self.starts.signal(record, seen.id, self.backend.stop(seen.id, grace))
            return await self.count(record, Crash(
                code=ErrorCode.ENGINE_UNREACHABLE, container_id=seen.id,
                detail=f"engine did not answer for more than {self.settings.engine.unreachable_restart_after:g}s; "
                       "restarted"))
        if (record.stopping_since is not None and not seen.oom_killed
                and (seen.exit_code is None or seen.exit_code in STOP_EXITS)
                and transitions.stop_left(record, self.health.clock.now(),
                                          await self.starts.stop_grace(record, seen) + EXIT_SEEN, seen.id) > 0):
            # A stop of it had begun (a predecessor's, in its grace when it died, then a start; or one whose call
            # timed out): that stop ended it, not a crash. Started again at once, with no crash counted.
            log.info("the engine exited after a stop of it began at %s: not a crash; starting it again",
                     record.stopping_since.isoformat(), extra={"game_id": record.game_id})
            await self.store.mark_starting(record, rollback_image=None)
            return AGAIN
        if await self.backend.stopped_by_daemon(seen):
            log.warning("engine stopped by a restart of the container daemon; starting it again (not a crash)",
                        extra={"game_id": record.game_id, "exit_code": seen.exit_code})
            self.metrics.daemon_restarts.inc()
            await self.store.mark_starting(record, rollback_image=None)
            return AGAIN
        detail, tail = await self.health.exit_detail(seen, "exited unexpectedly", 10)
        return await self.count(record, Crash(code=ErrorCode.CONTAINER_START_FAILED, detail=detail,
                                              container_id=container.id, exit_code=seen.exit_code,
                                              oom_killed=seen.oom_killed, log_tail=tail))

    async def count(self, record: RuntimeRecord, crash: Crash) -> Step:
        """One more crash of a game nobody asked to change; the store applies the crash policy."""
        current = await self.store.find(record.game_id)  # the action may have moved its status
        if current is None or current.generation != record.generation:
            return AGAIN  # a job changed the desired state meanwhile: plan again instead
        new, verdict = await self.store.record_crash(current, crash, self.policy)
        self.metrics.crashes.labels("true" if verdict.give_up else "false").inc()
        if verdict.give_up:
            log.error("giving up after %d crashes", verdict.count,
                      extra={"game_id": record.game_id, "exit_code": crash.exit_code})
            return AGAIN
        log.warning("engine crashed (%d in the window); restarting in %.1fs: %s", verdict.count, verdict.delay,
                    crash.detail, extra={"game_id": record.game_id, "exit_code": crash.exit_code,
                                         "oom_killed": crash.oom_killed})
        return requeue(verdict.delay, "restart backoff after a crash", again=True)
