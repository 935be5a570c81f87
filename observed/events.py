"""Docker events for managed containers, as hints for the work queue.

The reader runs on its own docker client and its own thread (a blocking
stream would otherwise hold an executor slot forever). Events are only hints:
dockerd keeps just the last 256 for replay, skips slow subscribers, and ends
the stream when it restarts, saying nothing about what happened meanwhile. So
on every (re)connect the reader first asks for a full relist (``on_connect``)
before it trusts events again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import docker

from observed.model import LABEL_GAME_ID, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY

log = logging.getLogger("rtmanager.events")

WATCHED = ("start", "die", "oom", "destroy", "stop", "kill")
# The events an action of ours makes the stream report about its own unit: echoes, not news.
STARTING = frozenset({"start"})
STOPPING = frozenset({"kill", "die", "stop"})
REMOVING = STOPPING | {"destroy"}
ECHO_WINDOW = 5.0  # seconds after an action ends during which its echoes may still arrive
ECHOES_KEPT = 10_000  # actions remembered at most (expired ones are dropped first)


class Echoes:
    """The events our own actions cause. A start, stop or removal of a unit makes the stream report it
    (``start``; ``kill``, ``die``, ``stop``; ``destroy``); such an event, of the unit acted on, while the
    action runs or within ECHO_WINDOW after it, tells the reconciler nothing it will not see in its own
    next look, and woke a second look of every game started or stopped. Any other event of that unit
    (a ``die`` during a start, an ``oom``), and every event after the window, is news. A new action of
    the unit replaces what the last one expected; one inside another (a removal's stop) adds to it.

    Used on the event loop's thread only (the actions run there; the stream's events are handed to it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._live: dict[str, tuple[frozenset[str], int, float]] = {}  # unit -> (actions, running, until)

    @contextlib.contextmanager
    def expect(self, unit_id: str, actions: frozenset[str]) -> Iterator[None]:
        now = self._clock()
        if len(self._live) >= ECHOES_KEPT:
            self._live = {u: e for u, e in self._live.items() if e[1] or e[2] >= now}
            while len(self._live) >= ECHOES_KEPT:  # all still live: the oldest goes (its echoes become news)
                del self._live[next(iter(self._live))]
        kept, running, until = self._live.get(unit_id, (frozenset(), 0, 0.0))
        if not running:
            # A new action of ours: its own kinds only. A late echo of the one before it is news (one more
            # look); kept, that one's kinds would hide what happens now (a stop's ``die`` in a start's wait).
            kept = frozenset()
        self._live[unit_id] = (kept | actions, running + 1, until)
        try:
            yield
        finally:
            kept, running, _ = self._live.get(unit_id, (actions, 1, 0.0))
            self._live[unit_id] = (kept, max(running - 1, 0), self._clock() + ECHO_WINDOW)

    def is_echo(self, unit_id: str, action: str) -> bool:
        entry = self._live.get(unit_id)
        if entry is None:
            return False
        actions, running, until = entry
        if not running and until < self._clock():
            del self._live[unit_id]
            return False
        return action in actions


class EventWatcher:
    def __init__(self, *, instance: str, loop: asyncio.AbstractEventLoop,
                 on_event: Callable[[str, str], None], on_connect: Callable[[], None],
                 on_lost: Callable[[bool], None] = lambda daemon: None, echoes: Echoes | None = None) -> None:
        self.instance = instance
        self._loop = loop
        self._on_event = on_event
        self._echoes = echoes  # our own actions' events, not handed on (None: every event is)
        self._on_connect = on_connect
        # the stream is gone: on_lost(True) when the daemon ended it or did not answer, on_lost(False)
        # when we dropped it ourselves (it vouches for nothing from then on either way)
        self._on_lost = on_lost
        self._deliberate = False
        self._next_delay: float | None = None
        self._stopping = threading.Event()
        self._stream = None
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self.connected = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.reconnect()

    def reconnect(self, delay: float | None = None) -> None:
        """Drop the current stream, as a dockerd restart would; the reader reconnects (after ``delay``
        seconds if given) and relists."""
        if delay is not None:
            self._next_delay = delay
        self._deliberate = True
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - already closed
                pass

    def _lost(self) -> None:
        deliberate, self._deliberate = self._deliberate, False
        self._loop.call_soon_threadsafe(self._on_lost, not deliberate)

    def _seen(self, game_id: str, action: str, unit_id: str) -> None:
        """On the event loop: an event of a game's unit, handed on unless an action of ours made it."""
        if self._echoes is not None and unit_id and self._echoes.is_echo(unit_id, action):
            return
        self._on_event(game_id, action)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        delay = 0.5
        self.connects = 0
        filters = {"type": "container", "event": list(WATCHED),
                   "label": [f"{LABEL_MANAGED_BY}={MANAGED_BY}", f"{LABEL_INSTANCE}={self.instance}"]}
        while not self._stopping.is_set():
            client = None
            try:
                client = docker.from_env(timeout=None)
                self._stream = stream = client.events(decode=True, filters=filters)
                self.connected = True
                self.connects += 1
                delay = 0.5
                self._loop.call_soon_threadsafe(self._on_connect)
                for event in stream:
                    if self._stopping.is_set():
                        break
                    attrs = (event.get("Actor") or {}).get("Attributes") or {}
                    game_id = attrs.get(LABEL_GAME_ID)
                    if game_id:
                        self._loop.call_soon_threadsafe(self._seen, game_id, event.get("Action", ""),
                                                        (event.get("Actor") or {}).get("ID") or "")
                if not self._stopping.is_set():
                    log.warning("docker event stream ended (daemon restart?); reconnecting")
                    self._lost()
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect and relist
                if self._stopping.is_set():
                    break
                log.warning("docker event stream failed, reconnecting in %.1fs: %s", delay, exc)
                self._lost()
            finally:
                self.connected = False
                self._stream = None
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # noqa: BLE001
                        pass
            if not self._stopping.is_set():
                wait, self._next_delay = (self._next_delay or delay), None
                self._stopping.wait(wait)
                delay = min(delay * 2, 10.0)
