"""Rolling engine-version rollouts: the pure half (no I/O), tested as tables.

A rollout moves a set of games to a target engine version, ``max_parallel`` at a time, each by a
``patch`` job through admission (so it waits for the turn boundary and copies the state directory
exactly as a single patch does). It is desired state: a ``rollouts`` row and one ``rollout_games``
row per game (desired/db/rollouts.py), read again by the leader's loop (controller/rollouts.py) at
every tick, so a kill -9 or a failover resumes it from the rows and the runtime records.

The decisions, each a function here:

* ``parse_request``: the body of ``POST /api/v1/rollouts`` (and the CLI's arguments), checked;
* ``skip_reason``: a game that will not run again on its own (stopped, finished, removed, given up
  after a crash loop, of another repository, moved to another image by another job since the
  rollout began) is skipped with a reason, never patched and never counted as failed;
* ``not_ready``: a game that runs but is briefly not up (restarting after a crash, unreachable)
  stays waiting: the rollout moves on to the others and comes back to it;
* ``step_outcome``: the row's state a job submitted for the rollout records, from admission's
  decision (a refused patch fails, a patch already done is done);
* ``follow``: what became of a game whose patch is in flight: still going, done, skipped
  (superseded or moved by another job), or, for a canary, held healthy long enough; a failed patch
  (or a canary patched back) stays in flight until its rollback has converged, then reads
  ``rolled_back``, or ``failed`` when the game ended stopped;
* ``plan``: which games start next (canaries first, then the rest once the canaries have held),
  whether the failure budget is spent or a canary failed (the rollout pauses itself), and whether
  the rollout is complete.

Game states: ``waiting`` -> ``in_progress`` -> ``done`` | ``failed`` | ``rolled_back`` |
``skipped`` (a waiting game may be skipped at once). Rollout states: ``running`` <-> ``paused``,
either -> ``aborted``; ``running`` -> ``completed``. A paused or aborted rollout starts no new
patch; the patches in flight finish and are recorded.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from desired.jobs import DecisionAction
from desired.model import GAME_ID_PATTERN, DesiredStatus, ErrorCode, JobKind, OpStatus, RuntimeRecord, Status
from desired.versions import VERSION_PATTERN, EngineVersion, VersionStatus

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
    from_image_ref: str | None = None  # the game's image when the rollout began (what a rollback returns to)
    operation_id: int | None = None
    back_operation_id: int | None = None  # a canary's patch back to from_image_ref, after it failed its hold
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
    # A patch back to the game's own previous image (the row's from_image_ref): the version policy
    # treats it as a run of an image the game ran, not a new start (a deprecated source may be it).
    back: bool = False


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
    failing: bool = False  # in flight, its patch failed (its rollback under way): counted by ``plan`` already


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
    if not isinstance(on_failure, str) or on_failure not in {o.value for o in OnFailure}:
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


def skip_reason(record: RuntimeRecord | None, target_image: str, from_image: str | None = None) -> str | None:
    """Why a game is left out for good when its turn comes (None: patch it, or wait: ``not_ready``).

    Only what will not change on its own skips a game: the game is not wanted running, is finished,
    runs another repository, or another job moved it off ``from_image`` (its image when the rollout
    began) to something else than the target: the rollout never undoes a patch it did not make."""
    if record is None:
        return "no runtime record"
    if record.desired_status is not DesiredStatus.RUNNING or record.status is Status.REMOVED:
        if record.last_error_message and record.last_error_message.startswith("crash loop"):
            return "not running: given up after a crash loop"
        return f"not running (desired {record.desired_status.value}, status {record.status.value})"
    if record.status is Status.FINISHED:
        return "the game is finished"
    image = record.desired_image_ref or record.current_image_ref or ""
    if _repository(image) != _repository(target_image):
        return f"runs {image}, of another repository than {target_image} (a patch keeps the repository)"
    if from_image is not None and image not in (from_image, target_image):
        return f"moved by another job: wants {image}, not {from_image} as when the rollout began"
    return None


def not_ready(record: RuntimeRecord) -> str | None:
    """Why a game that is wanted running cannot be patched right now (None: it can). Such a game is
    not skipped: it stays waiting, the rollout starts the next ones and tries it again later."""
    if record.status not in PATCHABLE:
        return f"waiting: not up now (status {record.status.value}); tried again later"
    return None


def step_outcome(step: RolloutStep, action: DecisionAction, error_code: ErrorCode | None,
                 message: str) -> tuple[GameState, str]:
    """The state and reason a rollout's job records on its game's row, given admission's decision.

    A first patch that is refused fails (its game is not moved); one that finds the game already on
    the target is done. A patch back that is refused leaves the canary where it is: failed, never
    the success state; one that finds the game already back is rolled back."""
    why = f"{(error_code or ErrorCode.INVALID_REQUEST).value}: {message}"
    if step.expect is GameState.WAITING:
        if action is DecisionAction.REPLAY:
            return GameState.DONE, "already on the target version"
        if action is DecisionAction.REJECT:
            return GameState.FAILED, why
    elif step.back:
        base = step.reason.split(BACK, 1)[0]
        if action is DecisionAction.REJECT:
            return GameState.FAILED, f"{base}; the patch back was refused ({why})"
        if action is DecisionAction.REPLAY:
            return GameState.ROLLED_BACK, f"{base}; back on its previous image"
    return step.state, step.reason


BACK = "; patching back to "  # the reason of a canary being patched back, up to the image
# The error codes of a failure that is the engine's own (a canary's evidence), not Docker's, the disk's or a job's.
ENGINE_EVIDENCE = frozenset({ErrorCode.ENGINE_UNHEALTHY, ErrorCode.CONTAINER_START_FAILED,
                             ErrorCode.ENGINE_UNREACHABLE, ErrorCode.GENERATION_FAILED})


def follow(rollout: Rollout, game: RolloutGame, op: OpView | None, record: RuntimeRecord | None,
           now: datetime, back: OpView | None = None) -> Verdict:
    """What became of ``game``, whose patch (operation ``op``) is in flight or done; ``back`` is the
    operation of its patch back (a canary that failed its hold), when it has one.

    An operation that is no longer recorded (retention) is read from the runtime record instead."""
    keep = Verdict(state=GameState.IN_PROGRESS, reason=game.reason)
    if game.back_operation_id is not None:
        if back is not None and not back.status.is_final:
            return keep
        return _settle(game, record, game.reason.split(BACK, 1)[0], back=True) or keep
    if op is None and game.operation_id is not None:
        op = _vanished(rollout, game, record)
    if op is None or not op.status.is_final:
        return keep
    target = rollout.target_image_ref
    if op.status is OpStatus.SUCCEEDED:
        if record is None:
            return Verdict(state=GameState.SKIPPED, reason="its runtime record is gone")
        if not game.canary or rollout.canary_hold <= 0:
            if (record.desired_image_ref or record.current_image_ref) != target:
                return Verdict(state=GameState.SKIPPED, reason="moved off the target by another job after its patch")
            return Verdict(state=GameState.DONE, reason=f"on {rollout.target_version}")
        return _hold(rollout, game, record, op.finished_at or game.started_at or now, now)
    code = op.error_code.value if op.error_code else "failed"
    why = f"{code}: {op.error_message}" if op.error_message else code
    if op.error_code is ErrorCode.SUPERSEDED:
        return Verdict(state=GameState.SKIPPED, reason=f"another job replaced the patch ({why})")
    if (rollout.on_failure is OnFailure.STOP and record is not None
            and record.desired_status is DesiredStatus.RUNNING and game.from_image_ref is not None
            and record.desired_image_ref == game.from_image_ref):
        # on_failure stop: the rollback the patch began is stopped at once
        return Verdict(state=GameState.FAILED, reason=f"{why}; stopped (on_failure stop)", then=JobKind.STOP)
    return _settle(game, record, why, back=False) or Verdict(
        state=GameState.IN_PROGRESS, reason=f"{why}; rolling back to {game.from_image_ref}", failing=True)


def _hold(rollout: Rollout, game: RolloutGame, record: RuntimeRecord, since: datetime, now: datetime) -> Verdict:
    """A canary whose patch succeeded at ``since``: only the engine's own evidence fails it (a crash
    since then, unreachable, a failed generation); what other jobs do to the game is not its fault."""
    crashed = record.last_crash_at is not None and record.last_crash_at >= since
    if crashed or record.status in (Status.ENGINE_UNREACHABLE, Status.GENERATION_FAILED):
        why = "crashed" if crashed else f"status {record.status.value}"
        return _canary_failed(rollout, game, record, f"canary unhealthy within its hold ({why})")
    if record.desired_image_ref != rollout.target_image_ref:
        return Verdict(state=GameState.SKIPPED, reason="moved off the target by another job during its canary hold")
    if (record.desired_status is DesiredStatus.STOPPED and record.stop_reason is None
            and record.last_error_code in ENGINE_EVIDENCE and record.last_op_at >= since):
        # Stopped by a failure, not by a job (a stop always gives its reason) nor by the node-loss policy or an
        # outage (their code, docker_unavailable): the target's engine did not come back from a restart or a
        # move during the hold.
        return _canary_failed(rollout, game, record, f"canary's engine failed within its hold "
                                                     f"({record.last_error_code.value}: "
                                                     f"{record.last_error_message or 'no message'})")
    if record.desired_status is not DesiredStatus.RUNNING:
        why = (f"another job ({record.stop_reason.value})" if record.stop_reason is not None
               else f"rtmanager ({record.last_error_message or 'no message'})")
        return Verdict(state=GameState.SKIPPED, reason=f"stopped during its canary hold by {why}, not by its "
                                                       f"engine (desired {record.desired_status.value}); not counted "
                                                       "as a canary")
    if record.status is Status.FINISHED:
        return Verdict(state=GameState.SKIPPED, reason="the game finished during its canary hold; not counted as "
                                                       "a canary")
    if record.status not in HEALTHY:  # a restart another job asked for: wait for the engine to be up again
        return Verdict(state=GameState.IN_PROGRESS, reason=f"canary: waiting for the game to be up again "
                                                           f"(status {record.status.value})")
    if (now - since).total_seconds() >= rollout.canary_hold:
        return Verdict(state=GameState.DONE, reason=f"on {rollout.target_version}; canary held healthy "
                                                    f"{rollout.canary_hold:g}s")
    until = since + timedelta(seconds=rollout.canary_hold)
    return Verdict(state=GameState.IN_PROGRESS, reason=f"canary: patched; must stay healthy until "
                                                       f"{until.isoformat(timespec='seconds')}")


def _canary_failed(rollout: Rollout, game: RolloutGame, record: RuntimeRecord, why: str) -> Verdict:
    if record.desired_status is not DesiredStatus.RUNNING:  # given up after a crash loop: already stopped
        return Verdict(state=GameState.FAILED, reason=f"{why}; the game is stopped")
    if rollout.on_failure is OnFailure.ROLLBACK and game.from_image_ref:
        return Verdict(state=GameState.IN_PROGRESS, reason=f"{why}{BACK}{game.from_image_ref}",
                       then=JobKind.PATCH, image_ref=game.from_image_ref)
    return Verdict(state=GameState.FAILED, reason=f"{why}; stopped (on_failure stop)", then=JobKind.STOP)


def _settle(game: RolloutGame, record: RuntimeRecord | None, why: str, *, back: bool) -> Verdict | None:
    """Where a failed patch (or a canary's patch back) left the game, once its last generation has
    converged (None: not yet, the game stays in flight and holds its slot): on its old image again
    (``rolled_back``), or not (``failed``: stopped, or moved elsewhere)."""
    if record is None:
        return Verdict(state=GameState.FAILED, reason=f"{why}; its runtime record is gone")
    if not record.converged:
        return None
    home = game.from_image_ref
    if record.desired_status is DesiredStatus.RUNNING and home is not None and record.desired_image_ref == home:
        return Verdict(state=GameState.ROLLED_BACK, reason=f"{why}; patched back to {home}" if back else why)
    if record.desired_status is not DesiredStatus.RUNNING:
        return Verdict(state=GameState.FAILED, reason=f"{why}; {'patch back' if back else 'rollback'} failed; "
                                                      f"{record.desired_status.value}")
    return Verdict(state=GameState.FAILED, reason=f"{why}; now on {record.desired_image_ref}")


def _vanished(rollout: Rollout, game: RolloutGame, record: RuntimeRecord | None) -> OpView | None:
    """The patch's operation row is gone (operation retention shorter than the rollout): what the
    runtime record says of it (None: not converged yet, keep waiting)."""
    if record is None:
        return OpView(status=OpStatus.FAILED, error_code=None, error_message="its operation is no longer recorded",
                      finished_at=None)
    if not record.converged:
        return None
    if record.desired_status is DesiredStatus.RUNNING and record.desired_image_ref == rollout.target_image_ref:
        return OpView(status=OpStatus.SUCCEEDED, error_code=None, error_message="",
                      finished_at=record.started_at or game.started_at)
    return OpView(status=OpStatus.FAILED, error_code=None, error_message="its operation is no longer recorded",
                  finished_at=None)


def failures(rollout: Rollout, games: Sequence[RolloutGame]) -> list[RolloutGame]:
    """Failed and rolled-back games that count against the budget: those since the last resume."""
    return [g for g in games if g.state.is_failure
            and (rollout.resumed_at is None or g.finished_at is None or g.finished_at > rollout.resumed_at)]


def target_refusal(rollout: Rollout, entry: EngineVersion | None, *, registry: bool) -> str | None:
    """Why the rollout may not patch another game onto its target now, from what the version registry says of
    the target's image (``entry``; None: no entry has it), or None. Read before each step that starts
    patches: an operator who disables the version (the runbook's way to stop a bad one), or deletes it and
    registers the name again with another image, stops the rollout, not only new starts."""
    name = f"target version {rollout.target_version} ({rollout.target_image_ref})"
    if entry is None:
        return f"{name}: its image is no longer registered"
    if entry.version != rollout.target_version:
        return f"{name}: the image is registered as version {entry.version} now"
    if entry.status is VersionStatus.DISABLED:
        return f"{name} was disabled in the version registry"
    if registry and entry.status is not VersionStatus.ACTIVE:
        return f"{name} is {entry.status.value} (RTMANAGER_VERSION_POLICY=registry starts only active versions)"
    return None


def plan(rollout: Rollout, games: Sequence[RolloutGame], not_ready: frozenset[str] = frozenset(),
         failing: frozenset[str] = frozenset()) -> Plan:
    """What a running rollout does next; ``not_ready``: waiting games to pass over this time; ``failing``:
    games in flight whose patch failed (``Verdict.failing``), still rolling back: no new patch starts when
    they would spend the failure budget (the pause comes once their rollback is over and they are counted).

    A canary counts only while in flight or once it held (``done``): one skipped (another job took
    the game, it finished) or one that failed before a resume is replaced by the next waiting game,
    so the rest never proceed without ``canary`` games that held."""
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
    if len(counted) + sum(g.state is GameState.IN_PROGRESS and g.game_id in failing for g in games) \
            >= rollout.failure_budget:
        return Plan()
    free = rollout.max_parallel - in_flight
    ready = [g for g in waiting if g.game_id not in not_ready]
    if free <= 0 or not ready:
        return Plan()
    canaries = [g for g in games if g.canary and g.state in (GameState.IN_PROGRESS, GameState.DONE)]
    if len(canaries) < rollout.canary:
        n = min(free, rollout.canary - len(canaries))
        return Plan(start=[(g.game_id, True) for g in ready[:n]])
    if any(g.state is GameState.IN_PROGRESS for g in canaries):
        return Plan()  # the rest wait for every canary to hold
    return Plan(start=[(g.game_id, False) for g in ready[:free]])


def _json_value(v: object) -> object:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def rollout_json(rollout: Rollout, games_by_state: dict[str, int],
                 games: Sequence[RolloutGame] | None = None) -> dict[str, object]:
    """A rollout as the REST API answers it (and the CLI prints it): its fields, its games per state, and
    its games when given."""
    body: dict[str, object] = {k: _json_value(v) for k, v in dataclasses.asdict(rollout).items()}
    body["games_by_state"] = games_by_state
    if games is not None:
        body["games"] = [{k: _json_value(v) for k, v in dataclasses.asdict(g).items() if k != "rollout_id"}
                         for g in games]
    return body


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
