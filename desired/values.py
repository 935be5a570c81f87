"""The values the store takes and returns, apart from the records themselves (desired/model.py):
operations of the log, outbox entries, submissions' outcomes, crashes, the database's identity.
Pure: the store that reads and writes them is desired/db/, its consumers' ports desired/ports.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from desired.jobs import Decision
from desired.model import ErrorCode, JobKind, OpSource, OpStatus, Outcome


@dataclass(frozen=True, kw_only=True)
class Operation:
    id: int
    game_id: str
    op: JobKind
    source: OpSource
    status: OpStatus
    generation: int
    stream: str | None
    entry_id: str | None
    params: dict[str, Any]
    error_code: str | None
    error_message: str | None
    created_at: datetime
    finished_at: datetime | None
    actor: str | None = None  # who asked: "token:NAME" (REST), "stream:STREAM" (a job entry), None (rtmanager)
    requested_by: str | None = None  # on whose behalf, as the entry or request said


class Claimed(NamedTuple):
    """A queued operation a reconcile claimed (marked running): which, when it was accepted, what it asks."""
    id: int
    accepted_at: datetime
    op: JobKind


def decided(op: Operation, outcome: Outcome, code: ErrorCode | None, message: str, container_id: str,
            endpoint: str) -> tuple[Outcome, ErrorCode | None, str, str, str]:
    """The answer of a pending operation whose failure was already decided (``fail_generation``,
    recorded until its engine is stopped): that failure, whatever converged; an answer given before
    the engine was stopped (overdue, superseded) says so. A success that went ahead while the engine
    still generated a turn (its wait ran out) says that."""
    note = op.params.get("disruption_note") if isinstance(op.params, dict) else None
    if note and outcome is Outcome.SUCCESS and not message:
        message = str(note)
    if op.error_code is None or op.status.is_final:
        return outcome, code, message, container_id, endpoint
    decided_message = op.error_message or ""
    if outcome is Outcome.FAILURE and message and message != decided_message:
        decided_message = f"{decided_message}; answered although the engine was not stopped: {message}"
    return Outcome.FAILURE, ErrorCode(op.error_code), decided_message, "", ""


@dataclass(frozen=True, kw_only=True)
class Rejection:
    """An entry that could not be parsed: a failed operation and its result, with the parser's code."""

    kind: JobKind
    game_id: str
    stream: str
    entry_id: str
    code: ErrorCode
    message: str
    source: OpSource = OpSource.LOBBY


@dataclass(frozen=True, kw_only=True)
class SubmitOutcome:
    operation_id: int  # 0 when nothing was recorded (a scheduled turn no longer due: "skip")
    decision: Decision | None  # None when the entry had been submitted before
    duplicate: bool = False


@dataclass(frozen=True, kw_only=True)
class PendingResult:
    """One outbox entry: a job result, or a snapshot (``kind``); ``result_id`` is the snapshot_id then."""

    seq: int
    result_id: str
    game_id: str
    fields: dict[str, str]
    kind: str = "result"
    written_at: datetime | None = None
    accepted_at: datetime | None = None  # when the job was accepted (None for results without an operation)


@dataclass(frozen=True, kw_only=True)
class ReconcilerNote:
    """An operation-log row for something the controller did on its own (no result is published)."""

    op: JobKind
    params: dict[str, Any]
    error_code: ErrorCode | None = None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Finish:
    """How to end the pending operations of a generation once it converged (or failed)."""

    generation: int
    outcome: Outcome
    error_code: ErrorCode | None = None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Crash:
    """What is known about one crash of an engine."""

    code: ErrorCode
    detail: str
    container_id: str | None
    exit_code: int | None = None
    oom_killed: bool = False
    log_tail: str = ""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Which instance the database belongs to, and the uid that labels every unit created under it."""

    instance: str
    uid: str
    claimed_at: datetime


class VersionInUse(RuntimeError):
    """An engine version that a game (not removed) still runs or wants cannot be deleted."""


class WrongInstance(RuntimeError):
    """The database belongs to another RTMANAGER_INSTANCE."""


KEEP = object()  # an argument left as it is (None means something)


# The operation log's entries that concern no one game (game_id null): changes of the engine-version
# registry, drains and rollouts, each with who asked (migration 0020 lists the same).
FLEET_OPS = ("version_create", "version_update", "version_delete", "drain_create", "drain_undrain",
             "rollout_create", "rollout_pause", "rollout_resume", "rollout_abort")
