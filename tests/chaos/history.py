"""What a chaos run records: the jobs as sent and answered, the faults, and the final observations.
Plain data (JSON in and out), so that the checker can be run again on a saved history:
``python -m tests.chaos --check history.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class JobRecord:
    tag: str
    via: str                              # "stream" | "rest"
    kind: str                             # start | stop | restart | patch | cleanup
    game: str | None                      # the (valid) game it is about; None when the game_id is the defect
    image: str | None = None
    reason: str | None = None
    shape: str = "ok"                     # "ok" or the defect of a bad shape
    expect_code: str | None = None        # bad shapes: the error_code the result must carry
    sent_at: float | None = None          # seconds since the run started (None: never sent)
    sent_wall: float | None = None        # time.time() when sent
    # stream jobs
    stream: str | None = None             # "start" | "stop"
    entry_id: str | None = None           # None: not on the stream (the XADD failed and did not land)
    send_error: str | None = None
    # REST jobs
    replica: str | None = None
    wait: float | None = None
    http_status: int | None = None
    http_body: dict | None = None
    http_error: str | None = None         # no answer: "connect: ..." (refused) or "timeout: ..."
    answered_at: float | None = None
    # resolved after the run
    op_id: int | None = None              # its operation (from the answer, or found in the operation log)
    op_source: str | None = None          # "answer" | "log" (REST jobs whose answer did not say)
    result: dict | None = None            # its result (stream jobs: first on the results stream; REST: the log's)

    @property
    def valid(self) -> bool:
        return self.shape == "ok"

    def describe(self) -> str:
        where = f"{self.stream}-stream entry {self.entry_id}" if self.via == "stream" else f"REST via {self.replica}"
        what = " ".join(x for x in (self.kind, self.game or "-", self.image or "", self.reason or "") if x)
        bad = "" if self.valid else f" BAD[{self.shape}]"
        when = "never sent" if self.sent_at is None else f"sent at {self.sent_at:.2f}s"
        return f"{self.tag} {what}{bad} ({where}, {when})"


@dataclass
class FaultRecord:
    at: float                   # planned
    kind: str
    duration: float
    params: dict
    started: float | None = None
    ended: float | None = None
    note: str = ""              # what was done (or why it was skipped)
    observed: dict = field(default_factory=dict)  # what the harness saw around it (db_restore, watched restarts)


@dataclass
class History:
    seed: int
    minutes: float
    games: list[str]
    mortal: list[str]
    instance: str = ""
    code: str = ""                                             # the commit under test (and local changes)
    never_healthy: list[str] = field(default_factory=list)    # images whose engine can never become healthy
    jobs: list[JobRecord] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    # final observations (once healed and quiet)
    results: list[list] = field(default_factory=list)          # [stream entry id, fields] in stream order
    ops: list[dict] = field(default_factory=list)              # the operation log
    op_results: dict = field(default_factory=dict)             # str(operation id) -> result fields
    unpublished: int = 0                                        # outbox rows not yet published
    pending: dict = field(default_factory=dict)                # job stream -> entries pending in the group
    dead_letters: list[dict] = field(default_factory=list)
    records: dict = field(default_factory=dict)                # game -> runtime record (a few columns)
    containers: list[dict] = field(default_factory=list)       # every container of the private daemon
    container_images: dict = field(default_factory=dict)       # id -> image of every container ever created
    state_dirs: dict = field(default_factory=dict)             # game -> what the run saw and what is there now
    controller_exits: list[dict] = field(default_factory=list)  # exits nobody asked for
    extra: list[str] = field(default_factory=list)              # the opt-in fault kinds of the run (--faults)
    destroyed: dict = field(default_factory=dict)               # id -> wall time a container was removed
    harness_removed: list[str] = field(default_factory=list)    # ids the harness removed itself
    quiet: bool = True
    not_quiet: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> History:
        known = {f.name for f in fields(cls)}
        h = cls(**{k: v for k, v in data.items() if k in known and k not in ("jobs", "faults")})
        h.jobs = [JobRecord(**j) for j in data.get("jobs", [])]
        h.faults = [FaultRecord(**f) for f in data.get("faults", [])]
        return h

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1, default=str))

    @classmethod
    def load(cls, path: Path) -> History:
        return cls.from_json(json.loads(path.read_text()))
