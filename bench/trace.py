"""Where one start's time goes: the controller in this process, every call it makes to Postgres, Redis,
dockerd and the engine timed at the driver, for starts sent one at a time.

    .venv/bin/python bench/trace.py [--starts 20] [--show 1]

(after ``bash bench/run.sh`` or ``deploy/local/services.sh up`` brought the services up). For each start
(XADD of a start job -> its result on the results stream) the calls are split into phases:

    intake     XADD -> the admission's COMMIT
    to create  the COMMIT -> the create sent to dockerd (the look, the intent written before the create)
    dockerd    create and start (what the plain docker-py loop of ``bench/run.py`` waits for too)
    to healthy the start's answer -> the engine's first health answer (the probe schedule both share)
    answer     the health answer -> the result read back (the address checked again, the engine's
               status, the record written, the relay's XADD)

``intake + to create + answer`` is the controller's own time: the plain loop's counterpart is one
inspect (about 1.5 ms). The table gives the median of each phase and the calls it made; ``--show``
prints the whole timeline of the last starts.

A measuring aid, not a benchmark: the wrappers cost a few microseconds a call, and the controller runs
in the process that times it (its HTTP port answers on 127.0.0.1 as ``rtmanager run``'s does).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import docker
import docker.api.client
import redis.asyncio as aredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run as base  # noqa: E402  bench/run.py: the database, network and image the other benchmarks use

from observed.model import LABEL_INSTANCE  # noqa: E402

PHASES = ("intake", "to create", "dockerd", "to healthy", "answer")


class Spans:
    """Calls as (start, end, kind, what), from the event loop and from docker-py's threads."""

    def __init__(self) -> None:
        self.items: list[tuple[float, float, str, str]] = []
        self.lock = threading.Lock()

    def add(self, t0: float, kind: str, what: str) -> None:
        with self.lock:
            self.items.append((t0, time.perf_counter(), kind, what))

    def take(self) -> list[tuple[float, float, str, str]]:
        with self.lock:
            out, self.items = sorted(self.items), []
        return out


SPANS = Spans()


def _wrap(cls: Any, name: str, kind: str, label: Callable[[tuple], str]) -> None:
    orig = getattr(cls, name)
    if asyncio.iscoroutinefunction(orig):
        @functools.wraps(orig)
        async def timed_async(self: Any, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await orig(self, *a, **k)
            finally:
                SPANS.add(t0, kind, label(a))
        setattr(cls, name, timed_async)
    else:
        @functools.wraps(orig)
        def timed(self: Any, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(self, *a, **k)
            finally:
                SPANS.add(t0, kind, label(a))
        setattr(cls, name, timed)


def instrument() -> None:
    def sql(a: tuple) -> str:
        return " ".join(str(a[0]).split())[:60]
    for m in ("execute", "fetch", "fetchrow", "fetchval", "executemany"):
        _wrap(asyncpg.connection.Connection, m, "sql", sql)
    _wrap(aredis.Redis, "execute_command", "redis", lambda a: " ".join(str(x) for x in a[:2]))
    _wrap(aredis.client.Pipeline, "execute", "redis", lambda a: "pipeline")
    for m in ("_get", "_post", "_delete"):  # docker-py's requests (in the backend's threads)
        _wrap(docker.api.client.APIClient, m, "docker",
              lambda a, m=m: f"{m[1:]} " + re.sub("[0-9a-f]{64}", "<id>", str(a[0]).split("/", 4)[-1])[:60])
    _wrap(aiohttp.ClientSession, "_request", "engine", lambda a: f"{a[0]} {str(a[1]).split('/', 3)[-1][:40]}")


def phases(spans: list[tuple[float, float, str, str]], sent: float, answered: float) -> dict[str, float] | None:
    """The phases of one start (seconds), or None when its calls are not those of a start."""
    commit = next((e for s, e, k, w in spans if s >= sent and w.startswith("COMMIT")), None)
    create = next((s for s, e, k, w in spans if k == "docker" and "containers/create" in w), None)
    start = next((e for s, e, k, w in spans if k == "docker" and w.endswith("/start")), None)
    health = [e for s, e, k, w in spans if k == "engine" and "healthz" in w and start and s >= start]
    if commit is None or create is None or start is None or not health:
        return None
    # The last health request before the engine's status (the first answered one).
    status = next((s for s, e, k, w in spans if k == "engine" and "status" in w and s >= health[0]), answered)
    healthy = max(h for h in health if h <= status)
    return {"intake": commit - sent, "to create": create - commit, "dockerd": start - create,
            "to healthy": healthy - start, "answer": answered - healthy}


async def trace(args: argparse.Namespace, env: dict[str, str]) -> None:
    os.environ.update(env)
    from controller import app  # noqa: PLC0415  after the environment is set
    from controller.config import Settings  # noqa: PLC0415
    task = asyncio.create_task(app.run(Settings.from_env()))
    r = aredis.Redis.from_url(env["RTMANAGER_REDIS_URL"], decode_responses=True)
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(f"http://127.0.0.1:{env['RTMANAGER_HTTP_PORT']}/readyz") as resp:
                    if (await resp.json()).get("leader"):
                        break
            except (aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the controller did not become leader")
    try:
        rows = await starts(args, env, r)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # the controller's own way out: it stops its loops and threads
        await task
        await r.aclose()
    report(rows, args.show)


async def starts(args: argparse.Namespace, env: dict[str, str], r: aredis.Redis) -> list:
    last = "0-0"
    rows: list[tuple[float, dict[str, float], list]] = []
    for i in range(args.starts + args.warmup):
        game = f"trace-{uuid.uuid4().hex[:8]}"
        await asyncio.sleep(0.5)  # the previous start's tail (marks, snapshots) out of the way
        SPANS.take()
        sent = time.perf_counter()
        entry = await r.xadd(env["RTMANAGER_START_STREAM"], {"game_id": game, "image_ref": base.IMAGE})
        answered = None
        deadline = time.monotonic() + 60
        while answered is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no result for {game}")
            for _, items in await r.xread({env["RTMANAGER_RESULTS_STREAM"]: last}, count=100, block=200) or []:
                for eid, fields in items:
                    last = eid
                    if fields.get("job_entry_id") == entry:
                        if fields.get("outcome") != "success":
                            raise RuntimeError(f"{game}: {fields}")
                        answered = time.perf_counter()
        spans = [s for s in SPANS.take() if s[0] <= answered]
        if i >= args.warmup:
            split = phases(spans, sent, answered)
            if split is None:
                raise RuntimeError(f"{game}: not the calls of a start: {spans}")
            rows.append((answered - sent, split, [(s - sent, e - s, k, w) for s, e, k, w in spans]))
    return rows


def report(rows: list[tuple[float, dict[str, float], list]], show: int) -> None:
    ms = 1000.0
    print(f"\n== one start, XADD -> result, {len(rows)} starts one at a time (median; ms)")
    print(f"{'phase':<12}{'median':>9}{'p90':>9}   calls in the phase (median count)")
    for name in PHASES:
        values = sorted(s[name] for _, s, _ in rows)
        counts: list[Counter[str]] = []
        for _, split, spans in rows:
            lo = sum(split[p] for p in PHASES[:PHASES.index(name)])
            hi = lo + split[name]
            counts.append(Counter(k for t, d, k, w in spans if lo <= t < hi))
        kinds = sorted({k for c in counts for k in c})
        calls = ", ".join(f"{k} {statistics.median(c[k] for c in counts):g}" for k in kinds)
        print(f"{name:<12}{values[len(values) // 2] * ms:>9.1f}{values[int(len(values) * 0.9)] * ms:>9.1f}   "
              f"{calls}")
    own = sorted(s["intake"] + s["to create"] + s["answer"] for _, s, _ in rows)
    total = sorted(t for t, _, _ in rows)
    print(f"{'total':<12}{total[len(total) // 2] * ms:>9.1f}{total[int(len(total) * 0.9)] * ms:>9.1f}")
    print(f"{'own':<12}{own[len(own) // 2] * ms:>9.1f}{own[int(len(own) * 0.9)] * ms:>9.1f}   "
          "intake + to create + answer")
    for total_s, _, spans in rows[-show:] if show else []:
        print(f"\n-- one start: {total_s * ms:.1f} ms (start of the call, its time, ms)")
        for t, d, k, w in spans:
            if t >= -0.001:
                print(f"{t * ms:8.1f} {d * ms:7.1f}  {k:<7}{w}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--show", type=int, default=1, help="print the timeline of the last SHOW starts")
    args = ap.parse_args()
    client = docker.from_env()
    if not client.networks.list(names=[base.NETWORK]):
        client.networks.create(base.NETWORK, driver="bridge")
    work = Path(tempfile.mkdtemp(prefix="rtm-trace-"))
    rtm = base.Rtm(work, resync=30)
    db = rtm.env["RTMANAGER_DATABASE_URL"]
    rtm.env["RTMANAGER_INSTANCE"] = "bench-trace"
    rtm.env["RTMANAGER_LOG_LEVEL"] = "WARNING"

    async def create_db(sql: str) -> None:
        admin = await asyncpg.connect(base.ADMIN_DSN)
        await admin.execute(sql.format(db=rtm.db))
        await admin.close()
    asyncio.run(create_db('CREATE DATABASE "{db}"'))
    try:
        exe = Path(sys.executable).with_name("rtmanager")
        subprocess.run([str(exe), "migrate"], env=rtm.env, check=True, capture_output=True)
        instrument()
        asyncio.run(trace(args, {k: v for k, v in rtm.env.items() if k.startswith("RTMANAGER_")}
                          | {"RTMANAGER_DATABASE_URL": db}))
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}=bench-trace"}):
            c.remove(force=True)
        asyncio.run(create_db('DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
