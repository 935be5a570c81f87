"""The domain model of rtmanager: pure values, no I/O.

A *runtime record* is one row of ``runtime_records``: what the controller last
observed about a game's container (``status``, ``current_*``) next to what
Lobby or an operator asked for (``desired_status``, ``desired_image_ref``).
Every change of the desired fields bumps ``generation``; the controller copies
the generation it converged to into ``observed_generation``. A record is
*converged* when the two are equal.

Status machine (the observed lifecycle). ``starting``: asked to run, not yet
healthy. Five statuses mean "the engine's container runs" (``UP``) and differ in
what the engine says of itself: ``running`` (idle, answering),
``generation_in_progress`` (generating the next turn), ``generation_failed``
(the last generation failed; the game stays up), ``engine_unreachable`` (the
container runs but the engine has not answered RTMANAGER_UNREACHABLE_AFTER
probes in a row), ``finished`` (the engine says the game is over)::

    starting  --> any UP status | node_lost | stopped | removed
    UP        --> any other UP status | node_lost | starting | stopped | removed
                  (starting = being recreated, or restarted after a crash)
    node_lost --> any UP status | starting | stopped | removed
    stopped   --> starting | removed
    removed   --> (nothing: the record stays for audit)

``node_lost`` (a Swarm backend): the node that runs the game's engine is down, unreachable or
drained; the engine's fate is unknown. Not a crash (none is counted); RTMANAGER_NODE_LOSS decides
what follows (desired/policy.py ``node_loss_step``).

The same rules are enforced by CHECK constraints in ``migrations/`` so that a
bug cannot store a record this module would refuse.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# The contract's pattern. Use it with fullmatch(): in Python, "$" also matches
# before a trailing newline, so match() would let "g1\n" through.
GAME_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,49}[a-z0-9])?$")
CONTAINER_PREFIX = "galaxy-game-"
# The turn columns are PostgreSQL integers: a game at MAX_TURN cannot get a next turn, and an
# engine reporting more (or less than 0) gives a garbage answer.
MAX_TURN = 2**31 - 1


class Status(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    GENERATION_IN_PROGRESS = "generation_in_progress"
    GENERATION_FAILED = "generation_failed"
    ENGINE_UNREACHABLE = "engine_unreachable"
    FINISHED = "finished"
    NODE_LOST = "node_lost"
    STOPPED = "stopped"
    REMOVED = "removed"

    @property
    def is_terminal(self) -> bool:
        return self is Status.REMOVED

    @property
    def is_up(self) -> bool:
        """The engine's container runs (whatever the engine says of itself)."""
        return self in UP


UP: frozenset[Status] = frozenset({Status.RUNNING, Status.GENERATION_IN_PROGRESS, Status.GENERATION_FAILED,
                                   Status.ENGINE_UNREACHABLE, Status.FINISHED})


class DesiredStatus(str, enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    REMOVED = "removed"


TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.STARTING: UP | {Status.NODE_LOST, Status.STOPPED, Status.REMOVED},
    **{up: (UP - {up}) | {Status.NODE_LOST, Status.STARTING, Status.STOPPED, Status.REMOVED} for up in UP},
    Status.NODE_LOST: UP | {Status.STARTING, Status.STOPPED, Status.REMOVED},
    Status.STOPPED: frozenset({Status.STARTING, Status.REMOVED}),
    Status.REMOVED: frozenset(),
}


class InvalidTransition(ValueError):
    """A status change the state machine does not allow."""


def check_transition(frm: Status, to: Status) -> None:
    if to not in TRANSITIONS[frm]:
        raise InvalidTransition(f"status transition {frm.value} -> {to.value} is not allowed")


class StopReason(str, enum.Enum):
    ORPHAN_CLEANUP = "orphan_cleanup"
    CANCELLED = "cancelled"
    FINISHED = "finished"
    ADMIN_REQUEST = "admin_request"
    TIMEOUT = "timeout"


class JobKind(str, enum.Enum):
    """What a job asks for: a result's ``job`` field and the operation log's ``op`` (the same values)."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    PATCH = "patch"
    CLEANUP = "cleanup"
    PAUSE = "pause"
    RESUME = "resume"
    FORCE_NEXT_TURN = "force_next_turn"
    RECONCILE = "reconcile"
    TURN = "turn"


CONTROL_OPS = (JobKind.PAUSE, JobKind.RESUME, JobKind.FORCE_NEXT_TURN, JobKind.RECONCILE)  # the control stream's


class OpSource(str, enum.Enum):
    LOBBY = "lobby"
    ADMIN = "admin"
    SCHEDULER = "scheduler"
    RECONCILER = "reconciler"


class OpStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (OpStatus.SUCCEEDED, OpStatus.FAILED)


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"


class ErrorCode(str, enum.Enum):
    """Stable error codes of the results stream (docs/contract.md lists when each happens)."""

    REPLAY_NO_OP = "replay_no_op"
    INVALID_REQUEST = "invalid_request"
    IMAGE_REJECTED = "image_rejected"
    IMAGE_UNAVAILABLE = "image_unavailable"
    CONTAINER_START_FAILED = "container_start_failed"
    ENGINE_UNHEALTHY = "engine_unhealthy"
    SUPERSEDED = "superseded"
    DOCKER_UNAVAILABLE = "docker_unavailable"
    INTERNAL_ERROR = "internal_error"
    GENERATION_FAILED = "generation_failed"
    ENGINE_UNREACHABLE = "engine_unreachable"
    ENGINE_UNSUPPORTED = "engine_unsupported"
    ENGINE_REFUSED = "engine_refused"
    STORAGE_FULL = "storage_full"
    HOST_DRAINED = "host_drained"


class Health(str, enum.Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNREACHABLE = "unreachable"


def container_name(game_id: str) -> str:
    return CONTAINER_PREFIX + game_id


def engine_endpoint(game_id: str, port: int) -> str:
    return f"http://{container_name(game_id)}:{port}"


class InvalidRecord(ValueError):
    """A runtime record that breaks an invariant."""


# Fields of a runtime record that no answer, snapshot or log may show.
SECRET_FIELDS = frozenset({"admin_token"})
# Fields of a runtime record that are the store's bookkeeping, not the game's: in no answer either.
BOOKKEEPING_FIELDS = frozenset({"row_version"})


@dataclass(frozen=True, kw_only=True, slots=True)
class RuntimeRecord:
    game_id: str
    status: Status
    current_container_id: str | None
    current_image_ref: str | None
    engine_endpoint: str
    state_path: str
    docker_network: str
    started_at: datetime | None
    stopped_at: datetime | None
    removed_at: datetime | None
    last_op_at: datetime
    created_at: datetime
    desired_status: DesiredStatus
    desired_image_ref: str | None
    generation: int
    observed_generation: int
    spec_revision: int = 0
    stop_reason: StopReason | None = None
    health: Health = Health.UNKNOWN
    last_error_code: ErrorCode | None = None
    last_error_message: str | None = None
    crash_count: int = 0
    last_exit_code: int | None = None
    last_oom_killed: bool = False
    last_crash_at: datetime | None = None
    restart_not_before: datetime | None = None
    health_checked_at: datetime | None = None
    # While a job replaces a running engine (patch, restart, start with another image): the
    # image it ran before, to start again if the new one fails. ``rolling_back`` marks the
    # generation that does so; its own failure stops the game instead of rolling back again.
    rollback_image_ref: str | None = None
    rolling_back: bool = False
    # What the engine says of itself (its admin API), and the probes' count.
    turn: int | None = None
    phase: str | None = None
    admin_api: bool | None = None      # None: not asked yet; False: the engine has none (404)
    probe_failures: int = 0            # failed health probes in a row
    unreachable_since: datetime | None = None
    generation_started_at: datetime | None = None
    last_turn_at: datetime | None = None  # when the engine last reported a new turn (the clock counts from it)
    snapshot_revision: int = 0         # the revision of the last snapshot published for this game
    # Desired: the turn clock and forced turns (a change bumps the generation like any desired change).
    paused: bool = False               # the turn clock is stopped; the engine keeps serving
    turn_interval: int = 0             # seconds between scheduled turns (0: no schedule)
    desired_turn: int | None = None    # the turn desired state asks the engine to reach
    clock_from: datetime | None = None  # the clock counts from here too (start, resume)
    engine_version: str = ""           # the registered version of the game's image (empty: unregistered)
    node_id: str | None = None         # the node that first ran it, where its state lives (Swarm)
    node_lost_since: datetime | None = None  # observed: when its node was seen lost (status node_lost)
    # Desired: nodes its unit must avoid (a move off a lost node); part of the unit's spec hash.
    avoid_nodes: tuple[str, ...] = ()
    # A planned disruption (stop, removal, recreate of the running engine) waits while the engine
    # generates a turn: when that wait began (observed), and the generation an operator forced,
    # whose disruption does not wait (desired).
    disruption_wait_since: datetime | None = None
    force_generation: int | None = None
    # A turn-boundary deadline of generation ``disruption_generation``'s own (a drain's stop or move
    # waits until the drain's deadline, not only RTMANAGER_DISRUPTION_WAIT) (desired).
    disruption_until: datetime | None = None
    disruption_generation: int | None = None
    # Observed: a stop of the running engine is under way (it saves its state on its way out); the
    # gateway's pass-through sends it nothing more. Set right before the stop, cleared by the next status.
    stopping_since: datetime | None = None
    # Observed: the unit that stop is of (the record's engine, or a unit the record does not name: a
    # replacement's new one that failed or was cut before it was recorded). None: the record's engine (a mark
    # written before this field was).
    stopping_unit: str | None = None
    # Observed: the turn the engine had finished when ``disruption_wait_since`` was set (the wait is for the
    # turn after it); a later turn found generating when the wait has run out gets a wait of its own.
    disruption_wait_turn: int | None = None
    # The secret of the unit (ENGINE_ADMIN_TOKEN), sent with every admin call; recorded before the unit
    # is created. Never shown: not in repr, REST answers (SECRET_FIELDS), snapshots or logs.
    admin_token: str = field(default="", repr=False)
    # Not a column: which version of the row this record was read as (Postgres' ``xmin``), when it was read
    # with it. A compare-and-swap from a record whose row has not moved since is one statement
    # (desired/db/base.py ``_swap``). A record made by ``replace`` is no row's: it has none.
    row_version: int | None = field(default=None, repr=False, compare=False)

    @property
    def converged(self) -> bool:
        return self.observed_generation == self.generation

    @property
    def ran_image(self) -> str | None:
        """The image a rollout returns the game to (a drain's is ``stop_image``). For an up game, or one whose
        node was lost while it ran (a replacement waits for the node), the one that runs, not a patch still
        waiting (it has not run, and may never). Otherwise the one asked for: a replacement (a node lost
        during one: it has an image to roll back to), a start or a restart is under way or next, and its
        engine may already have written the state."""
        if self.status.is_up or (self.status is Status.NODE_LOST and self.rollback_image_ref is None):
            return self.current_image_ref or self.desired_image_ref
        return self.desired_image_ref or self.current_image_ref

    @property
    def stop_image(self) -> str | None:
        """The image whose state the game's directory holds once the game is stopped now: what a drain
        records for undrain to start again. A replacement under way (a patch whose new engine has not
        answered healthy yet) does not survive a stop: the copy of the replaced engine's state is put
        back, or the unit stopped is that engine itself (controller/storage.py ``restore_at_stop``), so it
        is the replaced image, and undrain must not start the new one on that state with no copy and
        nothing to roll back to. Otherwise ``ran_image``."""
        if (self.status is Status.STARTING and self.rollback_image_ref and not self.rolling_back
                and self.current_container_id):
            return self.rollback_image_ref
        return self.ran_image

    def validate(self) -> None:
        """Raise InvalidRecord when an invariant of the record (observed and desired) fails."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise InvalidRecord(f"runtime record {self.game_id!r}: {msg}")

        need(bool(GAME_ID_PATTERN.fullmatch(self.game_id or "")), "game_id does not match the pattern")
        need(bool(self.engine_endpoint.strip()), "engine_endpoint must not be empty")
        need(bool(self.state_path.strip()), "state_path must not be empty")
        need(bool(self.docker_network.strip()), "docker_network must not be empty")
        need(self.last_op_at >= self.created_at, "last_op_at must not be before created_at")
        st = self.status
        if st.is_up:
            need(bool(self.current_container_id), f"{st.value} needs current_container_id")
            need(bool(self.current_image_ref), f"{st.value} needs current_image_ref")
            need(self.started_at is not None, f"{st.value} needs started_at")
        elif st is Status.STOPPED:
            need(bool(self.current_image_ref), "stopped needs current_image_ref")
            need(self.stopped_at is not None, "stopped needs stopped_at")
        elif st is Status.REMOVED:
            need(self.removed_at is not None, "removed needs removed_at")
            need(self.current_container_id is None, "removed must not keep a container id")
        if self.started_at is not None:
            need(self.started_at >= self.created_at, "started_at must not be before created_at")
        if self.stopped_at is not None and self.started_at is not None:
            need(self.stopped_at >= self.started_at, "stopped_at must not be before started_at")
        if self.removed_at is not None:
            need(self.removed_at >= self.created_at, "removed_at must not be before created_at")
        need(self.generation >= 1, "generation must be at least 1")
        need(0 <= self.observed_generation <= self.generation,
             "observed_generation must be between 0 and generation")
        if self.desired_status is DesiredStatus.RUNNING:
            need(bool(self.desired_image_ref), "desired running needs desired_image_ref")
        need(self.spec_revision >= 0, "spec_revision must not be negative")
        need(self.crash_count >= 0, "crash_count must not be negative")
        need(self.probe_failures >= 0, "probe_failures must not be negative")
        need(self.turn is None or 0 <= self.turn <= MAX_TURN, f"turn must be from 0 to {MAX_TURN}")
        need(self.desired_turn is None or 0 <= self.desired_turn <= MAX_TURN,
             f"desired_turn must be from 0 to {MAX_TURN}")
        need(self.last_exit_code is None or -2**31 <= self.last_exit_code <= MAX_TURN,
             "last_exit_code must be a 32-bit integer")
        need(self.snapshot_revision >= 0, "snapshot_revision must not be negative")
        need(self.node_lost_since is None or st is Status.NODE_LOST, "only node_lost keeps node_lost_since")

    def replace(self, **changes: Any) -> RuntimeRecord:
        return dataclasses.replace(self, **{"row_version": None, **changes})


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """One entry of the results stream; every field is always present on the wire."""

    result_id: str
    game_id: str
    outcome: Outcome
    job: JobKind
    job_entry_id: str = ""
    container_id: str = ""
    engine_endpoint: str = ""
    error_code: ErrorCode | None = None
    error_message: str = ""

    def fields(self) -> dict[str, str]:
        return {
            "game_id": self.game_id,
            "outcome": self.outcome.value,
            "container_id": self.container_id,
            "engine_endpoint": self.engine_endpoint,
            "error_code": self.error_code.value if self.error_code else "",
            "error_message": self.error_message,
            "job": self.job.value,
            "job_entry_id": self.job_entry_id,
            "result_id": self.result_id,
        }
