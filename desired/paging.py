"""Pages of runtime records: a keyset on ``game_id`` behind an opaque cursor, and the filters.

``GET /api/v1/runtimes`` answers at most ``limit`` records, ordered by ``game_id``, and a ``next``
cursor when there are more. The cursor carries the last ``game_id`` of the page (keyset, not an
offset): a game created or removed during a walk never shifts the others, so a walk sees every game
that existed throughout it exactly once. The cursor is opaque to clients (base64url of a versioned
text); a client passes it back unchanged. Pure: no driver, no I/O.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from desired.model import GAME_ID_PATTERN, Status
from desired.versions import VERSION_PATTERN

MAX_PAGE = 10_000     # the largest page, and the default one (clients that never page see up to this)
_CURSOR_PREFIX = "g1:"  # a version, so that another keyset could be told apart later


class InvalidPage(ValueError):
    """A bad ``limit``, ``cursor`` or filter: the message names the parameter."""


@dataclass(frozen=True, kw_only=True)
class RuntimeFilter:
    """Which records: all filters given must hold (``node`` is the Swarm node that holds the game)."""

    status: Status | None = None
    engine_version: str | None = None
    node: str | None = None


@dataclass(frozen=True, kw_only=True)
class PageRequest:
    filter: RuntimeFilter
    after: str | None  # the keyset: records with a game_id above this one
    limit: int


def encode_cursor(game_id: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + game_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The game id a cursor continues after; InvalidPage for anything this server did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidPage("cursor is not one this server returned") from None
    if not raw.startswith(_CURSOR_PREFIX) or not GAME_ID_PATTERN.fullmatch(raw[len(_CURSOR_PREFIX):]):
        raise InvalidPage("cursor is not one this server returned")
    return raw[len(_CURSOR_PREFIX):]


def parse_page(query: dict[str, str]) -> PageRequest:
    """The query parameters of a list: ``status``, ``engine_version``, ``node``, ``limit``, ``cursor``."""
    status = None
    if "status" in query:
        try:
            status = Status(query["status"])
        except ValueError:
            raise InvalidPage(f"status must be one of {', '.join(s.value for s in Status)}") from None
    version = query.get("engine_version")
    if version is not None and not VERSION_PATTERN.fullmatch(version):
        raise InvalidPage("engine_version must be 1-64 characters of A-Z a-z 0-9 . _ -")
    node = query.get("node")
    if node is not None and not (0 < len(node) <= 128 and node.isascii() and node.isprintable()):
        raise InvalidPage("node must be 1-128 printable ASCII characters")
    raw_limit = query.get("limit", str(MAX_PAGE))
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 9) or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise InvalidPage(f"limit must be a whole number from 1 to {MAX_PAGE}")
    after = decode_cursor(query["cursor"]) if "cursor" in query else None
    return PageRequest(filter=RuntimeFilter(status=status, engine_version=version, node=node), after=after,
                       limit=int(raw_limit))
