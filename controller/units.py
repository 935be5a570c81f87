"""What the reconciler knows of each game's unit between looks, and for how long it may go by it.

Docker's event stream says when something happens to a unit; while it stays connected, a unit inspected
once need not be inspected again until an event (or an action of ours) touches it. Where there is no such
stream (the fake backend, Swarm's task poller), nothing is kept and every look inspects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from desired.model import DesiredStatus, RuntimeRecord
from observed.model import ObservedContainer


class UnitCache:
    """The unit each game's sync last inspected, used instead of a new inspect only while the backend's
    event stream vouches that nothing happened to it since: the stream connected without a break since
    the inspect, no event named the game since (``touch``), no action of ours changed the unit, and the
    record says the game is up on exactly that unit. So a turn of an up game costs no inspect; a crash
    mid-turn (a ``die``), a reconnect, a resync that finds the game diverged all make the next look a real
    one. Off (``stream`` says None) where no such stream exists (the fake backend, Swarm's task poller)."""

    def __init__(self) -> None:
        self.stream: Callable[[], int | None] = lambda: None  # the event stream's connection number, if connected
        self._units: dict[str, tuple[int, ObservedContainer]] = {}
        self._touched: dict[str, int] = {}

    def token(self, game_id: str) -> tuple[int | None, int]:
        """Taken before an inspect: the answer is kept only if nothing happened while it ran."""
        return self.stream(), self._touched.get(game_id, 0)

    def vouches(self, game_id: str, token: tuple[int | None, int]) -> bool:
        """Nothing happened to the game's unit since ``token`` was taken, as a connected event stream says."""
        return token[0] is not None and self.token(game_id) == token

    def put(self, game_id: str, token: tuple[int | None, int], container: ObservedContainer | None) -> None:
        stream, touched = token
        if (stream is None or container is None or not container.running or self.stream() != stream
                or self._touched.get(game_id, 0) != touched):
            self._units.pop(game_id, None)
            return
        self._units[game_id] = (stream, container)

    def get(self, record: RuntimeRecord | None) -> ObservedContainer | None:
        if record is None:
            return None
        found = self._units.get(record.game_id)
        if found is None:
            return None
        stream, container = found
        if (stream != self.stream() or not record.status.is_up or record.current_container_id != container.id
                or record.desired_status is not DesiredStatus.RUNNING):
            del self._units[record.game_id]
            return None
        return container

    def compare(self, listed: Iterable[ObservedContainer]) -> None:
        """A list of the units (the resync's, the health round's): a kept unit whose address the list shows
        changed is let go. A network disconnect and connect gives a running unit a new address and no
        container event; the turn path must not send the game's admin token to the old one."""
        if not self._units:
            return
        for c in listed:
            if not c.game_id or c.game_id not in self._units:
                continue
            kept = self._units[c.game_id][1]
            if kept.id == c.id and c.running and kept.address != c.address:
                self.touch(c.game_id)

    def clear(self) -> None:
        self._units.clear()

    def touches(self, game_id: str) -> int:
        """How many times something happened to the game's unit (``touch``) in this process."""
        return self._touched.get(game_id, 0)

    def touch(self, game_id: str) -> None:
        """Something happened to the game's unit (an event, a resync's finding, an action of ours)."""
        self._touched[game_id] = self._touched.get(game_id, 0) + 1
        self._units.pop(game_id, None)
