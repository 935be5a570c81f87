"""Rolling engine-version rollouts: the pure half (no I/O), tested as tables.

A rollout moves a set of games to a target engine version, ``max_parallel`` at a time, each by a
``patch`` job through admission (so it waits for the turn boundary and copies the state directory
exactly as a single patch does). It is desired state: a ``rollouts`` row and one ``rollout_games``
row per game (desired/db/rollouts.py), read again by the leader's loop (controller/rollouts.py) at
every tick, so a kill -9 or a failover resumes it from the rows and the runtime records.

The decisions, each a function here:

* ``parse_request``: the body of ``POST /api/v1/rollouts`` (and the CLI's arguments), checked;
* ``skip_reason``: a game that does not run (stopped, finished, removed, given up after a crash
  loop, being restarted) is skipped with a reason, never patched and never counted as failed;
* ``follow``: what became of a game whose patch is in flight: still going, done, failed, rolled
  back, skipped (superseded by another job), or, for a canary, held healthy long enough;
* ``plan``: which games start next (canaries first, then the rest once every canary is settled and
  held), whether the failure budget is spent or a canary failed (the rollout pauses itself), and
  whether the rollout is complete.

Game states: ``waiting`` -> ``in_progress`` -> ``done`` | ``failed`` | ``rolled_back`` |
``skipped`` (a waiting game may be skipped at once). Rollout states: ``running`` <-> ``paused``,
either -> ``aborted``; ``running`` -> ``completed``. A paused or aborted rollout starts no new
patch; the patches in flight finish and are recorded.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from desired.model import GAME_ID_PATTERN, DesiredStatus, ErrorCode, JobKind, OpStatus, RuntimeRecord, Status
from desired.versions import VERSION_PATTERN

MAX_PARALLEL = 100
MAX_GAMES = 10000
MAX_HOLD = 86400.0
DEFAULTS = {"max_parallel": 1, "canary": 0, "canary_hold": 60.0, "failure_budget": 1, "on_failure": "rollback"}


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"

    @property
    def is_terminal(self) -> bool:
        return self in (RolloutState.COMPLETED, RolloutState.ABORTED)


class GameState(enum.StrEnum):
    WAITING = "waiting"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"

    @property
    def is_final(self) -> bool:
        return self not in (GameState.WAITING, GameState.IN_PROGRESS)

    @property
    def is_failure(self) -> bool:
        return self in (GameState.FAILED, GameState.ROLLED_BACK)


class OnFailure(enum.StrEnum):
    ROLLBACK = "rollback"  # the patch's own rollback puts the game back on its old image
    STOP = "stop"          # the game is left stopped


class Action(enum.StrEnum):
    """What an operator may do to a rollout (``POST /api/v1/rollouts/{id}/{action}``)."""
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


class InvalidRollout(ValueError):
    """A request that cannot make a rollout (HTTP 400, with this message)."""


class RolloutConflict(RuntimeError):
    """A rollout that would touch a game another active rollout holds, or an action its state refuses
    (HTTP 409, with this message)."""


# Statuses in which a game's engine runs and may be patched (a generating engine is patched at the
# turn boundary: the patch waits for it).
PATCHABLE = frozenset({Status.RUNNING, Status.GENERATION_IN_PROGRESS, Status.GENERATION_FAILED})
# Statuses in which a canary counts as healthy during its hold.
HEALTHY = frozenset({Status.RUNNING, Status.GENERATION_IN_PROGRESS})


@dataclass(frozen=True, kw_only=True)
class RolloutRequest:
    target_version: str
    source_version: str | None = None
    game_ids: tuple[str, ...] | None = None
    max_parallel: int = 1
    canary: int = 0
    canary_hold: float = 60.0
    failure_budget: int = 1
    on_failure: OnFailure = OnFailure.ROLLBACK
    force: bool = False  # each patch skips the turn-boundary wait (an operator's force)


@dataclass(frozen=True, kw_only=True)
class Rollout:
    id: int
    target_version: str
    target_image_ref: str
    source_version: str | None
    state: RolloutState
    max_parallel: int
    canary: int
    canary_hold: float
    failure_budget: int
    on_failure: OnFailure
    force: bool
    state_reason: str
    created_at: datetime
    updated_at: datetime
    resumed_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class RolloutGame:
    rollout_id: int
    game_id: str
    position: int
    state: GameState
    canary: bool = False
    from_image_ref: str | None = None
    operation_id: int | None = None
    reason: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class RolloutStep:
    """What a job submitted for a rollout records on its game's row, in the job's own transaction
    (desired/db/rollouts.py ``record_step``): the row must still be in ``expect`` (and, for a first
    patch, the rollout still running), or the job is not recorded at all."""
    rollout_id: int
    expect: GameState
    state: GameState
    reason: str
    canary: bool = False


@dataclass(frozen=True, kw_only=True)
class OpView:
    """The patch's operation as the loop needs it."""
    status: OpStatus
    error_code: ErrorCode | None
    error_message: str
    finished_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """A game's new state; ``then`` a job to submit with it (in the same transaction): a stop
    (``on_failure: stop``), or a patch back to ``image_ref`` (a canary that failed its hold)."""
    state: GameState
    reason: str
    then: JobKind | None = None
    image_ref: str | None = None


@dataclass(frozen=True, kw_only=True)
class Plan:
    pause: str | None = None            # the rollout pauses itself, for this reason
    complete: bool = False
    start: list[tuple[str, bool]] = field(default_factory=list)  # (game_id, as a canary)


def _int(body: Mapping[str, object], name: str, lo: int, hi: int) -> int:
    value = body.get(name, DEFAULTS.get(name))
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRollout(f"field {name} must be a whole number from {lo} to {hi}")
    return value


def parse_request(body: object) -> RolloutRequest:
    """A rollout request from a JSON object; InvalidRollout names the bad field."""
    if not isinstance(body, dict):
        raise InvalidRollout("the body must be a JSON object")
    allowed = {"target_version", "source_version", "game_ids", "max_parallel", "canary", "canary_hold",
               "failure_budget", "on_failure", "force"}
    for name in body:
        if name not in allowed:
            raise InvalidRollout(f"field {name} is not a field of a rollout")
    target = body.get("target_version")
    if not isinstance(target, str) or not VERSION_PATTERN.fullmatch(target):
        raise InvalidRollout("field target_version must be 1-64 characters of A-Z a-z 0-9 . _ -")
    source = body.get("source_version")
    games = body.get("game_ids")
    if (source is None) == (games is None):
        raise InvalidRollout("give exactly one of source_version (every live game on it) and game_ids")
    if source is not None and (not isinstance(source, str) or not VERSION_PATTERN.fullmatch(source)):
        raise InvalidRollout("field source_version must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if source == target:
        raise InvalidRollout("field source_version must differ from target_version")
    ids: tuple[str, ...] | None = None
    if games is not None:
        if not isinstance(games, list) or not games or len(games) > MAX_GAMES:
            raise InvalidRollout(f"field game_ids must be a list of 1 to {MAX_GAMES} game ids")
        for g in games:
            if not isinstance(g, str) or not GAME_ID_PATTERN.fullmatch(g):
                raise InvalidRollout("field game_ids: each must match ^[a-z0-9](?:[a-z0-9-]{0,49}[a-z0-9])?$")
        if len(set(games)) != len(games):
            raise InvalidRollout("field game_ids names a game twice")
        ids = tuple(games)
    hold = body.get("canary_hold", DEFAULTS["canary_hold"])
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold <= MAX_HOLD:
        raise InvalidRollout(f"field canary_hold must be seconds from 0 to {MAX_HOLD:g}")
    on_failure = body.get("on_failure", DEFAULTS["on_failure"])
    if on_failure not in {o.value for o in OnFailure}:
        raise InvalidRollout("field on_failure must be rollback or stop")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise InvalidRollout("field force must be true or false")
    return RolloutRequest(
        target_version=target, source_version=source, game_ids=ids,
        max_parallel=_int(body, "max_parallel", 1, MAX_PARALLEL), canary=_int(body, "canary", 0, MAX_GAMES),
        canary_hold=float(hold), failure_budget=_int(body, "failure_budget", 1, MAX_GAMES),
        on_failure=OnFailure(str(on_failure)), force=force)


def _repository(image_ref: str) -> str:
    ref = image_ref.split("@", 1)[0]
    slash, colon = ref.rfind("/"), ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def skip_reason(record: RuntimeRecord | None, target_image: str) -> str | None:
    """Why a game is left out when its turn comes (None: patch it)."""
    if record is None:
        return "no runtime record"
    if record.desired_status is not DesiredStatus.RUNNING or record.status is Status.REMOVED:
        if record.last_error_message and record.last_error_message.startswith("crash loop"):
            return "not running: given up after a crash loop"
        return f"not running (desired {record.desired_status.value}, status {record.status.value})"
    if record.status is Status.FINISHED:
        return "the game is finished"
    if record.status not in PATCHABLE:
        return f"not running (status {record.status.value})"
    image = record.desired_image_ref or record.current_image_ref or ""
    if _repository(image) != _repository(target_image):
        return f"runs {image}, of another repository than {target_image} (a patch keeps the repository)"
    return None


def follow(rollout: Rollout, game: RolloutGame, op: OpView | None, record: RuntimeRecord | None,
           now: datetime) -> Verdict:
    """What became of ``game``, whose patch (operation ``op``) is in flight or done."""
    keep = Verdict(state=GameState.IN_PROGRESS, reason=game.reason)
    if op is None or not op.status.is_final:
        return keep
    target = rollout.target_image_ref
    if op.status is OpStatus.SUCCEEDED:
        if record is None or (record.desired_image_ref or record.current_image_ref) != target:
            return Verdict(state=GameState.SKIPPED, reason="moved off the target by another job after its patch")
        if not game.canary or rollout.canary_hold <= 0:
            return Verdict(state=GameState.DONE, reason=f"on {rollout.target_version}")
        since = op.finished_at or now
        crashed = record.last_crash_at is not None and record.last_crash_at >= since
        if record.status not in HEALTHY or crashed or record.desired_status is not DesiredStatus.RUNNING:
            why = "crashed" if crashed else f"status {record.status.value}"
            return _canary_failed(rollout, game, f"canary unhealthy within its hold ({why})")
        held = (now - since).total_seconds()
        if held >= rollout.canary_hold:
            return Verdict(state=GameState.DONE, reason=f"on {rollout.target_version}; canary held healthy "
                                                        f"{rollout.canary_hold:g}s")
        until = since + timedelta(seconds=rollout.canary_hold)
        return Verdict(state=GameState.IN_PROGRESS, reason=f"canary: patched; must stay healthy until "
                                                           f"{until.isoformat(timespec='seconds')}")
    code = op.error_code.value if op.error_code else "failed"
    why = f"{code}: {op.error_message}" if op.error_message else code
    if op.error_code is ErrorCode.SUPERSEDED:
        return Verdict(state=GameState.SKIPPED, reason=f"another job replaced the patch ({why})")
    rolled_back = (record is not None and record.desired_status is DesiredStatus.RUNNING
                   and game.from_image_ref is not None and record.desired_image_ref == game.from_image_ref)
    if rolled_back and rollout.on_failure is OnFailure.ROLLBACK:
        return Verdict(state=GameState.ROLLED_BACK, reason=why)
    if rolled_back:  # on_failure stop: the rollback the patch began is stopped
        return Verdict(state=GameState.FAILED, reason=f"{why}; stopped (on_failure stop)", then=JobKind.STOP)
    return Verdict(state=GameState.FAILED, reason=why)


def _canary_failed(rollout: Rollout, game: RolloutGame, why: str) -> Verdict:
    if rollout.on_failure is OnFailure.ROLLBACK and game.from_image_ref:
        return Verdict(state=GameState.ROLLED_BACK, reason=f"{why}; patched back to {game.from_image_ref}",
                       then=JobKind.PATCH, image_ref=game.from_image_ref)
    return Verdict(state=GameState.FAILED, reason=f"{why}; stopped (on_failure stop)", then=JobKind.STOP)


def failures(rollout: Rollout, games: Sequence[RolloutGame]) -> list[RolloutGame]:
    """Failed and rolled-back games that count against the budget: those since the last resume."""
    return [g for g in games if g.state.is_failure
            and (rollout.resumed_at is None or g.finished_at is None or g.finished_at > rollout.resumed_at)]


def plan(rollout: Rollout, games: Sequence[RolloutGame]) -> Plan:
    """What a running rollout does next."""
    if rollout.state is not RolloutState.RUNNING:
        return Plan()
    counted = failures(rollout, games)
    failed_canary = next((g for g in counted if g.canary), None)
    if failed_canary is not None:
        return Plan(pause=f"canary {failed_canary.game_id} {failed_canary.state.value}: {failed_canary.reason}")
    if len(counted) >= rollout.failure_budget:
        return Plan(pause=f"failure budget spent: {len(counted)} of {rollout.failure_budget} games failed or "
                          "rolled back")
    waiting = sorted((g for g in games if g.state is GameState.WAITING), key=lambda g: g.position)
    in_flight = sum(g.state is GameState.IN_PROGRESS for g in games)
    if not waiting and not in_flight:
        return Plan(complete=True)
    free = rollout.max_parallel - in_flight
    if free <= 0 or not waiting:
        return Plan()
    canaries = [g for g in games if g.canary]
    if len(canaries) < rollout.canary:
        n = min(free, rollout.canary - len(canaries))
        return Plan(start=[(g.game_id, True) for g in waiting[:n]])
    if any(not g.state.is_final for g in canaries):
        return Plan()  # the rest wait for every canary to hold
    return Plan(start=[(g.game_id, False) for g in waiting[:free]])


def counts(games: Sequence[RolloutGame]) -> dict[str, int]:
    """Games per state, every state present."""
    out = {s.value: 0 for s in GameState}
    for g in games:
        out[g.state.value] += 1
    return out


def allowed(state: RolloutState, action: Action) -> RolloutState | None:
    """The state ``action`` leads to from ``state`` (the same state: nothing to do), or None (refused)."""
    if action is Action.PAUSE:
        return {RolloutState.RUNNING: RolloutState.PAUSED, RolloutState.PAUSED: RolloutState.PAUSED}.get(state)
    if action is Action.RESUME:
        return {RolloutState.PAUSED: RolloutState.RUNNING, RolloutState.RUNNING: RolloutState.RUNNING}.get(state)
    if state.is_terminal:
        return RolloutState.ABORTED if state is RolloutState.ABORTED else None
    return RolloutState.ABORTED
