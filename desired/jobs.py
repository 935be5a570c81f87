"""Jobs: parsing stream entries and deciding how a job changes desired state.

Both halves are pure. ``parse_job`` turns the raw fields of a stream entry (bytes,
possibly hostile) into a ``Job`` or raises ``InvalidJob`` with the error code and
a message naming the field. ``decide`` takes the current record (or ``None``)
and a job and says what the intake must write in one transaction:

* ``replay``  - the job asks for what already holds: answer ``success`` +
  ``replay_no_op`` at once, change nothing;
* ``join``    - the desired state already says this but has not converged yet:
  the job waits for the current generation, nothing is bumped;
* ``change``  - the desired state changes: ``generation`` is bumped; when what runs
  changes (status, image, a restart) every still-pending operation of an older
  generation is answered ``superseded`` (``replaces``), and a turn desired state asked for
  but the engine has not reached is no longer asked for: the jobs that wanted it are answered;
* ``reject``  - the job cannot apply to this game (``invalid_request``).
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from desired import transitions
from desired.drains import DrainStep, with_step
from desired.model import (
    CONTROL_OPS,
    GAME_ID_PATTERN,
    MAX_TURN,
    DesiredStatus,
    ErrorCode,
    JobKind,
    OpSource,
    RuntimeRecord,
    Status,
    StopReason,
    engine_endpoint,
)

if TYPE_CHECKING:
    from desired.rollouts import RolloutStep

MAX_IMAGE_REF = 255
MAX_FIELD = 1024
MAX_TURN_INTERVAL = 7 * 86400
SHOWN_BAD_GAME_ID = 64

# A Docker image reference: [host[:port]/]path[:tag][@sha256:digest].
IMAGE_REF_PATTERN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]{1,5})?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


class InvalidJob(ValueError):
    """A job entry that cannot be carried out; ``code`` goes into the result."""

    def __init__(self, code: ErrorCode, message: str, game_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.game_id = game_id


@dataclass(frozen=True, kw_only=True)
class Job:
    kind: JobKind
    game_id: str
    source: OpSource
    image_ref: str | None = None
    reason: StopReason | None = None
    turn_interval: int | None = None  # start jobs may set the turn clock
    force: bool = False  # an operator's (REST, CLI): the disruption does not wait for a turn generation
    stream: str = ""
    entry_id: str = ""
    rollout: RolloutStep | None = None  # a rollout's job: its game's row changes in the job's transaction
    drain: DrainStep | None = None  # a drain's job: tagged with it; its game's row changes in the job's transaction
    actor: str = ""  # who asked: "token:NAME" (REST) or "stream:STREAM" (the operation log's actor)
    requested_by: str = ""  # a job entry's (or REST body's) optional requested_by: on whose behalf
    # A REST job's Idempotency-Key: the same key from the same token is the same job (``request_digest``).
    idempotency_key: str = ""


MAX_REQUESTED_BY = 128
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:~+/=-]{1,128}")


class KeyReused(ValueError):
    """An Idempotency-Key its token already used for another request (another game, job or field)."""


def parse_idempotency_key(raw: str | None) -> str:
    """An Idempotency-Key header: 1-128 characters of letters, digits and ``._:~+/=-`` (a UUID, a base64
    token), bare or as a quoted string; "" when absent. ValueError when malformed."""
    if raw is None:
        return ""
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ValueError("the Idempotency-Key header must be 1-128 characters: letters, digits and ._:~+/=-")
    return key


def request_digest(job: Job) -> str:
    """What a job asks, as a digest: a job sent again under its Idempotency-Key must ask the same."""
    fields = [job.kind.value, job.game_id, job.image_ref or "", job.reason.value if job.reason else "",
              "" if job.turn_interval is None else str(job.turn_interval), "force" if job.force else "",
              job.requested_by]
    return hashlib.sha256("\x00".join(fields).encode()).hexdigest()[:32]


def actor_of(job: Job) -> str | None:
    """The operation log's actor of a job: its REST token, else its stream."""
    return job.actor or (f"stream:{job.stream}" if job.stream else None)


def image_repository(image_ref: str) -> str:
    """The repository part of a reference: without its tag and digest."""
    ref = image_ref.split("@", 1)[0]
    slash, colon = ref.rfind("/"), ref.rfind(":")
    return ref[:colon] if colon > slash else ref


_ANY_TAG = "\x00"  # no tag has this character: only a pattern that allows every tag matches it


class ImageAllowlist:
    """Comma-separated shell-style patterns (``galaxy/engine:*``) matched on the whole ref."""

    def __init__(self, patterns: str | list[str]) -> None:
        items = patterns.split(",") if isinstance(patterns, str) else patterns
        self.patterns = tuple(p.strip() for p in items if p.strip())

    def allows(self, image_ref: str) -> bool:
        """A pattern matches the whole reference. One with both a tag and a digest runs its digest, whatever
        the tag says (Docker looks the digest up in the repository): its tag proves nothing. So a pattern
        that matches it must also say something of the digest: name it (another digest in its place would
        not match), allow the digest on its own (``repo@sha256:...``), or allow it under any tag (match it
        with a tag no real tag can be)."""
        matching = [p for p in self.patterns if fnmatch.fnmatchcase(image_ref, p)]
        name, _, digest = image_ref.partition("@")
        repo = image_repository(image_ref)
        if not matching or not digest or repo == name:
            return bool(matching)
        algo, _, hexpart = digest.partition(":")
        other = f"{name}@{algo}:" + "".join("1" if c == "0" else "0" for c in hexpart)  # differs everywhere
        alone, any_tag = f"{repo}@{digest}", f"{repo}:{_ANY_TAG}@{digest}"
        return (any(not fnmatch.fnmatchcase(other, p) for p in matching)
                or any(fnmatch.fnmatchcase(alone, p) or fnmatch.fnmatchcase(any_tag, p) for p in self.patterns))


def validate_game_id(value: str) -> str:
    if not GAME_ID_PATTERN.fullmatch(value):
        raise InvalidJob(
            ErrorCode.INVALID_REQUEST,
            "game_id must match ^[a-z0-9](?:[a-z0-9-]{0,49}[a-z0-9])?$",
            game_id=shown_game_id(value),
        )
    return value


def validate_image_ref(value: str, allowlist: ImageAllowlist, game_id: str) -> str:
    if len(value) > MAX_IMAGE_REF or not IMAGE_REF_PATTERN.fullmatch(value):
        raise InvalidJob(ErrorCode.INVALID_REQUEST, "image_ref is not a valid image reference", game_id)
    if not allowlist.allows(value):
        raise InvalidJob(
            ErrorCode.IMAGE_REJECTED,
            f"image_ref {value!r} is not allowed by RTMANAGER_IMAGE_ALLOWLIST",
            game_id,
        )
    return value


def shown_game_id(raw: str) -> str:
    """A bad game_id as it may be echoed in a result: printable and short."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in raw)
    return cleaned[:SHOWN_BAD_GAME_ID]


def _text(fields: Mapping[bytes | str, bytes | str], name: str, game_id: str = "") -> str:
    raw = fields.get(name.encode(), fields.get(name))
    if raw is None:
        raise InvalidJob(ErrorCode.INVALID_REQUEST, f"field {name} is missing", game_id)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidJob(ErrorCode.INVALID_REQUEST, f"field {name} is not valid UTF-8", game_id) from None
    if raw == "":
        raise InvalidJob(ErrorCode.INVALID_REQUEST, f"field {name} is empty", game_id)
    if len(raw) > MAX_FIELD:
        raise InvalidJob(ErrorCode.INVALID_REQUEST, f"field {name} is longer than {MAX_FIELD} characters", game_id)
    return raw


def _raw_game_id(fields: Mapping[bytes | str, bytes | str]) -> str:
    raw = fields.get(b"game_id", fields.get("game_id"))
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return shown_game_id(raw or "")


def parse_job(
    kind: JobKind,
    fields: Mapping[bytes | str, bytes | str],
    allowlist: ImageAllowlist,
    *,
    source: OpSource = OpSource.LOBBY,
    stream: str = "",
    entry_id: str = "",
) -> Job:
    """Validate the fields of one job; unknown fields are ignored."""
    try:
        game_id = validate_game_id(_text(fields, "game_id"))
    except InvalidJob as exc:
        exc.game_id = exc.game_id or _raw_game_id(fields)
        raise
    image_ref = reason = turn_interval = None
    if kind in (JobKind.START, JobKind.PATCH):
        image_ref = validate_image_ref(_text(fields, "image_ref", game_id), allowlist, game_id)
    if kind is JobKind.START and _present(fields, "turn_interval"):
        turn_interval = parse_turn_interval(_text(fields, "turn_interval", game_id), game_id)
    elif kind is JobKind.STOP:
        raw = _text(fields, "reason", game_id)
        try:
            reason = StopReason(raw)
        except ValueError:
            allowed = ", ".join(r.value for r in StopReason)
            raise InvalidJob(
                ErrorCode.INVALID_REQUEST, f"field reason must be one of {allowed}", game_id
            ) from None
    return Job(kind=kind, game_id=game_id, source=source, image_ref=image_ref, reason=reason,
               turn_interval=turn_interval, stream=stream, entry_id=entry_id,
               requested_by=parse_requested_by(fields, game_id))


def parse_control(fields: Mapping[bytes | str, bytes | str], *, source: OpSource = OpSource.LOBBY,
                  stream: str = "", entry_id: str = "") -> Job:
    """An entry of the control stream: ``game_id`` and ``op`` (pause, resume, force_next_turn, reconcile)."""
    try:
        game_id = validate_game_id(_text(fields, "game_id"))
    except InvalidJob as exc:
        exc.game_id = exc.game_id or _raw_game_id(fields)
        raise
    raw = _text(fields, "op", game_id)
    ops = {k.value: k for k in CONTROL_OPS}
    if raw not in ops:
        raise InvalidJob(ErrorCode.INVALID_REQUEST, f"field op must be one of {', '.join(ops)}", game_id)
    return Job(kind=ops[raw], game_id=game_id, source=source, stream=stream, entry_id=entry_id,
               requested_by=parse_requested_by(fields, game_id))


def parse_requested_by(fields: Mapping[bytes | str, bytes | str], game_id: str) -> str:
    """The optional ``requested_by`` of an entry: who the sender acts for (Game Master, an admin service,
    a user id), 1-128 printable characters; it is written to the operation log, never trusted for access."""
    if not _present(fields, "requested_by"):
        return ""
    raw = _text(fields, "requested_by", game_id)
    if len(raw) > MAX_REQUESTED_BY or not raw.isprintable() or any("\ud800" <= ch <= "\udfff" for ch in raw):
        raise InvalidJob(ErrorCode.INVALID_REQUEST,
                         f"field requested_by must be 1-{MAX_REQUESTED_BY} printable characters", game_id)
    return raw


def parse_turn_interval(raw: object, game_id: str = "") -> int:
    """Seconds between scheduled turns: an integer from 0 (no schedule) to a week, written in ASCII digits
    only (``int()`` alone takes signs, spaces, underscores and other scripts' digits)."""
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw.lstrip("0")) <= 7:
        value = int(raw)  # leading zeros taken (len() first: int() of a long digit string is slow, then refused)
    if value is None or not 0 <= value <= MAX_TURN_INTERVAL:
        raise InvalidJob(ErrorCode.INVALID_REQUEST,
                         f"field turn_interval must be whole seconds from 0 to {MAX_TURN_INTERVAL}", game_id)
    return value


def _present(fields: Mapping[bytes | str, bytes | str], name: str) -> bool:
    return name in fields or name.encode() in fields


@dataclass(frozen=True)
class RecordDefaults:
    """What a new record takes from the controller's configuration."""

    docker_network: str
    state_root: str
    engine_port: int

    def endpoint(self, game_id: str) -> str:
        return engine_endpoint(game_id, self.engine_port)

    def state_path(self, game_id: str) -> str:
        validate_game_id(game_id)  # never build a host path from an unchecked id
        root = os.path.abspath(self.state_root)
        path = os.path.join(root, game_id)
        if os.path.dirname(path) != root:
            raise InvalidJob(ErrorCode.INVALID_REQUEST, "game_id does not make a safe state path", game_id)
        return path


class DecisionAction(enum.StrEnum):
    """What a job does to desired state."""
    REPLAY = "replay"  # already done: answered at once
    JOIN = "join"      # nothing changes: it joins the current generation, answered when that converges
    CHANGE = "change"  # a new generation
    REJECT = "reject"  # cannot be done: answered with a failure
    SKIP = "skip"      # a scheduled turn no longer due: nothing


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: DecisionAction
    record: RuntimeRecord | None = None
    error_code: ErrorCode | None = None
    message: str = ""
    container_id: str = ""
    engine_endpoint: str = ""

    @property
    def waits(self) -> bool:
        """The job is answered when a generation converges (a change, or a join), not at once."""
        return self.action in (DecisionAction.CHANGE, DecisionAction.JOIN)

    @property
    def op_generation(self) -> int:
        return self.record.generation if self.record else 0


def _replay(record: RuntimeRecord | None, with_container: bool) -> Decision:
    if record is not None and with_container and record.current_container_id:
        return Decision(action=DecisionAction.REPLAY, record=record, error_code=ErrorCode.REPLAY_NO_OP,
                        container_id=record.current_container_id, engine_endpoint=record.engine_endpoint)
    return Decision(action=DecisionAction.REPLAY, record=record, error_code=ErrorCode.REPLAY_NO_OP)


def _reject(record: RuntimeRecord | None, message: str) -> Decision:
    return Decision(action=DecisionAction.REJECT, record=record, error_code=ErrorCode.INVALID_REQUEST, message=message)


def _want(record: RuntimeRecord, now: datetime, **desired: object) -> Decision:
    """Join the current generation when nothing changes, else bump it."""
    changed = any(getattr(record, k) != v for k, v in desired.items())
    if not changed:
        return Decision(action=DecisionAction.JOIN, record=record)
    return Decision(action=DecisionAction.CHANGE, record=record.replace(
        generation=record.generation + 1, last_op_at=max(now, record.last_op_at), **desired))


# A change of these replaces what older pending jobs asked for (they are answered superseded);
# a pause, a forced turn or a reconcile does not.
_REPLACING = ("desired_status", "desired_image_ref", "spec_revision")


def replaces(current: RuntimeRecord, new: RuntimeRecord) -> bool:
    return any(getattr(current, f) != getattr(new, f) for f in _REPLACING)


def decide(record: RuntimeRecord | None, job: Job, now: datetime, defaults: RecordDefaults) -> Decision:
    d = _decide(record, job, now, defaults)
    if d.action is DecisionAction.CHANGE and record is not None and d.record is not None and replaces(record, d.record):
        # The jobs that asked for an unreached turn are answered superseded now: desired state
        # must stop asking for it too, or the turn is generated later for nobody (after a stop
        # and a start, say), and a later force_next_turn would join a turn nobody asks for.
        d = Decision(action=DecisionAction.CHANGE, record=transitions.turn_unasked(d.record))
    if d.action is DecisionAction.CHANGE and record is not None and d.record is not None:
        d = Decision(action=DecisionAction.CHANGE, record=keeps_deadline(record, d.record))
    if d.action is DecisionAction.CHANGE and d.record is not None and job.drain is not None:
        d = Decision(action=DecisionAction.CHANGE, record=with_step(d.record, job.drain))
    return d


def keeps_deadline(record: RuntimeRecord, new: RuntimeRecord) -> RuntimeRecord:
    """A drain's turn-boundary deadline (its stop or move waits for the engine's turn until then; past it
    the drain forces it: desired/drains.py ``unforced``) stays with a new generation admitted while that
    disruption is still under way (not converged): a pause, a reconcile or a patch meanwhile does not
    withdraw it, so it must not cut the wait short. Once the generation converged, it is over."""
    if (record.disruption_generation is not None and record.disruption_generation == record.generation
            and not record.converged and new.generation > record.generation
            and new.disruption_generation == record.disruption_generation):
        return new.replace(disruption_generation=new.generation)
    return new


def _decide(record: RuntimeRecord | None, job: Job, now: datetime, defaults: RecordDefaults) -> Decision:
    kind = job.kind
    # Removal is final from the moment it is asked for, not only once it is done: a start
    # accepted while the container is being removed could never converge.
    if record is not None and record.desired_status is DesiredStatus.REMOVED:
        if kind in (JobKind.STOP, JobKind.CLEANUP):
            if record.converged:
                return _replay(record, with_container=False)
            return Decision(action=DecisionAction.JOIN, record=record)
        return _reject(record, f"game {job.game_id} was removed or is being removed; "
                               "its game_id cannot be used again")
    # A finished game is over: it may be stopped or cleaned up, not started, restarted or patched.
    if (record is not None and record.status is Status.FINISHED
            and kind in (JobKind.START, JobKind.RESTART, JobKind.PATCH)):
        return _reject(record, f"game {job.game_id} is finished; stop it (reason finished) instead")

    if kind is JobKind.START:
        assert job.image_ref
        if record is None:
            new = RuntimeRecord(
                game_id=job.game_id, status=Status.STARTING, current_container_id=None,
                current_image_ref=None, engine_endpoint=engine_endpoint(job.game_id, defaults.engine_port),
                state_path=defaults.state_path(job.game_id), docker_network=defaults.docker_network,
                started_at=None, stopped_at=None, removed_at=None, last_op_at=now, created_at=now,
                desired_status=DesiredStatus.RUNNING, desired_image_ref=job.image_ref,
                generation=1, observed_generation=0, turn_interval=job.turn_interval or 0, clock_from=now,
            )
            return Decision(action=DecisionAction.CHANGE, record=new)
        interval = record.turn_interval if job.turn_interval is None else job.turn_interval
        if (record.converged and record.status.is_up
                and record.desired_status is DesiredStatus.RUNNING
                and record.current_image_ref == job.image_ref and interval == record.turn_interval):
            return _replay(record, with_container=True)
        clock = {} if record.desired_status is DesiredStatus.RUNNING else {"clock_from": now}
        return _want(record, now, desired_status=DesiredStatus.RUNNING, desired_image_ref=job.image_ref,
                     stop_reason=None, turn_interval=interval, **clock)

    if kind is JobKind.STOP:
        if record is None:
            return _replay(None, with_container=False)
        if record.desired_status is not DesiredStatus.RUNNING and record.converged:
            return _replay(record, with_container=False)
        if record.desired_status is not DesiredStatus.RUNNING:
            return Decision(action=DecisionAction.JOIN, record=record)  # already on its way down, whatever the reason
        return _want(record, now, desired_status=DesiredStatus.STOPPED, stop_reason=job.reason)

    if record is None:
        if kind is JobKind.CLEANUP:
            return _replay(None, with_container=False)
        return _reject(None, f"game {job.game_id} is not known")

    if kind is JobKind.RESTART:
        image = record.desired_image_ref or record.current_image_ref
        if not image:
            return _reject(record, f"game {job.game_id} has no image to restart")
        return Decision(action=DecisionAction.CHANGE, record=record.replace(
            desired_status=DesiredStatus.RUNNING, desired_image_ref=image, stop_reason=None,
            spec_revision=record.spec_revision + 1, generation=record.generation + 1,
            last_op_at=max(now, record.last_op_at)))

    if kind is JobKind.PATCH:
        assert job.image_ref
        if record.desired_status is not DesiredStatus.RUNNING:
            return _reject(record, f"game {job.game_id} is not running; patch needs a running game")
        current = record.desired_image_ref or ""
        if image_repository(current) != image_repository(job.image_ref):
            return _reject(record, f"field image_ref: patch must keep the repository "
                                   f"{image_repository(current)!r}")
        if record.converged and record.status.is_up and record.current_image_ref == job.image_ref:
            return _replay(record, with_container=True)
        return _want(record, now, desired_image_ref=job.image_ref)

    if kind is JobKind.CLEANUP:
        if record.desired_status is DesiredStatus.RUNNING:
            return _reject(record, f"game {job.game_id} is running; stop it before cleanup")
        return _want(record, now, desired_status=DesiredStatus.REMOVED)

    if kind is JobKind.RECONCILE:  # look again now: answered after the next reconcile of the game
        return _bump(record, now)

    if kind is JobKind.TURN and not turn_due(record, now):
        # The turn clock read the record before this transaction: a pause, a forced turn, a stop or
        # a new schedule since then took the turn away. Nothing is recorded, nobody is answered.
        return Decision(action=DecisionAction.SKIP, record=record)

    # Turn operations need a game that is (or is about to be) up and not over.
    if record.desired_status is not DesiredStatus.RUNNING:
        return _reject(record, f"game {job.game_id} is not running; {kind.value} needs a running game")
    if record.status is Status.FINISHED:
        return _reject(record, f"game {job.game_id} is finished")

    if kind is JobKind.PAUSE:
        if record.paused:
            return _replay(record, with_container=True)
        return _bump(record, now, paused=True)

    if kind is JobKind.RESUME:
        if not record.paused:
            return _replay(record, with_container=True)
        return _bump(record, now, paused=False, clock_from=now)  # the clock restarts

    if kind in (JobKind.FORCE_NEXT_TURN, JobKind.TURN):
        # One turn past the engine's last completed turn. Two at once, a redelivery, or a forced
        # turn during a generation ask for the same turn: never two turns for one request.
        target = next_turn(record)
        if target > MAX_TURN:  # no column holds the next turn: this game's turns are over
            return Decision(action=DecisionAction.REJECT, record=record, error_code=ErrorCode.GENERATION_FAILED,
                            message=f"game {job.game_id} is at turn {record.turn}, the largest turn a game can "
                                    "have; there is no next turn")
        if record.desired_turn is not None and record.desired_turn >= target:
            return Decision(action=DecisionAction.JOIN, record=record)
        return _bump(record, now, desired_turn=target)

    raise AssertionError(f"unhandled job kind {kind}")


def turn_due(record: RuntimeRecord, now: datetime) -> bool:
    """The turn clock's condition (``Store.due_turns``), decided again under the record's lock when
    its ``turn`` job is submitted: running, unpaused, converged (no stop, restart or patch pending), no
    disruption waiting for the engine (a spec drift), with an admin API, no turn already
    asked for, a next turn that fits its column, and the interval passed since the later of the last
    turn and the start or resume."""
    if (record.turn_interval <= 0 or record.paused or record.desired_status is not DesiredStatus.RUNNING
            or record.status is not Status.RUNNING or record.admin_api is not True or not record.converged
            or record.disruption_wait_since is not None):  # a disruption waits for the engine: no new turn
        return False
    if record.desired_turn is not None and (record.turn is None or record.desired_turn > record.turn):
        return False
    if record.turn is not None and record.turn >= MAX_TURN:
        return False  # no column holds the next turn (Store.due_turns leaves the game out too)
    since = record.clock_from or record.created_at
    base = max(record.last_turn_at or since, since)
    return now >= base + timedelta(seconds=record.turn_interval)


def next_turn(record: RuntimeRecord) -> int:
    return (record.turn or 0) + 1


def _bump(record: RuntimeRecord, now: datetime, **desired: object) -> Decision:
    """A new generation (converged once the reconciler has looked), with these desired changes."""
    return Decision(action=DecisionAction.CHANGE, record=record.replace(
        generation=record.generation + 1, last_op_at=max(now, record.last_op_at), **desired))
