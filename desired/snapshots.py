"""Runtime snapshots to Lobby: when a game's status, turn or paused flag changes, one entry on the
snapshot stream, written in the transaction of the change (the outbox) and published in commit
order. Pure: the store calls these with the record before and after a change.

Lobby hears about everything that changes a game, not only what answers a job: a crash, a
crash-loop give-up, an engine that stops answering and comes back, a game that ends. Every
field is always present (the empty string where it does not apply); ``revision`` grows by one
per snapshot of a game, so a consumer keeps the highest revision and drops the rest, and a
republished snapshot keeps its ``snapshot_id`` and ``revision``.
"""

from __future__ import annotations

from datetime import datetime

from desired.model import RuntimeRecord, Status

REASONS = ("started", "stopped", "crashed", "crash_loop", "engine_unreachable", "recovered", "generation_started",
           "turn_generated", "generation_failed", "finished", "paused", "resumed", "removed", "resync", "node_lost")
_FAILURES = ("crashed", "crash_loop", "engine_unreachable", "generation_failed")

FIELDS = ("snapshot_id", "game_id", "revision", "status", "previous_status", "reason", "desired_status",
          "container_id", "engine_endpoint", "image_ref", "engine_version", "turn", "paused", "exit_code",
          "error_code", "error_message", "observed_at")


def reason_for(old: RuntimeRecord | None, new: RuntimeRecord, forced: str | None = None) -> str | None:
    """Why a snapshot is due, or None when nothing Lobby sees changed."""
    if forced is not None:
        return forced
    if old is None:
        return "started" if new.status is Status.STARTING else None
    if old.paused != new.paused:
        return "paused" if new.paused else "resumed"
    if old.status is new.status:
        if new.turn is not None and old.turn != new.turn:
            return "turn_generated"
        return None
    to, frm = new.status, old.status
    if to is Status.REMOVED:
        return "removed"
    if to is Status.STOPPED:
        return "stopped"
    if to is Status.FINISHED:
        return "finished"
    if to is Status.ENGINE_UNREACHABLE:
        return "engine_unreachable"
    if to is Status.NODE_LOST:
        return "node_lost"
    if to is Status.GENERATION_IN_PROGRESS:
        return "generation_started"
    if to is Status.GENERATION_FAILED:
        return "generation_failed"
    if to is Status.RUNNING:
        if frm in (Status.ENGINE_UNREACHABLE, Status.NODE_LOST):
            return "recovered"
        if frm in (Status.GENERATION_IN_PROGRESS, Status.GENERATION_FAILED):
            return "turn_generated" if new.turn != old.turn else "recovered"
        return "started"
    return "started"  # to starting: being started or replaced


def fields(new: RuntimeRecord, *, previous: Status | None, reason: str, snapshot_id: str,
           now: datetime) -> dict[str, str]:
    # A game stopped by rtmanager (a failed start, a crash loop, a disabled version) says why.
    failure = reason in _FAILURES or (reason == "stopped" and new.stop_reason is None)
    lost = reason == "node_lost"  # not a failure of the engine: why, without an error code
    return {
        "snapshot_id": snapshot_id,
        "game_id": new.game_id,
        "revision": str(new.snapshot_revision),
        "status": new.status.value,
        "previous_status": previous.value if previous is not None else "",
        "reason": reason,
        "desired_status": new.desired_status.value,
        "container_id": new.current_container_id or "",
        "engine_endpoint": new.engine_endpoint if new.status.is_up else "",
        "image_ref": new.current_image_ref or new.desired_image_ref or "",
        "engine_version": new.engine_version,
        "turn": "" if new.turn is None else str(new.turn),
        "paused": "1" if new.paused else "0",
        "exit_code": "" if reason not in ("crashed", "crash_loop") or new.last_exit_code is None
        else str(new.last_exit_code),
        "error_code": new.last_error_code.value if failure and new.last_error_code else "",
        "error_message": (new.last_error_message or "") if failure or lost else "",
        "observed_at": now.isoformat(),
    }
