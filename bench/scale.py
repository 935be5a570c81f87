"""rtmanager at scale: many real games on this Docker host, restart, failover, a job flood, turns,
and (simulated) 100,000 games. One table per section, comparisons side by side and as ratios.

    bash bench/run.sh --scale [--games 1000] [--sim-games 100000] [--sections start,restart,...]

Sections (``--sections``, by name or number; default all):

1. ``start``    N real games: time to start them with rtmanager against bench/run.py's plain
                docker-py loop at the same concurrency (in stages 100, N/2, N); then at rest at each
                size: controller CPU and RSS, Docker calls and SQL statements per resync, the
                health round, the daemon's memory and CPU per container, and their growth.
2. ``restart``  kill -9 with N games running, start again: ready + leader, re-verified, Docker calls
                in that window, containers untouched.
3. ``failover`` a standby replica, kill -9 of the leader (then SIGTERM): time to lead and to answer.
4. ``flood``    ``--flood`` replays and ``--flood`` malformed entries at once: entries handled per
                second; real starts placed inside the flood against the same start on an idle
                controller.
5. ``turns``    the N games on a ``--turn-interval`` turn clock for ``--turn-seconds``: the due-turns
                query's cost and the spread of turn times (from the run's snapshot stream).
6. ``sim``      ``--sim-games`` games in Postgres with an in-process controller whose Docker daemon
                and engines are in memory (bench/scale_sim.py). It runs first, before any real
                engine is started, so that the machine is quiet for it.

Sections 2-5 need the N games of section 1; without section 1 they are started unmeasured.
Everything this run creates carries its run id (instance, network, databases, stream names,
container names) and is removed at the end, on Ctrl-C too. Prints the tables and writes
bench/results/scale-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import docker
import docker.errors
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run as base  # noqa: E402  bench/run.py: the plain docker-py loop

from observed.model import LABEL_INSTANCE  # noqa: E402

IMAGE = "galaxy/engine-stub:1.0"
ADMIN_PATH = "/cgi-bin/admin/v1"
ADMIN_DSN = base.ADMIN_DSN
REDIS_URL = base.REDIS_URL
CONCURRENCY = base.CONCURRENCY
SECTIONS = ("start", "restart", "failover", "flood", "turns", "sim")
MARK = "/* rtm-scale-bench */ "  # our own statements, left out of every count
RESYNC_MARKERS = ("observed_generation <> generation", "GROUP BY status", "count(*) FROM job_results",
                  "DISTINCT game_id FROM runtime_operations")
BRIDGE_PORTS = 1024  # a Linux bridge holds at most this many ports (BR_MAX_PORTS)
# Each engine the host talks to costs two ARP entries: the host's for the engine, the engine's (in
# its own namespace) for its gateway; the kernel's limit (gc_thresh3) counts every namespace.
NEIGH_PER_GAME = 2
NEIGH_SPARE = 16
MIB = 2**20


def say(msg: str) -> None:
    print(f"-- {msg}", flush=True)


def pct(values: list[float], p: float) -> float | None:
    return base.pct(values, p) if values else None


def free_port() -> int:
    return base.free_port()


# ===================================================================== Postgres
def sql(dsn: str, query: str, *args) -> list:
    async def go():
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(MARK + query, *args)
        finally:
            await conn.close()
    return asyncio.run(go())


def pgss_reset(dsn: str) -> None:
    """Statistics of this run's database only (other runs share the cluster)."""
    sql(dsn, "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)")


def pgss(dsn: str) -> dict[str, tuple[float, float, float]]:
    """query -> (calls, total ms, max ms) for this run's database, our own statements left out."""
    rows = sql(dsn, "SELECT query, calls::float8 AS calls, total_exec_time AS total, max_exec_time AS max"
                    " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())")
    return {r["query"]: (r["calls"], r["total"], r["max"]) for r in rows
            if "rtm-scale-bench" not in r["query"] and "pg_stat_statements" not in r["query"]}


def pgss_delta(q0: dict, q1: dict) -> dict[str, tuple[float, float]]:
    """query -> (calls, total ms) between two readings."""
    out = {}
    for q, (c, t, _) in q1.items():
        c0, t0, _ = q0.get(q, (0.0, 0.0, 0.0))
        if c - c0 > 0:
            out[q] = (c - c0, t - t0)
    return out


def short(q: str, n: int = 110) -> str:
    return " ".join(q.split())[:n]


# ======================================================================= the host
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def proc_cpu(pid: int) -> float:
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return float("nan")
    f = raw.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB."""
    rss = pss = float("nan")
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    for line in (_read(f"/proc/{pid}/smaps_rollup") or "").splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
    return rss, pss


def proc_hwm(pid: int) -> float:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Host:
    """dockerd, its containerd, the shims of this run's containers and the containers' cgroups."""

    def __init__(self) -> None:
        self.dockerd = self.containerd = None
        if not os.environ.get("DOCKER_HOST"):
            raw = _read("/var/run/docker.pid")
            if raw and raw.strip().isdigit() and _read(f"/proc/{raw.strip()}/stat"):
                self.dockerd = int(raw.strip())
        for pid in self._pids():
            cmd = self._cmdline(pid)
            if cmd and cmd[0].endswith("containerd") and "/var/run/docker/containerd/containerd.toml" in cmd:
                self.containerd = pid

    @staticmethod
    def _pids() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]

    @staticmethod
    def _cmdline(pid: int) -> list[str]:
        raw = _read(f"/proc/{pid}/cmdline")
        return raw.split("\0") if raw else []

    def shims(self, cids: set[str]) -> dict[str, int]:
        out = {}
        for pid in self._pids():
            cmd = self._cmdline(pid)
            if cmd and "containerd-shim" in cmd[0] and "-id" in cmd:
                i = cmd.index("-id")
                if i + 1 < len(cmd) and cmd[i + 1] in cids:
                    out[cmd[i + 1]] = pid
        return out

    @staticmethod
    def cgroup(cid: str) -> tuple[float, float]:
        """(memory MiB, CPU seconds) of one container's cgroup (v1 cgroupfs, v2, or systemd)."""
        for mem, cpu, kind in ((f"/sys/fs/cgroup/memory/docker/{cid}/memory.usage_in_bytes",
                                f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage", "v1"),
                               (f"/sys/fs/cgroup/memory/system.slice/docker-{cid}.scope/memory.usage_in_bytes",
                                f"/sys/fs/cgroup/cpuacct/system.slice/docker-{cid}.scope/cpuacct.usage", "v1"),
                               (f"/sys/fs/cgroup/docker/{cid}/memory.current",
                                f"/sys/fs/cgroup/docker/{cid}/cpu.stat", "v2"),
                               (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.current",
                                f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat", "v2")):
            m = _read(mem)
            if m is None:
                continue
            c = _read(cpu) or ""
            if kind == "v1":
                secs = int(c.strip() or 0) / 1e9
            else:
                secs = next((int(line.split()[1]) / 1e6 for line in c.splitlines()
                             if line.startswith("usage_usec")), 0.0)
            return int(m.strip()) / MIB, secs
        return float("nan"), float("nan")

    def snapshot(self, cids: Iterable[str]) -> dict:
        cids = set(cids)
        shims = self.shims(cids)
        out: dict = {"containers": len(cids), "shims": len(shims)}
        for name, pid in (("dockerd", self.dockerd), ("containerd", self.containerd)):
            if pid:
                out[f"{name}_rss"], out[f"{name}_pss"] = proc_mem(pid)
                out[f"{name}_cpu"] = proc_cpu(pid)
        mems = [proc_mem(p) for p in shims.values()]
        out["shims_rss"] = sum(r for r, _ in mems)
        out["shims_pss"] = sum(p for _, p in mems)
        out["shims_cpu"] = sum(proc_cpu(p) for p in shims.values())
        groups = [self.cgroup(c) for c in cids]
        out["engines_mem"] = sum(m for m, _ in groups if m == m)
        out["engines_cpu"] = sum(c for _, c in groups if c == c)
        return out


# =================================================================== a controller
def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def msum(m: dict[str, float], prefix: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if (k == prefix or k.startswith(prefix + "{"))
               and all(w in k for w in want))


def by_label(m: dict[str, float], prefix: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in m.items():
        if k.startswith(prefix + "{") and f'{label}="' in k:
            key = k.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[key] = out.get(key, 0.0) + v
    return out


def delta(m0: dict[str, float], m1: dict[str, float], prefix: str, label: str) -> dict[str, float]:
    a, b = by_label(m0, prefix, label), by_label(m1, prefix, label)
    return {k: v - a.get(k, 0.0) for k, v in b.items() if v - a.get(k, 0.0)}


class Ctl:
    """One `rtmanager run` process of this run."""

    def __init__(self, run: Run, name: str, port: int | None = None, **env: str) -> None:
        self.run, self.name = run, name
        self.port = port or free_port()
        self.env = {**run.controller_env(), "RTMANAGER_HTTP_PORT": str(self.port),
                    "RTMANAGER_CONSUMER_NAME": f"{run.rid}-{name}", **env}
        self.log = run.work / f"rtmanager-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Ctl:
        exe = Path(sys.executable).with_name("rtmanager")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(exe), "run"], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.run.procs.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive:
            self.proc.kill()  # SIGKILL, this process only
            self.proc.wait(10)

    def term(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 40) -> None:
        if self.alive:
            self.term()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def _get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def healthz(self) -> bool:
        try:
            return self._get("/healthz", 1)[0] == 200
        except OSError:
            return False

    def readyz(self) -> tuple[bool, bool] | None:
        """(ready, leader), or None when it does not answer."""
        try:
            _, body = self._get("/readyz", 2)
            doc = json.loads(body)
            return bool(doc.get("ready")), bool(doc.get("leader"))
        except (OSError, ValueError):
            return None

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self._get("/metrics", 10)[1].decode())

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> float:
        return proc_mem(self.pid)[0]

    def wait_until(self, what: str, predicate, timeout: float, every: float = 0.05) -> float:
        """perf_counter time at which ``predicate()`` first held."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise RuntimeError(f"rtmanager {self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if predicate():
                    return time.perf_counter()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"rtmanager {self.name}: not {what} within {timeout:g}s; see {self.log}")
            time.sleep(every)

    def wait_leader(self, timeout: float = 60) -> float:
        return self.wait_until("ready and leader", lambda: self.readyz() == (True, True), timeout)

    def wait_standby(self, timeout: float = 60) -> float:
        return self.wait_until("ready as a standby", lambda: self.readyz() == (True, False), timeout)

    def wait_idle(self, timeout: float = 120) -> dict[str, float]:
        """Until the work queue is empty and a resync completed since; the metrics then."""
        m0 = self.metrics()
        r0 = msum(m0, "rtmanager_resync_total", result="ok")
        box = {}

        def idle() -> bool:
            m = self.metrics()
            box["m"] = m
            return msum(m, "rtmanager_resync_total", result="ok") > r0 and msum(m, "rtmanager_workqueue_depth") == 0
        self.wait_until("idle", idle, timeout, every=0.2)
        return box["m"]


# ================================================================== results stream
class Watcher(threading.Thread):
    """Reads the run's results stream; "job/job_entry_id" -> (perf_counter when seen, fields).

    The job is part of the key: entries of two streams XADDed in the same millisecond get the same id."""

    def __init__(self, stream: str) -> None:
        super().__init__(daemon=True, name="results")
        self.r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        self.stream = stream
        self.last = "0-0"
        self.seen: dict[str, tuple[float, dict]] = {}
        self.order: list[str] = []
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                reply = self.r.xread({self.stream: self.last}, count=5000, block=200)
            except redis.RedisError as exc:
                self.error = exc
                time.sleep(0.5)
                continue
            now = time.perf_counter()
            with self.cond:
                for _, items in reply or []:
                    for eid, fields in items:
                        self.last = eid
                        job_entry = fields.get("job_entry_id", "")
                        if job_entry:
                            key = f"{fields.get('job', '')}/{job_entry}"
                            self.seen[key] = (now, fields)
                            self.order.append(key)
                self.cond.notify_all()

    def wait(self, entries: Iterable[str], timeout: float) -> dict[str, tuple[float, dict]]:
        want = set(entries)
        deadline = time.monotonic() + timeout
        with self.cond:
            missing = {e for e in want if e not in self.seen}
            looked = len(self.order)
            while missing:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{len(missing)} of {len(want)} results missing after {timeout:g}s")
                self.cond.wait(min(left, 1.0))
                missing.difference_update(self.order[looked:])  # only what arrived since: O(results)
                looked = len(self.order)
            return {e: self.seen[e] for e in want}


# ===================================================================== the run
class Interrupted(Exception):
    pass


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rid = f"{os.getpid() % 46656:x}{secrets.token_hex(2)}"
        self.prefix = f"rtms{self.rid}"
        self.instance = f"scale-{self.rid}"
        self.plain_instance = f"scale-plain-{self.rid}"
        self.network = f"rtm-scale-{self.rid}"
        self.db = f"rtm_scale_{self.rid}"
        self.sim_db = f"rtm_scale_{self.rid}_sim"
        self.dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + self.db
        self.work = Path(tempfile.mkdtemp(prefix=f"rtm-scale-{self.rid}-"))
        self.procs: list[Ctl] = []
        self.children: list[subprocess.Popen] = []
        self.dbs: list[str] = []
        self.network_made = False
        self.docker = docker.from_env(timeout=120, max_pool_size=16)
        self.r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        self.host = Host()
        self.watcher: Watcher | None = None
        self.leader: Ctl | None = None
        self.games: list[str] = []          # running games of this run (started by rtmanager)
        self.extra: list[str] = []          # games started by sections 3 and 4, stopped again
        self.results: dict = {"when": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(),
                              "concurrency": CONCURRENCY, "run_id": self.rid, "args": vars(args)}
        self.cleaned = False
        self.failed = False
        self.image = IMAGE
        self.built_image: str | None = None

    # ------------------------------------------------------------------ names
    def stream(self, kind: str) -> str:
        return f"{self.prefix}:{kind}"

    def game(self, i: int | str) -> str:
        return f"g{self.rid}-{i}"

    def controller_env(self) -> dict[str, str]:
        a = self.args
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RTMANAGER_")},
            "RTMANAGER_DATABASE_URL": self.dsn, "RTMANAGER_REDIS_URL": REDIS_URL,
            "RTMANAGER_DOCKER_NETWORK": self.network, "RTMANAGER_STATE_ROOT": str(self.work / "rtm-games"),
            "RTMANAGER_INSTANCE": self.instance, "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*",
            "RTMANAGER_START_STREAM": self.stream("start"), "RTMANAGER_STOP_STREAM": self.stream("stop"),
            "RTMANAGER_CONTROL_STREAM": self.stream("control"), "RTMANAGER_RESULTS_STREAM": self.stream("results"),
            "RTMANAGER_SNAPSHOT_STREAM": self.stream("snapshots"),
            "RTMANAGER_DEAD_LETTER_STREAM": self.stream("dead"),
            "RTMANAGER_RESYNC_INTERVAL": str(a.resync), "RTMANAGER_HEALTH_INTERVAL": str(a.health_interval),
            "RTMANAGER_LEASE_TTL": str(a.lease_ttl), "RTMANAGER_CONCURRENCY": str(CONCURRENCY),
            "RTMANAGER_ENGINE_ADMIN_PATH": ADMIN_PATH, "RTMANAGER_CLEANUP_TTL": "0",
            "RTMANAGER_LOG_LEVEL": "WARNING", "RTMANAGER_AUTO_MIGRATE": "1",
            **dict(kv.split("=", 1) for kv in a.env),
        }

    # ------------------------------------------------------------------ setup
    def create_db(self, name: str) -> None:
        async def go():
            admin = await asyncpg.connect(ADMIN_DSN)
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
        self.dbs.append(name)
        asyncio.run(go())

    def build_quiet_image(self) -> None:
        """The stub engine 1.0 from deploy/engine-stub, built under a tag of this run, with one change:
        its keep-alive loop (which looks for stub-control files; this benchmark drops none) forks
        ``sleep`` every 5 s instead of every 0.3 s. Everything else (httpd, the admin API) is the same."""
        src = ROOT / "deploy" / "engine-stub"
        busybox = Path(os.environ.get("BUSYBOX", "/bin/busybox"))
        ctx = self.work / "quiet-stub"
        shutil.copytree(src, ctx)
        shutil.copy(busybox.resolve(), ctx / "busybox")
        entry = (ctx / "entrypoint.sh").read_text()
        if "sleep 0.3 &" not in entry:
            raise RuntimeError("deploy/engine-stub/entrypoint.sh has no 'sleep 0.3 &' loop any more; "
                               "run without --quiet-engines")
        (ctx / "entrypoint.sh").write_text(entry.replace("sleep 0.3 &", "sleep 5 &"))
        tag = f"galaxy/engine-stub:scale-{self.rid}"
        self.docker.images.build(path=str(ctx), tag=tag, buildargs={"STUB_VARIANT": "ok"}, rm=True,
                                 network_mode="none")  # RUN needs no network (and docker0 may not exist)
        self.built_image = self.image = tag
        say(f"built {tag} (the stub 1.0 with a 5 s keep-alive loop instead of 0.3 s)")

    def setup_real(self) -> None:
        if self.args.quiet_engines:
            self.build_quiet_image()
        base.IMAGE = self.image  # the plain loop runs the same image
        self.create_db(self.db)
        sql(self.dsn, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.docker.networks.create(self.network, driver="bridge", labels={LABEL_INSTANCE: self.instance})
        self.network_made = True
        (self.work / "rtm-games").mkdir()
        (self.work / "plain-games").mkdir()
        self.watcher = Watcher(self.stream("results"))
        self.watcher.start()
        exe = Path(sys.executable).with_name("rtmanager")
        subprocess.run([str(exe), "migrate"], env=self.controller_env(), check=True, capture_output=True)
        pgss_reset(self.dsn)
        self.leader = Ctl(self, "a").start()
        self.leader.wait_leader()

    # ------------------------------------------------------------------- jobs
    def xadd_many(self, items: list[tuple[str, dict]]) -> list[str]:
        """XADD in one round trip; the watcher keys ("start/<id>", "stop/<id>") of the entries."""
        pipe = self.r.pipeline(transaction=False)
        for stream, fields in items:
            pipe.xadd(stream, fields)
        return [f"{stream.rsplit(':', 1)[1]}/{eid}" for (stream, _), eid in zip(items, pipe.execute(), strict=True)]

    def xadd(self, kind: str, fields: dict) -> str:
        return f"{kind}/{self.r.xadd(self.stream(kind), fields)}"

    def start_games(self, games: list[str], timeout: float | None = None, **extra: str
                    ) -> tuple[float, dict[str, tuple[float, dict]], list[dict]]:
        """XADD start jobs for ``games`` at once; (seconds to the last result, results, failures)."""
        assert self.watcher is not None
        t0 = time.perf_counter()
        ids = self.xadd_many([(self.stream("start"), {"game_id": g, "image_ref": self.image, **extra})
                              for g in games])
        got = self.watcher.wait(ids, timeout or 120 + 2.0 * len(games))
        elapsed = max(t for t, _ in got.values()) - t0
        failures = [f for _, f in got.values() if f["outcome"] != "success"]
        return elapsed, got, failures

    def stop_games(self, games: list[str]) -> None:
        if not games:
            return
        assert self.watcher is not None
        ids = self.xadd_many([(self.stream("stop"), {"game_id": g, "reason": "finished"}) for g in games])
        self.watcher.wait(ids, 120 + 2.0 * len(games))

    def our_containers(self, instance: str | None = None) -> list[dict]:
        return self.docker.api.containers(all=True, filters={"label": f"{LABEL_INSTANCE}={instance or self.instance}"})

    def running_ids(self) -> set[str]:
        return {c["Id"] for c in self.our_containers() if c.get("State") == "running"}

    def container_states(self) -> dict[str, tuple]:
        """id -> (StartedAt, RestartCount, Pid, status) of every container of this run (inspect)."""
        ids = [c["Id"] for c in self.our_containers()]

        def one(cid: str):
            a = self.docker.api.inspect_container(cid)
            st = a["State"]
            return cid, (st.get("StartedAt"), a.get("RestartCount"), st.get("Pid"), st.get("Status"))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return dict(pool.map(one, ids))

    def remove_containers(self, instance: str, passes: int = 5) -> int:
        """Remove the instance's containers; a removal that fails (dockerd answers a forced removal of
        1,000 engines slowly, past the client's timeout) is tried again in the next pass, so that no run
        leaves engines running to load the next one."""
        ids = [c["Id"] for c in self.our_containers(instance)]
        total = len(ids)

        def rm(cid: str) -> None:
            try:
                self.docker.api.remove_container(cid, force=True)
            except docker.errors.NotFound:
                pass
            except Exception as exc:  # noqa: BLE001 - a timeout too: the next pass tries again
                print(f"   could not remove {cid[:12]}: {exc.__class__.__name__}: {str(exc)[:120]}", file=sys.stderr)
        for _ in range(passes):
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(rm, ids))
            ids = [c["Id"] for c in self.our_containers(instance)]
            if not ids:
                break
        if ids:
            print(f"   {len(ids)} containers of {instance} are left: remove them by hand", file=sys.stderr)
        return total

    # ---------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        if self.cleaned:
            return
        self.cleaned = True
        say(f"cleaning up run {self.rid} ...")
        for p in self.children:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        for c in self.procs:
            try:
                c.stop(40)
            except Exception as exc:  # noqa: BLE001 - go on cleaning
                print(f"   stopping rtmanager {c.name}: {exc}", file=sys.stderr)
        if self.watcher is not None:
            self.watcher.stopping.set()
        removed = 0
        for inst in (self.instance, self.plain_instance):
            try:
                removed += self.remove_containers(inst)
            except Exception as exc:  # noqa: BLE001
                print(f"   removing containers of {inst}: {exc}", file=sys.stderr)
        if self.network_made:
            try:
                self.docker.networks.get(self.network).remove()
            except Exception as exc:  # noqa: BLE001
                print(f"   removing network {self.network}: {exc}", file=sys.stderr)
        if self.built_image:
            try:
                self.docker.images.remove(self.built_image, noprune=False)
            except Exception as exc:  # noqa: BLE001
                print(f"   removing image {self.built_image}: {exc}", file=sys.stderr)

        async def drop():
            admin = await asyncpg.connect(ADMIN_DSN)
            try:
                for name in self.dbs:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()
        try:
            asyncio.run(drop())
        except Exception as exc:  # noqa: BLE001
            print(f"   dropping databases {self.dbs}: {exc}", file=sys.stderr)
        keys = 0
        try:
            for key in self.r.scan_iter(match=f"{self.prefix}:*", count=1000):
                self.r.delete(key)
                keys += 1
        except redis.RedisError as exc:
            print(f"   deleting Redis keys {self.prefix}:*: {exc}", file=sys.stderr)
        if self.failed and not self.args.keep_logs:
            keep = ROOT / "bench" / "results" / f"scale-{self.rid}-logs"
            keep.mkdir(parents=True, exist_ok=True)
            for f in self.work.glob("*.log"):
                shutil.copy(f, keep / f.name)
            say(f"logs kept in {keep}")
        if not self.args.keep_logs:
            shutil.rmtree(self.work, ignore_errors=True)
        say(f"removed {removed} containers, {'network ' + self.network if self.network_made else 'no network'}, "
            f"{'image ' + self.built_image + ', ' if self.built_image else ''}"
            f"databases {', '.join(self.dbs) or '-'}, {keys} Redis keys"
            f"{'' if self.args.keep_logs else ', ' + str(self.work)}")


# ============================================================ section 1: N games
def settle(run: Run, ctl: Ctl) -> dict[str, float]:
    """After a burst: a resync has completed and the queue is empty; then one more health interval."""
    m = ctl.wait_idle(timeout=300)
    time.sleep(min(5.0, run.args.health_interval))
    return m


def health_rounds(m0: dict, m1: dict, seconds: float) -> dict:
    """The health rounds that ended in a window, from the controller's own histogram: how many, their
    mean time and the mean time between them. (A round no longer probes every engine: steady ones
    every RTMANAGER_HEALTH_STEADY_EVERY-th round, so rounds are not told apart by the probe count.)"""
    name = "rtmanager_health_round_duration_seconds"
    n = msum(m1, name + "_count") - msum(m0, name + "_count")
    total = msum(m1, name + "_sum") - msum(m0, name + "_sum")
    return {"rounds": n, "duration_s": total / n if n else None, "interval_s": seconds / n if n else None}


def at_rest(run: Run, ctl: Ctl, n_up: int) -> dict:
    a = run.args
    cids = run.running_ids()
    m0, c0, q0, h0 = ctl.metrics(), ctl.cpu(), pgss(run.dsn), run.host.snapshot(cids)
    t0 = time.perf_counter()
    time.sleep(a.rest_seconds)
    m1, c1, q1, h1 = ctl.metrics(), ctl.cpu(), pgss(run.dsn), run.host.snapshot(cids)
    secs = time.perf_counter() - t0
    resyncs = msum(m1, "rtmanager_resync_total", result="ok") - msum(m0, "rtmanager_resync_total", result="ok")
    calls = delta(m0, m1, "rtmanager_docker_api_calls_total", "operation")
    probes = msum(m1, "rtmanager_engine_probes_total") - msum(m0, "rtmanager_engine_probes_total")
    rounds = probes / n_up if n_up else 0.0  # probes per game (a steady engine is not probed every round)
    health = health_rounds(m0, m1, secs)
    status_calls = msum(m1, "rtmanager_engine_status_calls_total") - msum(m0, "rtmanager_engine_status_calls_total")
    per_query = pgss_delta(q0, q1)
    resync_q = {q: v for q, v in per_query.items() if any(mk in q for mk in RESYNC_MARKERS)}
    resync_sql = sum(c for c, _ in resync_q.values())
    resync_sql_ms = sum(t / c for c, t in resync_q.values())  # the mean time of each, added up
    all_sql = sum(c for c, _ in per_query.values())
    list_n = (msum(m1, "rtmanager_docker_api_duration_seconds_count", operation="list")
              - msum(m0, "rtmanager_docker_api_duration_seconds_count", operation="list"))
    list_s = (msum(m1, "rtmanager_docker_api_duration_seconds_sum", operation="list")
              - msum(m0, "rtmanager_docker_api_duration_seconds_sum", operation="list"))
    reconciles = msum(m1, "rtmanager_reconcile_total") - msum(m0, "rtmanager_reconcile_total")
    top = sorted(per_query.items(), key=lambda kv: -kv[1][0])[:8]
    host = {}
    for k in ("dockerd_rss", "dockerd_pss", "containerd_rss", "shims_rss", "shims_pss", "engines_mem", "shims"):
        host[k] = h1.get(k)
    for k in ("dockerd_cpu", "containerd_cpu", "shims_cpu", "engines_cpu"):
        if k in h0 and k in h1:
            host[k + "_pct"] = 100 * (h1[k] - h0[k]) / secs
    out = {
        "games": n_up, "seconds": secs, "resyncs": resyncs,
        "cpu_s_per_min": (c1 - c0) * 60 / secs, "cpu_pct": 100 * (c1 - c0) / secs,
        "rss_mib": ctl.rss(), "hwm_mib": proc_hwm(ctl.pid),
        "docker_calls": calls,
        "list_per_resync": (calls.get("list", 0) - health["rounds"]) / resyncs if resyncs else None,
        "inspect_per_resync": calls.get("inspect", 0) / resyncs if resyncs else None,
        "docker_calls_per_resync": sum(calls.values()) / resyncs if resyncs else None,
        "list_ms": 1000 * list_s / list_n if list_n else None,
        "resync_sql_per_resync": resync_sql / resyncs if resyncs else None,
        "resync_sql_ms": resync_sql_ms if resync_q else None,
        "sql_per_min": all_sql * 60 / secs, "sql_per_resync_all": all_sql / resyncs if resyncs else None,
        "health_rounds": rounds, "probes": probes, "status_calls": status_calls, "reconciles": reconciles,
        "top_sql": [{"calls": c, "ms": t, "query": short(q, 160)} for q, (c, t) in top],
        "host": host,
    }
    if out["list_ms"] is not None and out["resync_sql_ms"] is not None:
        out["resync_io_ms"] = out["list_ms"] + out["resync_sql_ms"]
    out["health"] = health
    return out


def plain_stages(run: Run, stages: list[int]) -> list[float]:
    base.NETWORK = run.network
    base.PLAIN_INSTANCE = run.plain_instance
    plain = base.Plain(run.work / "plain-games")
    times: list[float | None] = []
    done = 0
    pool = concurrent.futures.ThreadPoolExecutor(CONCURRENCY)
    try:
        for size in stages:
            names = [f"p{run.rid}-{i}" for i in range(done, size)]
            t0 = time.perf_counter()
            try:
                list(pool.map(plain.start_one, names))
            except Exception as exc:  # noqa: BLE001 - where the plain loop stops is a result too
                n = len(run.our_containers(run.plain_instance))
                say(f"plain docker-py stopped at about {n} containers: {exc.__class__.__name__}: {str(exc)[:200]}")
                run.results.setdefault("plain_stopped", f"{n}: {exc.__class__.__name__}: {str(exc)[:300]}")
                times.append(None)
                break
            times.append(time.perf_counter() - t0)
            done = size
            say(f"plain docker-py x{CONCURRENCY}: {size} containers ({times[-1]:.1f}s for the last {len(names)})")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: do not start what is still queued
    times += [None] * (len(stages) - len(times))
    t0 = time.perf_counter()
    n = run.remove_containers(run.plain_instance)
    say(f"removed the {n} plain containers in {time.perf_counter() - t0:.1f}s")
    return times


def ensure_games(run: Run, n: int) -> None:
    """Sections 2-5 without section 1: start the N games, unmeasured."""
    if len(run.games) >= n:
        return
    new = [run.game(i) for i in range(len(run.games), n)]
    say(f"starting {len(new)} games (unmeasured) ...")
    _, got, failures = run.start_games(new)
    ok = {f["game_id"] for _, f in got.values() if f["outcome"] == "success"}
    run.games += [g for g in new if g in ok]
    if failures:
        say(f"{len(failures)} starts failed, e.g. {failures[0]['error_code']}: {failures[0]['error_message'][:200]}")
    settle(run, run.leader)


def neighbour_table_max() -> int | None:
    try:
        return int(Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3").read_text())
    except (OSError, ValueError):
        return None


def section_start(run: Run) -> dict:
    a = run.args
    n = a.games
    stages = sorted({s for s in (min(100, n), n // 2, n) if s > 0})
    if n > BRIDGE_PORTS - 4:
        say(f"note: {n} games on one bridge network: a Linux bridge holds at most {BRIDGE_PORTS} ports, so "
            f"starts past about {BRIDGE_PORTS - 4} are expected to fail (container_start_failed)")
    neigh_max = neighbour_table_max()
    if neigh_max is not None and NEIGH_PER_GAME * n + NEIGH_SPARE > neigh_max:
        say(f"note: {n} probed games need about {NEIGH_PER_GAME * n + NEIGH_SPARE} ARP entries and the kernel's "
            f"table holds {neigh_max} (net.ipv4.neigh.default.gc_thresh3, shared by every network namespace): "
            f"engines past about {(neigh_max - NEIGH_SPARE) // NEIGH_PER_GAME} cannot be reached and their starts "
            f"fail (engine_unhealthy, each after the start timeout). Raise it first, e.g. sysctl -w "
            f"net.ipv4.neigh.default.gc_thresh1=4096 net.ipv4.neigh.default.gc_thresh2=8192 "
            f"net.ipv4.neigh.default.gc_thresh3=16384")
    out: dict = {"stages": stages, "sizes": []}
    base_host = run.host.snapshot(set())
    out["host_before"] = base_host
    plain = plain_stages(run, stages) if not a.no_plain else [None] * len(stages)
    ctl = run.leader
    prev = 0
    stopped_at = None
    for size, plain_s in zip(stages, plain, strict=True):
        if stopped_at is not None:
            break
        games = [run.game(i) for i in range(prev, size)]
        cpu0 = ctl.cpu()
        rtm_s, got, failures = run.start_games(games)
        cpu = ctl.cpu() - cpu0
        ok = {f["game_id"] for _, f in got.values() if f["outcome"] == "success"}
        run.games += [g for g in games if g in ok]
        say(f"rtmanager: {len(run.games)} games running ({rtm_s:.1f}s for the last {len(games)}"
            f"{'' if plain_s is None else f'; plain {plain_s:.1f}s'})")
        row: dict = {"games": len(run.games), "stage_games": len(games), "rtm_start_s": rtm_s,
                     "plain_start_s": plain_s, "ratio": rtm_s / plain_s if plain_s else None,
                     "rtm_cpu_ms_per_game": 1000 * cpu / max(1, len(games)), "failed": len(failures)}
        if failures:
            codes: dict[str, int] = {}
            for f in failures:
                codes[f["error_code"]] = codes.get(f["error_code"], 0) + 1
            row["failures"] = {"codes": codes, "example": failures[0]["error_message"][:300]}
            stopped_at = len(run.games)
            say(f"the machine stopped at {stopped_at} games: {codes}; e.g. {failures[0]['error_message'][:200]}")
        mem = Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]
        row["mem_available_mib"] = int(mem) / 1024
        settle(run, ctl)
        say(f"at rest with {len(run.games)} games for {a.rest_seconds:g}s ...")
        row["rest"] = at_rest(run, ctl, len(run.games))
        h, hb = row["rest"]["host"], base_host
        k = max(1, len(run.games))
        row["per_container_mib"] = {
            "shim_rss": (h.get("shims_rss") or 0) / k, "shim_pss": (h.get("shims_pss") or 0) / k,
            "engine_cgroup": (h.get("engines_mem") or 0) / k,
            "dockerd_rss": ((h.get("dockerd_rss") or 0) - (hb.get("dockerd_rss") or 0)) / k,
            "containerd_rss": ((h.get("containerd_rss") or 0) - (hb.get("containerd_rss") or 0)) / k,
        }
        pc = row["per_container_mib"]
        pc["total_rss"] = pc["shim_rss"] + pc["engine_cgroup"] + pc["dockerd_rss"] + pc["containerd_rss"]
        pc["total_pss"] = pc["shim_pss"] + pc["engine_cgroup"] + pc["dockerd_rss"] + pc["containerd_rss"]
        out["sizes"].append(row)
        prev = size
    if stopped_at is not None:
        out["stopped_at"] = stopped_at
    return out


# ======================================================== section 2: restart recovery
def section_restart(run: Run) -> dict:
    a = run.args
    old = run.leader
    before = run.container_states()
    say(f"kill -9 of the controller with {len(run.games)} games running; starting it again ...")
    old.kill9()
    new = Ctl(run, old.name, old.port)
    t0 = time.perf_counter()
    new.start()
    t_health = new.wait_until("alive", new.healthz, 60, every=0.02) - t0
    t_ready = new.wait_leader(60) - t0
    box: dict = {}

    def verified() -> bool:
        m = new.metrics()
        box["m"] = m
        return msum(m, "rtmanager_resync_total", result="ok") >= 1 and msum(m, "rtmanager_workqueue_depth") == 0
    t_verified = new.wait_until("re-verified", verified, 120, every=0.05) - t0
    m_at = box["m"]
    time.sleep(max(a.resync, a.health_interval) + 2)
    m_later = new.metrics()
    after = run.container_states()
    changed = [cid for cid, st in before.items() if after.get(cid) != st]
    run.leader = new
    out = {
        "games": len(run.games), "to_healthz_s": t_health, "to_ready_leader_s": t_ready,
        "to_reverified_s": t_verified,
        "docker_calls_in_window": by_label(m_at, "rtmanager_docker_api_calls_total", "operation"),
        "reconciles_in_window": by_label(m_at, "rtmanager_reconcile_total", "action"),
        "docker_calls_after": by_label(m_later, "rtmanager_docker_api_calls_total", "operation"),
        "seconds_after": time.perf_counter() - t0,
        "reconciles_after": by_label(m_later, "rtmanager_reconcile_total", "action"),
        "containers": len(before), "containers_changed": len(changed), "containers_gone": len(set(before) - set(after)),
    }
    acts = {k: v for k, v in out["docker_calls_after"].items() if k in ("create", "start", "stop", "remove")}
    out["container_actions"] = sum(acts.values())
    return out


# ================================================================ section 3: failover
def _first_results(run: Run) -> tuple[str, str, str]:
    """A replay (stop of an unknown game) and a new start, XADDed now."""
    game = run.game(f"fo{len(run.extra)}")
    run.extra.append(game)
    e_replay = run.xadd("stop", {"game_id": f"u{run.rid}-fo{len(run.extra)}", "reason": "finished"})
    e_start = run.xadd("start", {"game_id": game, "image_ref": run.image})
    return game, e_replay, e_start


def section_failover(run: Run) -> dict:
    a = run.args
    assert run.watcher is not None
    leader = run.leader
    out: dict = {"games": len(run.games), "lease_ttl": a.lease_ttl}
    # A reference: the same start on the idle leader.
    ref_game = run.game(f"fo{len(run.extra)}")
    run.extra.append(ref_game)
    t0 = time.perf_counter()
    e = run.xadd("start", {"game_id": ref_game, "image_ref": run.image})
    out["idle_start_s"] = run.watcher.wait([e], 60)[e][0] - t0
    standby = Ctl(run, "b").start()
    standby.wait_standby(60)
    say(f"standby up; kill -9 of the leader with {len(run.games)} games ...")
    m0 = standby.metrics()
    t0 = time.perf_counter()
    leader.kill9()
    _, e_replay, e_start = _first_results(run)
    t_lead = standby.wait_until("leader", lambda: standby.readyz() == (True, True), 60, every=0.05) - t0
    got = run.watcher.wait([e_replay, e_start], 90)
    m1 = standby.wait_idle(120)
    out["kill"] = {"to_leader_s": t_lead, "to_replay_answer_s": got[e_replay][0] - t0,
                   "to_start_answer_s": got[e_start][0] - t0, "start_outcome": got[e_start][1]["outcome"],
                   "docker_calls": delta(m0, m1, "rtmanager_docker_api_calls_total", "operation"),
                   "reconciles": delta(m0, m1, "rtmanager_reconcile_total", "action")}
    say(f"standby led after {t_lead:.2f}s; graceful hand-over next ...")
    back = Ctl(run, "a", leader.port).start()
    back.wait_standby(60)
    exited: list[float] = []
    waiter = threading.Thread(target=lambda: (standby.proc.wait(), exited.append(time.perf_counter())), daemon=True)
    t0 = time.perf_counter()
    standby.term()
    waiter.start()
    _, e_replay, e_start = _first_results(run)
    t_lead = back.wait_until("leader", lambda: back.readyz() == (True, True), 60, every=0.05) - t0
    got = run.watcher.wait([e_replay, e_start], 90)
    waiter.join(60)
    t_exit = exited[0] - t0 if exited else None
    out["term"] = {"to_leader_s": t_lead, "to_replay_answer_s": got[e_replay][0] - t0,
                   "to_start_answer_s": got[e_start][0] - t0, "start_outcome": got[e_start][1]["outcome"],
                   "old_leader_exit_s": t_exit, "old_leader_exit_code": standby.proc.returncode}
    run.leader = back
    back.wait_idle(120)
    run.stop_games(run.extra)
    return out


# =================================================================== section 4: flood
def section_flood(run: Run) -> dict:
    a = run.args
    assert run.watcher is not None
    ctl = run.leader
    ctl.wait_idle(120)
    # The same start on the idle controller, a few times.
    idle = []
    for k in range(a.flood_starts):
        g = run.game(f"idle{k}")
        run.extra.append(g)
        t0 = time.perf_counter()
        e = run.xadd("start", {"game_id": g, "image_ref": run.image})
        idle.append(run.watcher.wait([e], 60)[e][0] - t0)
        time.sleep(0.3)
    n = a.flood
    entries: list[tuple[str, dict]] = []
    for i in range(n):
        entries.append((run.stream("stop"), {"game_id": f"u{run.rid}-{i}", "reason": "finished"}))
        entries.append((run.stream("start"), {"game_id": f"m{run.rid}-{i}"}))  # no image_ref: invalid_request
    k = a.flood_starts
    cut = [round(len(entries) * (j + 1) / (k + 1)) for j in range(k)]
    m0, c0, q0 = ctl.metrics(), ctl.cpu(), pgss(run.dsn)
    say(f"flood: {n} replays + {n} malformed entries at once, {k} real starts inside it ...")
    flood_ids: list[str] = []
    starts: list[tuple[str, float, int]] = []  # (entry id, XADD time, flood entries before it)
    t_first = time.perf_counter()
    prev = 0
    for j, c in enumerate(cut + [len(entries)]):
        flood_ids += run.xadd_many(entries[prev:c])
        prev = c
        if j < k:
            g = run.game(f"flood{j}")
            run.extra.append(g)
            t = time.perf_counter()
            e = run.xadd("start", {"game_id": g, "image_ref": run.image})
            starts.append((e, t, c))
    t_xadded = time.perf_counter()
    got = run.watcher.wait(flood_ids + [e for e, _, _ in starts], 600 + len(entries) / 10)  # >= 10 entries/s
    t_last = max(got[e][0] for e in flood_ids)
    m1, c1, q1 = ctl.metrics(), ctl.cpu(), pgss(run.dsn)
    outcomes: dict[str, int] = {}
    for e in flood_ids:
        f = got[e][1]
        key = f["error_code"] or f["outcome"]
        outcomes[key] = outcomes.get(key, 0) + 1
    with run.watcher.cond:
        order = {e: i for i, e in enumerate(run.watcher.order)}
    first_flood = min(order[e] for e in flood_ids)
    in_flood = []
    for e, t, before in starts:
        ahead = sum(1 for f in flood_ids if order[f] < order[e])
        in_flood.append({"latency_s": got[e][0] - t, "entries_before": before, "results_before": ahead,
                         "outcome": got[e][1]["outcome"], "result_position": order[e] - first_flood})
    lat = [s["latency_s"] for s in in_flood]
    per_query = pgss_delta(q0, q1)
    elapsed = t_last - t_first
    out = {
        "entries": len(entries), "xadd_s": t_xadded - t_first, "handled_s": elapsed,
        "entries_per_s": len(flood_ids) / elapsed, "outcomes": outcomes,
        "cpu_s": c1 - c0, "cpu_ms_per_entry": 1000 * (c1 - c0) / len(flood_ids),
        "sql_per_entry": sum(c for c, _ in per_query.values()) / len(flood_ids),
        "jobs_received": delta(m0, m1, "rtmanager_jobs_received_total", "outcome"),
        "idle_start_s": idle, "idle_p50": pct(idle, 0.5), "idle_p99": pct(idle, 0.99),
        "flood_starts": in_flood, "flood_p50": pct(lat, 0.5), "flood_p99": pct(lat, 0.99),
        "top_sql": [{"calls": c, "ms": t, "query": short(q, 160)}
                    for q, (c, t) in sorted(per_query.items(), key=lambda kv: -kv[1][0])[:6]],
    }
    out["ratio_p50"] = out["flood_p50"] / out["idle_p50"] if out["idle_p50"] else None
    out["ratio_p99"] = out["flood_p99"] / out["idle_p99"] if out["idle_p99"] else None
    run.stop_games([g for g in run.extra if g.startswith(run.game("idle")) or g.startswith(run.game("flood"))])
    return out


# =================================================================== section 5: turns
def read_snapshots(run: Run, since: str) -> list[dict]:
    out, last = [], since
    while True:
        batch = run.r.xrange(run.stream("snapshots"), min=f"({last}", max="+", count=10000)
        if not batch:
            return out
        for eid, f in batch:
            last = eid
            out.append(f)


def section_turns(run: Run) -> dict:
    a = run.args
    ctl = run.leader
    games = list(run.games)
    say(f"turns: {len(games)} games on a {a.turn_interval}s turn clock ...")
    t_set, _, failures = run.start_games(games, turn_interval=str(a.turn_interval))
    if failures:
        say(f"{len(failures)} games did not take the turn interval: {failures[0]['error_message'][:200]}")
    last = run.r.xrevrange(run.stream("snapshots"), count=1)
    since = last[0][0] if last else "0-0"
    m0, c0, q0 = ctl.metrics(), ctl.cpu(), pgss(run.dsn)
    wall0 = datetime.now(UTC)
    t0 = time.perf_counter()
    time.sleep(a.turn_seconds)
    secs = time.perf_counter() - t0
    m1, c1, q1 = ctl.metrics(), ctl.cpu(), pgss(run.dsn)
    ours = set(games)
    snaps = [s for s in read_snapshots(run, since) if s.get("game_id") in ours]
    per_game: dict[str, list[tuple[str, datetime]]] = {}
    for s in snaps:
        if s.get("reason") in ("turn_generated", "generation_started"):
            per_game.setdefault(s["game_id"], []).append((s["reason"], datetime.fromisoformat(s["observed_at"])))
    late, ask, gen = [], [], []
    for seq in per_game.values():
        made = [t for r, t in seq if r == "turn_generated"]
        asked = [t for r, t in seq if r == "generation_started"]
        for prev, nxt in zip(made, made[1:], strict=False):
            late.append((nxt - prev).total_seconds() - a.turn_interval)
            req = next((t for t in asked if prev < t <= nxt), None)
            if req is not None:
                ask.append((req - prev).total_seconds() - a.turn_interval)
                gen.append((nxt - req).total_seconds())
    turns = sum(1 for s in snaps if s.get("reason") == "turn_generated")
    per_query = pgss_delta(q0, q1)
    due = [(q, v) for q, v in per_query.items() if "ORDER BY due_in" in q]  # pgss shows constants as $n
    due_calls = sum(c for _, (c, _) in due)
    due_ms = sum(t for _, (_, t) in due)
    due_max = max((q1[q][2] for q, _ in due), default=None)
    calls = delta(m0, m1, "rtmanager_docker_api_calls_total", "operation")
    engine_calls = delta(m0, m1, "rtmanager_engine_status_calls_total", "call")  # the admin API: status, turns
    probes = msum(m1, "rtmanager_engine_probes_total") - msum(m0, "rtmanager_engine_probes_total")
    all_sql = sum(c for c, _ in per_query.values())
    out = {
        "games": len(games), "interval_s": a.turn_interval, "window_s": secs, "set_interval_s": t_set,
        "turns_expected": len(games) * secs / a.turn_interval, "turns_generated": turns,
        "turns_per_s": turns / secs, "started_at": wall0.isoformat(),
        "lateness_s": {"n": len(late), "p50": pct(late, 0.5), "p95": pct(late, 0.95), "p99": pct(late, 0.99),
                       "max": max(late) if late else None},
        "ask_lag_s": {"n": len(ask), "p50": pct(ask, 0.5), "p95": pct(ask, 0.95), "p99": pct(ask, 0.99),
                      "max": max(ask) if ask else None},
        "generation_s": {"p50": pct(gen, 0.5), "p99": pct(gen, 0.99)},
        "due_query": {"calls": due_calls, "mean_ms": due_ms / due_calls if due_calls else None, "max_ms": due_max,
                      "ticks_per_s": due_calls / secs},
        "cpu_pct": 100 * (c1 - c0) / secs, "cpu_ms_per_turn": 1000 * (c1 - c0) / turns if turns else None,
        "docker_calls": calls, "inspect_per_turn": calls.get("inspect", 0) / turns if turns else None,
        "sql_per_turn": all_sql / turns if turns else None,
        "engine_calls": engine_calls, "probes": probes,
        "status_per_turn": engine_calls.get("status", 0) / turns if turns else None,
        "turn_results": delta(m0, m1, "rtmanager_turns_total", "result"),
        "top_sql": [{"calls": c, "ms": t, "query": short(q, 600)}
                    for q, (c, t) in sorted(per_query.items(), key=lambda kv: -kv[1][1])[:30]],
    }
    return out


# ================================================================ section 6: simulated
def section_sim(run: Run) -> dict:
    a = run.args
    run.create_db(run.sim_db)
    out_file = run.work / "sim.json"
    cmd = [sys.executable, str(ROOT / "bench" / "scale_sim.py"), "--games", str(a.sim_games), "--db", run.sim_db,
           "--prefix", run.prefix, "--out", str(out_file), "--drift", str(a.sim_drift),
           "--drift-timeout", str(a.sim_drift_timeout),
           "--resync", str(a.sim_resync), "--log", str(run.work / "sim-controller.log"),
           "--state-root", str(run.work / "sim-games"),
           "--concurrency", str(CONCURRENCY)]
    say(f"simulated: {a.sim_games:,} games in Postgres, an in-process controller with an in-memory daemon ...")
    # Its own session: a Ctrl-C reaches the parent only, which stops the child in order (SIGTERM).
    proc = subprocess.Popen(cmd, env={**os.environ, "RTMANAGER_TEST_DATABASE_URL": ADMIN_DSN},
                            start_new_session=True)
    run.children.append(proc)
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"bench/scale_sim.py failed ({rc}); log: {run.work / 'sim-controller.log'}")
    sim = json.loads(out_file.read_text())
    # The largest number of games one controller keeps converged: fit t = a + b*n to each cost.
    sizes = sim["sizes"]
    bounds = {}

    def fit(key: str) -> tuple[float, float] | None:
        pts = [(s["games"], s[key]) for s in sizes if s.get(key) is not None]
        if len(pts) < 2:
            return None
        xs, ys = zip(*pts, strict=True)
        mx, my = statistics.mean(xs), statistics.mean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0
        return my - b * mx, b
    for key, limit, what in (("resync_s_median", 30.0, "resync within the default 30 s interval"),
                             ("health_round_s", 15.0, "health round (in-memory probes) within 15 s")):
        f = fit(key)
        if f and f[1] > 0:
            bounds[what] = int((limit - f[0]) / f[1])
    d = sim.get("drift")
    if d and d.get("games_per_s"):
        bounds["a 10 % drift repaired within 30 s"] = int(d["games_per_s"] * 30 / max(a.sim_drift, 1e-9))
    sim["bounds"] = bounds
    return sim


# ===================================================================== tables
def fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "n/a"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x, '.1f')}" for k, x in sorted(v.items())) or "-"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n== {title}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def print_start(r: dict) -> None:
    sz = r["sizes"]
    if not sz:
        return
    head = ["games"] + [str(s["games"]) for s in sz] + [f"x ({sz[-1]['games']} vs {sz[0]['games']})"]

    def row(name, get, spec=".2f", grow=True):
        vals = [get(s) for s in sz]
        g = "-"
        if grow and len(vals) > 1 and isinstance(vals[0], (int, float)) and isinstance(vals[-1], (int, float)) \
                and vals[0]:
            g = f"{vals[-1] / vals[0]:.2f}"
        return [name] + [fmt(v, spec) for v in vals] + [g]
    rest = lambda s: s["rest"]  # noqa: E731
    rows = [
        row("start stage: rtmanager s", lambda s: s["rtm_start_s"], grow=False),
        row(f"start stage: plain docker-py x{CONCURRENCY} s", lambda s: s["plain_start_s"], grow=False),
        row("  ratio rtmanager / plain", lambda s: s["ratio"], grow=False),
        row("  rtmanager CPU ms per game started", lambda s: s["rtm_cpu_ms_per_game"], ".1f", False),
        row("at rest: controller CPU s/min", lambda s: rest(s)["cpu_s_per_min"]),
        row("  % of one core", lambda s: rest(s)["cpu_pct"]),
        row("  RSS MiB (peak)", lambda s: f"{rest(s)['rss_mib']:.0f} ({rest(s)['hwm_mib']:.0f})", grow=False),
        row("  resyncs in the window", lambda s: rest(s)["resyncs"], ".0f", False),
        row("  Docker list per resync", lambda s: rest(s)["list_per_resync"]),
        row("  Docker inspect per resync", lambda s: rest(s)["inspect_per_resync"]),
        row("  Docker calls in the window", lambda s: rest(s)["docker_calls"], grow=False),
        row("  Docker list ms (mean)", lambda s: rest(s)["list_ms"], ".1f"),
        row("  resync SQL statements / resync", lambda s: rest(s)["resync_sql_per_resync"], ".1f"),
        row("  resync SQL ms (sum of means)", lambda s: rest(s)["resync_sql_ms"], ".2f"),
        row("  resync I/O ms (list + its SQL)", lambda s: rest(s).get("resync_io_ms"), ".1f"),
        row("  all SQL statements / min", lambda s: rest(s)["sql_per_min"], ".0f"),
        row("  health rounds (probes / games)", lambda s: rest(s)["health_rounds"], ".1f", False),
        row("  health round s (mean)", lambda s: rest(s)["health"]["duration_s"]),
        row("  health round interval s", lambda s: rest(s)["health"]["interval_s"], ".1f", False),
        row("  reconciles at rest", lambda s: rest(s)["reconciles"], ".0f", False),
        row("host: dockerd RSS MiB", lambda s: rest(s)["host"].get("dockerd_rss"), ".0f"),
        row("  containerd RSS MiB", lambda s: rest(s)["host"].get("containerd_rss"), ".0f"),
        row("  per container: shim RSS / PSS MiB",
            lambda s: f"{s['per_container_mib']['shim_rss']:.1f} / {s['per_container_mib']['shim_pss']:.1f}",
            grow=False),
        row("  per container: engine cgroup MiB", lambda s: s["per_container_mib"]["engine_cgroup"]),
        row("  per container: dockerd+containerd growth MiB",
            lambda s: s["per_container_mib"]["dockerd_rss"] + s["per_container_mib"]["containerd_rss"]),
        row("  per container: total (PSS) MiB", lambda s: s["per_container_mib"]["total_pss"]),
        row("  engines' own CPU % of one core", lambda s: rest(s)["host"].get("engines_cpu_pct"), ".1f"),
        row("  dockerd+containerd+shims CPU %",
            lambda s: sum(rest(s)["host"].get(k, 0) or 0 for k in ("dockerd_cpu_pct", "containerd_cpu_pct",
                                                                    "shims_cpu_pct")), ".1f"),
        row("  MemAvailable MiB", lambda s: s["mem_available_mib"], ".0f", False),
    ]
    table(f"1. N running games (concurrency {CONCURRENCY}; rest {sz[0]['rest']['seconds']:.0f}s per size)",
          head, rows)
    if len(sz) >= 2 and sz[-1]["games"] < 1000 and sz[-1]["games"] > sz[-2]["games"]:
        lo, hi = sz[-2], sz[-1]
        dn = hi["games"] - lo["games"]
        print(f"   linear extrapolation to 1,000 games from the {lo['games']} -> {hi['games']} growth "
              "(a guess on a small, noisy run; the full run measures it):")
        for name, get, unit in (
                ("controller CPU at rest", lambda s: s["rest"]["cpu_pct"], "% of one core"),
                ("Docker list", lambda s: s["rest"]["list_ms"], "ms"),
                ("health round", lambda s: s["rest"]["health"]["duration_s"], "s"),
                ("engines' own CPU", lambda s: s["rest"]["host"].get("engines_cpu_pct"), "% of one core"),
                ("memory per container (PSS)", lambda s: s["per_container_mib"]["total_pss"] * s["games"], "MiB")):
            a, b = get(lo), get(hi)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                per = (b - a) / dn
                print(f"     {name}: {b + per * (1000 - hi['games']):.1f} {unit} ({per:+.3g} {unit} per game)")
    if r.get("stopped_at"):
        print(f"   the machine stopped at {r['stopped_at']} games: {sz[-1].get('failures')}")


def print_restart(r: dict) -> None:
    acts = r["container_actions"]
    rows = [
        ["process start -> /healthz", fmt(r["to_healthz_s"]), ""],
        ["process start -> ready and leader", fmt(r["to_ready_leader_s"]), ""],
        ["process start -> re-verified (resync ok, queue empty)", fmt(r["to_reverified_s"]), "< 5 s"],
        ["Docker calls in that window", fmt(r["docker_calls_in_window"]), "list, no inspect"],
        ["reconciles in that window", fmt(r["reconciles_in_window"]), "none"],
        [f"Docker calls in the first {r['seconds_after']:.0f}s", fmt(r["docker_calls_after"]), ""],
        ["container actions (create/start/stop/remove)", str(acts), "0"],
        ["containers changed (id, StartedAt, restarts, pid)", f"{r['containers_changed']} of {r['containers']}",
         "0"],
    ]
    table(f"2. restart recovery: kill -9 with {r['games']} games running", ["", "measured", "goal"], rows)


def print_failover(r: dict) -> None:
    k, t = r["kill"], r["term"]
    goal = r["lease_ttl"] + 1
    rows = [
        ["standby leads", fmt(k["to_leader_s"]), fmt(t["to_leader_s"]), ""],
        ["a replay (stop of an unknown game) answered", fmt(k["to_replay_answer_s"]), fmt(t["to_replay_answer_s"]),
         f"< {goal:g} s"],
        ["a new start answered", fmt(k["to_start_answer_s"]), fmt(t["to_start_answer_s"]), f"< {goal:g} s"],
        ["  the same start on the idle leader", fmt(r["idle_start_s"]), fmt(r["idle_start_s"]), ""],
        ["old leader exited (code)", "killed", f"{fmt(t['old_leader_exit_s'])} ({t['old_leader_exit_code']})", ""],
        ["new leader's Docker calls until idle", fmt(k["docker_calls"]), "", ""],
    ]
    table(f"3. failover: 2 replicas, lease TTL {r['lease_ttl']:g}s, {r['games']} games; seconds from the signal",
          ["", "kill -9", "SIGTERM", "goal"], rows)


def print_flood(r: dict) -> None:
    rows = [
        ["entries XADDed (replays + malformed)", f"{r['entries']:,} in {r['xadd_s']:.2f}s", ""],
        ["handled per second (results / time)", f"{r['entries_per_s']:.0f}", ">= 2000"],
        ["time to the last flood result", f"{r['handled_s']:.1f} s", ""],
        ["outcomes", fmt(r["outcomes"]), ""],
        ["controller CPU ms per entry", f"{r['cpu_ms_per_entry']:.2f}", ""],
        ["SQL statements per entry", f"{r['sql_per_entry']:.1f}", ""],
        ["real start, idle controller p50 / p99 s", f"{fmt(r['idle_p50'])} / {fmt(r['idle_p99'])}", ""],
        ["real start inside the flood p50 / p99 s", f"{fmt(r['flood_p50'])} / {fmt(r['flood_p99'])}",
         "<= 2x idle"],
        ["  ratio p50 / p99", f"{fmt(r['ratio_p50'])} / {fmt(r['ratio_p99'])}", ""],
    ]
    for s in r["flood_starts"]:
        rows.append([f"  start after {s['entries_before']:,} entries",
                     f"{s['latency_s']:.2f}s; {s['results_before']:,} flood results before its own", ""])
    table("4. job throughput without Docker work", ["", "measured", "goal"], rows)


def print_turns(r: dict) -> None:
    la, ak, g, d = r["lateness_s"], r["ask_lag_s"], r["generation_s"], r["due_query"]
    rows = [
        ["turns generated / expected", f"{r['turns_generated']} / {r['turns_expected']:.0f}"],
        ["turn N+1 generated after its due time p50 / p95 / p99 / max s",
         f"{fmt(la['p50'])} / {fmt(la['p95'])} / {fmt(la['p99'])} / {fmt(la['max'])}  (n={la['n']})"],
        ["  engine asked after the due time p50 / p99 / max s",
         f"{fmt(ak['p50'])} / {fmt(ak['p99'])} / {fmt(ak['max'])}"],
        ["  asked -> generated (stub 0.5 s + polls) p50 / p99 s", f"{fmt(g['p50'])} / {fmt(g['p99'])}"],
        ["due-turns query: ticks/s, mean / max ms",
         f"{d['ticks_per_s']:.2f}, {fmt(d['mean_ms'], '.3f')} / {fmt(d['max_ms'], '.3f')}"],
        ["controller CPU % / ms per turn", f"{r['cpu_pct']:.1f} / {fmt(r['cpu_ms_per_turn'], '.1f')}"],
        ["Docker inspects per turn", fmt(r["inspect_per_turn"])],
        ["SQL statements per turn", fmt(r["sql_per_turn"], ".1f")],
    ]
    table(f"5. turns: {r['games']} games, {r['interval_s']}s interval, {r['window_s']:.0f}s window",
          ["", "measured"], rows)


def print_sim(r: dict) -> None:
    sz = r["sizes"]
    head = ["games"] + [f"{s['games']:,}" for s in sz]
    get = lambda f, spec=".2f": [fmt(f(s), spec) for s in sz]  # noqa: E731
    rows = [
        ["resync s (median)"] + get(lambda s: s["resync_s_median"], ".3f"),
        ["  us per game"] + get(lambda s: s["us_per_game"], ".0f"),
        ["  the list call s"] + get(lambda s: s["list_s_median"], ".3f"),
        ["  the records query s (client) / SQL ms"] + [f"{fmt(s['list_live_s_median'], '.3f')} / "
                                                       f"{fmt(s['list_live_sql_ms'], '.0f')}" for s in sz],
        ["  CPU s per resync"] + get(lambda s: s["resync_cpu_s_median"], ".3f"),
        ["  Docker calls per resync"] + get(lambda s: s["docker_calls_per_resync"]),
        ["  resync SQL statements per resync"] + get(lambda s: s["resync_sql_per_resync"], ".1f"),
        ["health round s (in-memory probes)"] + get(lambda s: s["health_round_s"], ".2f"),
        ["  CPU s of one resync, GC on / off"] + [
            f"{fmt(s.get('resync_cpu_s_gc_on'))} / {fmt(s.get('resync_cpu_s_gc_off'))}" for s in sz],
        ["  CPU s of one health round, GC on / off"] + [
            f"{fmt(s.get('health_round_cpu_s_gc_on'))} / {fmt(s.get('health_round_cpu_s_gc_off'))}" for s in sz],
        ["RSS MiB (peak) of the process, the fakes' included"] + [
            f"{s['rss_mib']:.0f} ({s['hwm_mib']:.0f})" for s in sz],
    ]
    table("6. simulated games (real Postgres and rtmanager; in-memory Docker daemon and engines)", head, rows)
    d = r.get("drift")
    if d:
        print(f"   drift: {d['drifted']:,} of {d['games']:,} containers exit at once: "
              + (f"all running and converged again after {d['seconds']:.1f}s ({d['games_per_s']:.0f} games/s)"
                 if d["converged"] else "NOT converged within the timeout")
              + f"; queue peak {d['max_queue']:,}; {d['sql_per_game']:.1f} SQL statements and "
              f"{sum(d['docker_calls'].values()) / d['drifted']:.1f} Docker calls per game; "
              f"{d['resyncs_during']} resyncs meanwhile")
    for what, n in r.get("bounds", {}).items():
        print(f"   largest number of games for {what}: about {n:,}")


# ====================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", type=int, default=1000, help="N real games (default 1000)")
    ap.add_argument("--sim-games", type=int, default=100_000, help="simulated games (default 100000)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="start,restart,failover,flood,turns,sim or 1-6")
    ap.add_argument("--rest-seconds", type=float, default=60, help="quiet window at each size (default 60)")
    ap.add_argument("--resync", type=float, default=10, help="RTMANAGER_RESYNC_INTERVAL of the real runs")
    ap.add_argument("--health-interval", type=float, default=15, help="RTMANAGER_HEALTH_INTERVAL")
    ap.add_argument("--lease-ttl", type=float, default=5, help="RTMANAGER_LEASE_TTL")
    ap.add_argument("--flood", type=int, default=10_000, help="replays, and as many malformed entries")
    ap.add_argument("--flood-starts", type=int, default=5, help="real starts inside the flood (and idle)")
    ap.add_argument("--turn-interval", type=int, default=10)
    ap.add_argument("--turn-seconds", type=float, default=180)
    ap.add_argument("--sim-drift", type=float, default=0.10)
    ap.add_argument("--sim-resync", type=float, default=30)
    ap.add_argument("--sim-drift-timeout", type=float, default=600,
                    help="seconds the simulated drift may take to converge before it is reported as not converged")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain docker-py comparison")
    ap.add_argument("--env", action="append", default=[], metavar="RTMANAGER_X=V",
                    help="a setting more for the real controllers (repeatable), e.g. RTMANAGER_HEALTH_STEADY_EVERY=1")
    ap.add_argument("--quiet-engines", action="store_true",
                    help="run a per-run build of the stub 1.0 whose keep-alive loop forks every 5 s instead of "
                         "every 0.3 s (an idle stub 1.0 costs about 0.4 %% of a core: 1,000 of them need ~4 cores)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work directory (controller logs)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/scale-latest.json"))
    args = ap.parse_args()
    for kv in args.env:
        if "=" not in kv or not kv.startswith("RTMANAGER_"):
            ap.error(f"--env {kv!r}: must be RTMANAGER_NAME=VALUE")
    names = {str(i + 1): s for i, s in enumerate(SECTIONS)}
    wanted = [names.get(s.strip(), s.strip()) for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {', '.join(SECTIONS)} or 1-6")

    run = Run(args)

    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    # SIGINT too: a shell starting us in the background leaves it ignored, and Ctrl-C must clean up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    say(f"run {run.rid}: sections {', '.join(wanted)}; {args.games} real games, {args.sim_games:,} simulated; "
        f"work dir {run.work}")
    printers = {"start": print_start, "restart": print_restart, "failover": print_failover, "flood": print_flood,
                "turns": print_turns, "sim": print_sim}
    failed = None
    try:
        if "sim" in wanted:
            # First, on a quiet machine: after the real sections, their 1,000 engines and the controller
            # of the turns section (its turn clock still on) kept both cores busy until the cleanup, so
            # the simulated controller's figures were the machine's as much as its own.
            run.results["sim"] = section_sim(run)
        real = [s for s in wanted if s != "sim"]
        if real:
            if not args.quiet_engines and args.games * 0.004 > 0.5 * (os.cpu_count() or 1):
                say(f"warning: {args.games} idle stub engines 1.0 need about {args.games * 0.004:.1f} cores by "
                    f"themselves (a 0.3 s fork loop each) on this {os.cpu_count()}-core machine; the controller's "
                    "numbers will include that contention (--quiet-engines avoids it)")
            run.setup_real()
            run.results["image"] = run.image
            if "start" in real:
                run.results["start"] = section_start(run)
            else:
                ensure_games(run, args.games)
            for name, fn in (("restart", section_restart), ("failover", section_failover),
                             ("flood", section_flood), ("turns", section_turns)):
                if name in real:
                    say(f"section {name} ...")
                    run.results[name] = fn(run)
    except (KeyboardInterrupt, Interrupted) as exc:
        failed = f"interrupted ({str(exc) or 'Ctrl-C'})"
    except Exception as exc:  # noqa: BLE001 - clean up, keep what was measured, then fail
        failed = f"{exc.__class__.__name__}: {exc}"
        import traceback
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run.failed = failed is not None
        run.cleanup()
    if failed:
        run.results["failed"] = failed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(run.results, indent=2, default=str))
    for name in SECTIONS:
        if name in run.results:
            try:
                printers[name](run.results[name])
            except Exception as exc:  # noqa: BLE001 - a partial section prints what it can
                print(f"\n== {name}: could not print ({exc!r})")
    print(f"\nJSON: {args.out}")
    if failed:
        print(f"FAILED: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
