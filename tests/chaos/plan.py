"""The seeded plans of a chaos run: the workload and the fault schedule. Pure: a seed and a duration
give the same plans on every machine (the run itself is real time, so a replay repeats the plans,
not the exact interleaving)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

REPO = "galaxy/engine-stub"
V10, V11 = f"{REPO}:1.0", f"{REPO}:1.1"
MUTE, CRASH = f"{REPO}:mute", f"{REPO}:crash"
MISSING = f"{REPO}:missing"       # not in the private daemon; its pull fails at once (no registry)
IMAGES_TO_LOAD = (V10, V11, MUTE, CRASH)
NEVER_HEALTHY = (MUTE, CRASH, MISSING)  # a start of these can only fail (or be superseded)
REASONS = ("orphan_cleanup", "cancelled", "finished", "admin_request", "timeout")

FAULT_KINDS = ("kill9", "leader_change", "pause_leader", "postgres_down", "redis_down", "dockerd_restart",
               "events_cut", "container_kill", "container_remove")
# Opt-in (``--faults``): not in a run unless asked for, so that a seed without the option plays
# exactly as before. ``stubborn_engines`` is no fault of its own: the 1.1 engines' PID 1 ignores
# SIGTERM (a dockerd restart then SIGKILLs them, exit 137), and the dockerd restarts are watched.
EXTRA_FAULT_KINDS = ("backlog", "redis_readonly", "hostile_engine", "db_restore")
EXTRA_OPTIONS = EXTRA_FAULT_KINDS + ("stubborn_engines",)
BACKLOG_CUTS = ("kill9", "sigterm", "sigstop", "table_lock", "redis_blip")
READ_COUNT = 500                # the intake reads up to this many entries per stream per read (intake.py)
STATEMENT_TIMEOUT = 30.0        # the controller's command timeout (desired/db/pool.py): a lock held longer
HOSTILE_STATUSES = (            # what a hostile engine's admin status says (its status.json, served verbatim)
    "turn 2147483647", "turn 2147483648", "turn 2**64", "turn 1e400", "last_generation turn 2**63",
    "phase with NUL and a lone surrogate", "not JSON", "a JSON list", "nested 100000 deep", "1 MB error text",
)
LEASE_TTL = 2.0


@dataclass
class PlannedJob:
    at: float                       # seconds after the workload starts
    tag: str                        # unique; also sent as the entry field chaos_tag (ignored by rtmanager)
    via: str                        # "stream" | "rest"
    kind: str                       # start | stop | restart | patch | cleanup
    game: str | None                # the game it is about (None: the game_id itself is the defect)
    image: str | None = None
    reason: str | None = None
    shape: str = "ok"               # "ok", or the defect of a bad shape
    expect_code: str | None = None  # bad shapes: the error_code the result must carry
    stream: str | None = None       # stream jobs: "start" | "stop"
    fields: dict = field(default_factory=dict)  # stream jobs: the entry (values str or bytes)
    path_game: str | None = None    # REST: the game_id in the path
    body: object = None             # REST: the JSON body (or raw bytes for a body that is not JSON)
    wait: float = 0.0               # REST: ?wait=
    pair: str | None = None         # XADDed in one pipeline with this other tag (same millisecond, likely)
    burst: str | None = None        # a backlog burst: XADDed by its fault, all in one pipeline, in plan order

    def describe(self) -> str:
        if self.via == "stream":
            what = f"{self.stream}-stream {self.kind}"
        else:
            what = f"REST {self.kind} (wait={self.wait:g})"
        extra = "" if self.shape == "ok" else f" BAD[{self.shape}]"
        bits = [b for b in (self.image, self.reason) if b]
        return f"{self.tag} {what} {self.game or '-'} {' '.join(bits)}{extra}".rstrip()

    def to_json(self) -> dict:
        d = asdict(self)
        d["fields"] = {k: _j(v) for k, v in self.fields.items()}
        d["body"] = _j(self.body)
        return d


def _j(v):
    if isinstance(v, bytes):
        return {"bytes": v.decode("latin-1")}
    return v


@dataclass
class PlannedFault:
    at: float
    kind: str
    duration: float = 0.0
    params: dict = field(default_factory=dict)

    def describe(self) -> str:
        p = " ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        d = f" {self.duration:.1f}s" if self.duration else ""
        return f"t={self.at:6.1f}s {self.kind}{d} {p}".rstrip()

    def to_json(self) -> dict:
        return asdict(self)


def game_names(n: int) -> tuple[list[str], list[str]]:
    """``n`` games: all but two are never cleaned up (removal is final), two are mortal."""
    mortal = [f"mortal-{i}" for i in range(min(2, n))]
    return [f"game-{i}" for i in range(n - len(mortal))], mortal


# --------------------------------------------------------------------------- workload
def _start_image(rng: random.Random) -> str:
    return rng.choices([V10, V11, MUTE, MISSING, CRASH], weights=[46, 36, 6, 6, 6])[0]


def _patch_image(rng: random.Random) -> str:
    return rng.choices([V10, V11, MUTE, MISSING], weights=[45, 45, 5, 5])[0]


def _bad_stream(rng: random.Random, game: str, tag: str) -> PlannedJob:
    """One defect per entry, with the error code the contract gives it."""
    start = [  # (defect, fields, code)
        ("game_id pattern", {"game_id": "Bad_Game", "image_ref": V10}, "invalid_request"),
        ("game_id newline", {"game_id": f"{game}\n", "image_ref": V10}, "invalid_request"),
        ("game_id too long", {"game_id": "g" * 60, "image_ref": V10}, "invalid_request"),
        ("game_id missing", {"image_ref": V10}, "invalid_request"),
        ("game_id not UTF-8", {"game_id": b"\xff\xfegame", "image_ref": V10}, "invalid_request"),
        ("image_ref missing", {"game_id": game}, "invalid_request"),
        ("image_ref empty", {"game_id": game, "image_ref": ""}, "invalid_request"),
        ("image_ref not UTF-8", {"game_id": game, "image_ref": b"galaxy/engine-stub:\xff1"}, "invalid_request"),
        ("image_ref syntax", {"game_id": game, "image_ref": "Galaxy/Engine Stub:1.0"}, "invalid_request"),
        ("image_ref too long", {"game_id": game, "image_ref": "galaxy/engine-stub:" + "x" * 1100},
         "invalid_request"),
        ("image outside allowlist", {"game_id": game, "image_ref": "busybox:latest"}, "image_rejected"),
        ("image outside allowlist", {"game_id": game, "image_ref": "galaxy/engine:1.0"}, "image_rejected"),
    ]
    stop = [
        ("reason unknown", {"game_id": game, "reason": "because"}, "invalid_request"),
        ("reason missing", {"game_id": game}, "invalid_request"),
        ("reason not UTF-8", {"game_id": game, "reason": b"\xc3\x28"}, "invalid_request"),
        ("game_id pattern", {"game_id": "-leading-dash", "reason": "cancelled"}, "invalid_request"),
        ("game_id empty", {"game_id": "", "reason": "cancelled"}, "invalid_request"),
    ]
    which = "start" if rng.random() < 0.65 else "stop"
    shape, fields, code = rng.choice(start if which == "start" else stop)
    about = game if fields.get("game_id") == game else None
    return PlannedJob(at=0, tag=tag, via="stream", kind=which, game=about, shape=shape, expect_code=code,
                      stream=which, fields={**fields, "chaos_tag": tag})


def _bad_rest(rng: random.Random, game: str, tag: str) -> PlannedJob:
    options = [  # (kind, path game, body, defect, code)
        ("start", game, {"image_ref": "busybox:latest"}, "image outside allowlist", "image_rejected"),
        ("start", game, {"image_ref": "Not A Ref"}, "image_ref syntax", "invalid_request"),
        ("start", "Bad_Game", {"image_ref": V10}, "game_id pattern", "invalid_request"),
        ("patch", game, {"image_ref": "galaxy/engine:1.1"}, "image outside allowlist", "image_rejected"),
        ("stop", game, {"reason": "because"}, "reason unknown", "invalid_request"),
        ("start", game, {}, "image_ref missing", "invalid_request"),
        ("start", game, b"{not json", "body not JSON", None),
    ]
    kind, path_game, body, shape, code = rng.choice(options)
    return PlannedJob(at=0, tag=tag, via="rest", kind=kind, game=game if path_game == game else None,
                      shape=shape, expect_code=code, path_game=path_game, body=body, wait=1.0)


def _stream_job(rng: random.Random, kind: str, game: str, tag: str) -> PlannedJob:
    if kind == "start":
        image = _start_image(rng)
        return PlannedJob(at=0, tag=tag, via="stream", kind="start", game=game, image=image, stream="start",
                          fields={"game_id": game, "image_ref": image, "chaos_tag": tag})
    reason = rng.choice(REASONS)
    return PlannedJob(at=0, tag=tag, via="stream", kind="stop", game=game, reason=reason, stream="stop",
                      fields={"game_id": game, "reason": reason, "chaos_tag": tag})


def _rest_job(rng: random.Random, kind: str, game: str, tag: str) -> PlannedJob:
    wait = rng.choice([0.0, 0.5, 1.0, 3.0, 8.0])
    job = PlannedJob(at=0, tag=tag, via="rest", kind=kind, game=game, path_game=game, wait=wait, body=None)
    if kind == "start":
        job.image = _start_image(rng)
        job.body = {"image_ref": job.image}
    elif kind == "patch":
        job.image = _patch_image(rng)
        job.body = {"image_ref": job.image}
    elif kind == "stop":
        if rng.random() < 0.5:
            job.reason = rng.choice(REASONS)
            job.body = {"reason": job.reason}
        else:
            job.reason = "admin_request"  # the default
    return job


def plan_workload(seed: int, duration: float, games: list[str], mortal: list[str]) -> list[PlannedJob]:
    rng = random.Random(f"workload-{seed}")
    everyone = games + mortal
    jobs: list[PlannedJob] = []
    t = 0.5
    n = 0

    def tag() -> str:
        nonlocal n
        n += 1
        return f"j{n:05d}"

    def one(game_pool: list[str]) -> list[PlannedJob]:
        game = rng.choice(game_pool)
        r = rng.random()
        if r < 0.36:
            return [_stream_job(rng, "start", game, tag())]
        if r < 0.60:
            return [_stream_job(rng, "stop", game, tag())]
        if r < 0.66:  # a start and a stop in one pipeline: most likely within one millisecond
            a = _stream_job(rng, "start", game, tag())
            b = _stream_job(rng, "stop", game, tag())
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            first.pair, second.pair = second.tag, first.tag
            return [first, second]
        if r < 0.86:
            kind = rng.choices(["start", "stop", "restart", "patch", "cleanup"], weights=[4, 4, 5, 5, 3])[0]
            if kind == "cleanup" and game not in mortal:
                kind = "stop"
            return [_rest_job(rng, kind, game, tag())]
        if r < 0.96:
            return [_bad_stream(rng, game, tag())]
        return [_bad_rest(rng, game, tag())]

    while t < duration:
        r = rng.random()
        if r < 0.08:  # a burst, mostly on one or two games: their jobs interleave closely
            focus = rng.sample(everyone, k=min(len(everyone), rng.choice([1, 1, 2])))
            for _ in range(rng.randint(4, 16)):
                for j in one(focus):
                    j.at = t
                    jobs.append(j)
                t += rng.uniform(0.0, 0.03)
        elif r < 0.12:  # a lull: let things converge
            t += rng.uniform(3.0, 10.0)
        else:
            for j in one(everyone):
                j.at = t
                jobs.append(j)
            t += rng.expovariate(1 / 0.6)
    return [j for j in jobs if j.at < duration]


# ------------------------------------------------------------------------- faults
def parse_extra(text: str | None) -> tuple[str, ...]:
    """``--faults``: a comma-separated list of EXTRA_OPTIONS, or ``all``; unknown names raise ValueError."""
    if not text:
        return ()
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return EXTRA_OPTIONS
    unknown = sorted(set(names) - set(EXTRA_OPTIONS))
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(EXTRA_OPTIONS)} or all")
    return tuple(n for n in EXTRA_OPTIONS if n in names)


def plan_faults(seed: int, duration: float, n_games: int, *, dockerd_restart: bool = True,
                extra: tuple[str, ...] = ()) -> list[PlannedFault]:
    """Every kind once first (in a seeded order), then a seeded mix; one fault at a time. ``extra``
    (EXTRA_OPTIONS) adds kinds to both; without it the schedule is what it always was."""
    rng = random.Random(f"faults-{seed}")
    short = duration < 180  # a CI-sized run: shorter outages so that every kind fits
    cap = 6.0 if short else 20.0
    added = [k for k in EXTRA_FAULT_KINDS if k in extra]
    kinds = list(FAULT_KINDS) + added
    rng.shuffle(kinds)
    weights = {"kill9": 3, "leader_change": 2, "pause_leader": 2, "postgres_down": 2, "redis_down": 2,
               "dockerd_restart": 1.5, "events_cut": 2, "container_kill": 3, "container_remove": 2}
    weights.update({k: 2 for k in added})
    if "stubborn_engines" in extra:
        weights["dockerd_restart"] = 3
    faults: list[PlannedFault] = []
    t = rng.uniform(3.0, 6.0)
    while t < duration - 2:
        kind = kinds.pop(0) if kinds else rng.choices(list(weights), weights=list(weights.values()))[0]
        f = PlannedFault(at=round(t, 2), kind=kind)
        if kind == "kill9":
            f.params = {"target": rng.choice(["leader", "leader", "any"]),
                        "restart_after": round(rng.uniform(0.2, 5), 2)}
            f.duration = f.params["restart_after"]
        elif kind == "leader_change":
            f.params = {"old_back_after": round(rng.uniform(1, 5), 2),
                        "then": rng.choice(["stop_new", "keep_both", "kill_new"])}
            f.duration = 8 + f.params["old_back_after"]  # start a standby, hand over, come back: about that
        elif kind == "pause_leader":
            f.duration = round(LEASE_TTL + rng.uniform(0.5, 4.0), 2)
            f.params = {"with_standby": rng.random() < 0.6}
            overhead = 1 + (3 if f.params["with_standby"] else 0)  # a standby to start, a look after
        elif kind in ("postgres_down", "redis_down"):
            f.duration = round(rng.uniform(1.0, cap), 2)
            f.params = {"how": rng.choice(["fast", "immediate"] if kind == "postgres_down" else ["shutdown", "kill"])}
        elif kind == "dockerd_restart":
            f.params = {"enabled": dockerd_restart}
        elif kind == "events_cut":
            f.params = {"then_kill_game": rng.randrange(n_games) if rng.random() < 0.5 else None}
        elif kind in ("container_kill", "container_remove"):
            f.params = {"game": rng.randrange(n_games)}
        elif kind == "backlog":
            cut = rng.choice(BACKLOG_CUTS)
            # the intake takes a burst in well under a second: cut it soon, or (table_lock) lock first
            f.params = {"entries": rng.randint(150, 400), "cut": cut, "cut_after": round(rng.uniform(0.0, 0.4), 2)}
            if cut == "table_lock":
                f.params["hold"] = round(STATEMENT_TIMEOUT + rng.uniform(1.0, 6.0), 1)
            elif cut == "sigstop":
                f.params["hold"] = round(LEASE_TTL + rng.uniform(0.5, 3.0), 2)
            elif cut == "redis_blip":
                f.params["hold"] = round(rng.uniform(0.3, 2.0), 2)
            else:
                f.params["hold"] = round(rng.uniform(0.2, 2.0), 2)  # back after
            f.duration = f.params["hold"] + 3
        elif kind == "redis_readonly":
            f.duration = round(rng.uniform(2.0, cap + 4), 2)
        elif kind == "hostile_engine":
            f.duration = round(rng.uniform(5.0, 15.0), 2)
            f.params = {"game": rng.randrange(n_games), "status": rng.choice(HOSTILE_STATUSES)}
        elif kind == "db_restore":
            f.params = {"age": round(rng.uniform(4.0, 12.0 if short else 40.0), 2)}
            f.duration = f.params["age"] + 10  # the dump's age, then stop, restore and start again: about that
        faults.append(f)
        if kind == "pause_leader":
            t += overhead
        t += f.duration + (rng.uniform(0.5, 3.0) if short else rng.uniform(1.0, 12.0))
    return faults


# ------------------------------------------------------------------------ backlogs
def plan_backlogs(seed: int, faults: list[PlannedFault], games: list[str], mortal: list[str]) -> list[PlannedJob]:
    """The entries of every ``backlog`` fault: more than one read (READ_COUNT) on the start stream
    and often on the stop stream too, XADDed at once in this order. Most of the start stream's
    entries come first, so that the start stream's second read holds starts older than the stop
    stream's first read; among them, for one or two games, a start far into the start stream and
    a stop of the same game early on the stop stream (sent after it, so applied after it). Fillers
    are starts and stops of every game (mostly replays) and bad shapes (rejected at once)."""
    rng = random.Random(f"backlog-{seed}")
    jobs: list[PlannedJob] = []
    for i, f in enumerate(faults):
        if f.kind == "backlog":
            for j in _backlog(rng, f"B{i}", int(f.params.get("entries", 200)), games, games + mortal):
                j.at = f.at
                jobs.append(j)
    return jobs


def _backlog(rng: random.Random, burst: str, total: int, games: list[str], everyone: list[str]) -> list[PlannedJob]:
    n = 0

    def tag() -> str:
        nonlocal n
        n += 1
        return f"{burst}-{n:04d}"

    def filler(stream: str) -> PlannedJob:
        game = rng.choice(everyone)
        if rng.random() < 0.45:
            for _ in range(20):
                j = _bad_stream(rng, game, tag())
                if j.stream == stream:
                    return j
        return _stream_job(rng, stream, game, tag())

    n_start = max(READ_COUNT + 10, int(total * rng.uniform(0.5, 0.7)))
    n_stop = max(20, total - n_start)
    head = [filler("stop") for _ in range(rng.randint(0, 10))]  # a few stops before the start stream's run
    starts = [filler("start") for _ in range(n_start)]
    stops = [filler("stop") for _ in range(max(0, n_stop - len(head)))]
    for game in rng.sample(games, k=min(len(games), rng.choice([1, 2]))):
        image = rng.choice([V10, V11])
        far = PlannedJob(at=0, tag=tag(), via="stream", kind="start", game=game, image=image, stream="start")
        far.fields = {"game_id": game, "image_ref": image, "chaos_tag": far.tag}
        reason = rng.choice(REASONS)
        early = PlannedJob(at=0, tag=tag(), via="stream", kind="stop", game=game, reason=reason, stream="stop")
        early.fields = {"game_id": game, "reason": reason, "chaos_tag": early.tag}
        starts.insert(rng.randint(READ_COUNT + 1, len(starts)), far)
        stops.insert(rng.randint(0, min(len(stops), READ_COUNT // 2 - len(head))), early)
    order = head + starts + stops
    for j in order:
        j.burst = burst
    return order
