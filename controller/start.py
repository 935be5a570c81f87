"""Starting a game's engine: the checks every start makes (the allowlist, the version registry), the
state directory around a replacement, a new unit with a new admin token, then the wait for its health
path before the record says it runs (``Starts.run``, for CREATE, START, RECREATE and CONFIRM); and
the stop grace of an engine (``Starts.stop_grace``), which every stop and removal uses.

Never hold a pooled Postgres connection across a backend call or a probe: every store call acquires
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable

from controller.config import Settings
from controller.health import Health, warn_turn_back
from controller.metrics import Metrics
from controller.planner import ActionKind
from controller.step import Step, requeue
from controller.storage import StateKeeper
from controller.turns import probe_host
from controller.units import UnitCache
from desired import storage, transitions, versions
from desired.errors import (
    Conflict,
    ContainerStartFailed,
    DockerUnavailable,
    EngineUnhealthy,
    ImageRejected,
    Unplaceable,
)
from desired.model import RuntimeRecord, Status
from desired.ports import ReconcilerStore
from observed.backend import RuntimeBackend
from observed.engine import EngineClient
from observed.errors import NodeLost, NotSent, ObservedError, Refused
from observed.model import ContainerSpec, ObservedContainer

log = logging.getLogger("rtmanager.reconciler")


class Starts:
    def __init__(self, settings: Settings, store: ReconcilerStore, backend: RuntimeBackend, engine: EngineClient,
                 metrics: Metrics, health: Health, states: StateKeeper, units: UnitCache | None = None) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.engine = engine
        self.metrics = metrics
        self.health = health
        self.states = states
        self.units = units or UnitCache()  # what the event stream vouches for: the reconciler's
        # The nodes no new unit may land on (drained Swarm nodes): set by the composition root.
        self.avoid: Callable[[], Awaitable[frozenset[str]]] | None = None

    async def run(self, kind: ActionKind, record: RuntimeRecord, container: ObservedContainer | None,
                  spec: ContainerSpec) -> Step | None:
        """CREATE, START, RECREATE or CONFIRM: the unit ``spec`` describes runs and answers its health path,
        and the record says so; a unit adopted from an older attempt returns early (plan again)."""
        # The allowlist holds at every start, not only when a job is accepted: restarts, crash
        # recoveries and spec changes reuse a stored image the operator may have banned since.
        if kind is not ActionKind.CONFIRM:
            if not self.settings.images.image_allowlist.allows(spec.image):
                raise ImageRejected(f"image {spec.image} is no longer allowed by RTMANAGER_IMAGE_ALLOWLIST")
            if self.settings.images.version_policy == "registry":
                refusal = versions.refuse_run(await self.store.engine_version_of(spec.image), spec.image)
                if refusal is not None:
                    raise ImageRejected(refusal)
        if kind is ActionKind.RECREATE:
            await self.backend.ensure_image(spec.image)  # pull before taking the running game down
        if container is None or kind is ActionKind.RECREATE:
            spec = await self._placed(spec)
            if container is not None and not await self.backend.placeable(frozenset(spec.avoid_nodes), spec.node):
                # Nowhere to start the new unit (its pinned node paused or drained, no other node usable for
                # a move): the running one is kept, and the replacement waits for a node.
                where = f"its node {spec.node[:12]} takes no new unit" if spec.node else "no node is usable"
                raise Unplaceable(f"not replacing the unit of {record.game_id}: {where} (ready and active); "
                                  "the running unit is kept")
        confirming_up = kind is ActionKind.CONFIRM and record.status.is_up and container is not None \
            and record.current_container_id == container.id
        if container is not None and container.running and transitions.stop_mark_of(record, container.id):
            # A stop or removal of this unit begun before (a replacement's, whose call timed out, then a
            # rollback to it; a predecessor's, in its grace when it died; the removal of a replacement's new
            # unit) may still be under way: the engine is saving on its way out. Not signalled again, and not
            # confirmed running, until it is over.
            left = transitions.stop_left(record, self.health.clock.now(), await self.stop_grace(record, container),
                                         container.id)
            if left > 0:
                log.info("a stop of the engine begun %s may still be under way: waiting %.0fs",
                         record.stopping_since.isoformat() if record.stopping_since else "?", left,
                         extra={"game_id": record.game_id})
                return requeue(min(left, 5.0), "a stop of the engine may still be under way")
        if record.status is not Status.STARTING and not confirming_up:
            # A job replacing a running engine: remember what it ran, to start it again on failure.
            rollback = (record.current_image_ref if record.status.is_up and not record.converged
                        and not record.rolling_back else None)
            record = await self.store.mark_starting(record, rollback_image=rollback)
        if kind is ActionKind.RECREATE and container is not None:
            if storage.needs_backup(record, spec.image):
                # The room for the copy, measured before the running engine is touched: a copy refused after
                # its removal cost a healthy game a stop and a start (its save cut) for nothing. Measured again
                # below, once the engine has stopped (what it saved on the way out counts too).
                await self.states.check_copy_room(record)
            grace = await self.stop_grace(record, container)
            record = await self.mark(record, container.id, grace)  # right before the signal, each time
            # SIGTERM first
            record = await self.signal(record, container.id, self.backend.remove(container.id, grace), over=True)
            container = None
        made = container is None
        if container is None:
            entry = await self.store.engine_version_of(spec.image)
            if entry is not None and entry.stop_grace is not None:  # a Swarm service keeps it from its creation
                spec = dataclasses.replace(spec, stop_grace=float(entry.stop_grace))
            # A rollback: the old image starts on the state the old engine left (and a restore a
            # kill cut short is finished first, whatever is asked now).
            await self.states.restore(record, spec.image)
            if storage.needs_backup(record, spec.image):
                # Another image replaces the running engine (stopped by now): keep what it left, if there is
                # room for it beside what the other engines need.
                await self.states.check_copy_room(record)
                await self.states.backup(record)
            elif not record.rolling_back:
                await self.states.check_room(record)  # a new game's directory needs room
            await self.backend.prepare()  # the image: the create pulls it when it is missing
            # Made where the unit will run: on a Swarm, the game's node, or the node chosen for a new
            # game (the unit is pinned there, so the engine finds the directory it was given).
            node = await self.backend.make_state_dir(self.settings.storage.state_root, spec)
            if node and not spec.node:
                spec = dataclasses.replace(spec, node=node)
            # A new secret for each unit, recorded before the unit exists: a kill between the create
            # and the next write must not leave a unit whose token nobody knows.
            token = secrets.token_urlsafe(32)
            record = await self.store.set_admin_token(record, token)
            spec = dataclasses.replace(spec, admin_token=token)
            t0 = asyncio.get_running_loop().time()
            container = await self.backend.create(spec)
            self.metrics.phase.labels("container_created").observe(asyncio.get_running_loop().time() - t0)
            if container.admin_token != token:
                # The name was taken: a unit this create did not make (an earlier attempt's, one a restored
                # database does not know, somebody else's, one being removed). Planned for from a new look,
                # as any unit found, not started or adopted here.
                return None
        if container.admin_token is not None and container.admin_token != record.admin_token:
            # A unit that existed already (the create found one an earlier attempt made, or the record
            # does not know it: a restored database) runs with the token it was created with: record it.
            log.info("recording the admin token the unit %s was created with", container.id[:12],
                     extra={"game_id": record.game_id, "container_id": container.id})
            record = await self.store.set_admin_token(record, container.admin_token)
        if not container.running:
            if not made:
                # A stopped unit starts again: a restore left pending first (a kill, or a disk full at a stop,
                # cut it short): its engine must not run on a half-restored directory. (A unit just made had
                # it finished before its create: ``restore`` above.)
                await self.states.finish_restore(record)
            await self.backend.start(container.id)
        await self.confirm(record, container.id, spec)
        return None

    async def _placed(self, spec: ContainerSpec) -> ContainerSpec:
        """The nodes a new unit of ``spec`` avoids, as of now."""
        # A node the game left when it was lost is avoided only while it is still lost: once it is back (or
        # nowhere else could take the game), it is a node like any other.
        if spec.avoid_nodes:
            lost = await self.backend.lost_nodes()
            spec = dataclasses.replace(spec, avoid_nodes=tuple(n for n in spec.avoid_nodes if n in lost))
        # The nodes being drained are avoided before a node is chosen: a new game must not be placed on (and
        # pinned to) a node on its way out.
        if self.avoid is not None:
            avoided = await self.avoid()
            if avoided:
                spec = dataclasses.replace(spec, avoid_nodes=tuple(sorted(set(spec.avoid_nodes) | avoided)))
        return spec

    async def confirm(self, record: RuntimeRecord, container_id: str, spec: ContainerSpec) -> None:
        """Wait for the engine's health path, then record the game as running."""
        loop = asyncio.get_running_loop()
        last_look = [loop.time()]
        exited: list[ObservedContainer] = []
        game = record.game_id
        token = [self.units.token(game)]  # before the inspect: what happens after it touches the game

        async def still_running() -> bool:
            # While the event stream vouches that nothing happened to the unit (an exit is an event), it
            # runs; otherwise it is inspected, at most every 0.5 s.
            if self.units.vouches(game, token[0]) or loop.time() - last_look[0] < 0.5:
                return True
            last_look[0] = loop.time()
            token[0] = self.units.token(game)
            seen = await self.backend.inspect(container_id)
            if seen is None or not seen.running:
                if seen is not None:
                    exited.append(seen)
                return False
            return True

        seen = await self.backend.inspect(container_id)
        if seen is None:
            raise ContainerStartFailed("the container disappeared right after start")
        if not seen.running:
            await self._raise_exited(seen)
        await self._raise_if_node_lost(seen)  # a task the manager still calls running on a lost node
        host = probe_host(record.game_id, seen.address)
        t0 = loop.time()
        ok, detail = await self.engine.wait_healthy(host, self.settings.engine.start_timeout, still_running)
        self.metrics.probes.labels("healthy" if ok else "unhealthy").inc()
        if ok:
            # The answer came from the address this unit had: make sure it is still this unit's (a
            # daemon may hand a dead container's IP to the next one at once).
            token[0] = self.units.token(game)
            again = await self.backend.inspect(container_id)
            if again is None or not again.running or again.address != seen.address:
                if again is not None and not again.running:
                    await self._raise_exited(again)
                raise ContainerStartFailed("the engine's container stopped or moved while it was probed")
            self.units.put(game, token[0], again)  # the next look goes by it while nothing happens to it
        if not ok:
            if not exited:  # the last look may predate an exit (failure path only: one inspect more)
                last = await self.backend.inspect(container_id)
                if last is not None and not last.running:
                    exited.append(last)
            if exited:
                await self._raise_exited(exited[-1])
            await self._raise_if_node_lost(seen)
            raise EngineUnhealthy(f"engine did not answer GET {self.settings.engine.health_path} with 2xx within "
                                  f"{self.settings.engine.start_timeout:g}s (last: {detail})")
        self.metrics.phase.labels("engine_healthy").observe(loop.time() - t0)
        probe = (await self.health.probe(record, seen.address, answered=True) if record.admin_api is not False
                 else None)
        s = self.settings
        if probe is not None and probe.healthy:
            warn_turn_back(record, probe)  # a restart after a crash that lost saves, say
        await self.store.mark_running(record, container_id=container_id, image=spec.image,
                                      probe=probe if probe is not None and probe.healthy else None,
                                      unreachable_after=s.engine.unreachable_after,
                                      generation_timeout=s.engine.generation_timeout,
                                      node=seen.node)
        if storage.replacing(record):
            try:
                await self.states.drop(record.game_id)  # healthy: the copy of the replaced state is not needed
            except ObservedError as exc:  # converged all the same; the storage round deletes it later
                log.warning("could not delete the copy of the state directory: %s", exc.message,
                            extra={"game_id": record.game_id})

    async def _raise_if_node_lost(self, seen: ObservedContainer) -> None:
        """The unit's node is lost (or drained): ``NodeLost``, a temporary failure, never the engine's crash
        nor a failed start; the next look records the game node_lost."""
        if seen.node_lost or seen.node_drained or (seen.node and seen.node in await self.backend.lost_nodes()):
            raise NodeLost(f"the node {(seen.node or '?')[:12]} of {seen.name} was lost while the engine started")

    async def _raise_exited(self, seen: ObservedContainer) -> None:
        """The unit ended while it started: its node was lost or the daemon stopped it in a restart of its
        own (both temporary: the engine is started again), or the engine exited (the start failed)."""
        await self._raise_if_node_lost(seen)
        if await self.backend.stopped_by_daemon(seen):
            self.metrics.daemon_restarts.inc()
            raise DockerUnavailable("the container daemon stopped the engine while it started (a restart of the "
                                    "daemon): it is started again")
        await self.health.raise_exited(seen)

    async def mark(self, record: RuntimeRecord, unit_id: str, grace: float) -> RuntimeRecord:
        """Unit ``unit_id`` of the game is about to be asked to stop: the record's stop mark names it from now
        (``transitions.stopping``). The record holds one mark: a young one of another unit (in its grace and
        STOP_SLACK) is kept, and this unit's stop goes unmarked (as every stop did before marks named units)."""
        other = record.stopping_unit or record.current_container_id
        if (other != unit_id and transitions.stop_left(record, self.health.clock.now(), grace, other) > 0
                and (other is None or await self.backend.inspect(other) is not None)):
            # (a mark of a unit that is gone dates nothing: a removal whose call timed out after the daemon
            # removed it, or whose clearing write failed; this unit's stop takes the mark)
            log.info("not marking the stop of unit %s: the record's mark of unit %s is in its grace", unit_id[:12],
                     (other or "?")[:12], extra={"game_id": record.game_id})
            return record
        return await self.store.mark_stopping(record, unit_id)

    async def signal(self, record: RuntimeRecord, unit_id: str, call: Awaitable[None], *,
                     over: bool = False) -> RuntimeRecord:
        """A stop or removal of an engine, its mark written just before (the caller's): a refusal of the
        daemon's, or a call that never reached it (its socket refused the connection: a daemon restarting),
        says no signal went out, so the mark is cleared (nothing to wait out on the next attempt). A call that
        failed otherwise (a timeout, a connection cut) may have sent it: the mark stays. With ``over``, a call
        that returned (the unit has exited) clears it too, where no transition that follows would (a
        replacement's removal: the record's one mark is then free for its new unit's stop). Only a mark of
        ``unit_id`` is cleared: another unit's (kept by ``mark``) is that unit's."""
        mine = transitions.stop_mark_of(record, unit_id) is not None
        try:
            await call
        except (Refused, NotSent):
            if mine:  # whatever job landed meanwhile: this mark dates no signal
                with contextlib.suppress(Conflict):
                    await self.store.clear_stopping(record, same_generation=False)
            raise
        if not over:
            return record
        cleared: RuntimeRecord | None
        try:
            cleared = (await self.store.clear_stopping(record, same_generation=False) if mine  # the unit is gone
                       else await self.store.find(record.game_id))
        except Conflict:
            cleared = None
        if cleared is None or cleared.generation != record.generation:
            # A job landed while the engine was removed: the plan this removal was part of is not the game's
            # any more. Planned again from the record as it is (no backup, no new unit for the older plan).
            raise Conflict(f"{record.game_id}: a job changed the game while its engine was removed")
        return cleared

    async def stop_grace(self, record: RuntimeRecord, container: ObservedContainer | None) -> float:
        """Seconds between SIGTERM and SIGKILL for the engine this unit runs (None: the record's engine): its
        registered version's ``stop_grace`` (whatever RTMANAGER_VERSION_POLICY), else RTMANAGER_STOP_GRACE."""
        image = record.current_image_ref if container is None or record.current_container_id == container.id else None
        image = image or (container.image if container is not None else None)
        entry = await self.store.engine_version_of(image) if image else None
        return versions.stop_grace(entry, self.settings.runtime.stop_grace)
