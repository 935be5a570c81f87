"""One chaos run against real services of its own: set up, run the workload and the fault schedule,
heal, wait until quiet, observe, tear everything down, check.

Everything the run starts is its own and is removed in ``finally`` (Ctrl-C included): a Postgres
cluster (tests.support.PostgresCluster), a redis-server (tests.support.RedisServer, AOF with
appendfsync always, so that a Redis restart loses no job entry), a private dockerd
(tests.support.PrivateDockerd) behind a socket proxy (tests/chaos/proxy.py) and the controllers.
Traffic goes to 127.0.0.1, to unix sockets of the run, and to the engines the private dockerd runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import docker.errors
import redis

from tests.chaos.checker import Report, check, in_windows, resolve, restore_windows
from tests.chaos.history import FaultRecord, History, JobRecord
from tests.chaos.plan import (
    IMAGES_TO_LOAD,
    LEASE_TTL,
    NEVER_HEALTHY,
    V11,
    PlannedFault,
    PlannedJob,
    game_names,
    plan_backlogs,
    plan_faults,
    plan_workload,
)
from tests.chaos.proxy import DockerSocketProxy
from tests.support import ROOT, ControllerProcess, PostgresCluster, PrivateDockerd, RedisServer, free_port

ENGINE_PORT = 8080
MARKER = ".chaos-marker"


class Slot:
    """One replica: a fixed consumer name and HTTP port; its process is killed, paused and restarted."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.env = {**env, "RTMANAGER_HTTP_PORT": str(self.port), "RTMANAGER_CONSUMER_NAME": f"replica-{name}"}
        self.log_path = log_path
        self.proc: ControllerProcess | None = None
        self.want_up = False       # False: the harness stopped or killed it on purpose
        self.paused = False
        self.resumed_at = -1e9     # when it last got SIGCONT
        self.lock = threading.RLock()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc is not None and self.proc.proc.poll() is None

    def start(self, clean_env: dict[str, str]) -> None:
        with self.lock:
            cp = ControllerProcess(self.env, self.log_path)
            cp.env = {**clean_env, **self.env}  # nothing of the caller's RTMANAGER_* / DOCKER_* leaks in
            self.proc = cp.start()
            self.want_up = True
            self.paused = False

    def kill9(self) -> None:
        with self.lock:
            self.want_up = False
            if self.proc is not None and self.proc.proc is not None:
                self.proc.kill9()
            self.paused = False

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful: SIGTERM (after SIGCONT if paused); the exit status."""
        with self.lock:
            self.want_up = False
            if self.proc is None or self.proc.proc is None:
                return None
            if self.paused:
                self.cont()
            return self.proc.stop(signal.SIGTERM, timeout)

    def pause(self) -> None:
        with self.lock:
            if self.alive:
                self.proc.proc.send_signal(signal.SIGSTOP)
                self.paused = True

    def cont(self) -> None:
        with self.lock:
            if self.alive and self.paused:
                self.proc.proc.send_signal(signal.SIGCONT)
            self.paused = False
            self.resumed_at = time.monotonic()

    def readyz(self) -> dict | None:
        if not self.alive or self.paused:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=0.7) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                return json.load(exc)
            except Exception:  # noqa: BLE001
                return None
        except Exception:  # noqa: BLE001 - not answering
            return None


class ChaosRun:
    def __init__(self, seed: int, minutes: float, log_dir: Path, *, n_games: int = 8, dockerd_restart: bool = True,
                 quiesce_timeout: float = 120.0, strict_same_ms: bool = True,
                 out: Callable[[str], None] = print, extra: tuple[str, ...] = ()) -> None:
        self.seed = seed
        self.minutes = minutes
        self.duration = minutes * 60.0
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.quiesce_timeout = quiesce_timeout
        self.strict_same_ms = strict_same_ms
        self.id = f"{seed % 100000}-{uuid.uuid4().hex[:6]}"
        self.games, self.mortal = game_names(n_games)
        self.all_games = self.games + self.mortal
        self.extra = tuple(extra)
        self.plan_jobs: list[PlannedJob] = plan_workload(seed, self.duration, self.games, self.mortal)
        self.plan_faults: list[PlannedFault] = plan_faults(seed, self.duration, n_games,
                                                           dockerd_restart=dockerd_restart, extra=self.extra)
        if "backlog" in self.extra:  # its entries go with the rest, in time order (a stable sort)
            self.plan_jobs = sorted(self.plan_jobs + plan_backlogs(seed, self.plan_faults, self.games, self.mortal),
                                    key=lambda j: j.at)
        self.history = History(seed=seed, minutes=minutes, games=self.games, mortal=self.mortal,
                               never_healthy=list(NEVER_HEALTHY), extra=list(self.extra))
        self.records: dict[str, JobRecord] = {}
        for p in self.plan_jobs:
            rec = JobRecord(tag=p.tag, via=p.via, kind=p.kind, game=p.game, image=p.image, reason=p.reason,
                            shape=p.shape, expect_code=p.expect_code, stream=p.stream,
                            wait=p.wait if p.via == "rest" else None)
            self.records[p.tag] = rec
            self.history.jobs.append(rec)
        self.history.faults = [FaultRecord(at=f.at, kind=f.kind, duration=f.duration, params=f.params)
                               for f in self.plan_faults]
        self.rng = random.Random(f"runtime-{seed}")
        self.abort = threading.Event()
        self.workload_over = threading.Event()
        self.t0 = time.monotonic()
        self.t_work = self.t0 + 1e6  # set when the workload begins
        self.work: Path | None = None
        self.pg: PostgresCluster | None = None
        self.redis: RedisServer | None = None
        self.dockerd: PrivateDockerd | None = None
        self.proxy: DockerSocketProxy | None = None
        self.slots: dict[str, Slot] = {}
        self.state_dirs: dict[str, dict] = {}
        self.threads: list[threading.Thread] = []
        self.pg_up = self.redis_up = False
        self.controller_exits: list[dict] = []

    # ----------------------------------------------------------------- output
    def now(self) -> float:
        """Seconds since the workload began (the fault schedule's clock); negative during set-up."""
        return time.monotonic() - self.t_work

    def say(self, msg: str) -> None:
        t = self.now()
        self.out(f"[{t:7.1f}s] {msg}" if t > -1000 else f"[  setup ] {msg}")

    def schedule_text(self) -> str:
        lines = [f"fault schedule (seed {self.seed}, {self.minutes:g} min):"]
        for f in self.history.faults:
            when = f"t={f.at:6.1f}s {f.kind}" + (f" {f.duration:.1f}s" if f.duration else "")
            params = " ".join(f"{k}={v}" for k, v in sorted(f.params.items()))
            done = f"  -> {f.note}" if f.note else ""
            ran = f" [ran {f.started:.1f}-{f.ended:.1f}s]" if f.started is not None and f.ended is not None else ""
            lines.append(f"  {when} {params}{ran}{done}")
        return "\n".join(lines)

    # -------------------------------------------------------------- services
    def _setup(self) -> None:
        import glob

        for tool in ("redis-server", "runuser", "docker", "ip", "dockerd", "containerd"):
            if shutil.which(tool) is None:
                raise AssertionError(f"{tool} is not installed; `bash deploy/local/services.sh up` installs the "
                                     "services (as root)")
        if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
            raise AssertionError("PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin/initdb); "
                                 "`bash deploy/local/services.sh up` installs them (as root)")
        self.work = Path(tempfile.mkdtemp(prefix=f"rtm-chaos-{self.id}-", dir="/var/tmp"))
        os.chmod(self.work, 0o755)
        self.say(f"work dir {self.work}, logs {self.log_dir}")
        self.history.code = _code_version()
        self.say(f"code under test: {self.history.code}")
        self.pg = PostgresCluster()
        self.pg.start()
        self.pg_up = True
        asyncio.run(self._admin("CREATE DATABASE rtmanager"))
        (self.work / "redis").mkdir()
        self.redis = RedisServer(self.work / "redis")
        self.redis.start()
        self.redis_up = True
        self.dockerd = PrivateDockerd(name=f"chaos-{self.id}")
        self.dockerd.start()
        _ensure_stub_images()
        self.dockerd.load_images(*IMAGES_TO_LOAD)
        if "stubborn_engines" in self.extra:
            self._build_stubborn()
        self.proxy = DockerSocketProxy(self.dockerd.socket, self.dockerd.run_dir / "proxy.sock").start()
        self.say(f"services up: postgres :{self.pg.port}, redis :{self.redis.port}, private dockerd "
                 f"{self.dockerd.host} (pool {self.dockerd.pool}), proxy {self.proxy.host}")
        prefix = f"chaos-{self.id}"
        self.streams = {"start": f"{prefix}:start_jobs", "stop": f"{prefix}:stop_jobs",
                        "results": f"{prefix}:job_results", "dead": f"{prefix}:dead_letters"}
        self.network = f"rtm-{prefix}"
        self.instance = prefix
        self.history.instance = prefix
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        self.games_root = self.work / "games"
        self.env = {
            "RTMANAGER_DATABASE_URL": self.pg.url_for("rtmanager"),
            "RTMANAGER_REDIS_URL": self.redis.url,
            "DOCKER_HOST": self.proxy.host,
            "RTMANAGER_DOCKER_NETWORK": self.network,
            "RTMANAGER_STATE_ROOT": str(self.games_root),
            "RTMANAGER_INSTANCE": self.instance,
            "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*",
            "RTMANAGER_START_STREAM": self.streams["start"],
            "RTMANAGER_STOP_STREAM": self.streams["stop"],
            "RTMANAGER_RESULTS_STREAM": self.streams["results"],
            "RTMANAGER_DEAD_LETTER_STREAM": self.streams["dead"],
            "RTMANAGER_CONTROL_STREAM": f"{prefix}:control_jobs",
            "RTMANAGER_SNAPSHOT_STREAM": f"{prefix}:snapshots",
            "RTMANAGER_CONSUMER_GROUP": "rtmanager",
            "RTMANAGER_LEASE_TTL": str(LEASE_TTL),
            "RTMANAGER_RESYNC_INTERVAL": "2",
            "RTMANAGER_START_TIMEOUT": "10",
            "RTMANAGER_STOP_GRACE": "2",
            "RTMANAGER_CLAIM_IDLE": "2",
            "RTMANAGER_CRASH_LIMIT": "1000",       # outside kills must never give a game up
            "RTMANAGER_CRASH_BACKOFF_MAX": "4",
            "RTMANAGER_CLEANUP_TTL": "0",          # removal only by cleanup jobs
            "RTMANAGER_STREAM_KEEP": "86400",      # job streams are never trimmed during a run
            "RTMANAGER_JOB_TIMEOUT": "60",
            "RTMANAGER_HEALTH_INTERVAL": "5",
            "RTMANAGER_HTTP_HOST": "127.0.0.1",
            "RTMANAGER_API_TOKEN": self.token,
            "RTMANAGER_LOG_FORMAT": "text",
            "RTMANAGER_LOG_LEVEL": "INFO",
        }
        if "hostile_engine" in self.extra:  # the health round asks every engine's admin status
            self.env["RTMANAGER_ENGINE_ADMIN_PATH"] = "/cgi-bin/admin/v1"
        self.clean_env = {k: v for k, v in os.environ.items()
                          if not k.startswith(("RTMANAGER_", "DOCKER_", "RTM_", "PG"))}
        out = subprocess.run([sys.executable, "-m", "controller.cli", "migrate"], env={**self.clean_env, **self.env},
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        if out.returncode != 0:
            raise AssertionError(f"rtmanager migrate failed: {out.stderr[-2000:]}")
        for name in ("a", "b"):
            self.slots[name] = Slot(name, self.env, self.log_dir / f"replica-{name}.log")
        self.slots["a"].start(self.clean_env)
        self._wait(lambda: self.leader() is not None, 60, "replica a to lead")
        self.say("replica a leads")

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.pg.url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def _fetch(self, sql: str, *args) -> list[dict]:
        conn = await asyncpg.connect(self.env["RTMANAGER_DATABASE_URL"], timeout=5)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args, timeout=10)]
        finally:
            await conn.close()

    def fetch(self, sql: str, *args) -> list[dict]:
        return asyncio.run(self._fetch(sql, *args))

    def _wait(self, cond, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what} ({timeout:g}s)")
            time.sleep(interval)

    def leader(self) -> str | None:
        for name, slot in self.slots.items():
            info = slot.readyz()
            if info and info.get("leader"):
                return name
        return None

    def docker(self):
        return self.dockerd.client(timeout=30)

    # ------------------------------------------------------------------ run
    def run(self) -> tuple[Report, History]:
        try:
            self.say(f"chaos run: seed {self.seed}, {self.minutes:g} min, {len(self.all_games)} games, "
                     f"{len(self.plan_jobs)} planned jobs, {len(self.plan_faults)} planned faults")
            self.out(self.schedule_text())
            self._setup()
            self._go()
            self._heal()
            self._quiesce()
            self._observe()
        finally:
            self._teardown()
        notes = resolve(self.history, self.streams["start"], self.streams["stop"])
        report = check(self.history, strict_same_ms=self.strict_same_ms)
        report.info[:0] = notes
        self.history.save(self.log_dir / "history.json")
        (self.log_dir / "schedule.txt").write_text(self.schedule_text() + "\n")
        (self.log_dir / "report.txt").write_text(self.render(report, full=True))
        return report, self.history

    def _go(self) -> None:
        self.t_work = time.monotonic()
        self.t0 = self.t_work
        self.say("workload and faults start")
        for name, fn in (("streams", self._stream_sender), ("rest", self._rest_client),
                         ("faults", self._fault_injector), ("monitor", self._monitor),
                         ("docker-events", self._docker_events)):
            t = threading.Thread(target=self._guard(fn), name=f"chaos-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        end = self.t_work + self.duration
        while time.monotonic() < end:
            time.sleep(0.2)
        self.workload_over.set()
        self.say("workload over; waiting for the faults still due (up to 25 s, 60 s in long runs)")
        for t in self.threads:
            if t.name not in ("chaos-monitor", "chaos-docker-events"):
                t.join(timeout=180)

    def _guard(self, fn):
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on to its checks
                self.say(f"harness thread {fn.__name__} failed: {exc.__class__.__name__}: {exc}")
                import traceback
                traceback.print_exc()
        return run

    def _sleep_until(self, t: float) -> bool:
        """Sleep until ``t`` seconds after the workload began; False when the run is aborted."""
        while not self.abort.is_set():
            left = self.t_work + t - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.2))
        return False

    # ------------------------------------------------------------ workload
    def _stream_sender(self) -> None:
        r = redis.Redis.from_url(self.redis.url, socket_timeout=3, socket_connect_timeout=2)
        jobs = [p for p in self.plan_jobs if p.via == "stream" and p.burst is None]  # bursts: their fault's
        done: set[str] = set()
        by_tag = {p.tag: p for p in jobs}
        try:
            for p in jobs:
                if p.tag in done:
                    continue
                if not self._sleep_until(p.at) or self.workload_over.is_set():
                    return
                group = [p] + ([by_tag[p.pair]] if p.pair and p.pair in by_tag else [])
                sent_at, wall = self.now(), time.time()
                try:
                    pipe = r.pipeline(transaction=False)
                    for q in group:
                        pipe.xadd(self.streams[q.stream], q.fields)
                    ids = pipe.execute()
                    error = None
                except redis.RedisError as exc:
                    ids, error = [None] * len(group), f"{exc.__class__.__name__}: {exc}"
                for q, entry_id in zip(group, ids, strict=True):
                    rec = self.records[q.tag]
                    rec.sent_at, rec.sent_wall = sent_at, wall
                    rec.entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    rec.send_error = error
                    done.add(q.tag)
        finally:
            r.close()

    def _rest_client(self) -> None:
        for p in (p for p in self.plan_jobs if p.via == "rest"):
            if not self._sleep_until(p.at) or self.workload_over.is_set():
                return
            rec = self.records[p.tag]
            name = self.leader() or self.rng.choice(sorted(self.slots))
            slot = self.slots[name]
            game = urllib.parse.quote(p.path_game or "", safe="")
            url = f"http://127.0.0.1:{slot.port}/api/v1/runtimes/{game}/{p.kind}?wait={p.wait:g}"
            if isinstance(p.body, bytes):
                data = p.body
            elif p.body is None:
                data = b""
            else:
                data = json.dumps(p.body).encode()
            req = urllib.request.Request(url, data=data, method="POST", headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            rec.replica, rec.sent_at, rec.sent_wall = name, self.now(), time.time()
            try:
                with urllib.request.urlopen(req, timeout=p.wait + 4) as resp:
                    rec.http_status, rec.http_body = resp.status, _json_or_text(resp.read())
            except urllib.error.HTTPError as exc:
                rec.http_status, rec.http_body = exc.code, _json_or_text(exc.read())
            except (ConnectionRefusedError, ConnectionResetError) as exc:
                rec.http_error = f"connect: {exc}"
            except urllib.error.URLError as exc:
                reason = exc.reason
                kind = "connect" if isinstance(reason, ConnectionRefusedError) else "timeout"
                rec.http_error = f"{kind}: {reason}"
            except (TimeoutError, OSError) as exc:
                rec.http_error = f"timeout: {exc.__class__.__name__}: {exc}"
            rec.answered_at = self.now()

    # -------------------------------------------------------------- faults
    def _fault_injector(self) -> None:
        # A fault that comes late (the ones before it took longer than planned) still runs, up to a
        # while after the workload has ended; the rest are shown as not run.
        overrun = 25.0 if self.duration < 180 else 60.0
        for plan, rec in zip(self.plan_faults, self.history.faults, strict=True):
            if not self._sleep_until(plan.at) or self.now() > self.duration + overrun:
                rec.note = "not run (the run ended first)"
                continue
            rec.started = self.now()
            try:
                rec.note = getattr(self, f"_fault_{plan.kind}")(plan)
            except Exception as exc:  # noqa: BLE001 - the fault itself failed: say so, heal, go on
                rec.note = f"harness error: {exc.__class__.__name__}: {exc}"
                self._heal_services()
            rec.ended = self.now()
            self.say(f"fault {plan.kind}: {rec.note}")

    def _running_slots(self) -> list[str]:
        return [n for n, s in self.slots.items() if s.alive and s.want_up]

    def _other(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def _ensure_up(self, name: str, wait_ready: bool = True) -> None:
        slot = self.slots[name]
        if not slot.alive:
            slot.start(self.clean_env)
        slot.want_up = True
        if wait_ready:
            with contextlib.suppress(AssertionError):
                self._wait(lambda: slot.readyz() is not None, 20, f"replica {name} to answer")

    def _fault_kill9(self, f: PlannedFault) -> str:
        target = self.leader() if f.params.get("target") == "leader" else None
        if target is None:
            running = self._running_slots()
            if not running:
                return "skipped: no replica running"
            target = self.rng.choice(running)
        was = "leader" if target == self.leader() else "replica"
        self.slots[target].kill9()
        self.say(f"kill -9 of replica {target} ({was})")
        time.sleep(f.params.get("restart_after", 1.0))
        self.slots[target].start(self.clean_env)
        return f"killed replica {target} ({was}), restarted after {f.params.get('restart_after')}s"

    def _fault_leader_change(self, f: PlannedFault) -> str:
        old = self.leader() or "a"
        new = self._other(old)
        self._ensure_up(new)
        time.sleep(1.0)
        t_term = time.monotonic()
        led: dict[str, float] = {}

        def watch() -> None:  # when the standby leads, counted from the SIGTERM
            while time.monotonic() - t_term < 60 and not self.abort.is_set():
                if self.leader() == new:
                    led["after"] = time.monotonic() - t_term
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = self.slots[old].stop()
        exited = time.monotonic() - t_term
        if code not in (0, None):
            self._exit(old, code, "graceful stop (SIGTERM) for a leader change", expected=False)
        watcher.join(timeout=LEASE_TTL + 15)
        took = (f"{new} led {led['after']:.1f}s after the SIGTERM" if "after" in led
                else f"{new} did NOT lead within {exited + LEASE_TTL + 15:.0f}s of the SIGTERM")
        took = f"{old} exited ({code}) {exited:.1f}s after SIGTERM; {took}"
        time.sleep(f.params.get("old_back_after", 2.0))
        self.slots[old].start(self.clean_env)
        time.sleep(2.0)
        then = f.params.get("then")
        if then == "stop_new":
            code = self.slots[new].stop()
            if code not in (0, None):
                self._exit(new, code, "graceful stop (SIGTERM) after a leader change", expected=False)
        elif then == "kill_new":
            self.slots[new].kill9()
        if not self.slots["a"].alive:
            time.sleep(1.0)
            self.slots["a"].start(self.clean_env)
        return f"stopped leader {old} gracefully; {took}; {old} back; then {then}"

    def _fault_pause_leader(self, f: PlannedFault) -> str:
        leader = self.leader()
        if leader is None:
            return "skipped: no leader"
        other = self._other(leader)
        if f.params.get("with_standby"):
            self._ensure_up(other)
        standby = self.slots[other].alive
        self.slots[leader].pause()
        self.say(f"SIGSTOP replica {leader} (leader) for {f.duration:.1f}s; standby {'up' if standby else 'none'}")
        time.sleep(f.duration)
        during = self.leader()
        self.slots[leader].cont()
        time.sleep(1.0)
        return (f"paused leader {leader} {f.duration:.1f}s (standby: {other if standby else 'none'}); "
                f"leader while paused: {during}; after SIGCONT: {self.leader()}")

    def _fault_postgres_down(self, f: PlannedFault) -> str:
        self.pg.stop(f.params.get("how", "fast"))
        self.pg_up = False
        time.sleep(f.duration)
        self._start_postgres()
        return f"postgres stopped ({f.params.get('how')}) for {f.duration:.1f}s"

    def _start_postgres(self) -> None:
        for attempt in range(5):
            try:
                self.pg.start()
                self.pg_up = True
                return
            except subprocess.CalledProcessError:
                time.sleep(1 + attempt)
        raise AssertionError("postgres did not start again")

    def _fault_redis_down(self, f: PlannedFault) -> str:
        if f.params.get("how") == "kill":
            self.redis.kill()
        else:
            self.redis.stop()
        self.redis_up = False
        time.sleep(f.duration)
        self.redis.start()
        self.redis_up = True
        return f"redis stopped ({f.params.get('how')}) for {f.duration:.1f}s"

    def _fault_dockerd_restart(self, f: PlannedFault) -> str:
        if not f.params.get("enabled", True):
            return "SKIPPED (dockerd restarts disabled for this run)"
        t = time.monotonic()
        watch = "stubborn_engines" in self.extra
        if watch:
            rec = self.history.faults[self._index(f)]
            rec.observed["before_wall"] = time.time()
            rec.observed["before"] = self._records_now()
            client = self.docker()
            try:
                rec.observed["running_ids"] = {c.id: c.name[len("galaxy-game-"):] for c in client.containers.list(
                    ignore_removed=True) if c.name.startswith("galaxy-game-")}
            finally:
                client.close()
        self.dockerd.restart()
        took = time.monotonic() - t
        if watch:
            self._observe_daemon_restart(rec, t)
        return f"private dockerd restarted in {took:.1f}s (SIGTERM, containerd too, started again)"

    def _fault_events_cut(self, f: PlannedFault) -> str:
        n = self.proxy.cut_events()
        note = f"cut {n} docker event stream(s)"
        if f.params.get("then_kill_game") is not None:
            note += "; then " + self._outside(f.params["then_kill_game"], remove=False)
        return note

    def _fault_container_kill(self, f: PlannedFault) -> str:
        return self._outside(f.params.get("game", 0), remove=False)

    def _fault_container_remove(self, f: PlannedFault) -> str:
        return self._outside(f.params.get("game", 0), remove=True)

    # ------------------------------------------------- opt-in faults (--faults)
    def _index(self, f: PlannedFault) -> int:
        return next(i for i, x in enumerate(self.plan_faults) if x is f)

    def _fault_backlog(self, f: PlannedFault) -> str:
        """XADD the burst in one pipeline (more than one read per stream), then cut the round. A table
        lock is taken first and held past the statement timeout: the round meets it mid-way."""
        burst = [p for p in self.plan_jobs if p.burst == f"B{self._index(f)}"]
        cut, hold = f.params.get("cut"), f.params.get("hold", 1.0)
        locker = None
        if cut == "table_lock":
            taken = threading.Event()
            locker = threading.Thread(target=lambda: asyncio.run(self._lock_table("runtime_operations", hold, taken)),
                                      daemon=True)
            locker.start()
            taken.wait(10)
        r = redis.Redis.from_url(self.redis.url, socket_timeout=10, socket_connect_timeout=2)
        sent_at, wall = self.now(), time.time()
        try:
            pipe = r.pipeline(transaction=False)
            for q in burst:
                pipe.xadd(self.streams[q.stream], q.fields)
            ids, error = pipe.execute(raise_on_error=False), None
        except redis.RedisError as exc:
            ids, error = [None] * len(burst), f"{exc.__class__.__name__}: {exc}"
        finally:
            r.close()
        for q, entry_id in zip(burst, ids, strict=True):
            rec = self.records[q.tag]
            rec.sent_at, rec.sent_wall = sent_at, wall
            if isinstance(entry_id, Exception):
                rec.send_error = f"{entry_id.__class__.__name__}: {entry_id}"
            else:
                rec.entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                rec.send_error = error
        counts = {k: sum(1 for q in burst if q.stream == k) for k in ("start", "stop")}
        time.sleep(f.params.get("cut_after", 0.2))
        leader = self.leader() or "a"
        slot = self.slots[leader]
        if cut == "kill9":
            slot.kill9()
            time.sleep(hold)
            slot.start(self.clean_env)
            how = f"kill -9 of leader {leader}, back after {hold}s"
        elif cut == "sigterm":
            code = slot.stop()
            if code not in (0, None):
                self._exit(leader, code, "graceful stop (SIGTERM) during a backlog", expected=False)
            time.sleep(hold)
            slot.start(self.clean_env)
            how = f"SIGTERM of leader {leader} (exit {code}), back after {hold}s"
        elif cut == "sigstop":
            slot.pause()
            time.sleep(hold)
            slot.cont()
            how = f"SIGSTOP of leader {leader} for {hold}s"
        elif locker is not None:
            locker.join(hold + 60)
            how = f"LOCK TABLE runtime_operations IN ACCESS EXCLUSIVE MODE taken before it, held {hold}s"
        else:
            self.redis.kill()
            self.redis_up = False
            time.sleep(hold)
            self.redis.start()
            self.redis_up = True
            how = f"redis killed for {hold}s"
        time.sleep(1.0)
        return (f"burst of {len(burst)} entries ({counts['start']} start, {counts['stop']} stop"
                f"{', send error ' + error if error else ''}); after {f.params.get('cut_after')}s: {how}")

    async def _lock_table(self, table: str, hold: float, taken: threading.Event) -> None:
        conn = await asyncpg.connect(self.env["RTMANAGER_DATABASE_URL"], timeout=10)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE", timeout=hold + 30)
                taken.set()
                await asyncio.sleep(hold)
        finally:
            await conn.close()

    def _redis_writes(self, allowed: bool) -> None:
        r = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            r.config_set("min-replicas-to-write", 0 if allowed else 1)
        finally:
            r.close()

    def _fault_redis_readonly(self, f: PlannedFault) -> str:
        self._redis_writes(False)
        try:
            time.sleep(f.duration)
        finally:
            self._redis_writes(True)
        return f"redis refused writes (min-replicas-to-write 1) for {f.duration:.1f}s"

    def _fault_hostile_engine(self, f: PlannedFault) -> str:
        """A running game's engine answers its admin status with a hostile document (its status.json,
        which the stub serves verbatim), with a 1 s turn clock so that the turn path reads it too;
        then the document it had is put back and the clock turned off."""
        client = self.docker()
        try:
            running = {c.name[len("galaxy-game-"):] for c in client.containers.list(ignore_removed=True)
                       if c.name.startswith("galaxy-game-")}
        finally:
            client.close()
        index = f.params.get("game", 0) % len(self.all_games)
        order = [g for g in self.all_games[index:] + self.all_games[:index] if g in running]
        if not order:
            return "skipped: no game runs"
        now = self.now()  # the game the workload leaves alone longest, so that it stays up meanwhile
        game = min(order, key=lambda g: sum(1 for j in self.plan_jobs
                                            if j.game == g and now - 1 <= j.at <= now + f.duration + 5))
        path = self.games_root / game / "engine" / "status.json"
        try:
            before = path.read_bytes()
        except OSError as exc:
            return f"skipped: {game} has no engine status ({exc.__class__.__name__})"
        what = f.params.get("status", "turn 2147483647")
        _write_as_engine(path, hostile_status(what))
        f.params.setdefault("chosen", game)
        try:
            schedule = self._schedule(game, 1)
            time.sleep(f.duration)
        finally:
            _write_as_engine(path, before)
        unschedule = self._schedule(game, 0)
        for _ in range(20):  # a clock left on would generate turns until the end of the run: insist
            if unschedule in ("HTTP 200", "HTTP 404") or self.abort.is_set():
                break
            time.sleep(1.0)
            unschedule = self._schedule(game, 0)
        return (f"engine of {game} answered its status with {what} for {f.duration:.1f}s (turn clock 1 s: "
                f"{schedule}; off again: {unschedule}); its own status put back")

    def _schedule(self, game: str, interval: int) -> str:
        name = self.leader() or "a"
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.slots[name].port}/api/v1/runtimes/{game}/schedule",
            data=json.dumps({"turn_interval": interval}).encode(), method="PUT",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except OSError as exc:
            return f"no answer ({exc.__class__.__name__})"

    def _fault_db_restore(self, f: PlannedFault) -> str:
        """pg_dump -Fc now; ``age`` seconds later stop the replicas, drop and create the database,
        pg_restore the dump, start them again. What ran before the restore is recorded for the
        checker (the ``restore`` invariant)."""
        rec = self.history.faults[self._index(f)]
        dump = self.work / f"backup-{self._index(f)}.dump"
        pg = ["-h", "127.0.0.1", "-p", str(self.pg.port), "-U", "postgres"]
        out = subprocess.run([f"{self.pg.bin}/pg_dump", *pg, "-Fc", "-f", str(dump), "rtmanager"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return f"skipped: pg_dump failed: {out.stderr[-300:]}"
        rec.observed["dump_wall"] = time.time()
        rec.observed["containers_at_dump"] = [c[0] for c in self._docker_snapshot()]
        time.sleep(f.params.get("age", 5.0))
        rec.observed["restore_wall"] = time.time()
        client = self.docker()
        try:
            rec.observed["running"] = {c.id: c.name[len("galaxy-game-"):] for c in client.containers.list(
                ignore_removed=True) if c.name.startswith("galaxy-game-")}
        finally:
            client.close()
        up = self._running_slots()
        for name in up:
            code = self.slots[name].stop()
            if code not in (0, None):
                self._exit(name, code, "graceful stop (SIGTERM) for a database restore", expected=False)
        asyncio.run(self._admin("DROP DATABASE rtmanager WITH (FORCE)"))
        asyncio.run(self._admin("CREATE DATABASE rtmanager"))
        out = subprocess.run([f"{self.pg.bin}/pg_restore", *pg, "-d", "rtmanager", str(dump)],
                             capture_output=True, text=True, timeout=120)
        rec.observed["restored_wall"] = time.time()
        for name in up or ["a"]:
            self.slots[name].start(self.clean_env)
        restored = "restored" if out.returncode == 0 else f"pg_restore exited {out.returncode}: {out.stderr[-300:]}"
        return (f"database dumped, {f.params.get('age')}s later replicas {up} stopped, database dropped and "
                f"{restored} ({len(rec.observed['running'])} containers running then); replicas started again")

    def _build_stubborn(self) -> None:
        """galaxy/engine-stub:1.1 in the private daemon becomes an engine whose PID 1 ignores SIGTERM
        (a signal ignored on entry stays ignored in sh): stops and daemon restarts SIGKILL it."""
        ctx = Path(tempfile.mkdtemp(prefix="stubborn-", dir=self.work))
        (ctx / "Dockerfile").write_text(
            f"FROM {V11}\n"
            'ENTRYPOINT ["/bin/sh", "-c", "trap \'\' TERM; exec /bin/sh /entrypoint.sh"]\n'
            "LABEL com.galaxy.stub-variant=stubborn\n")
        client = self.docker()
        try:
            client.images.build(path=str(ctx), tag=V11, rm=True, pull=False)
        finally:
            client.close()
        self.say(f"{V11} in the private daemon is now an engine that ignores SIGTERM")

    def _observe_daemon_restart(self, rec: FaultRecord, t_start: float) -> None:
        """Around a dockerd restart with stubborn engines: every game's record before, the exit codes
        of the containers it stopped, and the records once the games that ran are up again."""
        running_ids = rec.observed["running_ids"]
        client = self.docker()
        try:
            codes = {}
            for cid, game in running_ids.items():
                with contextlib.suppress(docker.errors.APIError):
                    st = client.api.inspect_container(cid)["State"]
                    codes[game] = st.get("ExitCode") if not st.get("Running") or st.get("Restarting") else None
            rec.observed["exit_codes"] = codes
        finally:
            client.close()

        def back() -> bool:
            """Every game that ran is no longer wanted running, or runs again in a container started after
            the restart and its record says so (rtmanager has seen the exit and counted it, or not)."""
            rows = self._records_now()
            client = self.docker()
            try:
                started = {c["Names"][0].lstrip("/"): c["Id"] for c in client.api.containers(all=True)}
                again = set()
                for game in running_ids.values():
                    cid = started.get(f"galaxy-game-{game}")
                    if cid is None:
                        continue
                    with contextlib.suppress(docker.errors.APIError):
                        st = client.api.inspect_container(cid)["State"]
                        if st.get("Running") and _epoch(st.get("StartedAt", "")) > rec.observed["before_wall"]:
                            again.add(game)
            finally:
                client.close()
            return all(rows.get(g, {}).get("desired_status") != "running"
                       or (g in again and rows[g].get("status") == "running") for g in running_ids.values())

        with contextlib.suppress(AssertionError, Exception):
            self._wait(back, 40, "the games to run again after a daemon restart", interval=1.0)
        rec.observed["after"] = self._records_now()
        rec.observed["after_wall"] = time.time()

    def _records_now(self) -> dict:
        return {r["game_id"]: {**r} for r in self.fetch(
            "SELECT game_id, status, desired_status, crash_count, generation, last_error_code FROM runtime_records")}

    def _outside(self, index: int, remove: bool) -> str:
        client = self.docker()
        try:
            containers = {c.name: c for c in client.containers.list(all=True, ignore_removed=True)}
            order = self.all_games[index % len(self.all_games):] + self.all_games[:index % len(self.all_games)]
            for game in order:
                c = containers.get(f"galaxy-game-{game}")
                if c is None or (not remove and c.status != "running"):
                    continue
                try:
                    if remove:
                        self.history.harness_removed.append(c.id)
                        c.remove(force=True)
                        return f"removed the container of {game} from outside (docker rm -f, was {c.status})"
                    c.kill()
                    return f"killed the container of {game} from outside (SIGKILL)"
                except docker.errors.APIError:  # gone or changed meanwhile (rtmanager is busy too): the next one
                    continue
            return f"skipped: no {'' if remove else 'running '}container to {'remove' if remove else 'kill'}"
        finally:
            client.close()

    # --------------------------------------------------------- docker events
    def _docker_events(self) -> None:
        """The image of every container the private daemon creates, from its own event stream
        (straight to the daemon, not through the proxy); after a daemon restart, from where it stopped."""
        since = time.time() - 5
        while not self.abort.is_set():
            client = None
            try:
                client = self.dockerd.client(timeout=None)
                self._events_client = client
                for ev in client.events(decode=True, since=since,
                                        filters={"type": "container", "event": ["create", "destroy"]}):
                    if self.abort.is_set():
                        return
                    attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                    cid = (ev.get("Actor") or {}).get("ID") or ev.get("id")
                    if cid and ev.get("Action", ev.get("status")) == "destroy":
                        self.history.destroyed.setdefault(cid, ev.get("timeNano", 0) / 1e9)
                    elif cid and attrs.get("image"):
                        self.history.container_images[cid] = attrs["image"]
                    since = max(since, ev.get("timeNano", 0) / 1e9 - 1)
            except Exception:  # noqa: BLE001 - the daemon restarted or the run ends: look again
                pass
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
            time.sleep(0.2)

    # ------------------------------------------------------------- monitor
    def _monitor(self) -> None:
        last_progress = 0.0
        while not self.abort.is_set():
            for name, slot in self.slots.items():
                with slot.lock:
                    if slot.want_up and slot.proc is not None and slot.proc.proc is not None \
                            and slot.proc.proc.poll() is not None:
                        code = slot.proc.proc.returncode
                        recently_paused = time.monotonic() - slot.resumed_at < 60
                        self._exit(name, code, "exited on its own", expected=code == 3 and recently_paused)
                        slot.proc.stop()  # closes its log
                        time.sleep(1.0)  # as a supervisor would: start it again
                        slot.start(self.clean_env)
            self._sample_state_dirs()
            if self.now() - last_progress > 15 and not self.workload_over.is_set():
                last_progress = self.now()
                sent = sum(1 for j in self.history.jobs if j.sent_at is not None)
                self.say(f"progress: {sent}/{len(self.history.jobs)} jobs sent; leader {self.leader()}; "
                         f"replicas up {self._running_slots()}")
            time.sleep(0.5)

    def _exit(self, name: str, code: int | None, why: str, expected: bool) -> None:
        slot = self.slots[name]
        try:
            tail = slot.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            tail = ""
        self.controller_exits.append({"slot": name, "code": code, "at": self.now(), "why": why,
                                      "expected": expected, "log_tail": tail})
        self.say(f"replica {name} {why} (status {code}){' (documented after a pause)' if expected else ''}")

    def _sample_state_dirs(self) -> None:
        for game in self.all_games:
            path = self.games_root / game
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            sd = self.state_dirs.setdefault(game, {"first_inode": None, "marker": None, "boots_max": 0})
            if sd["first_inode"] is None:
                sd["first_inode"] = st.st_ino
                sd["first_seen"] = round(self.now(), 2)
            if sd["marker"] is None and stat.S_ISDIR(st.st_mode) and st.st_uid == 10000:
                content = f"{self.seed}:{game}:{uuid.uuid4().hex}"
                try:
                    fd = os.open(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                    with os.fdopen(fd, "w") as f:
                        f.write(content)
                    sd["marker"] = content
                except OSError:
                    pass
            sd["boots_max"] = max(sd["boots_max"], _lines(path / "boots"))

    def _final_state_dir(self, game: str) -> dict:
        path = self.games_root / game
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return {"exists": False}
        final = {"exists": True, "is_dir": stat.S_ISDIR(st.st_mode), "is_symlink": stat.S_ISLNK(st.st_mode),
                 "inode": st.st_ino, "uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode),
                 "boots": _lines(path / "boots")}
        try:
            final["marker"] = (path / MARKER).read_text()
        except OSError:
            final["marker"] = None
        return final

    # ---------------------------------------------------------- heal, quiet
    def _heal_services(self) -> None:
        if self.pg is not None and not self.pg_up:
            self._start_postgres()
        if self.redis is not None and not self.redis.running:
            self.redis.start()
            self.redis_up = True
        if self.dockerd is not None and not self.dockerd.running:
            self.dockerd.start()
        if self.redis is not None and self.redis.running and "redis_readonly" in self.extra:
            self._redis_writes(True)

    def _heal(self) -> None:
        for slot in self.slots.values():
            slot.cont()
        self._heal_services()
        self._ensure_up("a", wait_ready=False)
        self._wait(lambda: self.leader() is not None, 60, "a leader after healing")
        self.say(f"healed: every service up, replicas {self._running_slots()}, leader {self.leader()}")

    def _landed_ids(self) -> None:
        """Entries whose XADD answer was lost may still have landed: find them by their tag."""
        r = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        try:
            for kind in ("start", "stop"):
                for entry_id, fields in r.xrange(self.streams[kind]):
                    tag = fields.get(b"chaos_tag", b"").decode()
                    rec = self.records.get(tag)
                    if rec is not None and rec.entry_id is None:
                        rec.entry_id = entry_id.decode()
                        rec.send_error = (rec.send_error or "") + " (landed nevertheless)"
        finally:
            r.close()

    def _quiet_reasons(self) -> list[str]:
        reasons = []
        self._landed_ids()
        r = redis.Redis.from_url(self.redis.url, socket_timeout=10, decode_responses=True)
        try:
            answered = {(f.get("job"), f.get("job_entry_id")) for _, f in r.xrange(self.streams["results"])}
            pending = {k: r.xpending(self.streams[k], "rtmanager")["pending"] for k in ("start", "stop")}
        finally:
            r.close()
        lost = restore_windows(self.history)  # entries a restore made the database forget may stay unanswered
        missing = [j.tag for j in self.history.jobs if j.entry_id and (j.stream, j.entry_id) not in answered
                   and not in_windows(j, lost)]
        if missing:
            reasons.append(f"{len(missing)} entries unanswered: {missing[:10]}")
        for k, n in pending.items():
            if n:
                reasons.append(f"{n} entries pending on the {k} stream")
        open_ops = self.fetch("SELECT id, game_id, op, status FROM runtime_operations WHERE status IN "
                              "('queued', 'running') ORDER BY id")
        if open_ops:
            reasons.append(f"{len(open_ops)} operations open: {open_ops[:5]}")
        unpublished = self.fetch("SELECT count(*) AS n FROM job_results WHERE published_at IS NULL")[0]["n"]
        if unpublished:
            reasons.append(f"{unpublished} results unpublished")
        moving = self.fetch("SELECT game_id, status, desired_status, generation, observed_generation FROM "
                            "runtime_records WHERE generation <> observed_generation OR status = 'starting'")
        if moving:
            reasons.append(f"records not converged: {moving[:5]}")
        return reasons

    def _docker_snapshot(self) -> list:
        client = self.docker()
        try:
            return sorted((c["Id"], c["State"], c["Image"]) for c in client.api.containers(all=True))
        finally:
            client.close()

    def _quiesce(self) -> None:
        deadline = time.monotonic() + self.quiesce_timeout
        last_snapshot, since = None, time.monotonic()
        reasons: list[str] = ["not looked yet"]
        while time.monotonic() < deadline:
            try:
                reasons = self._quiet_reasons()
                snap = self._docker_snapshot()
            except Exception as exc:  # noqa: BLE001 - a service still waking up
                reasons = [f"observation failed: {exc.__class__.__name__}: {exc}"]
                snap = None
            if snap != last_snapshot:
                last_snapshot, since = snap, time.monotonic()
            if not reasons and time.monotonic() - since >= 4.0:
                self.say("quiet: every entry answered, nothing pending, records converged, Docker steady for 4s")
                return
            if self.leader() is None:
                self._ensure_up("a", wait_ready=False)
            time.sleep(1.0)
        self.history.quiet = False
        self.history.not_quiet = reasons + ([] if reasons else ["containers kept changing"])
        self.say(f"NOT quiet after {self.quiesce_timeout:g}s: {self.history.not_quiet}")

    # ------------------------------------------------------------- observe
    def _observe(self) -> None:
        h = self.history
        self._landed_ids()
        r = redis.Redis.from_url(self.redis.url, socket_timeout=10, decode_responses=True)
        rb = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        try:
            h.results = [[eid, fields] for eid, fields in r.xrange(self.streams["results"])]
            h.pending = {self.streams[k]: r.xpending(self.streams[k], "rtmanager")["pending"]
                         for k in ("start", "stop")}
            h.dead_letters = [{k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in f.items()}
                              for _, f in rb.xrange(self.streams["dead"])]
        finally:
            r.close()
            rb.close()
        h.ops = self.fetch("SELECT id, game_id, op, source, status, generation, stream, entry_id, error_code, "
                           "params->>'event' AS event, "
                           "extract(epoch FROM created_at)::float8 AS created_epoch FROM runtime_operations"
                           " ORDER BY id")
        h.op_results = {str(row["operation_id"]): _fields(row["fields"]) for row in self.fetch(
            "SELECT operation_id, fields FROM job_results WHERE operation_id IS NOT NULL")}
        h.unpublished = self.fetch("SELECT count(*) AS n FROM job_results WHERE published_at IS NULL")[0]["n"]
        h.records = {row["game_id"]: row for row in self.fetch(
            "SELECT game_id, status, desired_status, desired_image_ref, current_image_ref, current_container_id, "
            "generation, observed_generation, crash_count, last_error_code FROM runtime_records")}
        client = self.docker()
        try:
            for c in client.containers.list(all=True):
                labels = c.attrs["Config"].get("Labels") or {}
                nets = c.attrs["NetworkSettings"].get("Networks") or {}
                ip = (nets.get(self.network) or {}).get("IPAddress") or ""
                running = c.attrs["State"].get("Running", False)
                h.container_images.setdefault(c.id, c.attrs["Config"]["Image"])
                h.containers.append({"id": c.id, "name": c.name, "game": labels.get("com.galaxy.game-id"),
                                     "instance": labels.get("com.galaxy.instance"), "running": running,
                                     "status": c.status, "image": c.attrs["Config"]["Image"], "ip": ip,
                                     "healthy": _healthy(ip) if running else None})
        finally:
            client.close()
        for game in self.all_games:
            sd = self.state_dirs.get(game, {"first_inode": None, "marker": None, "boots_max": 0})
            sd["final"] = self._final_state_dir(game)
            h.state_dirs[game] = sd
        h.controller_exits = self.controller_exits

    # ------------------------------------------------------------ teardown
    def _teardown(self) -> None:
        self.abort.set()
        self.workload_over.set()
        steps = [("controllers", self._stop_controllers), ("proxy", lambda: self.proxy and self.proxy.stop()),
                 ("service logs", self._copy_logs), ("dockerd", lambda: self.dockerd and self.dockerd.remove()),
                 ("redis", lambda: self.redis and self.redis.kill()),
                 ("postgres", lambda: self.pg and self.pg.remove()), ("work dir", self._remove_work)]
        for what, fn in steps:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - go on removing the rest
                self.out(f"teardown of {what} failed: {exc.__class__.__name__}: {exc}")
        self.say("torn down: controllers, private dockerd (and its data), redis, postgres, work dir")

    def _stop_controllers(self) -> None:
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                slot.cont()
        for slot in self.slots.values():
            if slot.proc is not None and slot.proc.proc is not None:
                with contextlib.suppress(Exception):
                    slot.stop(timeout=20)

    def _copy_logs(self) -> None:
        if self.dockerd is not None:
            for name in ("dockerd.log", "containerd.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(self.dockerd.data_dir / name, self.log_dir / name)
        if self.pg is not None:
            with contextlib.suppress(OSError):
                shutil.copy(f"{self.pg.dir}/log", self.log_dir / "postgres.log")

    def _remove_work(self) -> None:
        if self.work is not None and self.work.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.work)], capture_output=True)

    # -------------------------------------------------------------- output
    def render(self, report: Report, full: bool = False) -> str:
        h = self.history
        lines = []
        stream = [j for j in h.jobs if j.via == "stream" and j.entry_id]
        rest = [j for j in h.jobs if j.via == "rest" and j.sent_at is not None]
        bad = [j for j in h.jobs if not j.valid and j.sent_at is not None]
        codes: dict[str, int] = {}
        for _, f in h.results:
            key = f.get("error_code") or f.get("outcome", "?")
            codes[key] = codes.get(key, 0) + 1
        unsent = sum(1 for j in h.jobs if j.sent_at is None)
        lines.append(f"chaos seed={self.seed} minutes={self.minutes:g}: {len(stream)} stream entries, "
                     f"{len(rest)} REST calls ({sum(1 for j in rest if j.op_id is not None)} admitted), "
                     f"{len(bad)} bad shapes, {unsent} planned jobs not sent (the REST client fell behind); "
                     f"{len(h.results)} results {dict(sorted(codes.items()))}; "
                     f"{sum(1 for f in h.faults if f.started is not None)} faults run")
        for g in self.all_games:
            lines.append(f"  {g:10s} final {_show(report.observed.get(g))}; allowed "
                         f"{', '.join(_show(s) for s in report.expected.get(g, []))}")
        lines.append(f"code under test: {h.code or 'unknown'}")
        if report.ok:
            lines.append("all invariants hold")
        else:
            lines.append(f"VIOLATED: {report.by_invariant()}")
            lines.append(f"replay: python -m tests.chaos --seed {self.seed} --minutes {self.minutes:g}"
                         + (f" --faults {','.join(self.extra)}" if self.extra else ""))
            lines.append(self.schedule_text())
            lines.append("first violated invariant:")
            lines.append(report.first.render())
            lines.append(f"logs and history: {self.log_dir}")
        if full:
            if len(report.violations) > 1:
                lines.append("all violations:")
                lines += [v.render() for v in report.violations]
            if report.info:
                lines.append("information:")
                lines += [f"  {i}" for i in report.info]
            lines.append("jobs per game (admission order):")
            for g, trail in report.trails.items():
                lines.append(f"  {g}:")
                lines += [f"    {t}" for t in trail]
        return "\n".join(lines) + "\n"


def _ensure_stub_images() -> None:
    """The stub images in the main daemon (read only: ``docker save``), built by the project's script if missing."""
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    missing = [ref for ref in IMAGES_TO_LOAD if subprocess.run(["docker", "image", "inspect", ref], env=env,
                                                                 capture_output=True).returncode != 0]
    if missing:
        out = subprocess.run(["bash", str(ROOT / "deploy/engine-stub/build.sh")], env=env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise AssertionError(f"the stub images {missing} are missing and could not be built: {out.stderr[-1000:]}")


def _code_version() -> str:
    """The commit, and how many product files differ from it (read-only git: no index refresh)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              env=env, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "controller", "desired", "observed",
                                "migrations"], cwd=ROOT, capture_output=True, text=True, env=env,
                               timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}" + (f" + {len(dirty)} changed product files" if dirty else "")


def _show(state) -> str:
    if state is None:
        return "?"
    return state[0] if len(state) == 1 else f"running {state[1]}"


def hostile_status(what: str) -> bytes:
    """The admin status document of a hostile engine (plan.HOSTILE_STATUSES)."""
    idle = '"phase":"idle","last_generation":null'
    docs = {
        "turn 2147483647": '{"turn":2147483647,' + idle + '}',
        "turn 2147483648": '{"turn":2147483648,' + idle + '}',
        "turn 2**64": '{"turn":18446744073709551616,' + idle + '}',
        "turn 1e400": '{"turn":1e400,' + idle + '}',
        "last_generation turn 2**63": '{"turn":4,"phase":"idle","last_generation":{"turn":9223372036854775808,'
                                      '"ok":true,"error":""}}',
        "phase with NUL and a lone surrogate": '{"turn":4,"phase":"idle\\u0000\\ud800","last_generation":null}',
        "a JSON list": '[1,2,3]',
        "nested 100000 deep": '{"turn":' + "[" * 100000 + "]" * 100000 + '}',
        "1 MB error text": '{"turn":4,"phase":"idle","last_generation":{"turn":4,"ok":false,"error":"'
                           + "x" * 1_000_000 + '"}}',
    }
    if what == "not JSON":
        return b"\xff\xfe<html>{{{ not json\n"
    return (docs.get(what) or docs["turn 2147483647"]).encode() + b"\n"


def _write_as_engine(path: Path, data: bytes) -> None:
    """Replace the file whole (as the engine does), owned by the engine's user."""
    tmp = path.with_name(path.name + ".chaos")
    tmp.write_bytes(data)
    os.chown(tmp, 10000, 10000)
    os.replace(tmp, path)


def _epoch(docker_time: str) -> float:
    """A Docker timestamp (RFC 3339, nanoseconds) as seconds since the epoch; 0 when unreadable."""
    import datetime
    import re

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?", docker_time or "")
    if not m:
        return 0.0
    base = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.UTC).timestamp()
    return base + float(m.group(2) or 0)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _json_or_text(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"text": raw.decode("utf-8", "replace")[:500]}


def _fields(raw) -> dict:
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def _healthy(ip: str, attempts: int = 3) -> bool:
    """The host reaches the engine at its container IP (as rtmanager's probe does)."""
    if not ip:
        return False
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(f"http://{ip}:{ENGINE_PORT}/healthz", timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return True
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    return False
