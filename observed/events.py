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
import logging
import threading
from collections.abc import Callable

import docker

from observed.model import LABEL_GAME_ID, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY

log = logging.getLogger("rtmanager.events")

WATCHED = ("start", "die", "oom", "destroy", "stop", "kill")


class EventWatcher:
    def __init__(self, *, instance: str, loop: asyncio.AbstractEventLoop,
                 on_event: Callable[[str, str], None], on_connect: Callable[[], None],
                 on_lost: Callable[[bool], None] = lambda daemon: None) -> None:
        self.instance = instance
        self._loop = loop
        self._on_event = on_event
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
                self._stream = client.events(decode=True, filters=filters)
                self.connected = True
                self.connects += 1
                delay = 0.5
                self._loop.call_soon_threadsafe(self._on_connect)
                for event in self._stream:
                    if self._stopping.is_set():
                        break
                    attrs = (event.get("Actor") or {}).get("Attributes") or {}
                    game_id = attrs.get(LABEL_GAME_ID)
                    if game_id:
                        self._loop.call_soon_threadsafe(self._on_event, game_id, event.get("Action", ""))
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
