"""Errors, split by what the caller should do about them.

    RtmError (code: ErrorCode)
    ├── TemporaryError        retry with backoff; the job stays pending
    │   ├── DockerUnavailable     the daemon did not answer
    │   └── StoreUnavailable      Postgres did not answer
    └── PermanentError        answer the job with a failure now
        ├── ImageRejected         the image is not (any more) on the allowlist
        ├── ImageUnavailable      the image is not present and cannot be pulled
        ├── ContainerStartFailed  create or start was refused, or the engine exited
        └── EngineUnhealthy       no 2xx on the health path within the start timeout
    NotFound, Conflict            store outcomes (seed 000), not failures of a job

Driver errors (asyncpg, redis, docker) are translated once, in the adapters,
with ``raise ... from exc``.
"""

from __future__ import annotations

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


class StoreUnavailable(TemporaryError):
    code = ErrorCode.INTERNAL_ERROR


class PermanentError(RtmError):
    pass


class ImageRejected(PermanentError):
    code = ErrorCode.IMAGE_REJECTED


class ImageUnavailable(PermanentError):
    code = ErrorCode.IMAGE_UNAVAILABLE


class ContainerStartFailed(PermanentError):
    code = ErrorCode.CONTAINER_START_FAILED


class EngineUnhealthy(PermanentError):
    code = ErrorCode.ENGINE_UNHEALTHY


class NotFound(LookupError):
    """No runtime record for the game."""


class Conflict(RuntimeError):
    """A compare-and-swap guard did not hold: someone else changed the record."""
