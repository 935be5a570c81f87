"""The runtime backend port: what the reconciler needs from whatever runs the engines.

One implementation per backend (``observed/docker.py`` for one Docker host; a
Swarm backend is another implementation of the same port, not an edit of the
reconciler). Every method translates its driver's errors into
``observed.errors``; every string it returns is safe text.

A *unit* is what runs one game: a container on a Docker host, a service on a
Docker Swarm. Its name is
deterministic (``galaxy-game-{game_id}``), which is what makes ``create``
idempotent: a name conflict means an earlier attempt got through, and the
existing unit is returned for the caller to adopt or replace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from observed.model import ContainerSpec, ObservedContainer


class EventSource(Protocol):
    """Hints that a unit changed; ``on_connect`` runs after every (re)connect (relist then)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def reconnect(self) -> None: ...


class RuntimeBackend(Protocol):
    name: str

    async def ping(self) -> None: ...

    async def list_managed(self) -> list[ObservedContainer]:
        """Every unit of this instance, running or not, in one call."""

    async def inspect(self, name_or_id: str) -> ObservedContainer | None:
        """One unit, or None when it does not exist."""

    async def image_present(self, image: str) -> bool: ...

    async def ensure_image(self, image: str) -> None:
        """Present, or pulled once; otherwise ImageMissing."""

    async def prepare(self) -> None:
        """What every unit needs before the first create (the network)."""

    async def network_subnets(self) -> list[str]:
        """The subnets of the game network (the HTTP server keeps off them: RTMANAGER_HTTP_HOST)."""

    async def make_state_dir(self, state_root: str, spec: ContainerSpec) -> str | None:
        """Make the unit's state directory ``spec.state_path`` (directly under ``state_root``, mode 0700,
        given to ``spec.user``) where the unit will run, before ``create``; idempotent. ``Refused`` for a
        path outside the root or anything there but a real directory (never through a symlink).

        Returns the node it was made on when the backend has nodes (a Swarm: the game's pin, or the node
        chosen for a new game, not one of ``spec.avoid_nodes``; the caller pins the unit there), else None."""

    async def lost_nodes(self) -> frozenset[str]:
        """Nodes that are down or unreachable (a Swarm): their engines' fate is unknown, nothing is started
        on one. Not a node its operator drained (it is up; its engines are shut down, their state intact).
        Empty on one host."""

    async def placeable(self, avoid_nodes: frozenset[str], node: str | None = None) -> bool:
        """Whether a new unit could be placed now: pinned to ``node``, that node is ready and active (a
        Swarm: not lost, drained or paused); else some node is, and not in ``avoid_nodes``. Always True on
        one host."""

    async def create(self, spec: ContainerSpec) -> ObservedContainer:
        """The unit ``spec`` describes, created and not started. An image that is not present is pulled
        once: by the create on one Docker host (``ImageMissing`` when it cannot be), by the node that runs
        the task on a Swarm (``ImageMissing`` from ``start``). When the name is taken, what holds it (ours or
        not, of this spec or not: the caller decides)."""

    async def start(self, unit_id: str) -> None: ...

    async def stop(self, unit_id: str, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns once it has exited."""

    async def remove(self, unit_id: str, grace: float) -> None:
        """Stop gracefully (as ``stop``) when it still runs, then remove it."""

    async def logs_tail(self, unit_id: str, lines: int = 20) -> str: ...

    async def stopped_by_daemon(self, unit: ObservedContainer) -> bool:
        """The unit exited because the engine behind the backend (the daemon) went away, not on its own;
        when that cannot be told, True (observed/restarts.py)."""

    def events(self, on_event: Callable[[str, str], None], on_connect: Callable[[], None]) -> EventSource: ...

    def close(self) -> None: ...
