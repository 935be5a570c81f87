"""Section 6 of bench/scale.py: many games, simulated: one in-process Controller against the real
Postgres and Redis, with a Docker daemon and engines that live in memory.

    .venv/bin/python bench/scale_sim.py --games 100000 --db NAME --prefix PREFIX --out FILE

Normally started by bench/scale.py (which also drops the database and the Redis keys afterwards).

What is real and what is fake:

* real: Postgres (records inserted directly, converged and running), Redis (the run's own
  streams), and all of rtmanager: ``Controller(settings)`` with its store, intake, relay,
  reconcile workers, resync, health round, and its own ``DockerBackend`` adapter (thread pool,
  docker-py's request helpers, the list parser, the metrics observer and the leadership guard);
* fake: the daemon behind docker-py (``FakeDockerAPI``, a ``docker.APIClient`` whose calls that
  would talk HTTP answer from a dict; the list call hands back JSON that is decoded like
  dockerd's answer), the engines (``SimEngine``, the engine-client port: every running container
  is healthy, idle at turn 0) and the Docker event stream (``SimEvents``: the drift below sends
  'die' events the way dockerd would).

tests/fakes.FakeBackend is not used: its ``ip_of`` looks a container up with
``list(...).index(...)``, so one list of n containers costs O(n^2) (100,000 games: 10^10 steps).

Measured at each size (grown in place: containers first, then the records, so a resync never
sees a record without its container): resync time (``Resync.once``, triggered back to back),
its parts (the list call, the records query), process CPU per resync, RSS, SQL statements per
resync (pg_stat_statements of this database), one health round (``HealthRound.once``; its
probes cost nothing here, see the report for the real per-probe cost), and at the largest size a
drift of ``--drift`` of the games at once (their containers exit, 'die' events): time until every
game is running and converged again, and the queue on the way.

With ``--starts K`` only starts are measured instead: at each of ``--start-sizes`` (games already
running), K new games through the start stream at once, and this process's CPU per start (the
controller's, plus the fake daemon's small constant share). ``--start-latency`` makes the fake
daemon take that long per container start, so that the starts take the wall time they take on a
real dockerd and the background loops (``--health``, ``--resync``) run meanwhile, as they do in the
``start`` section of bench/scale.py; without it the start path alone is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import docker
import docker.errors
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if os.environ.get("BENCH_CODE"):  # bench/run.sh --before: the controller's code of another revision
    sys.path.insert(0, os.environ["BENCH_CODE"])

import controller.app  # noqa: E402
from controller.app import Controller  # noqa: E402
from controller.config import Settings  # noqa: E402
from controller.logs import setup_logging  # noqa: E402
from controller.spec import build_spec  # noqa: E402
from desired.db.migrate import migrate  # noqa: E402
from desired.db.pool import create_pool  # noqa: E402
from desired.db.rows import RECORD_COLUMNS  # noqa: E402
from desired.db.store import Store  # noqa: E402
from desired.model import DesiredStatus, Health, RuntimeRecord, Status, engine_endpoint  # noqa: E402
from observed.engine import EngineStatus  # noqa: E402
from observed.errors import EngineUnreachable  # noqa: E402
from observed.model import LABEL_DATABASE, LABEL_EPOCH  # noqa: E402

IMAGE = "galaxy/engine-stub:1.0"
MARK = "/* rtm-scale-bench */ "  # our own statements, left out of the counts
RESYNC_MARKERS = ("observed_generation <> generation", "GROUP BY status", "count(*) FROM job_results",
                  "DISTINCT game_id FROM runtime_operations")


def log(msg: str) -> None:
    print(f"   [sim] {msg}", file=sys.stderr, flush=True)


def rss_mib() -> tuple[float, float]:
    rss = hwm = float("nan")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def _err(cls, code: int, msg: str):
    resp = requests.models.Response()
    resp.status_code = code
    return cls(msg, response=resp, explanation=msg)


# ------------------------------------------------------------------ the fake daemon
class SimContainer:
    __slots__ = ("id", "name", "image", "labels", "state", "exit_code", "ip", "created", "started_at",
                 "finished_at", "mounts", "env")

    def __init__(self, cid: str, name: str, image: str, labels: dict, ip: str, mounts: list, env: list) -> None:
        self.id, self.name, self.image, self.labels, self.ip = cid, name, image, labels, ip
        self.state, self.exit_code = "created", 0
        self.created = time.time()
        self.started_at = self.finished_at = "0001-01-01T00:00:00Z"
        self.mounts, self.env = mounts, env


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class FakeDockerAPI(docker.APIClient):
    """docker-py's low-level client whose I/O answers from memory, the way dockerd would.

    The request helpers (create_host_config, create_networking_config, ...) are docker-py's own;
    only the calls that would go to the daemon are replaced. Thread-safe (the backend calls it
    from its thread pool)."""

    def __init__(self, network: str) -> None:
        super().__init__(base_url="unix:///nonexistent-rtm-scale-sim.sock", version="1.41")
        self.network = network
        self.net_id = secrets.token_hex(32)
        self.lock = threading.Lock()
        self.by_id: dict[str, SimContainer] = {}
        self.by_name: dict[str, str] = {}
        self.by_ip: dict[str, SimContainer] = {}
        self._ips = 0
        self._list_json: bytes | None = None
        self._version = 0  # bumped by every change of a container (under the lock)
        self.calls: dict[str, int] = {}
        self.start_latency = 0.0

    def _changed(self) -> None:
        self._list_json = None
        self._version += 1

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def _next_ip(self) -> str:
        self._ips += 1
        n = self._ips
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    # what the bench does (not through docker-py)
    def add_running(self, cid: str, name: str, labels: dict, state_path: str, state_target: str) -> SimContainer:
        c = SimContainer(cid, name, IMAGE, labels, "", [{"Type": "bind", "Source": state_path,
                                                          "Destination": state_target, "Mode": "", "RW": True,
                                                          "Propagation": "rprivate"}], [])
        c.state, c.started_at = "running", _iso(time.time())
        with self.lock:
            c.ip = self._next_ip()
            self.by_id[cid] = c
            self.by_name[name] = cid
            self.by_ip[c.ip] = c
            self._changed()
        return c

    def exit(self, cid: str, code: int) -> None:
        with self.lock:
            c = self.by_id[cid]
            c.state, c.exit_code, c.finished_at = "exited", code, _iso(time.time())
            self.by_ip.pop(c.ip, None)
            self._changed()

    def running_count(self) -> int:
        """Without the lock: the drift's sampler runs on the event loop, and waiting there for a list
        call's lock held the controller's loop (its lease renewal) for seconds. by_ip holds exactly
        the running containers; len() of a dict is atomic."""
        return len(self.by_ip)

    def list_json_bytes(self) -> int:
        return len(self._list_json or b"")

    # ------------------------------------------------------------- the daemon's answers
    def _list_entry(self, c: SimContainer) -> dict:
        status = f"Up {int(time.time() - c.created)} seconds" if c.state == "running" else (
            f"Exited ({c.exit_code}) 1 second ago" if c.state == "exited" else "Created")
        return {
            "Id": c.id, "Names": [f"/{c.name}"], "Image": c.image, "ImageID": "sha256:" + "0" * 64,
            "Command": "/bin/sh /entrypoint.sh", "Created": int(c.created), "Ports": [], "Labels": c.labels,
            "State": c.state, "Status": status, "HostConfig": {"NetworkMode": self.network},
            "NetworkSettings": {"Networks": {self.network: {
                "IPAMConfig": None, "Links": None, "Aliases": None, "NetworkID": self.net_id,
                "EndpointID": c.id if c.state == "running" else "", "Gateway": "10.0.0.1" if c.ip else "",
                "IPAddress": c.ip if c.state == "running" else "", "IPPrefixLen": 8 if c.ip else 0,
                "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
                "MacAddress": "02:42:0a:00:00:02" if c.state == "running" else "", "DriverOpts": None}}},
            "Mounts": c.mounts,
        }

    def _list_raw(self, all: bool) -> bytes:
        """The list's answer as dockerd sends it. Encoded an entry at a time: dockerd encodes in a process
        of its own, and one json.dumps of 100,000 entries here would hold the controller's GIL for seconds,
        a stall the controller does not have with a real daemon."""
        self._count("list")
        with self.lock:
            raw, version = self._list_json, self._version
            if raw is None:  # the entries under the lock, their JSON (dockerd's work, not ours) outside it
                entries = [self._list_entry(c) for c in self.by_id.values() if all or c.state == "running"]
        if raw is None:
            raw = b"[" + b",".join(json.dumps(e).encode() for e in entries) + b"]"
            with self.lock:
                if self._version == version:  # nothing changed meanwhile: keep it for the next list
                    self._list_json = raw
        return raw

    def containers(self, quiet=False, all=False, trunc=False, latest=False, since=None, before=None, limit=-1,
                   size=False, filters=None, **kwargs):
        return json.loads(self._list_raw(all))  # what requests' .json() does with dockerd's answer

    def _get(self, url, **kwargs):
        """The controller's list call (observed/daemon.get_list) reads the answer's bytes itself."""
        if url.endswith("/containers/json"):
            res = requests.Response()
            res.status_code, res.url = 200, url
            res._content = self._list_raw(bool((kwargs.get("params") or {}).get("all")))
            return res
        return super()._get(url, **kwargs)  # anything else: no daemon at all (logs, as before)

    def _find(self, name_or_id: str) -> SimContainer:
        c = self.by_id.get(name_or_id) or self.by_id.get(self.by_name.get(name_or_id, ""))
        if c is None:
            raise _err(docker.errors.NotFound, 404, f"No such container: {name_or_id}")
        return c

    def inspect_container(self, container):
        self._count("inspect")
        with self.lock:
            c = self._find(container)
            running = c.state == "running"
            return {
                "Id": c.id, "Name": f"/{c.name}", "Created": _iso(c.created),
                "State": {"Status": c.state, "Running": running, "Paused": False, "Restarting": False,
                          "OOMKilled": False, "Dead": False, "Pid": 4242 if running else 0,
                          "ExitCode": c.exit_code, "Error": "", "StartedAt": c.started_at,
                          "FinishedAt": c.finished_at},
                "Config": {"Image": c.image, "Labels": dict(c.labels), "Env": c.env, "Hostname": c.name},
                "NetworkSettings": {"Networks": {self.network: {"IPAddress": c.ip if running else "",
                                                                "NetworkID": self.net_id}}},
                "Mounts": c.mounts,
            }

    def logs(self, container, stdout=True, stderr=True, stream=False, timestamps=False, tail="all", since=None,
             follow=None, until=None):
        self._count("logs")
        return b"engine-stub: simulated exit\n"

    def inspect_image(self, image):
        self._count("image_inspect")
        if image != IMAGE:
            raise _err(docker.errors.ImageNotFound, 404, f"No such image: {image}")
        return {"Id": "sha256:" + "0" * 64, "RepoTags": [IMAGE]}

    def networks(self, names=None, ids=None, filters=None):
        self._count("networks")
        return [{"Name": self.network, "Id": self.net_id}]

    def create_network(self, name, *args, **kwargs):
        self._count("create_network")
        return {"Id": self.net_id}

    def create_container(self, image, command=None, hostname=None, user=None, detach=False, stdin_open=False,
                         tty=False, ports=None, environment=None, volumes=None, network_disabled=False, name=None,
                         entrypoint=None, working_dir=None, domainname=None, host_config=None, mac_address=None,
                         labels=None, stop_signal=None, networking_config=None, healthcheck=None,
                         stop_timeout=None, runtime=None, use_config_proxy=True, platform=None):
        self._count("create")
        with self.lock:
            if name in self.by_name:
                raise _err(docker.errors.APIError, 409, f"Conflict. The container name \"/{name}\" is already in use")
            cid = secrets.token_hex(32)
            mounts = [{"Type": "bind", "Source": m.get("Source"), "Destination": m.get("Target"), "RW": True}
                      for m in (host_config or {}).get("Mounts", [])]
            c = SimContainer(cid, name, image, dict(labels or {}), "", mounts,
                             [f"{k}={v}" for k, v in (environment or {}).items()])
            self.by_id[cid] = c
            self.by_name[name] = cid
            self._changed()
        return {"Id": cid, "Warnings": []}

    def start(self, container, *args, **kwargs):
        self._count("start")
        if self.start_latency:
            time.sleep(self.start_latency)  # dockerd's own time (in the backend's thread, as a real call)
        with self.lock:
            c = self._find(container)
            if c.state != "running":
                c.state, c.exit_code, c.started_at = "running", 0, _iso(time.time())
                c.ip = self._next_ip()
                self.by_ip[c.ip] = c
                self._changed()

    def stop(self, container, timeout=None):
        self._count("stop")
        with self.lock:
            c = self._find(container)
            if c.state == "running":
                c.state, c.exit_code, c.finished_at = "exited", 0, _iso(time.time())
                self.by_ip.pop(c.ip, None)
                self._changed()

    def unpause(self, container):
        self._count("unpause")

    def remove_container(self, container, v=False, link=False, force=False):
        self._count("remove")
        with self.lock:
            c = self._find(container)
            self.by_id.pop(c.id, None)
            self.by_name.pop(c.name, None)
            self.by_ip.pop(c.ip, None)
            self._changed()

    def ping(self):
        self._count("ping")
        return True

    def close(self):
        pass


class FakeDockerClient:
    """What ``docker.from_env()`` gives the backend: ``.api``, ``ping()``, ``images.pull``, ``close()``."""

    def __init__(self, api: FakeDockerAPI) -> None:
        self.api = api
        self.images = self

    def ping(self) -> bool:
        return self.api.ping()

    def pull(self, image, *args, **kwargs):
        raise _err(docker.errors.NotFound, 404, f"pull access denied for {image}")

    def close(self) -> None:
        pass


class SimEvents:
    """The Docker event stream, as the drift sends it: on_connect at start (a relist), then events."""

    def __init__(self, on_event, on_connect) -> None:
        self.on_event = on_event
        self.on_connect = on_connect

    def start(self) -> None:
        self.on_connect()

    def stop(self) -> None:
        pass

    def reconnect(self) -> None:
        self.on_connect()


class SimEngine:
    """The engine-client port: a running container's engine is healthy, idle, at turn 0."""

    def __init__(self, api: FakeDockerAPI) -> None:
        self.api = api
        self.checks = 0
        self.statuses = 0

    async def check(self, host: str) -> tuple[bool, str]:
        self.checks += 1
        await asyncio.sleep(0)  # an HTTP request yields to the loop at least once
        c = self.api.by_ip.get(host)
        ok = c is not None and c.state == "running"
        return ok, "HTTP 200" if ok else "no answer"

    async def wait_healthy(self, host: str, timeout: float, still_worth_it=None) -> tuple[bool, str]:
        return await self.check(host)

    async def status(self, host: str, *, token: str = "") -> EngineStatus:
        self.statuses += 1
        await asyncio.sleep(0)
        c = self.api.by_ip.get(host)
        if c is None or c.state != "running":
            raise EngineUnreachable(f"engine at {host} does not answer")
        return EngineStatus(turn=0, phase="idle", last_generation=None)

    async def request_turn(self, host: str, expected_turn: int, *, token: str = "") -> bool:
        raise EngineUnreachable("turns are not simulated")

    async def close(self) -> None:
        pass


# ------------------------------------------------------------------------ the run
class Sim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dsn = args.admin_dsn.rsplit("/", 1)[0] + "/" + args.db
        self.state_root = args.state_root or tempfile.mkdtemp(prefix="rtm-scale-sim-")
        os.makedirs(self.state_root, exist_ok=True)
        p = args.prefix
        self.env = {
            "RTMANAGER_DATABASE_URL": self.dsn, "RTMANAGER_REDIS_URL": args.redis_url,
            "RTMANAGER_DOCKER_NETWORK": f"{p}-simnet", "RTMANAGER_STATE_ROOT": self.state_root,
            "RTMANAGER_INSTANCE": f"{p}-sim", "RTMANAGER_IMAGE_ALLOWLIST": "galaxy/engine-stub:*",
            "RTMANAGER_START_STREAM": f"{p}:sim:start", "RTMANAGER_STOP_STREAM": f"{p}:sim:stop",
            "RTMANAGER_CONTROL_STREAM": f"{p}:sim:control", "RTMANAGER_RESULTS_STREAM": f"{p}:sim:results",
            "RTMANAGER_SNAPSHOT_STREAM": f"{p}:sim:snapshots", "RTMANAGER_DEAD_LETTER_STREAM": f"{p}:sim:dead",
            "RTMANAGER_CONSUMER_NAME": f"{p}-sim", "RTMANAGER_HTTP_PORT": "0",
            "RTMANAGER_RESYNC_INTERVAL": str(args.resync), "RTMANAGER_HEALTH_INTERVAL": str(args.health),
            "RTMANAGER_ENGINE_ADMIN_PATH": "/cgi-bin/admin/v1", "RTMANAGER_CLEANUP_TTL": "0",
            "RTMANAGER_CONCURRENCY": str(args.concurrency), "RTMANAGER_LOG_LEVEL": "WARNING",
            "RTMANAGER_LOG_FORMAT": "text",
        }
        self.settings = Settings.from_env(self.env)
        self.api = FakeDockerAPI(self.settings.runtime.docker_network)
        self.api.start_latency = args.start_latency
        self.games: list[tuple[str, str]] = []  # (game_id, container id)
        self.resync_times: list[tuple[float, float, int]] = []  # (wall s, cpu s, queued)
        self.list_times: list[float] = []
        self.live_times: list[float] = []
        self.ctl: Controller | None = None
        self.stall = 0.0  # the longest the event loop was held since the last reset (see watch_loop)
        self._beat: list[float] | None = None

    def stall_stacks(self, path: str, held: float = 1.0) -> None:
        """A thread that, while the event loop is held longer than ``held`` seconds, writes where the
        loop's thread is (its stack, once a second): where a stall that costs the lease comes from."""
        main = threading.main_thread().ident
        beat = [time.monotonic()]
        self._beat = beat

        def watch() -> None:
            with open(path, "a") as out:
                while True:
                    time.sleep(held)
                    late = time.monotonic() - beat[0]
                    if late > held:
                        frame = sys._current_frames().get(main)
                        out.write(f"--- loop held {late:.1f}s\n" + "".join(traceback.format_stack(frame)[-14:]))
                        out.flush()

        threading.Thread(target=watch, daemon=True).start()

    async def watch_loop(self, tick: float = 0.05) -> None:
        """How long the event loop is held at a time: a sleep of ``tick`` that wakes late by more was
        held up by work that did not yield (a lease renewal waits as long; its TTL is 5 s)."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(tick)
            self.stall = max(self.stall, loop.time() - t0 - tick)
            if self._beat is not None:
                self._beat[0] = time.monotonic()

    # ------------------------------------------------------------- postgres
    async def sql(self, query: str, *args):
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetch(MARK + query, *args)
        finally:
            await conn.close()

    async def prepare_database(self):
        conn = await asyncpg.connect(self.dsn)
        try:
            await migrate(conn)
            await conn.execute(MARK + "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        finally:
            await conn.close()
        pool = await create_pool(self.dsn, max_size=1, lease_ttl=5)
        try:
            return await Store(pool).claim_identity(self.settings.leadership.instance)
        finally:
            await pool.close()

    async def pgss_reset(self) -> None:
        await self.sql("SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database"
                       " WHERE datname = current_database()), 0)")

    async def pgss(self) -> dict[str, tuple[float, float]]:
        rows = await self.sql("SELECT query, calls::float8 AS calls, total_exec_time AS total FROM pg_stat_statements"
                              " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())")
        return {r["query"]: (r["calls"], r["total"]) for r in rows
                if "rtm-scale-bench" not in r["query"] and "pg_stat_statements" not in r["query"]}

    # ---------------------------------------------------------------- games
    async def grow(self, upto: int, identity_uid: str) -> None:
        """Containers first (in the fake daemon), then their records (COPY), converged and running."""
        s = self.settings
        now = datetime.now(UTC)
        defaults = s.record_defaults
        start = len(self.games)
        rows = []
        t0 = time.perf_counter()
        for i in range(start, upto):
            if i % 1000 == 0:
                await asyncio.sleep(0)  # the controller runs on this loop: its lease renewals too
            gid = f"{self.args.prefix}-{i}"
            cid = secrets.token_hex(32)
            rec = RuntimeRecord(
                game_id=gid, status=Status.RUNNING, current_container_id=cid, current_image_ref=IMAGE,
                engine_endpoint=engine_endpoint(gid, s.engine.engine_port), state_path=defaults.state_path(gid),
                docker_network=s.runtime.docker_network, started_at=now, stopped_at=None, removed_at=None,
                last_op_at=now, created_at=now, desired_status=DesiredStatus.RUNNING, desired_image_ref=IMAGE,
                generation=1, observed_generation=1, health=Health.HEALTHY, health_checked_at=now,
                admin_api=True, turn=0, phase="idle", last_turn_at=now, clock_from=now, snapshot_revision=1)
            rec.validate()
            spec = build_spec(s, rec, database=identity_uid, epoch=1)
            labels = spec.all_labels()
            # No database label: were a resync to see the container before its record, the container
            # would be left alone as unowned instead of being disposed of as an orphan.
            labels[LABEL_DATABASE], labels[LABEL_EPOCH] = "", "0"
            self.api.add_running(cid, spec.name, labels, spec.state_path, spec.state_target)
            rows.append(tuple(getattr(rec, c).value if hasattr(getattr(rec, c), "value") else getattr(rec, c)
                              for c in RECORD_COLUMNS))
            self.games.append((gid, cid))
        built = time.perf_counter() - t0
        conn = await asyncpg.connect(self.dsn)
        try:
            t0 = time.perf_counter()
            for k in range(0, len(rows), 20000):
                await conn.copy_records_to_table("runtime_records", records=rows[k:k + 20000],
                                                 columns=list(RECORD_COLUMNS))
            await conn.execute(MARK + "ANALYZE runtime_records")
            copied = time.perf_counter() - t0
        finally:
            await conn.close()
        # The fake daemon lives in this process: keep its objects (several per container) out of the
        # cyclic GC's generations, so that collections cost what they would cost the controller alone.
        gc.freeze()
        log(f"{upto:,} games: built {upto - start:,} in {built:.1f}s, COPY {copied:.1f}s")

    # ------------------------------------------------------------ controller
    def instrument(self, ctl: Controller) -> None:
        """Time the resync and its two reads (wrappers on the instances; the product code is unchanged)."""
        once, list_managed, list_live = ctl.resync.once, ctl.backend.list_managed, ctl.store.list_live

        async def timed_once():
            t0, c0 = time.perf_counter(), time.process_time()
            queued = await once()
            self.resync_times.append((time.perf_counter() - t0, time.process_time() - c0, queued))
            return queued

        async def timed_list():
            t0 = time.perf_counter()
            out = await list_managed()
            self.list_times.append(time.perf_counter() - t0)
            return out

        async def timed_live():
            t0 = time.perf_counter()
            out = await list_live()
            self.live_times.append(time.perf_counter() - t0)
            return out

        ctl.resync.once = timed_once
        ctl.backend.list_managed = timed_list
        ctl.store.list_live = timed_live

    async def resyncs(self, k: int, timeout: float = 600) -> list[tuple[float, float, int]]:
        """k resyncs back to back (Resync.now), their (wall, cpu, queued)."""
        assert self.ctl is not None
        out = []
        for _ in range(k):
            before = len(self.resync_times)
            self.ctl.resync.now.set()
            deadline = time.monotonic() + timeout
            while len(self.resync_times) <= before:
                if time.monotonic() > deadline:
                    raise RuntimeError("resync did not complete")
                await asyncio.sleep(0.01)
            out.append(self.resync_times[before])
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        assert self.ctl is not None
        total = 0.0
        for fam in self.ctl.metrics.registry.collect():
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def docker_calls(self) -> dict[str, float]:
        assert self.ctl is not None
        out: dict[str, float] = {}
        for fam in self.ctl.metrics.registry.collect():
            for s in fam.samples:
                if s.name == "rtmanager_docker_api_calls_total":
                    out[s.labels["operation"]] = out.get(s.labels["operation"], 0) + s.value
        return out

    async def measure_size(self, n: int) -> dict:
        assert self.ctl is not None
        ctl = self.ctl
        await self.pgss_reset()
        q0 = await self.pgss()
        d0 = self.docker_calls()
        l0, v0 = len(self.list_times), len(self.live_times)
        self.stall = 0.0
        runs = await self.resyncs(self.args.resyncs)
        resync_stall = self.stall
        q1 = await self.pgss()
        d1 = self.docker_calls()
        per_query = {q: c - q0.get(q, (0, 0))[0] for q, (c, _) in q1.items()}
        resync_sql = sum(c for q, c in per_query.items() if any(m in q for m in RESYNC_MARKERS))
        live_ms = [(t - q0.get(q, (0, 0))[1]) / max(1, c - q0.get(q, (0, 0))[0])
                   for q, (c, t) in q1.items() if "observed_generation <> generation" in q]
        rss, hwm = rss_mib()
        gc_cpu = self.gc_cpu
        self.stall = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        await ctl.health.once()
        health_s, health_cpu = time.perf_counter() - t0, time.process_time() - c0
        health_gc, health_stall = self.gc_cpu - gc_cpu, self.stall
        walls = [w for w, _, _ in runs]
        out = {
            "games": n, "resyncs": len(runs),
            "resync_s_median": statistics.median(walls), "resync_s_max": max(walls),
            "resync_cpu_s_median": statistics.median(c for _, c, _ in runs),
            "resync_queued": [q for _, _, q in runs],
            "us_per_game": statistics.median(walls) / n * 1e6,
            "list_s_median": statistics.median(self.list_times[l0:]) if self.list_times[l0:] else None,
            "list_live_s_median": statistics.median(self.live_times[v0:]) if self.live_times[v0:] else None,
            "list_live_sql_ms": live_ms[0] if live_ms else None,
            "docker_calls_per_resync": {k: (d1.get(k, 0) - d0.get(k, 0)) / len(runs) for k in d1
                                        if d1.get(k, 0) - d0.get(k, 0)},
            "resync_sql_per_resync": resync_sql / len(runs),
            "all_sql_per_resync": sum(per_query.values()) / len(runs),
            "rss_mib": rss, "hwm_mib": hwm, "fake_list_json_mib": self.api.list_json_bytes() / 2**20,
            "health_round_s": health_s, "health_round_cpu_s": health_cpu, "health_round_gc_cpu_s": health_gc,
            "resync_loop_stall_s": resync_stall, "health_round_loop_stall_s": health_stall,
        }
        log(f"{n:,} games: resync {out['resync_s_median']:.3f}s (list {out['list_s_median'] or 0:.3f}s, records "
            f"{out['list_live_s_median'] or 0:.3f}s, CPU {out['resync_cpu_s_median']:.2f}s, loop held up to "
            f"{resync_stall:.2f}s), health round {health_s:.2f}s (CPU {health_cpu:.2f}s, GC {health_gc:.2f}s, loop "
            f"held up to {health_stall:.2f}s), RSS {rss:.0f} MiB")
        return out

    async def without_gc(self) -> dict:
        """The same resync and health round with Python's cyclic GC switched off (how much of their CPU
        the collector takes while the heap holds every record and container)."""
        assert self.ctl is not None
        out = {}
        for gc_on in (True, False):
            if not gc_on:
                gc.disable()
            try:
                (wall, cpu, _), = await self.resyncs(1)
                c0 = time.process_time()
                await self.ctl.health.once()
                health_cpu = time.process_time() - c0
            finally:
                gc.enable()
            key = "gc_on" if gc_on else "gc_off"
            out[f"resync_cpu_s_{key}"], out[f"health_round_cpu_s_{key}"] = cpu, health_cpu
        log(f"GC off: resync CPU {out['resync_cpu_s_gc_on']:.2f} -> {out['resync_cpu_s_gc_off']:.2f}s, health round "
            f"CPU {out['health_round_cpu_s_gc_on']:.2f} -> {out['health_round_cpu_s_gc_off']:.2f}s")
        return out

    async def converged_count(self) -> int:
        rows = await self.sql("SELECT count(*) AS n FROM runtime_records WHERE status = 'running'"
                              " AND observed_generation = generation")
        return rows[0]["n"]

    async def drift(self, fraction: float, timeout: float) -> dict:
        """``fraction`` of the games' containers exit at once ('die' events, as dockerd sends them);
        time until every game runs and is converged again."""
        assert self.ctl is not None
        ctl = self.ctl
        n = len(self.games)
        victims = random.Random(7).sample(self.games, max(1, int(n * fraction)))
        d0 = self.docker_calls()
        rec0 = self.metric_sum("rtmanager_reconcile_total")
        r0 = len(self.resync_times)
        await self.pgss_reset()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for _, cid in victims:
            self.api.exit(cid, 137)
        events = ctl.events
        for gid, _ in victims:
            events.on_event(gid, "die")
        max_depth = 0
        samples = []
        not_leader = 0  # samples (every 0.25 s) taken while this controller was not the leader
        self.stall = 0.0
        deadline = time.monotonic() + timeout
        converged_at = None
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            depth = len(ctl.queue) + ctl.queue.processing
            max_depth = max(max_depth, depth)
            running = self.api.running_count()
            samples.append((round(time.perf_counter() - t0, 2), depth, running))
            not_leader += not ctl.is_leader
            if running == n and depth == 0 and await self.converged_count() == n:
                converged_at = time.perf_counter() - t0
                break
        cpu = time.process_time() - cpu0
        q = await self.pgss()
        d1 = self.docker_calls()
        done = converged_at is not None
        return {
            "games": n, "drifted": len(victims), "converged": done,
            "seconds": converged_at if done else None,
            "games_per_s": len(victims) / converged_at if done and converged_at else None,
            "max_queue": max_depth, "cpu_s": cpu,
            "reconciles": self.metric_sum("rtmanager_reconcile_total") - rec0,
            "resyncs_during": len(self.resync_times) - r0,
            "docker_calls": {k: d1.get(k, 0) - d0.get(k, 0) for k in d1 if d1.get(k, 0) - d0.get(k, 0)},
            "sql_statements": sum(c for c, _ in q.values()),
            "sql_per_game": sum(c for c, _ in q.values()) / len(victims),
            "samples": len(samples), "not_leader_samples": not_leader, "loop_stall_s": self.stall,
            "queue_samples": samples[:: max(1, len(samples) // 40)],
        }

    async def measure_starts(self, k: int, timeout: float = 600) -> dict:
        """``k`` new games started through the start stream at once (XADD in one round trip), with
        ``self.games`` already running: wall time to the last result, and this process's CPU per start
        (the controller's, plus the fake daemon's and engines' constant work per start)."""
        import redis.asyncio as aioredis
        s = self.settings.streams
        r = aioredis.from_url(self.args.redis_url)
        try:
            base = len(self.games) + self._started
            games = [f"{self.args.prefix}-s{base + i}" for i in range(k)]
            self._started += k
            last = (await r.xrevrange(s.results_stream, count=1) or [(b"0-0", {})])[0][0]
            gc_before = sum(st["collections"] for st in gc.get_stats())
            t0, c0 = time.perf_counter(), time.process_time()
            pipe = r.pipeline(transaction=False)
            for g in games:
                pipe.xadd(s.start_stream, {"game_id": g, "image_ref": IMAGE})
            ids = {eid.decode() if isinstance(eid, bytes) else eid for eid in await pipe.execute()}
            outcomes: dict[str, int] = {}
            deadline = time.monotonic() + timeout
            while ids and time.monotonic() < deadline:
                reply = await r.xread({s.results_stream: last}, count=5000, block=200)
                for _, items in reply or []:
                    for eid, fields in items:
                        last = eid
                        je = fields.get(b"job_entry_id", b"").decode()
                        if fields.get(b"job", b"").decode() == "start" and je in ids:
                            ids.discard(je)
                            o = fields.get(b"outcome", b"").decode()
                            outcomes[o] = outcomes.get(o, 0) + 1
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            await r.aclose()
        gcs = sum(st["collections"] for st in gc.get_stats()) - gc_before
        out = {"running_before": base, "starts": k, "answered": k - len(ids), "outcomes": outcomes, "wall_s": wall,
               "cpu_ms_per_start": 1000 * cpu / k, "gc_collections": gcs}
        log(f"{base:,} running: {k} starts in {wall:.2f}s, {out['cpu_ms_per_start']:.1f} ms CPU each {outcomes}")
        return out

    def _gc_callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.process_time()
        else:
            self.gc_cpu += time.process_time() - self._gc_t0

    async def run(self) -> dict:
        args = self.args
        self._started = 0
        self.gc_cpu, self._gc_t0 = 0.0, 0.0  # the cyclic GC's CPU in this process, so far
        gc.callbacks.append(self._gc_callback)
        if args.stall_stacks:
            self.stall_stacks(args.stall_stacks)
        watcher = asyncio.create_task(self.watch_loop())
        identity = await self.prepare_database()
        sizes = sorted({max(1, args.games // 10), max(1, args.games // 2), args.games})
        base_rss, _ = rss_mib()
        await self.grow(sizes[0], identity.uid)
        ctl = Controller(self.settings, identity=identity)
        # The hook: the product DockerBackend stays, only the daemon behind docker-py is fake; the
        # engine client and the event stream are replaced before start() builds the loops.
        ctl.backend._client = FakeDockerClient(self.api)
        ctl.backend.events = lambda on_event, on_connect: SimEvents(on_event, on_connect)
        ctl.engine = SimEngine(self.api)
        self.ctl = ctl
        await ctl.start()
        deadline = time.monotonic() + 30
        while not ctl.is_leader:
            if time.monotonic() > deadline:
                raise RuntimeError("the simulated controller did not become leader")
            await asyncio.sleep(0.05)
        self.instrument(ctl)
        tune_gc = getattr(controller.app, "tune_gc", None)  # older revisions have none
        if tune_gc is not None:
            tune_gc()  # what `rtmanager run` does once started
        if args.gc_threshold0:
            gc.set_threshold(args.gc_threshold0, *gc.get_threshold()[1:])
        result: dict = {"sizes": [], "base_rss_mib": base_rss, "settings": {
            "resync_interval": args.resync, "concurrency": args.concurrency, "resyncs_per_size": args.resyncs}}
        try:
            if args.starts:
                start_sizes = [int(x) for x in args.start_sizes.split(",")] if args.start_sizes else sizes
                result["starts"] = []
                for n in start_sizes:
                    if n > len(self.games):
                        await self.grow(n, identity.uid)
                    await asyncio.sleep(0.5)
                    for _ in range(args.start_rounds):
                        result["starts"].append(await self.measure_starts(args.starts))
                return result
            for n in sizes:
                if n > len(self.games):
                    await self.grow(n, identity.uid)
                await asyncio.sleep(0.5)
                # The process's RSS holds the fake daemon and engines too: an upper bound of the
                # controller's. (An estimate from RSS growth while the fakes were built came out
                # negative once the allocator reused what a resync had freed: not kept.)
                m = await self.measure_size(n)
                if n == sizes[-1]:
                    m.update(await self.without_gc())
                result["sizes"].append(m)
            if args.drift > 0:
                log(f"drift: {args.drift:.0%} of {len(self.games):,} games exit at once ...")
                result["drift"] = await self.drift(args.drift, args.drift_timeout)
                d = result["drift"]
                log(f"drift: {d['drifted']:,} games converged again in {d['seconds'] or float('nan'):.1f}s"
                    f" (max queue {d['max_queue']:,}; running {self.api.running_count():,} of {len(self.games):,};"
                    f" not the leader in {d['not_leader_samples']} of {d['samples']} samples; loop held"
                    f" up to {d['loop_stall_s']:.2f}s)")
        finally:
            watcher.cancel()
            ctl.stopping.set()
            await ctl.shutdown()
        return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=100_000)
    ap.add_argument("--db", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--admin-dsn", default=os.environ.get("RTMANAGER_TEST_DATABASE_URL",
                                                          "postgresql://postgres@127.0.0.1:55432/postgres"))
    ap.add_argument("--redis-url", default=os.environ.get("RTMANAGER_REDIS_URL", "redis://127.0.0.1:56379/0"))
    ap.add_argument("--resync", type=float, default=30.0)
    ap.add_argument("--resyncs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=int(os.environ.get("RTMANAGER_CONCURRENCY", "4")))
    ap.add_argument("--drift", type=float, default=0.10)
    ap.add_argument("--drift-timeout", type=float, default=1800)
    ap.add_argument("--health", type=float, default=0, help="RTMANAGER_HEALTH_INTERVAL (0: no health round)")
    ap.add_argument("--starts", type=int, default=0, help="measure only starts: this many at once per size")
    ap.add_argument("--start-sizes", default="", help="games running before the starts, e.g. 200,1000,3000")
    ap.add_argument("--start-rounds", type=int, default=2)
    ap.add_argument("--start-latency", type=float, default=0.0,
                    help="seconds the fake daemon takes per container start (dockerd's pace: about 0.5 s at "
                         "concurrency 4 on this machine), so that the background loops run while games start")
    ap.add_argument("--stall-stacks", default="", help="write the loop thread's stack here whenever the loop is "
                    "held over a second")
    ap.add_argument("--gc-threshold0", type=int, default=0, help="gc.set_threshold's first value once started "
                    "(0: what rtmanager run sets, controller/app.py GC_THRESHOLD0; 700 is Python's default)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", default="/dev/null", help="the controller's log (JSON lines, WARNING and up)")
    ap.add_argument("--state-root", default="", help="RTMANAGER_STATE_ROOT (default: a new temporary directory)")
    args = ap.parse_args()
    # The controller logs as `rtmanager run` does with RTMANAGER_LOG_LEVEL=WARNING, into a file.
    setup_logging("json", "WARNING")
    logging.getLogger().handlers[0].setStream(open(args.log, "a"))  # noqa: SIM115
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)  # asyncio.run cancels: the controller shuts down
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sim = Sim(args)
    try:
        result = asyncio.run(sim.run())
    finally:
        import shutil
        shutil.rmtree(sim.state_root, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
