"""Which driver errors mean "that service is not available right now" (retry with backoff),
as opposed to a request that is wrong. Every loop of the controller retries these and
carries on; anything else is a bug and is reported as one."""

from __future__ import annotations

import redis.exceptions

from desired.errors import StoreUnavailable
from desired.store import PG_UNAVAILABLE

REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,      # includes BusyLoadingError (a restarting server)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,        # a replica during a fail-over
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)

UNAVAILABLE: tuple[type[BaseException], ...] = (*REDIS_UNAVAILABLE, StoreUnavailable, *PG_UNAVAILABLE)


def is_missing_group(exc: BaseException) -> bool:
    """The stream or its consumer group was deleted under us: create them again."""
    return isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc)
