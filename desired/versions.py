"""The engine-version registry: which engine images exist as named versions, and which may run.

With ``RTMANAGER_VERSION_POLICY=registry`` an image runs only as a registered version:

* ``active``     takes new starts and patches;
* ``deprecated`` keeps running and restarting, but takes no new start or patch;
* ``disabled``   is refused at every container start, crash restarts included (the game is then
  stopped, and its snapshot says why).

``allowlist`` (the default) keeps the pattern list alone; the allowlist stays an outer fence in
both policies. Refusals are ``image_rejected`` and name the version and its status. Pure: the
store looks the entry up and calls these.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_NOTES = 4000
MAX_STOP_GRACE = 3600  # seconds; as RTMANAGER_STOP_GRACE


class VersionStatus(str, enum.Enum):
    ACTIVE = "active"
    DEPRECATED = "deprecated"
    DISABLED = "disabled"


@dataclass(frozen=True, kw_only=True)
class EngineVersion:
    version: str
    image_ref: str
    status: VersionStatus
    notes: str
    created_at: datetime
    updated_at: datetime
    stop_grace: int | None = None  # seconds between SIGTERM and SIGKILL (None: RTMANAGER_STOP_GRACE)


def refuse_new(entry: EngineVersion | None, image_ref: str) -> str | None:
    """Why a start or patch may not use ``image_ref`` under the registry policy (None: it may)."""
    if entry is None:
        return f"image_ref {image_ref!r} is not a registered engine version"
    if entry.status is not VersionStatus.ACTIVE:
        return f"engine version {entry.version} ({image_ref}) is {entry.status.value} and takes no new starts"
    return None


def valid_stop_grace(value: object) -> bool:
    """A version's ``stop_grace``: whole seconds from 0 to MAX_STOP_GRACE, or None (the global one)."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STOP_GRACE)


def stop_grace(entry: EngineVersion | None, default: float) -> float:
    """The grace period of an engine running ``entry``'s image (the global one when it has none)."""
    return float(entry.stop_grace) if entry is not None and entry.stop_grace is not None else default


def refuse_run(entry: EngineVersion | None, image_ref: str) -> str | None:
    """Why a container of ``image_ref`` may not be started at all under the registry policy."""
    if entry is None:
        return f"image_ref {image_ref!r} is not a registered engine version"
    if entry.status is VersionStatus.DISABLED:
        return f"engine version {entry.version} ({image_ref}) is disabled"
    return None
