"""rtmanager against the local Docker engine's own limit and docker-compose, side by side.

    bash bench/run.sh [--games 10] [--bursts 20,100] [--steady-games 100] [--steady-seconds 60]

Everything runs in one go on the same dockerd, the same stub image and the
same container settings (network, labels, hardening, limits, bind mount):

1. single game: XADD of a start job -> its success result, against a plain
   docker-py create + start + health poll (the same poll schedule);
2. start bursts: N jobs at once -> the last result, against the plain loop
   sequentially, the plain loop with rtmanager's concurrency, and
   ``docker-compose up -d`` of N services until all answer their health path;
3. stop bursts: the same for stopping;
4. steady state: M running games and nothing to do: controller CPU seconds,
   Docker API calls and SQL statements per resync, resident memory;
5. the planner alone: plan() decisions per second.

Prints a table and writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import docker
import docker.types
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.planner import plan  # noqa: E402
from desired.model import DesiredStatus, RuntimeRecord, Status  # noqa: E402
from observed.model import LABEL_GAME_ID, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_SPEC_HASH, ObservedContainer  # noqa: E402

IMAGE = "galaxy/engine-stub:1.0"
NETWORK = "rtm-bench"
INSTANCE = "bench"
PLAIN_INSTANCE = "bench-plain"
ADMIN_DSN = os.environ.get("RTMANAGER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:55432/postgres")
REDIS_URL = os.environ.get("RTMANAGER_REDIS_URL", "redis://127.0.0.1:56379/0")
CONCURRENCY = int(os.environ.get("RTMANAGER_CONCURRENCY", "4"))
MEMORY, NANO_CPUS, PIDS = 512 * 1024**2, 10**9, 256
# rtmanager's defaults for what an engine runs as and writes to (RTMANAGER_ENGINE_USER, _READ_ONLY, _TMPFS):
# dockerd's work for them (a tmpfs mount, a read-only root) is the plain loop's too, or the ratio charges
# it to the controller.
ENGINE_UID, TMPFS = 10000, {"/tmp": "rw,nosuid,nodev,noexec,size=64m"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ---------------------------------------------------------------- plain docker-py
class Plain:
    """What one would write without a controller: create, start, poll health."""

    def __init__(self, state_root: Path, *, as_rtmanager: bool = True) -> None:
        self.client = docker.from_env(timeout=60, max_pool_size=16)
        self.api = self.client.api
        self.state_root = state_root
        # False: without the engine user, the read-only root and the tmpfs (what this loop did before
        # 2026-12-05, and what ``--hardening-cost`` compares with).
        self.as_rtmanager = as_rtmanager

    def start_one(self, name: str) -> float:
        t0 = time.perf_counter()
        state = self.state_root / name
        state.mkdir(mode=0o700, exist_ok=True)
        extra: dict = {}
        if self.as_rtmanager:
            os.chown(state, ENGINE_UID, ENGINE_UID)
            extra = {"read_only": True, "tmpfs": TMPFS}
        hc = self.api.create_host_config(
            network_mode=NETWORK, mounts=[docker.types.Mount(target="/var/lib/galaxy-engine", source=str(state),
                                                             type="bind")],
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"], privileged=False, pids_limit=PIDS,
            mem_limit=MEMORY, memswap_limit=MEMORY, nano_cpus=NANO_CPUS, restart_policy={"Name": "no"},
            log_config=docker.types.LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
            **extra)
        nc = self.api.create_networking_config({NETWORK: self.api.create_endpoint_config(aliases=[name])})
        cid = self.api.create_container(IMAGE, name=name, hostname=name, host_config=hc, networking_config=nc,
                                        user=f"{ENGINE_UID}:{ENGINE_UID}" if self.as_rtmanager else None,
                                        labels={LABEL_MANAGED_BY: "bench", LABEL_INSTANCE: PLAIN_INSTANCE,
                                                LABEL_GAME_ID: name},
                                        environment={"GAME_ID": name, "ENGINE_PORT": "8080",
                                                     "ENGINE_STATE_DIR": "/var/lib/galaxy-engine"})["Id"]
        self.api.start(cid)
        ip = self.api.inspect_container(cid)["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
        wait_healthy(ip)
        return time.perf_counter() - t0

    def stop_one(self, name: str) -> float:
        t0 = time.perf_counter()
        self.api.stop(name, timeout=10)
        return time.perf_counter() - t0

    def cleanup(self) -> None:
        for c in self.client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={PLAIN_INSTANCE}"}):
            c.remove(force=True)


def wait_healthy(ip: str, timeout: float = 30.0) -> None:
    """The controller's own probe schedule: 20 ms, doubling to 0.5 s."""
    deadline, delay = time.monotonic() + timeout, 0.02
    while True:
        try:
            with urllib.request.urlopen(f"http://{ip}:8080/healthz", timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ip} not healthy")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


# ----------------------------------------------------------------- rtmanager
class Rtm:
    def __init__(self, work: Path, resync: float) -> None:
        self.db = f"rtm_bench_{os.getpid()}"
        self.http_port = free_port()
        u = f"b{os.getpid()}"
        self.env = {
            **os.environ,
            "RTMANAGER_DATABASE_URL": ADMIN_DSN.rsplit("/", 1)[0] + "/" + self.db,
            "RTMANAGER_REDIS_URL": REDIS_URL, "RTMANAGER_DOCKER_NETWORK": NETWORK,
            "RTMANAGER_STATE_ROOT": str(work / "rtm-games"), "RTMANAGER_INSTANCE": INSTANCE,
            "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*", "RTMANAGER_START_STREAM": f"{u}:start",
            "RTMANAGER_STOP_STREAM": f"{u}:stop", "RTMANAGER_RESULTS_STREAM": f"{u}:results",
            "RTMANAGER_HTTP_PORT": str(self.http_port), "RTMANAGER_RESYNC_INTERVAL": str(resync),
            "RTMANAGER_LOG_LEVEL": "WARNING", "RTMANAGER_CONCURRENCY": str(CONCURRENCY),
            "RTMANAGER_CLEANUP_TTL": "0",
        }
        self.r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        self.last = "0-0"
        self.proc: subprocess.Popen | None = None
        self.log = work / "rtmanager.log"

    def setup(self) -> None:
        async def create() -> None:
            admin = await asyncpg.connect(ADMIN_DSN)
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{self.db}"')
            await admin.close()
        asyncio.run(create())
        exe = Path(sys.executable).with_name("rtmanager")
        subprocess.run([str(exe), "migrate"], env=self.env, check=True, capture_output=True)
        self.proc = subprocess.Popen([str(exe), "run"], env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1) as resp:
                    if json.load(resp)["leader"]:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("rtmanager did not become leader; see " + str(self.log))

    def teardown(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)
        for c in docker.from_env().containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={INSTANCE}"}):
            c.remove(force=True)
        for key in self.r.scan_iter(match=f"b{os.getpid()}:*"):
            self.r.delete(key)

        async def drop() -> None:
            admin = await asyncpg.connect(ADMIN_DSN)
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            await admin.close()
        asyncio.run(drop())

    def submit(self, kind: str, game: str) -> str:
        if kind == "start":
            return self.r.xadd(self.env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": IMAGE})
        return self.r.xadd(self.env["RTMANAGER_STOP_STREAM"], {"game_id": game, "reason": "finished"})

    def wait_results(self, entries: set[str], timeout: float = 300) -> dict[str, tuple[float, dict]]:
        """entry id -> (perf_counter time seen, fields)."""
        got: dict[str, tuple[float, dict]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(entries):
            if time.monotonic() > deadline:
                raise RuntimeError(f"results missing: {len(entries) - len(got)}")
            reply = self.r.xread({self.env["RTMANAGER_RESULTS_STREAM"]: self.last}, count=1000, block=100)
            for _, items in reply or []:
                for eid, fields in items:
                    self.last = eid
                    if fields["job_entry_id"] in entries:
                        got[fields["job_entry_id"]] = (time.perf_counter(), fields)
        bad = [f for _, f in got.values() if f["outcome"] != "success"]
        if bad:
            raise RuntimeError(f"failed jobs: {bad[:3]}")
        return got

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def remove_by_label(instance: str) -> None:
    for c in docker.from_env().containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"}):
        c.remove(force=True)


# ------------------------------------------------------------------ compose
def compose_file(n: int, state_root: Path, prefix: str) -> str:
    lines = ["version: '2.4'", "services:"]
    for i in range(n):
        name = f"{prefix}-{i}"
        (state_root / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(state_root / name, ENGINE_UID, ENGINE_UID)
        lines += [
            f"  {name}:", f"    image: {IMAGE}", f"    container_name: {name}", f"    hostname: {name}",
            f"    user: '{ENGINE_UID}:{ENGINE_UID}'", "    read_only: true",
            f"    tmpfs: ['/tmp:{TMPFS['/tmp']}']",
            "    cap_drop: [ALL]", "    security_opt: ['no-new-privileges:true']", f"    pids_limit: {PIDS}",
            "    mem_limit: 512m", "    memswap_limit: 512m", "    cpus: 1.0", "    restart: 'no'",
            "    environment: {GAME_ID: x, ENGINE_PORT: '8080', ENGINE_STATE_DIR: /var/lib/galaxy-engine}",
            f"    labels: {{'{LABEL_INSTANCE}': compose-bench}}",
            f"    volumes: ['{state_root / name}:/var/lib/galaxy-engine']", "    networks: [games]",
        ]
    lines += ["networks:", "  games:", "    external: true", f"    name: {NETWORK}"]
    return "\n".join(lines) + "\n"


COMPOSE_TIMEOUT = 600.0  # seconds an `up` may take before its figure is given up


def compose_cmd() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_up(n: int, work: Path) -> tuple[float, float] | None:
    cmd = compose_cmd()
    if cmd is None:
        return None
    d = work / f"compose-{n}"
    d.mkdir(exist_ok=True)
    (d / "docker-compose.yml").write_text(compose_file(n, work / "compose-games", f"cb{n}"))
    base = cmd + ["-f", str(d / "docker-compose.yml"), "-p", f"rtmbench{n}"]
    # docker-compose 1.x runs a service's create inside the project's parallel pool: with more services
    # than its limit (64), every slot holds a service waiting for a create that gets no slot, and `up`
    # never returns (seen here at 100). A limit above the services' count avoids that; a timeout leaves
    # the column empty instead of the whole run hanging.
    env = {**os.environ, "COMPOSE_PARALLEL_LIMIT": str(max(64, 2 * n))}
    t0 = time.perf_counter()
    try:
        subprocess.run(base + ["up", "-d"], check=True, capture_output=True, env=env, timeout=COMPOSE_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"docker-compose up of {n} services did not return in {COMPOSE_TIMEOUT:.0f}s: no compose figure",
              file=sys.stderr)
        subprocess.run(base + ["down", "-t", "1"], check=False, capture_output=True, env=env)
        remove_by_label("compose-bench")
        return None
    api = docker.from_env().api
    for i in range(n):
        ip = api.inspect_container(f"cb{n}-{i}")["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
        wait_healthy(ip)
    up = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(base + ["stop", "-t", "10"], check=True, capture_output=True, env=env)
    stop = time.perf_counter() - t0
    subprocess.run(base + ["down"], check=False, capture_output=True, env=env)
    remove_by_label("compose-bench")
    return up, stop


# ---------------------------------------------------------------- scenarios
def bench_single(rtm: Rtm, plain: Plain, games: int) -> dict:
    r_times, p_times = [], []
    for i in range(games):
        g = f"single-{i}"
        t0 = time.perf_counter()
        entry = rtm.submit("start", g)
        seen, _ = rtm.wait_results({entry})[entry]
        r_times.append(seen - t0)
        p_times.append(plain.start_one(f"plain-single-{i}"))
    plain.cleanup()
    return {"rtmanager_median": statistics.median(r_times), "rtmanager_p95": pct(r_times, 0.95),
            "plain_median": statistics.median(p_times), "plain_p95": pct(p_times, 0.95),
            "ratio_median": statistics.median(r_times) / statistics.median(p_times),
            "overhead_median_ms": (statistics.median(r_times) - statistics.median(p_times)) * 1000}


def bench_hardening(work: Path, pairs: int) -> dict:
    """What rtmanager's engine defaults cost dockerd, not the controller: the plain loop's sequential
    start (create, start, health) with the engine user, the read-only root and the tmpfs, and without
    them, alternated so that the machine's drift falls on both."""
    full, base = Plain(work / "plain-games"), Plain(work / "plain-games", as_rtmanager=False)
    times: dict[str, list[float]] = {"as_rtmanager": [], "without": []}
    try:
        for i in range(pairs):
            for key, plain in (("as_rtmanager", full), ("without", base)) if i % 2 == 0 else \
                    (("without", base), ("as_rtmanager", full)):
                times[key].append(plain.start_one(f"plain-hard-{key}-{i}"))
    finally:
        full.cleanup()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"pairs": pairs, "median_s": medians, "p95_s": {k: pct(v, 0.95) for k, v in times.items()},
            "extra_ms": (medians["as_rtmanager"] - medians["without"]) * 1000}


def docker_calls(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """The controller's Docker API calls between two scrapes, per job, by operation."""
    out: dict[str, float] = {}
    for name, value in after.items():
        if name.startswith("rtmanager_docker_api_calls_total{"):
            op = name.split('operation="', 1)[1].split('"', 1)[0] if 'operation="' in name else name
            calls = (value - before.get(name, 0.0)) / n
            if calls:
                out[op] = out.get(op, 0.0) + calls
    return out


def bench_burst(rtm: Rtm, plain: Plain, n: int, work: Path) -> dict:
    out: dict = {"n": n}
    games = [f"burst{n}-{i}" for i in range(n)]
    for what in ("start", "stop"):
        # The controller's CPU over the burst, up to its last result: its cost per job, at rest work included.
        m0 = rtm.metrics()  # scraped before the timed window: serving it costs the controller CPU too
        t0, c0 = time.perf_counter(), rtm.cpu_seconds()
        entries = {rtm.submit(what, g) for g in games}
        got = rtm.wait_results(entries)
        out[f"rtm_{what}"] = max(t for t, _ in got.values()) - t0
        out[f"rtm_cpu_ms_per_{what}"] = (rtm.cpu_seconds() - c0) * 1000 / n
        out[f"rtm_docker_calls_per_{what}"] = docker_calls(m0, rtm.metrics(), n)
    remove_by_label(INSTANCE)

    t0 = time.perf_counter()
    for i in range(n):
        plain.start_one(f"plain-seq{n}-{i}")
    out["plain_seq_start"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        plain.stop_one(f"plain-seq{n}-{i}")
    out["plain_seq_stop"] = time.perf_counter() - t0
    plain.cleanup()

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        t0 = time.perf_counter()
        list(pool.map(plain.start_one, [f"plain-par{n}-{i}" for i in range(n)]))
        out["plain_par_start"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(pool.map(plain.stop_one, [f"plain-par{n}-{i}" for i in range(n)]))
        out["plain_par_stop"] = time.perf_counter() - t0
    plain.cleanup()

    compose = compose_up(n, work)
    out["compose_start"], out["compose_stop"] = compose if compose else (None, None)
    return out


def bench_steady(rtm: Rtm, n: int, seconds: float, resync: float) -> dict:
    games = [f"steady-{i}" for i in range(n)]
    rtm.wait_results({rtm.submit("start", g) for g in games}, timeout=600)
    time.sleep(resync + 1)  # let the resync after the burst settle

    async def stmt_counts() -> dict[str, float] | None:
        conn = await asyncpg.connect(rtm.env["RTMANAGER_DATABASE_URL"])
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            rows = await conn.fetch(
                "SELECT query, calls::float8 AS calls FROM pg_stat_statements s JOIN pg_database d"
                " ON d.oid = s.dbid WHERE d.datname = current_database()"
                " AND s.query NOT ILIKE '%pg_stat_statements%'")
            return {r["query"]: r["calls"] for r in rows}
        except asyncpg.PostgresError:
            return None
        finally:
            await conn.close()

    m0, cpu0, q0 = rtm.metrics(), rtm.cpu_seconds(), asyncio.run(stmt_counts())
    time.sleep(seconds)
    m1, cpu1, q1 = rtm.metrics(), rtm.cpu_seconds(), asyncio.run(stmt_counts())
    per_query = {q: c - (q0 or {}).get(q, 0.0) for q, c in (q1 or {}).items() if c - (q0 or {}).get(q, 0.0) > 0}
    resync_markers = ("observed_generation <> generation", "GROUP BY status", "count(*) FROM job_results")
    resync_sql = sum(c for q, c in per_query.items() if any(m in q for m in resync_markers))
    top = sorted(per_query.items(), key=lambda kv: -kv[1])[:12]

    def delta(prefix: str) -> dict[str, float]:
        return {k: m1[k] - m0.get(k, 0.0) for k in m1 if k.startswith(prefix) and m1[k] - m0.get(k, 0.0)}

    resyncs = delta('rtmanager_resync_total{result="ok"}').get('rtmanager_resync_total{result="ok"}', 0)
    by_op = docker_calls(m0, m1, 1)
    reconciles = sum(delta("rtmanager_reconcile_total").values())
    return {"games": n, "seconds": seconds, "resyncs": resyncs, "cpu_seconds": cpu1 - cpu0,
            "cpu_percent": 100 * (cpu1 - cpu0) / seconds, "rss_mib": rtm.rss_mib(),
            "docker_calls": by_op,
            "docker_calls_per_resync": {k: v / resyncs for k, v in by_op.items()} if resyncs else {},
            "reconciles": reconciles,
            "sql_statements": sum(per_query.values()) if q1 is not None else None,
            "sql_per_minute": sum(per_query.values()) * 60 / seconds if q1 is not None else None,
            "resync_sql_per_resync": resync_sql / resyncs if (q1 is not None and resyncs) else None,
            "top_queries": [{"calls": c, "query": " ".join(q.split())[:160]} for q, c in top]}


def bench_planner(n: int) -> dict:
    rng = random.Random(7)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    pairs = []
    for i in range(n):
        status = rng.choice(list(Status))
        desired = rng.choice(list(DesiredStatus))
        gen = rng.randint(1, 5)
        rec = RuntimeRecord(
            game_id=f"g{i}", status=status, current_container_id="c" if status is Status.RUNNING else None,
            current_image_ref="img" if status in (Status.RUNNING, Status.STOPPED) else None,
            engine_endpoint="e", state_path="/s", docker_network="n",
            started_at=now if status is Status.RUNNING else None,
            stopped_at=now if status is Status.STOPPED else None,
            removed_at=now if status is Status.REMOVED else None, last_op_at=now, created_at=now,
            desired_status=desired, desired_image_ref="img", generation=gen,
            observed_generation=rng.randint(0, gen), restart_not_before=None)
        container = None if rng.random() < 0.3 else ObservedContainer(
            id=rng.choice(["c", "d"]), name=f"galaxy-game-g{i}", image="img",
            state=rng.choice(["running", "exited", "created"]),
            labels={LABEL_MANAGED_BY: "rtmanager", LABEL_INSTANCE: "default", LABEL_GAME_ID: f"g{i}",
                    LABEL_SPEC_HASH: rng.choice(["h1", "h2"])},
            created_at=now - timedelta(seconds=60))
        pairs.append((rec, container))
    t0 = time.perf_counter()
    for rec, container in pairs:
        plan(rec, container, want_hash="h1", instance="default", now=now, cleanup_ttl=3600)
    elapsed = time.perf_counter() - t0
    return {"pairs": n, "seconds": elapsed, "decisions_per_second": n / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=10)
    ap.add_argument("--bursts", default="20,100")
    ap.add_argument("--steady-games", type=int, default=100)
    ap.add_argument("--steady-seconds", type=float, default=60)
    ap.add_argument("--resync", type=float, default=5)
    ap.add_argument("--planner-pairs", type=int, default=100_000)
    ap.add_argument("--hardening-cost", type=int, default=0, metavar="PAIRS",
                    help="also time the plain loop's start with and without rtmanager's engine user, read-only "
                         "root and tmpfs, PAIRS starts each (alternated)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/latest.json"))
    args = ap.parse_args()

    client = docker.from_env()
    if not any(n.name == NETWORK for n in client.networks.list(names=[NETWORK])):
        client.networks.create(NETWORK, driver="bridge")
    work = Path(tempfile.mkdtemp(prefix="rtm-bench-"))
    (work / "plain-games").mkdir()
    results: dict = {"when": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(),
                     "concurrency": CONCURRENCY}
    rtm = Rtm(work, args.resync)
    plain = Plain(work / "plain-games")
    try:
        rtm.setup()
        print("single game ...", flush=True)
        results["single"] = bench_single(rtm, plain, args.games)
        results["bursts"] = []
        for n in (int(x) for x in args.bursts.split(",") if x):
            print(f"burst of {n} ...", flush=True)
            results["bursts"].append(bench_burst(rtm, plain, n, work))
        if args.steady_games:
            print(f"steady state: {args.steady_games} games for {args.steady_seconds:g}s ...", flush=True)
            results["steady"] = bench_steady(rtm, args.steady_games, args.steady_seconds, args.resync)
        if args.hardening_cost:
            print(f"the engine defaults' cost to dockerd: {args.hardening_cost} pairs ...", flush=True)
            results["hardening"] = bench_hardening(work, args.hardening_cost)
    finally:
        rtm.teardown()
        plain.cleanup()
        remove_by_label("compose-bench")
    results["planner"] = bench_planner(args.planner_pairs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nJSON: {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def print_table(r: dict) -> None:
    s = r["single"]
    print(f"\n== single game ({r['cpus']} CPUs, concurrency {r['concurrency']}) — seconds")
    print(f"{'':28}{'median':>10}{'p95':>10}")
    print(f"{'rtmanager (XADD->result)':28}{s['rtmanager_median']:>10.3f}{s['rtmanager_p95']:>10.3f}")
    print(f"{'plain docker-py':28}{s['plain_median']:>10.3f}{s['plain_p95']:>10.3f}")
    print(f"ratio of medians {s['ratio_median']:.2f}x; rtmanager overhead {s['overhead_median_ms']:.0f} ms a game")
    print("\n== bursts — seconds to the last result / container")
    head = f"{'N':>5}{'':3}{'rtmanager':>11}{'plain seq':>11}{'plain x' + str(r['concurrency']):>11}" \
           f"{'compose':>11}{'rtm/par':>9}{'rtm CPU/job':>12}"
    for what in ("start", "stop"):
        print(f"-- {what}")
        print(head)
        for b in r["bursts"]:
            comp = b[f"compose_{what}"]
            print(f"{b['n']:>5}{'':3}{b[f'rtm_{what}']:>11.2f}{b[f'plain_seq_{what}']:>11.2f}"
                  f"{b[f'plain_par_{what}']:>11.2f}{(f'{comp:.2f}' if comp is not None else 'n/a'):>11}"
                  f"{b[f'rtm_{what}'] / b[f'plain_par_{what}']:>8.2f}x"
                  f"{b[f'rtm_cpu_ms_per_{what}']:>9.1f} ms")
        for b in r["bursts"]:
            calls = b.get(f"rtm_docker_calls_per_{what}") or {}
            print(f"{'':8}{b['n']} {what}s, rtmanager's Docker calls per job: "
                  + (", ".join(f"{op} {v:.2g}" for op, v in sorted(calls.items())) or "n/a"))
    if "hardening" in r:
        h = r["hardening"]
        print(f"\n== the plain loop's start, sequential, median / p95 of {h['pairs']} each")
        for key, label in (("as_rtmanager", "as rtmanager runs engines"), ("without", "without user, ro root, tmpfs")):
            print(f"{label:32}{h['median_s'][key]:>10.3f}{h['p95_s'][key]:>10.3f}")
        print(f"dockerd's extra time for rtmanager's engine defaults: {h['extra_ms']:.0f} ms a start")
    if "steady" in r:
        st = r["steady"]
        print(f"\n== steady state: {st['games']} running games, {st['seconds']:g}s idle, {st['resyncs']:g} resyncs")
        print(f"controller CPU: {st['cpu_seconds']:.2f}s ({st['cpu_percent']:.2f}% of one core); "
              f"RSS {st['rss_mib']:.0f} MiB")
        print(f"Docker API calls per resync: {st['docker_calls_per_resync']}")
        print(f"Docker API calls in total: {st['docker_calls']}; reconciles: {st['reconciles']:g}")
        if st["sql_statements"] is None:
            print("SQL statements: pg_stat_statements not available")
        else:
            print(f"SQL statements per resync (the resync's own queries): {st['resync_sql_per_resync']:.1f}")
            print(f"SQL statements per idle minute, everything included: {st['sql_per_minute']:.0f}")
            for q in st["top_queries"][:6]:
                print(f"   {q['calls']:>6.0f}  {q['query'][:100]}")
    p = r["planner"]
    print(f"\n== planner: {p['decisions_per_second']:,.0f} decisions/s over {p['pairs']:,} pairs")


if __name__ == "__main__":
    main()
