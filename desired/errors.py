"""Errors, split by what the caller should do about them.

    RtmError (code: ErrorCode)
    ├── TemporaryError        retry with backoff; the job stays pending
    │   ├── DockerUnavailable     the runtime backend did not answer
    │   └── StoreUnavailable      Postgres did not answer (or is failing over)
    └── PermanentError        answer the job with a failure now
        ├── ImageRejected         the image is not (any more) allowed
        ├── ImageUnavailable      the image is not present and cannot be pulled
        ├── ContainerStartFailed  create or start was refused, or the engine exited
        ├── EngineUnhealthy       no 2xx on the health path within the start timeout
        └── StorageFull           the state root's filesystem has no room for a new game
    StoreError                a query failed for a reason that is not an outage (a bug, bad data)
    └── UniqueViolation           names the unique constraint that was violated
    NotFound, Conflict        store outcomes (compare-and-swap), not failures of a job

Driver errors are translated once, in the adapter that owns the driver, with
``raise ... from exc``: asyncpg's in ``desired/db/``; the runtime backend's
and the engine's in ``observed/`` (``observed.errors``), which the reconciler maps
to these codes in one table.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from desired.model import ErrorCode


class RtmError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TemporaryError(RtmError):
    pass


class DockerUnavailable(TemporaryError):
    code = ErrorCode.DOCKER_UNAVAILABLE


class NodeUnavailable(DockerUnavailable):
    """The game's node is lost (a Swarm): retried, never a crash; an overdue job is answered with
    docker_unavailable and the game left to the node-loss policy."""


class Unplaceable(NodeUnavailable):
    """A replacement not begun, nothing touched: no node takes its new unit now (its pinned node paused or
    drained, none usable for a move). Retried; its job, once overdue, fails as a job that changed nothing
    does (a patch of a running game goes back to the image that runs), not as a lost node's waits."""


class StoreUnavailable(TemporaryError):
    code = ErrorCode.INTERNAL_ERROR


class StoreBusy(StoreUnavailable):
    """A lock another session holds was not granted in time (``lock_timeout``): the store is there, one
    game's rows are not free. Temporary, and that game's alone."""


class PermanentError(RtmError):
    pass


class ImageRejected(PermanentError):
    code = ErrorCode.IMAGE_REJECTED


class ImageUnavailable(PermanentError):
    code = ErrorCode.IMAGE_UNAVAILABLE


class ContainerStartFailed(PermanentError):
    code = ErrorCode.CONTAINER_START_FAILED


class StorageFull(PermanentError):
    code = ErrorCode.STORAGE_FULL


class EngineUnhealthy(PermanentError):
    code = ErrorCode.ENGINE_UNHEALTHY


class StoreError(RtmError):
    """A statement failed, and not because Postgres is away: retrying the same write will not help."""


class UniqueViolation(StoreError):
    def __init__(self, message: str, constraint: str) -> None:
        super().__init__(message)
        self.constraint = constraint


class NotFound(LookupError):
    """No runtime record for the game."""


class Conflict(RuntimeError):
    """A compare-and-swap guard did not hold: someone else changed the record."""


_Class = TypeVar("_Class", bound=type)


def translating(translate: Callable[[BaseException], BaseException | None],
                after: Callable[[Any, BaseException], Awaitable[None]] | None = None) -> Callable[[_Class], _Class]:
    """Class decorator for an adapter: every public coroutine method raises ``translate(exc)`` from
    the driver's ``exc`` (when it gives one), so the driver's errors never leave the adapter.
    ``after(adapter, exc)``, if given, runs first for each error translated (to drop a connection the
    error shows is no good, say)."""
    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except BaseException as exc:
                ours = translate(exc)
                if ours is None:
                    raise
                if after is not None and args:
                    await after(args[0], exc)
                raise ours from exc
        return wrapper

    def decorate(cls: _Class) -> _Class:
        for name, member in list(vars(cls).items()):
            if not name.startswith("_") and inspect.iscoroutinefunction(member):
                setattr(cls, name, wrap(member))
        return cls
    return decorate
