"""asyncpg at the edge of ``desired/``: connections, and the translation of its errors.

Only desired/db/ talks to Postgres, and asyncpg's errors never leave it: an outage becomes
``StoreUnavailable`` (retry with backoff), a unique violation ``UniqueViolation``
naming its constraint, anything else ``StoreError``.
"""

from __future__ import annotations

import asyncio

import asyncpg

from desired.errors import StoreBusy, StoreError, StoreUnavailable, UniqueViolation
from desired.errors import translating as errors_translating

# asyncpg errors that mean "Postgres is not reachable right now" (retry), as
# opposed to a query that is wrong.
PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # What asyncpg raises when the server goes away in the middle of an operation.
    asyncpg.exceptions.InternalClientError,
    # A server that answers but cannot take writes or sessions right now (fail-over, full).
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.DiskFullError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout, a lock held by a paused replica
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
)


def translate(exc: BaseException) -> BaseException | None:
    """The store's own error for a driver error, or None when ``exc`` is not the driver's."""
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and isinstance(exc, ValueError):
        # The driver refused a value before sending it (a connection setting such as sslmode=bogus, an
        # argument it cannot encode): the same call fails again, Postgres is not away.
        return StoreError(f"postgres client: {exc.__class__.__name__}: {_headline(exc)}")
    if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        return StoreBusy(f"postgres: {exc.__class__.__name__}: {_headline(exc)}")
    if isinstance(exc, PG_UNAVAILABLE):
        return StoreUnavailable(f"postgres: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        return UniqueViolation(f"postgres: {_headline(exc)}", getattr(exc, "constraint_name", "") or "")
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        return StoreError(f"postgres {getattr(exc, 'sqlstate', '')}: {_headline(exc)}")
    return None


def _headline(exc: BaseException) -> str:
    """The server's message without its DETAIL: a "Failing row contains (...)" lists the row's
    values, secrets included (an engine's admin token), and these messages reach logs and results."""
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) and message else str(exc).split("\n", 1)[0]


translating = errors_translating(translate)
"""Class decorator: every public coroutine method raises the store's errors only."""


async def _no_session_state(conn: asyncpg.Connection) -> None:
    return None


async def create_pool(database_url: str, *, max_size: int, lease_ttl: float) -> asyncpg.Pool:
    """The pool of the controller. StoreUnavailable when Postgres does not answer."""
    try:
        return await asyncpg.create_pool(
            database_url, min_size=1, max_size=max_size, command_timeout=30,
            # A leader paused inside a transaction must not hold off a take-over for long.
            server_settings={"idle_in_transaction_session_timeout": str(int(lease_ttl * 1000))},
            # Pool connections never LISTEN, SET, hold session locks or open cursors, so the
            # default reset (4 statements per release) is pure overhead; asyncpg still rolls
            # back a transaction left open.
            reset=_no_session_state)
    except BaseException as exc:
        ours = translate(exc)
        if ours is None:
            raise
        raise ours from exc


async def connect(database_url: str, timeout: float = 5.0) -> asyncpg.Connection:
    """One connection of its own (migrations, LISTEN, the lease). StoreUnavailable when Postgres is away."""
    try:
        return await asyncpg.connect(database_url, timeout=timeout)
    except BaseException as exc:
        ours = translate(exc)
        if ours is None:
            raise
        raise ours from exc
