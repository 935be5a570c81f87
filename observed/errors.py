"""Errors of the runtime backends and of the engine client, split by what the caller should do.

    ObservedError (message is already safe text)
    ├── BackendUnavailable    the daemon did not answer, or answered 5xx: retry with backoff
    │   └── NotSent           the call never reached the daemon (no connection): nothing was carried out
    ├── ImageMissing          the image is not present and could not be pulled
    ├── Refused               the daemon refused to create or start the container
    └── EngineError           the engine's admin API (see observed/engine.py)
        ├── EngineUnreachable     no answer (connection refused, timeout, garbage)
        ├── EngineUnsupported     the engine has no admin API (404 on its status path)
        ├── EngineConflict        the engine refused a turn (409: not at that turn, or busy)
        └── EngineRefused         the engine refused rtmanager itself (401/403: not the admin token
                                  it was created with, e.g. after a restore of an older database)

Driver errors (docker-py, requests, aiohttp) are translated into these once, in
the adapter that owns the driver, with ``raise ... from exc``. The reconciler maps
them to the results' error codes in one table.
"""

from __future__ import annotations

from observed.text import safe_text


class ObservedError(Exception):
    def __init__(self, message: str) -> None:
        message = safe_text(message, 1000)
        super().__init__(message)
        self.message = message


class BackendUnavailable(ObservedError):
    pass


class NotSent(BackendUnavailable):
    """The call never reached the daemon: its connection was refused, or its socket is gone (a daemon
    restarting). Nothing was carried out, unlike a timeout or a connection cut after the request went out.
    A backend's ``stop`` and ``remove`` raise it only when no signal of theirs went out."""


class StateBusy(BackendUnavailable):
    """Another process holds the game's state directory (its file operation under way: a leader that lost
    its term and has not stopped yet). Temporary: looked at again later; nothing was touched."""


class NodeLost(BackendUnavailable):
    """The unit's node is down, unreachable or drained (a Swarm): nothing is started there now. Temporary:
    looked at again later (the node may come back), never counted as the engine's crash."""


class ImageMissing(ObservedError):
    pass


class Refused(ObservedError):
    pass


class EngineError(ObservedError):
    pass


class EngineUnreachable(EngineError):
    pass


class EngineAnswerLost(EngineUnreachable):
    """A request went out and its answer did not come back (a timeout after the connection was made, the
    connection cut before the answer): the engine may have carried it out."""


class EngineUnsupported(EngineError):
    pass


class EngineConflict(EngineError):
    pass


class EngineRefused(EngineError):
    pass
