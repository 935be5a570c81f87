"""What the commands share: the configuration, the connections they open, and the output helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from controller.config import ConfigError, Settings

if TYPE_CHECKING:  # imported where they are used, after start-up
    from controller.streams import RedisStreams
    from desired.db.store import Store
    from observed.backend import RuntimeBackend


def game_id_arg(value: str) -> str:
    """A GAME argument that goes into a URL path: a game id, or the command stops (exit 2) before any
    request (``../rollouts/1/abort`` would otherwise reach another endpoint)."""
    from desired.jobs import InvalidJob, validate_game_id

    try:
        return validate_game_id(value)
    except InvalidJob as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"rtmanager: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def table(rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def print_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


def fail(command: str, message: str, code: int = 1) -> int:
    """One line on stderr, and the exit status to return."""
    print(f"rtmanager {command}: {message}", file=sys.stderr)
    return code


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    from desired.db.pool import create_pool
    from desired.db.store import Store

    pool = await create_pool(settings.database.database_url, max_size=2, lease_ttl=settings.leadership.lease_ttl)
    try:
        yield Store(pool)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[RuntimeBackend]:
    from controller.app import make_backend

    backend = make_backend(settings)  # RTMANAGER_BACKEND: docker or swarm
    try:
        yield backend
    finally:
        backend.close()


@contextlib.asynccontextmanager
async def open_streams(settings: Settings) -> AsyncIterator[RedisStreams]:
    from controller.streams import RedisStreams

    group = settings.streams
    streams = RedisStreams(group.redis_url, group=group.consumer_group, consumer=group.consumer_name)
    try:
        yield streams
    finally:
        await streams.close()
