"""The checker: pure functions over a recorded history and the final observations (no I/O).

``check(history)`` returns a Report: the violations (in the order of ``INVARIANTS``, so the first
one is the most fundamental) and information that is worth reading but is not a violation.

Semantics it relies on (desired/jobs.py ``decide``, desired/transitions.py ``failed``):

* a start / patch / restart that fails on a game that was running rolls back to the image it ran
  before, and the rollback itself may fail (the game is then stopped); one that fails on a game
  that was not running leaves it stopped: after such a failure the game is stopped, or running on
  an image it may have been running before;
* removal is final (a later start is ``invalid_request``; stops and cleanups of it are replays or
  join the removal); a stop of an unknown or stopped game is ``replay_no_op``;
* ``superseded`` means a later change replaced the job's desired state before it converged.

The final state of a game is derived by folding its accepted jobs, in the order rtmanager admitted
them (the operation log's ids, checked against the entry order for stream jobs), into the *set*
of states it may be in. Where the history cannot tell (a job whose answer was lost, a result the
model cannot place), the set grows instead of guessing: the invariant gets weaker, never flaky.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.history import History, JobRecord

CONTRACT_FIELDS = frozenset({"game_id", "outcome", "container_id", "engine_endpoint", "error_code",
                             "error_message", "job", "job_entry_id", "result_id"})
ERROR_CODES = frozenset({"replay_no_op", "invalid_request", "image_rejected", "image_unavailable",
                         "container_start_failed", "engine_unhealthy", "superseded", "docker_unavailable",
                         "internal_error", "generation_failed", "engine_unreachable", "engine_unsupported",
                         "engine_refused", "storage_full", "host_drained"})
JOB_KINDS = frozenset({"start", "stop", "restart", "patch", "cleanup",  # and the turns of the clock (docs/contract.md)
                       "pause", "resume", "force_next_turn", "reconcile", "turn"})
REJECTIONS = frozenset({"invalid_request", "image_rejected", "host_drained"})
AT_ONCE = REJECTIONS | {"replay_no_op"}  # answered in the admitting transaction, not after convergence
ENGINE_UID = 10000

INVARIANTS = (
    "results_well_formed",   # every result carries exactly the contract's fields, consistently
    "answered",              # every job entry is answered, at least once
    "one_result_id",         # ... and never with two different result_ids
    "no_phantom_results",    # no result for an entry nobody sent
    "rejections",            # bad shapes get invalid_request / image_rejected; valid jobs are not rejected
    "rest_answered",         # every accepted REST job has its result, on the stream too
    "truthful_results",      # a success names the container and endpoint; nothing never-healthy succeeds
    "admission_order",       # the entries of one game are admitted in entry order
    "result_order",          # the results of one game (jobs that waited for convergence) in entry order
    "no_pending",            # nothing pending: group, operations, outbox, records converged
    "dead_letters",          # nothing valid dead-lettered
    "one_container",         # at most one container per game, named and labelled as the contract says
    "never_started",         # no container, record or state directory for a game never started
    "final_state",           # each game is what its last accepted job asked for
    "record_agrees",         # the runtime record says what Docker shows
    "state_dirs",            # every state directory intact
    "controllers",           # no controller process ended on its own
    "daemon_restarts",       # (stubborn_engines) no game counts a crash or is given up by a daemon restart
    "restore",               # (db_restore) no container of a game that ran is removed because of a restore
    "quiesced",              # once healed, the system became quiet
)
RESTORE_MARGIN = 10.0  # seconds before a dump: an entry sent then may have been admitted only after it

State = tuple  # ("absent",) ("stopped",) ("removed",) ("running", image) ; image "*" = any image
ABSENT, STOPPED, REMOVED = ("absent",), ("stopped",), ("removed",)
ANY_IMAGE = "*"


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    game: str | None = None
    evidence: Any = None

    def render(self) -> str:
        import json

        head = f"[{self.invariant}]" + (f" game {self.game}" if self.game else "") + f": {self.message}"
        if self.evidence is None:
            return head
        return head + "\n  evidence: " + json.dumps(self.evidence, indent=2, default=str).replace("\n", "\n  ")


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    expected: dict[str, list[State]] = field(default_factory=dict)
    observed: dict[str, State] = field(default_factory=dict)
    trails: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def first(self) -> Violation | None:
        return self.violations[0] if self.violations else None

    def by_invariant(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for v in self.violations:
            counts[v.invariant] += 1
        return dict(counts)


def show(state: State) -> str:
    return state[0] if len(state) == 1 else f"running {state[1]}"


# ------------------------------------------------------------------------ ordering
def entry_key(job: JobRecord) -> tuple[int, int, int]:
    """Entry-id order across the two job streams: by id, and within one millisecond the start
    stream's entries before the stop stream's (the order rtmanager documents)."""
    assert job.entry_id
    ms, _, seq = job.entry_id.partition("-")
    return int(ms), 0 if job.stream == "start" else 1, int(seq or 0)


def landed(job: JobRecord) -> bool:
    return job.via == "stream" and job.entry_id is not None


def accepted(job: JobRecord) -> bool | None:
    """Whether rtmanager took the job in: True, False, or None (cannot tell)."""
    if job.via == "stream":
        return landed(job)
    if job.op_id is not None:
        return True
    if job.op_source == "none":
        return False  # looked for in the operation log, not there
    if job.op_source == "restored":
        return None  # a database restore forgot it: it may or may not have had its effect
    if job.http_status is not None:
        return job.http_status in (200, 202)
    if job.http_error and job.http_error.startswith("connect"):
        return False
    return None if job.sent_at is not None else False


# ------------------------------------------------------------------- restores
def restore_windows(history: History) -> list[tuple[float, float]]:
    """Wall-clock spans whose jobs a database restore may have made rtmanager forget: from a little
    before each dump to the end of its restore. Their admissions and results may be lost (an entry
    acknowledged in Redis is not read again), and operation ids are handed out again after it."""
    out = []
    for f in history.faults:
        obs = f.observed or {}
        if f.kind == "db_restore" and obs.get("dump_wall") is not None and obs.get("restored_wall") is not None:
            out.append((obs["dump_wall"] - RESTORE_MARGIN, obs["restored_wall"]))
    return out


def in_windows(job: JobRecord, windows: list[tuple[float, float]]) -> bool:
    return job.sent_wall is not None and any(a <= job.sent_wall <= b for a, b in windows)


def created_after_restore(job: JobRecord, op: dict, windows: list[tuple[float, float]]) -> bool:
    """Whether the operation was written after the end of a restore that began after the job was sent:
    then it is not the job's (the restored log forgot that one and handed its id out again)."""
    created = op.get("created_epoch")
    return (created is not None and job.sent_wall is not None
            and any(a <= job.sent_wall <= b < created for a, b in windows))


def restore_phase(job: JobRecord, windows: list[tuple[float, float]]) -> int:
    """How many restores ended before the job was sent (2 per restore, 1 within its window): operation
    ids order jobs only within one phase."""
    if job.sent_wall is None:
        return 2 * len(windows)
    return sum(2 if job.sent_wall > b else 1 if job.sent_wall >= a else 0 for a, b in windows)


# ----------------------------------------------------------------- resolution
def resolve(history: History, start_stream: str, stop_stream: str) -> list[str]:
    """Fill in each job's operation and result from the final observations. Pure; returns notes.

    Stream jobs: the operation with their (stream, entry id), the first result on the stream with
    their (job, entry id). REST jobs: the operation id of their answer (200 or 202); a call that got
    no answer (a timeout, a replica paused or killed mid-call) is matched with an operation of the
    log that no answer claimed: same game and kind, source admin, written after the call was sent."""
    notes: list[str] = []
    names = {"start": start_stream, "stop": stop_stream}
    by_entry = {(op["stream"], op["entry_id"]): op for op in history.ops if op.get("entry_id")}
    first_result: dict[tuple[str, str], dict] = {}
    for _, fields in history.results:
        key = (fields.get("job", ""), fields.get("job_entry_id", ""))
        if key[1] and key not in first_result:
            first_result[key] = fields
    for job in history.jobs:
        if landed(job):
            op = by_entry.get((names[job.stream], job.entry_id))
            job.op_id = op["id"] if op else None
            job.op_source = "log" if op else None
            job.result = first_result.get((job.stream, job.entry_id))
    claimed: set[int] = set()
    rest = [j for j in history.jobs if j.via == "rest" and j.sent_at is not None]
    windows = restore_windows(history)
    ops_by_id = {op["id"]: op for op in history.ops}
    for job in rest:
        body = job.http_body or {}
        if job.http_status in (200, 202) and isinstance(body.get("operation_id"), int):
            job.op_id = body["operation_id"]
            job.op_source = "answer"
            op = ops_by_id.get(job.op_id)
            if in_windows(job, windows) and (op is None or op["game_id"] != job.game or op["op"] != job.kind
                                             or created_after_restore(job, op, windows)):
                # a restore forgot it, and its id may belong to another operation now (of the same game
                # and kind, too: an operation written after the restore ended is not the job's)
                notes.append(f"{job.tag}: operation {job.op_id} of its answer is not in the restored log")
                job.op_id, job.op_source = None, "restored"
                job.result = ({k: v for k, v in body.items() if k in CONTRACT_FIELDS}
                              if job.http_status == 200 and body.get("result_id") else None)
                continue
            claimed.add(job.op_id)
        else:
            job.op_id = None
    unresolved = sorted((j for j in rest if j.op_id is None and j.game), key=lambda j: j.sent_wall or 0)
    for op in sorted(history.ops, key=lambda o: o["id"]):
        if op.get("source") != "admin" or op["id"] in claimed:
            continue
        created = op.get("created_epoch") or math.inf
        match = next((j for j in unresolved if j.game == op["game_id"] and j.kind == op["op"]
                      and (j.sent_wall or 0) - 1.0 <= created), None)
        if match is None:
            notes.append(f"operation {op['id']} ({op['op']} {op['game_id']}, source admin) matches no REST call")
            continue
        unresolved.remove(match)
        match.op_id = op["id"]
        match.op_source = "log"
        claimed.add(op["id"])
        notes.append(f"{match.tag}: REST call without an answer ({match.http_error or match.http_status}) was "
                     f"admitted as operation {op['id']}")
    for job in unresolved:
        job.op_source = "none" if not in_windows(job, windows) else "restored"
    for job in rest:
        if job.op_source == "restored":
            continue
        if job.op_id is not None:
            job.result = history.op_results.get(str(job.op_id))
            if job.result is None and job.http_status == 200 and (job.http_body or {}).get("result_id"):
                job.result = {k: v for k, v in job.http_body.items() if k in CONTRACT_FIELDS}
        elif job.http_status == 400 and job.http_body is not None:
            job.result = job.http_body
    return notes


# ------------------------------------------------------------ stream invariants
def check_results_well_formed(history: History) -> list[Violation]:
    out = []
    for entry_id, f in history.results:
        problems = []
        if set(f) != CONTRACT_FIELDS:
            problems.append(f"fields {sorted(set(f) ^ CONTRACT_FIELDS)} missing or extra")
        outcome, code = f.get("outcome"), f.get("error_code", "")
        if outcome == "success" and code not in ("", "replay_no_op"):
            problems.append(f"success with error_code {code!r}")
        if outcome == "failure" and code not in ERROR_CODES - {"replay_no_op"}:
            problems.append(f"failure with error_code {code!r}")
        if outcome not in ("success", "failure"):
            problems.append(f"outcome {outcome!r}")
        if f.get("job") not in JOB_KINDS:
            problems.append(f"job {f.get('job')!r}")
        if not f.get("result_id"):
            problems.append("empty result_id")
        if problems:
            out.append(Violation("results_well_formed", "; ".join(problems), f.get("game_id"),
                                 {"stream_entry": entry_id, "result": f}))
    return out


def check_answered(history: History, info: list[str] | None = None) -> list[Violation]:
    answered = {(f.get("job"), f.get("job_entry_id")) for _, f in history.results}
    windows = restore_windows(history)
    out = []
    for job in history.jobs:
        if landed(job) and (job.stream, job.entry_id) not in answered:
            if in_windows(job, windows):
                if info is not None:
                    info.append(f"{job.tag} has no result: sent around a database restore, which forgot it")
                continue
            out.append(Violation("answered", f"{job.describe()} has no result", job.game,
                                 {"job": job.tag, "entry_id": job.entry_id, "stream": job.stream}))
    return out


def check_one_result_id(history: History, info: list[str]) -> list[Violation]:
    out = []
    ids: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for entry_id, f in history.results:
        if f.get("job_entry_id"):
            ids[(f.get("job"), f["job_entry_id"])][f.get("result_id")].append((entry_id, f))
    by_id: dict[str, list] = defaultdict(list)
    for _, f in history.results:
        by_id[f.get("result_id")].append(f)
    windows = restore_windows(history)
    around_restore = {(j.stream, j.entry_id) for j in history.jobs if landed(j) and in_windows(j, windows)}
    for key, per_id in ids.items():
        if len(per_id) > 1 and key in around_restore:
            info.append(f"{key[0]} entry {key[1]} answered with {len(per_id)} result_ids: sent around a database "
                        "restore, which forgot its first answer")
        elif len(per_id) > 1:
            out.append(Violation("one_result_id", f"{key[0]} entry {key[1]} answered with {len(per_id)} different "
                                 "result_ids", per_id[next(iter(per_id))][0][1].get("game_id"),
                                 {rid: [e for e, _ in copies] for rid, copies in per_id.items()}))
    for rid, copies in by_id.items():
        if len(copies) > 1:
            if any(c != copies[0] for c in copies[1:]):
                out.append(Violation("one_result_id", f"result_id {rid} published {len(copies)} times with different "
                                     "fields", copies[0].get("game_id"), copies))
            else:
                info.append(f"result {rid} ({copies[0].get('job')} {copies[0].get('job_entry_id') or 'REST'}) "
                            f"published {len(copies)} times (same result_id: allowed, consumers dedupe)")
    return out


def check_no_phantom_results(history: History, info: list[str]) -> list[Violation]:
    sent = {(j.stream, j.entry_id) for j in history.jobs if landed(j)}
    rest_ids = {f.get("result_id") for f in history.op_results.values()}
    out = []
    for entry_id, f in history.results:
        if f.get("job_entry_id"):
            if (f.get("job"), f["job_entry_id"]) not in sent:
                out.append(Violation("no_phantom_results", f"result for {f.get('job')} entry {f['job_entry_id']}, "
                                     "which was never sent", f.get("game_id"), {"stream_entry": entry_id, "result": f}))
        elif f.get("result_id") not in rest_ids:
            info.append(f"result {f.get('result_id')} without an entry id matches no REST operation of the log")
    return out


def check_rejections(history: History) -> list[Violation]:
    out = []
    for job in history.jobs:
        if job.valid:
            if job.result and job.result.get("error_code") == "image_rejected":
                out.append(Violation("rejections", f"{job.describe()}: a valid job answered image_rejected", job.game,
                                     {"result": job.result}))
            continue
        if job.via == "stream":
            if not landed(job) or job.result is None:
                continue  # unanswered: the answered invariant says so
            if job.result.get("outcome") != "failure" or job.result.get("error_code") != job.expect_code:
                out.append(Violation("rejections", f"{job.describe()}: expected failure {job.expect_code}, got "
                                     f"{job.result.get('outcome')} {job.result.get('error_code') or '(none)'}",
                                     job.game, {"result": job.result}))
        else:
            if job.http_status is None:
                continue  # no answer
            body = job.http_body or {}
            if job.http_status != 400 or (job.expect_code and body.get("error_code") != job.expect_code):
                out.append(Violation("rejections", f"{job.describe()}: expected HTTP 400 {job.expect_code or ''}, "
                                     f"got {job.http_status} {body.get('error_code', '')}", job.game,
                                     {"status": job.http_status, "body": body}))
    return out


def check_rest_answered(history: History) -> list[Violation]:
    on_stream = {f.get("result_id") for _, f in history.results}
    out = []
    for job in history.jobs:
        if job.via != "rest" or job.op_id is None:
            continue
        res = history.op_results.get(str(job.op_id))
        if res is None:
            out.append(Violation("rest_answered", f"{job.describe()}: operation {job.op_id} has no result", job.game,
                                 {"op_id": job.op_id, "http_status": job.http_status}))
            continue
        if res.get("result_id") not in on_stream:
            out.append(Violation("rest_answered", f"{job.describe()}: result {res.get('result_id')} of operation "
                                 f"{job.op_id} never reached the results stream", job.game, {"result": res}))
        body = job.http_body or {}
        if job.http_status == 200 and body.get("result_id") and body["result_id"] != res.get("result_id"):
            out.append(Violation("rest_answered", f"{job.describe()}: answered result_id {body['result_id']} but the "
                                 f"log has {res.get('result_id')}", job.game, {"answer": body, "log": res}))
    return out


def check_truthful_results(history: History) -> list[Violation]:
    out = []
    never = set(history.never_healthy)
    for job in history.jobs:
        r = job.result
        if not r or not job.valid or "outcome" not in r:
            continue
        problems = []
        code = r.get("error_code", "")
        if r.get("game_id") != job.game:
            problems.append(f"game_id {r.get('game_id')!r}")
        if r.get("job") != job.kind:
            problems.append(f"job {r.get('job')!r}")
        if r.get("outcome") == "success" and code == "" and job.kind in ("start", "patch", "restart"):
            if len(r.get("container_id", "")) != 64:
                problems.append(f"a success without a container_id ({r.get('container_id')!r})")
            if r.get("engine_endpoint") != f"http://galaxy-game-{job.game}:8080":
                problems.append(f"engine_endpoint {r.get('engine_endpoint')!r}")
            if job.image in never:
                problems.append(f"a success running {job.image}, whose engine never becomes healthy")
        if (r.get("outcome") == "success" and job.kind in ("start", "patch") and job.image
                and r.get("container_id") in history.container_images):
            ran = history.container_images[r["container_id"]]
            if ran != job.image:
                problems.append(f"its container {r['container_id'][:12]} was created from {ran}, not {job.image}")
        if r.get("outcome") == "failure" and (r.get("container_id") or r.get("engine_endpoint")):
            problems.append("a failure that names a container or an endpoint")
        if problems:
            out.append(Violation("truthful_results", f"{job.describe()}: " + "; ".join(problems), job.game,
                                 {"result": r}))
    return out


def _valid_stream_jobs(history: History) -> dict[str, list[JobRecord]]:
    """Per game, in entry order; without the entries sent around a database restore (their
    admission may be forgotten, and operation ids are handed out again after it)."""
    per_game: dict[str, list[JobRecord]] = defaultdict(list)
    windows = restore_windows(history)
    for job in history.jobs:
        if landed(job) and job.valid and job.game and not in_windows(job, windows):
            per_game[job.game].append(job)
    for jobs in per_game.values():
        jobs.sort(key=entry_key)
    return per_game


def before(a: JobRecord, b: JobRecord, strict_same_ms: bool) -> bool | None:
    """Whether entry ``a`` must take effect before entry ``b``: True / False, or None when the order
    is not defined. Entry ids order entries across the streams by their millisecond; within one
    millisecond the start stream's entries come first and the stop stream's last (docs/contract.md,
    "Order per game"). Without ``strict_same_ms`` such cross-stream pairs count as unordered (what
    an older README said: "may be applied in either order")."""
    ka, kb = entry_key(a), entry_key(b)
    if ka[0] != kb[0] or a.stream == b.stream or strict_same_ms:
        return ka < kb
    return None


def check_admission_order(history: History, info: list[str], strict_same_ms: bool = True) -> list[Violation]:
    out = []
    for game, jobs in _valid_stream_jobs(history).items():
        with_op = [j for j in jobs if j.op_id is not None]
        found = False
        for i, a in enumerate(with_op):
            for b in with_op[i + 1:]:
                if a.op_id < b.op_id:
                    continue
                order = before(a, b, strict_same_ms)
                if order is None:
                    info.append(f"{game}: {b.tag} ({b.stream} stream) was admitted before {a.tag} ({a.stream} stream),"
                                f" sent within the same millisecond {a.entry_id.split('-')[0]} (not checked: lenient)")
                elif order and not found:
                    out.append(Violation("admission_order", f"{b.describe()} was admitted (operation {b.op_id}) "
                                         f"before the earlier entry {a.describe()} (operation {a.op_id})", game,
                                         {"earlier": a.tag, "later": b.tag}))
                    found = True
    return out


def check_result_order(history: History, info: list[str], strict_same_ms: bool = True) -> list[Violation]:
    position: dict[tuple[str, str], int] = {}
    for i, (_, f) in enumerate(history.results):
        key = (f.get("job"), f.get("job_entry_id"))
        if key[1] and key not in position:
            position[key] = i
    out = []
    for game, jobs in _valid_stream_jobs(history).items():
        answered = [j for j in jobs if (j.stream, j.entry_id) in position and j.result is not None]
        waited = [j for j in answered if j.result.get("error_code") not in AT_ONCE]

        def pos(j: JobRecord) -> int:
            return position[(j.stream, j.entry_id)]

        found = False
        for i, a in enumerate(waited):
            for b in waited[i + 1:]:
                if pos(a) < pos(b):
                    continue
                order = before(a, b, strict_same_ms)
                if order is None:
                    info.append(f"{game}: the result of {b.tag} came before that of {a.tag}, sent within the same "
                                f"millisecond on the other stream (not checked: lenient)")
                elif order and not found:
                    ra, rb = a.result, b.result
                    out.append(Violation("result_order", f"the result of {b.describe()} "
                                         f"({rb.get('outcome')} {rb.get('error_code')}) came before that of the "
                                         f"earlier {a.describe()} ({ra.get('outcome')} {ra.get('error_code')})",
                                         game, {"earlier": [a.tag, a.result], "later": [b.tag, b.result]}))
                    found = True
        for j in answered:
            if j.result.get("error_code") not in AT_ONCE:
                continue
            overtaken = [w.tag for w in waited if before(w, j, strict_same_ms) and pos(w) > pos(j)]
            if overtaken:
                info.append(f"{game}: {j.tag} ({j.result.get('error_code')}, answered at once) was answered before "
                            f"the earlier {', '.join(overtaken)}, still converging (allowed)")
    return out


def check_no_pending(history: History) -> list[Violation]:
    out = []
    for stream, n in history.pending.items():
        if n:
            out.append(Violation("no_pending", f"{n} entries still pending in the consumer group of {stream}",
                                 evidence={"stream": stream, "pending": n}))
    open_ops = [op for op in history.ops if op.get("status") in ("queued", "running")]
    for op in open_ops:
        out.append(Violation("no_pending", f"operation {op['id']} ({op['op']} {op['game_id']}) is still {op['status']}",
                             op["game_id"], op))
    if history.unpublished:
        out.append(Violation("no_pending", f"{history.unpublished} results still unpublished in the outbox"))
    for game, rec in sorted(history.records.items()):
        if rec["generation"] != rec["observed_generation"] or rec["status"] == "starting":
            out.append(Violation("no_pending", f"record not converged: status {rec['status']}, desired "
                                 f"{rec['desired_status']}, generation "
                                 f"{rec['observed_generation']}/{rec['generation']}", game, rec))
    return out


def check_dead_letters(history: History, info: list[str]) -> list[Violation]:
    by_tag = {j.tag: j for j in history.jobs}
    out = []
    for dl in history.dead_letters:
        job = by_tag.get(dl.get("chaos_tag", ""))
        if job is None:
            info.append(f"dead letter of an entry this run did not send: {dl}")
        elif job.valid:
            out.append(Violation("dead_letters", f"{job.describe()} was dead-lettered", job.game, dl))
        else:
            info.append(f"{job.tag} (bad shape {job.shape}) was dead-lettered instead of rejected")
    seen = {(dl.get("rtm_source_stream"), dl.get("rtm_entry_id")) for dl in history.dead_letters}
    for job in history.jobs:
        r = job.result or {}
        if (job.valid and r.get("error_code") == "internal_error" and "dead-lettered" in r.get("error_message", "")
                and not any(e == job.entry_id for _, e in seen)):
            out.append(Violation("dead_letters", f"{job.describe()} was dead-lettered (its result says so)",
                                 job.game, r))
    return out


# -------------------------------------------------------------- the final state
@dataclass
class GameModel:
    states: frozenset = frozenset({ABSENT})
    images: frozenset = frozenset()   # what desired_image_ref may be (a restart runs it)
    trail: list[str] = field(default_factory=list)


def _running(states) -> set[State]:
    return {s for s in states if s[0] == "running"}


def _success_states(job: JobRecord, m: GameModel, never: frozenset = frozenset()) -> set[State]:
    """What the job leaves when it converges. An image whose engine never becomes healthy cannot
    converge to running (such a job can only fail or be superseded)."""
    if job.kind in ("start", "patch"):
        return set() if job.image in never else {("running", job.image or ANY_IMAGE)}
    if job.kind == "restart":
        return {("running", i) for i in m.images - never} or ({("running", ANY_IMAGE)} if not m.images else set())
    if job.kind == "stop":  # a stop that joined a removal in progress succeeds with the removal
        return ({STOPPED} if m.states - {REMOVED} else set()) | (m.states & {REMOVED})
    return {REMOVED}


def _failure_states(job: JobRecord, m: GameModel) -> set[State]:
    if job.kind in ("start", "patch", "restart"):
        return {STOPPED} | _running(m.states)  # stopped, or rolled back to what it may have run
    if job.kind == "stop":
        return ({STOPPED} if m.states - {REMOVED} else set()) | (m.states & {REMOVED})
    return {REMOVED}


def step(m: GameModel, job: JobRecord, result: dict | None, maybe: bool, violations: list[Violation],
         info: list[str], never: frozenset = frozenset()) -> GameModel:
    """One job's effect on the set of states its game may be in."""
    before = m.states
    images = m.images
    code = (result or {}).get("error_code", "")
    outcome = (result or {}).get("outcome")
    sets_image = job.kind in ("start", "patch")
    note = ""
    if result is None:
        new = set(before) | _success_states(job, m, never) | _failure_states(job, m)
        if sets_image:
            images = images | {job.image} | {s[1] for s in _running(before)}
        note = "outcome unknown"
    elif code in REJECTIONS:
        new = set(before)
        if job.via == "stream" and code == "invalid_request" and not (job.kind == "start" and REMOVED in before):
            violations.append(Violation("rejections", f"{job.describe()}: a valid job answered invalid_request though "
                                        f"the game may only be {sorted(map(show, before))}", job.game,
                                        {"result": result}))
    elif code == "replay_no_op":
        if job.kind in ("start", "patch"):
            new = {("running", job.image)}
            if not (new & before or ("running", ANY_IMAGE) in before):
                info.append(f"{job.game}: {job.tag} replayed 'running {job.image}' while the model had "
                            f"{sorted(map(show, before))}")
            images = frozenset({job.image})
        else:
            keep = {ABSENT, STOPPED, REMOVED} if job.kind == "stop" else {ABSENT, REMOVED}
            new = set(before) & keep
            if not new:
                info.append(f"{job.game}: {job.tag} ({job.kind}) replayed while the model had "
                            f"{sorted(map(show, before))}")
                new = set(keep - {ABSENT})
    elif outcome == "success":
        new = _success_states(job, m, never) or _success_states(job, m)  # (an impossible success is flagged)
        if sets_image:
            images = frozenset({job.image})
    elif code == "superseded":
        new = set(before) | _success_states(job, m, never)
        if sets_image:
            images = frozenset({job.image})
    else:  # the job failed: its generation ended and a safe one followed (desired/transitions.py failed)
        new = _failure_states(job, m)
        if code == "internal_error":  # e.g. dead-lettered: it may never have been applied
            new |= set(before)
        if sets_image:
            images = frozenset({job.image}) | {s[1] for s in _running(before)}
        elif job.kind == "restart":
            images = images | {s[1] for s in _running(before)}
    if maybe:
        new |= set(before)
        note = (note + "; " if note else "") + "may not have been admitted"
    label = "unknown" if result is None else f"{outcome} {code}".strip()
    trail = m.trail + [f"{job.tag} {job.via} {job.kind}{' ' + job.image if job.image else ''} -> {label}"
                       f"{' (' + note + ')' if note else ''} => {sorted(map(show, new))}"]
    return GameModel(states=frozenset(new), images=frozenset(images), trail=trail)


def admission_sequence(history: History, game: str) -> list[tuple[JobRecord, bool]]:
    """The game's jobs that may have been admitted, in admission order, each with 'maybe' (not sure it
    was admitted). Operation ids give the order; a job without one goes last (its effect is then
    taken as possibly the final one, which only widens the set)."""
    seq = []
    windows = restore_windows(history)
    for job in history.jobs:
        if job.game != game or not job.valid:
            continue
        acc = accepted(job)
        if acc is False:
            continue
        seq.append((job, acc is None or in_windows(job, windows)))
    seq.sort(key=lambda p: (restore_phase(p[0], windows) if windows else 0,
                            p[0].op_id if p[0].op_id is not None else math.inf, p[0].sent_at or 0))
    return seq


def expected_states(history: History, violations: list[Violation], info: list[str]) -> dict[str, GameModel]:
    models = {}
    for game in history.games + history.mortal:
        m = GameModel()
        never = frozenset(history.never_healthy)
        for job, maybe in admission_sequence(history, game):
            m = step(m, job, job.result, maybe, violations, info, never)
        models[game] = m
    return models


def containers_by_game(history: History) -> tuple[dict[str, list[dict]], list[dict]]:
    per: dict[str, list[dict]] = defaultdict(list)
    odd = []
    for c in history.containers:
        game = c.get("game")
        if game is None and c.get("name", "").startswith("galaxy-game-"):
            game = c["name"][len("galaxy-game-"):]
        if game is None:
            odd.append(c)
        else:
            per[game].append(c)
    return per, odd


def observe(history: History) -> dict[str, State]:
    per, _ = containers_by_game(history)
    out = {}
    for game in history.games + history.mortal:
        running = [c for c in per.get(game, []) if c.get("running")]
        rec = history.records.get(game)
        if running:
            out[game] = ("running", running[0].get("image"))
        elif rec is None:
            out[game] = ABSENT
        elif rec.get("desired_status") == "removed" or rec.get("status") == "removed":
            out[game] = REMOVED
        else:
            out[game] = STOPPED
    return out


def check_containers(history: History) -> list[Violation]:
    out = []
    per, odd = containers_by_game(history)
    known = set(history.games + history.mortal)
    for c in odd:
        out.append(Violation("one_container", f"container {c.get('name')} belongs to no game", evidence=c))
    for game, cs in sorted(per.items()):
        if game not in known:
            out.append(Violation("one_container", f"container(s) for {game!r}, a game_id no valid job named", game, cs))
            continue
        if len(cs) > 1:
            out.append(Violation("one_container", f"{len(cs)} containers", game, cs))
        for c in cs:
            problems = []
            if c.get("name") != f"galaxy-game-{game}":
                problems.append(f"named {c.get('name')}")
            if c.get("game") != game:
                problems.append(f"label com.galaxy.game-id={c.get('game')!r}")
            if history.instance and c.get("instance") != history.instance:
                problems.append(f"label com.galaxy.instance={c.get('instance')!r}")
            if problems:
                out.append(Violation("one_container", "container " + ", ".join(problems), game, c))
    return out


def check_final(history: History, models: dict[str, GameModel], observed: dict[str, State]) -> list[Violation]:
    out = []
    per, _ = containers_by_game(history)
    for game, m in models.items():
        obs = observed[game]
        cs = per.get(game, [])
        if m.states == {ABSENT}:
            problems = []
            if cs:
                problems.append(f"{len(cs)} container(s)")
            if game in history.records:
                problems.append("a runtime record")
            if (history.state_dirs.get(game) or {}).get("final", {}).get("exists"):
                problems.append("a state directory")
            if problems:
                out.append(Violation("never_started", "never started, yet it has " + " and ".join(problems), game,
                                     {"containers": cs, "record": history.records.get(game)}))
            continue
        fits = obs in m.states or (obs[0] == "running" and ("running", ANY_IMAGE) in m.states)
        evidence = {"observed": show(obs), "acceptable": sorted(map(show, m.states)), "containers": cs,
                    "record": history.records.get(game), "jobs (admission order)": m.trail[-12:]}
        if not fits:
            out.append(Violation("final_state", f"is {show(obs)}; its jobs allow only "
                                 f"{' or '.join(sorted(map(show, m.states)))}", game, evidence))
            continue
        if obs[0] == "running" and not all(c.get("healthy") for c in cs if c.get("running")):
            out.append(Violation("final_state", "runs, but its engine does not answer its health path", game, evidence))
        if obs in (REMOVED,) and cs:
            out.append(Violation("final_state", f"removed, yet {len(cs)} container(s) left", game, evidence))
    return out


def check_records(history: History, observed: dict[str, State]) -> list[Violation]:
    out = []
    per, _ = containers_by_game(history)
    for game, rec in sorted(history.records.items()):
        cs = per.get(game, [])
        running = [c for c in cs if c.get("running")]
        want = rec.get("desired_status")
        problems = []
        if want == "running":
            if rec.get("status") != "running":
                problems.append(f"desired running but status {rec.get('status')}")
            if len(running) != 1 or rec.get("current_container_id") != running[0]["id"]:
                problems.append(f"current_container_id {str(rec.get('current_container_id'))[:12]} is not the running "
                                "container")
            elif rec.get("current_image_ref") != running[0].get("image"):
                problems.append(f"current_image_ref {rec.get('current_image_ref')} but it runs "
                                f"{running[0].get('image')}")
        elif want == "stopped":
            if rec.get("status") != "stopped":
                problems.append(f"desired stopped but status {rec.get('status')}")
            if running:
                problems.append("desired stopped but a container runs")
            ids = [c["id"] for c in cs]
            if rec.get("current_container_id") not in (ids[:1] or [None]):
                problems.append(f"current_container_id {str(rec.get('current_container_id'))[:12]} but the "
                                f"containers are {[i[:12] for i in ids]}")
        elif want == "removed":
            if rec.get("status") != "removed" or cs:
                problems.append(f"desired removed but status {rec.get('status')} with {len(cs)} container(s)")
        if problems:
            out.append(Violation("record_agrees", "; ".join(problems), game, {"record": rec, "containers": cs}))
    return out


def check_state_dirs(history: History, observed: dict[str, State]) -> list[Violation]:
    """Every state directory stays the same directory, owned and moded as the contract says, with
    the marker planted in it and a boots file that never shrinks; except that a restore puts the
    copy taken before a replacement back (docs/contract.md: a rollback, a job asking for the replaced
    image again, a stop during the replacement; each is in the operation log): its boots file may then
    be shorter, and a marker planted after that copy was taken gone (never changed)."""
    out = []
    rolled_back = {op["game_id"] for op in history.ops if op.get("event") in ("rollback", "state_restore")}
    for game, sd in sorted(history.state_dirs.items()):
        final = sd.get("final") or {}
        problems = []
        if sd.get("first_inode") is not None:
            if not final.get("exists"):
                problems.append("gone")
            else:
                if final.get("is_symlink") or not final.get("is_dir"):
                    problems.append("no longer a directory")
                if final.get("inode") != sd["first_inode"]:
                    problems.append(f"replaced (inode {sd['first_inode']} -> {final.get('inode')})")
                if (final.get("uid"), final.get("gid")) != (ENGINE_UID, ENGINE_UID):
                    problems.append(f"owned by {final.get('uid')}:{final.get('gid')}")
                if final.get("mode") != 0o700:
                    problems.append(f"mode {oct(final.get('mode') or 0)}")
                restored = game in rolled_back
                if sd.get("marker") is not None and final.get("marker") != sd["marker"] and not (
                        restored and final.get("marker") is None):
                    problems.append("the marker file planted in it is gone or changed")
                if (final.get("boots") or 0) < (sd.get("boots_max") or 0) and not restored:
                    problems.append(f"its boots file shrank ({sd.get('boots_max')} -> {final.get('boots')} lines)")
        if observed.get(game, ABSENT)[0] == "running" and not final.get("exists"):
            problems.append("the game runs but its state directory does not exist")
        if problems:
            out.append(Violation("state_dirs", "state directory " + ", ".join(problems), game, sd))
    return out


def check_controllers(history: History, info: list[str]) -> list[Violation]:
    out = []
    for e in history.controller_exits:
        if e.get("expected"):
            info.append(f"replica {e.get('slot')} exited with {e.get('code')} after a pause ({e.get('why', '')})")
        else:
            out.append(Violation("controllers", f"replica {e.get('slot')} exited on its own with status "
                                 f"{e.get('code')} at {e.get('at', 0):.1f}s",
                                 evidence={"log_tail": e.get("log_tail", "")}))
    return out


def _jobs_of(history: History, game: str, since: float, until: float = math.inf) -> list[JobRecord]:
    return [j for j in history.jobs if j.game == game and j.sent_wall is not None and since <= j.sent_wall <= until]


def check_daemon_restarts(history: History) -> list[Violation]:
    """Around each watched dockerd restart (stubborn_engines): a game that ran before it does not count
    a crash (faults come one at a time, and jobs do not count crashes: the restart is the only cause),
    whatever the exit code the daemon's stop left (SIGTERM ignored, then SIGKILL: 137); one that got no
    job meanwhile is not given up either."""
    out = []
    for f in history.faults:
        obs = f.observed or {}
        if f.kind != "dockerd_restart" or "after" not in obs:
            continue
        for game in sorted(set((obs.get("running_ids") or {}).values())):
            b, a = (obs.get("before") or {}).get(game), (obs.get("after") or {}).get(game)
            if not b or not a:
                continue
            jobs = _jobs_of(history, game, obs["before_wall"] - 1, obs["after_wall"])
            problems = []
            if (a.get("crash_count") or 0) > (b.get("crash_count") or 0):
                problems.append(f"counted as a crash (crash_count {b.get('crash_count')} -> {a.get('crash_count')})")
            if b.get("desired_status") == "running" and a.get("desired_status") != "running" and not jobs:
                problems.append(f"given up (desired {a.get('desired_status')}, {a.get('last_error_code')})")
            if problems:
                out.append(Violation("daemon_restarts", f"a dockerd restart at {f.started or f.at:.1f}s: "
                                     + "; ".join(problems), game,
                                     {"exit_code": (obs.get("exit_codes") or {}).get(game), "before": b, "after": a,
                                      "jobs meanwhile": [j.describe() for j in jobs]}))
    return out


def _seen_by_restored(job: JobRecord, obs: dict, ops_by_id: dict) -> bool:
    """Whether the restored database may hold the job: sent before the dump (it may be in it, not yet
    converged), or after the restore began, or admitted (its operation in the final log) once the
    restored database was in use. A job sent between the dump and the restore and taken in before
    it (acknowledged in Redis) is forgotten."""
    sent = job.sent_wall
    if sent is None or sent <= obs["dump_wall"] or sent >= obs["restore_wall"]:
        return True
    op = ops_by_id.get(job.op_id) if job.op_id is not None else None
    return op is not None and (op.get("created_epoch") or 0) >= obs["restored_wall"]


def _asks_removal(job: JobRecord, image: str | None, unknown_spec: bool) -> bool:
    """Whether the job may remove the game's container: a cleanup, patch or restart, a start of
    another image (a stop keeps the container), or any start when the container's spec is unknown."""
    if not job.valid or accepted(job) is False:
        return False
    return job.kind in ("cleanup", "patch", "restart") or (job.kind == "start" and (job.image != image
                                                                                     or unknown_spec))


def check_restore(history: History) -> list[Violation]:
    """A database restored from an older dump: no container that ran just before the restore is removed
    after it, unless the harness removed it or a job of its game sent since the restore's window began
    may have (``_asks_removal``). Before the restored database is in use, that is any such job (the
    old replicas converge it while they are being stopped); after, only one the restored database may
    hold (``_seen_by_restored``): one it forgot is no excuse. A start of the same image is one only
    on the restored database and when the container was created after the dump: the restored record
    does not know its spec revision (e.g. of a forgotten restart), so a start recreates it."""
    out = []
    ops_by_id = {op["id"]: op for op in history.ops}
    for f in history.faults:
        obs = f.observed or {}
        if f.kind != "db_restore" or "running" not in obs or obs.get("restore_wall") is None:
            continue
        if obs.get("dump_wall") is None or obs.get("restored_wall") is None:
            continue
        for cid, game in sorted(obs["running"].items(), key=lambda x: x[1]):
            gone = history.destroyed.get(cid)
            if gone is None or gone < obs["restore_wall"] or cid in history.harness_removed:
                continue
            image = history.container_images.get(cid)
            restored = gone >= obs["restored_wall"]
            unknown_spec = restored and cid not in (obs.get("containers_at_dump") or [])
            jobs = _jobs_of(history, game, obs["dump_wall"] - RESTORE_MARGIN, gone)
            if any(_asks_removal(j, image, unknown_spec) and (not restored or _seen_by_restored(j, obs, ops_by_id))
                   for j in jobs):
                continue
            out.append(Violation("restore", f"its container {cid[:12]}, running when the database was restored, "
                                 f"was removed {gone - obs['restore_wall']:.1f}s after the restore began with no job "
                                 "asking", game, {"container": cid, "created_before_dump":
                                                  cid in (obs.get("containers_at_dump") or [])}))
    return out


def left_by_restore(history: History) -> set[str]:
    """Games whose running container was created after the dump their database was restored from and is
    not the one their record names: unowned, left running for an operator (architecture, section 9)."""
    games: set[str] = set()
    for f in history.faults:
        obs = f.observed or {}
        if f.kind != "db_restore" or "containers_at_dump" not in obs:
            continue
        for c in history.containers:
            rec = history.records.get(c.get("game") or "") or {}
            if (c.get("running") and c["id"] in (obs.get("running") or {})
                    and c["id"] not in obs["containers_at_dump"] and rec.get("current_container_id") != c["id"]):
                games.add(c.get("game"))
    return games


def check_crashes(history: History, info: list[str]) -> list[Violation]:
    """Crashes are the engines' own or an outside kill's; a dockerd restart stops every engine and
    is never one (whatever the exit code: a stopping dockerd SIGKILLs an engine that outlasts its
    stop timeout), nor is a SIGKILL that fell into a restart necessarily one (it may be counted or
    not: the cheaper mistake). The stub engines never crash by themselves, so a game with more
    crashes counted than kills and removals from outside aimed at it is worth a look; information
    only (a failed restart counts as a crash too)."""
    outside: dict[str, int] = defaultdict(int)
    for f in history.faults:
        for game in history.games + history.mortal:
            for verb in ("killed", "removed"):
                outside[game] += f.note.count(f"{verb} the container of {game} from outside")
    for game, rec in sorted(history.records.items()):
        counted = rec.get("crash_count") or 0
        if counted > outside[game]:
            info.append(f"game {game}: {counted} crash(es) counted, {outside[game]} kill(s) or removal(s) from "
                        "outside aimed at it")
    return []


def check_quiesced(history: History) -> list[Violation]:
    if history.quiet:
        return []
    return [Violation("quiesced", "the system did not become quiet after the faults were healed",
                      evidence=history.not_quiet)]


# ----------------------------------------------------------------------- all
def check(history: History, *, strict_same_ms: bool = True) -> Report:
    """Every invariant over the history. ``strict_same_ms`` (the default): entries of the two streams
    within one millisecond are ordered too, start first (docs/contract.md); False reports such pairs
    as information only."""
    report = Report()
    info = report.info
    v: list[Violation] = []
    v += check_results_well_formed(history)
    v += check_answered(history, info)
    v += check_one_result_id(history, info)
    v += check_no_phantom_results(history, info)
    v += check_rejections(history)
    v += check_rest_answered(history)
    v += check_truthful_results(history)
    v += check_admission_order(history, info, strict_same_ms)
    v += check_result_order(history, info, strict_same_ms)
    v += check_no_pending(history)
    v += check_dead_letters(history, info)
    v += check_containers(history)
    models = expected_states(history, v, info)
    observed = observe(history)
    v += check_final(history, models, observed)
    v += check_records(history, observed)
    v += check_state_dirs(history, observed)
    v += check_controllers(history, info)
    v += check_daemon_restarts(history)
    v += check_restore(history)
    unowned = left_by_restore(history)
    for x in [x for x in v if x.invariant in ("final_state", "record_agrees") and x.game in unowned]:
        v.remove(x)
        info.append(f"{x.game}: runs a container created after a dump the database was restored from, left for "
                    f"an operator (not checked: {x.invariant}: {x.message})")
    v += check_crashes(history, info)
    v += check_quiesced(history)
    rank = {name: i for i, name in enumerate(INVARIANTS)}
    report.violations = sorted(v, key=lambda x: rank.get(x.invariant, len(rank)))
    report.expected = {g: sorted(m.states) for g, m in models.items()}
    report.observed = observed
    report.trails = {g: m.trail for g, m in models.items()}
    return report
