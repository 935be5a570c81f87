"""The ``rtmanager`` command.

    rtmanager run                      the controller, in the foreground
    rtmanager migrate                  apply pending migrations (idempotent)
    rtmanager status                   a table of runtime records
    rtmanager submit start GAME IMAGE  publish a start job as Lobby does
    rtmanager submit stop GAME REASON  publish a stop job as Lobby does
    rtmanager results [--follow]       print the results stream
    rtmanager doctor                   check every dependency, say what is wrong
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from controller.config import VARIABLES, ConfigError, Settings
from controller.logs import redact_url, setup_logging


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"rtmanager: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _migrate(settings: Settings) -> int:
    import asyncpg

    from desired.migrate import migrate

    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


async def _status(settings: Settings) -> int:
    import asyncpg

    from desired.store import Store

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        records = await Store(pool).list()
    finally:
        await pool.close()
    rows = [("GAME", "STATUS", "DESIRED", "GEN", "HEALTH", "IMAGE", "CONTAINER", "LAST ERROR")]
    for r in records:
        rows.append((r.game_id, r.status.value, r.desired_status.value,
                     f"{r.observed_generation}/{r.generation}", r.health.value,
                     r.current_image_ref or r.desired_image_ref or "-", (r.current_container_id or "-")[:12],
                     (r.last_error_code.value if r.last_error_code else "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


async def _submit(settings: Settings, kind: str, game_id: str, value: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        if kind == "start":
            entry = await client.xadd(settings.start_stream, {"game_id": game_id, "image_ref": value})
        else:
            entry = await client.xadd(settings.stop_stream, {"game_id": game_id, "reason": value})
    finally:
        await client.aclose()
    print(entry.decode())
    return 0


async def _results(settings: Settings, follow: bool, count: int, wait_for: list[str],
                   timeout: float) -> int:
    """Print results; with --wait-for, only those of the given job entry ids, until all arrived."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    last = "0-0"
    waiting = set(wait_for)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            block = 500 if (follow or waiting) else None
            reply = await client.xread({settings.results_stream: last}, count=count, block=block)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if wait_for and fields.get("job_entry_id") not in waiting:
                        continue
                    waiting.discard(fields.get("job_entry_id", ""))
                    print(_format_result(fields), flush=True)
            if wait_for and not waiting:
                return 0
            if wait_for and loop.time() > deadline:
                print(f"rtmanager results: no result within {timeout:g}s for {', '.join(sorted(waiting))}",
                      file=sys.stderr)
                return 1
            if not follow and not wait_for and not reply:
                return 0
    finally:
        await client.aclose()


def _format_result(f: dict[str, str]) -> str:
    parts = [f"{f.get('job', '?'):<5}", f"{f.get('game_id', '?'):<14}", f"{f.get('outcome', '?'):<8}"]
    if f.get("error_code"):
        parts.append(f"error_code={f['error_code']}")
    if f.get("container_id"):
        parts.append(f"container={f['container_id'][:12]}")
    if f.get("engine_endpoint"):
        parts.append(f"endpoint={f['engine_endpoint']}")
    if f.get("error_message"):
        parts.append(f"message={f['error_message']!r}")
    parts.append(f"entry={f.get('job_entry_id') or '-'}")
    return "  ".join(parts)


async def _doctor(settings: Settings) -> int:
    import asyncpg
    import redis.asyncio as aioredis

    from observed.docker import DockerAdapter

    problems = 0

    def say(ok: bool, what: str, detail: str = "") -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}{(': ' + detail) if detail else ''}")

    try:
        conn = await asyncpg.connect(settings.database_url, timeout=5)
        try:
            from desired.migrate import load_migrations

            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            pending = [m.name for m in load_migrations() if m.version not in applied]
            say(True, f"postgres at {redact_url(settings.database_url)}")
            say(not pending, "schema", f"pending migrations {pending}: run `rtmanager migrate`" if pending
                else f"up to date ({len(applied)} migrations)")
            lease = None if pending else await conn.fetchrow(
                "SELECT holder, epoch, expires_at > now() AS live FROM leader_leases WHERE instance = $1",
                settings.instance)
            if lease is not None:
                print(f"info leader of instance {settings.instance}: {lease['holder']} (term {lease['epoch']}, "
                      f"{'live' if lease['live'] else 'expired'})")
        except asyncpg.UndefinedTableError:
            say(False, "postgres schema", "not migrated: run `rtmanager migrate`")
        finally:
            await conn.close()
    except Exception as exc:
        say(False, f"postgres at {redact_url(settings.database_url)}", f"{exc.__class__.__name__}: {exc}")
    client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        await client.ping()
        say(True, f"redis at {redact_url(settings.redis_url)}")
    except Exception as exc:
        say(False, f"redis at {redact_url(settings.redis_url)}", f"{exc.__class__.__name__}: {exc}")
    finally:
        await client.aclose()
    docker = DockerAdapter(instance=settings.instance, network=settings.docker_network, pool_size=1)
    try:
        await docker.ping()
        say(True, "docker daemon")
        managed = await docker.list_managed()
        print(f"info {len(managed)} containers of instance {settings.instance}, "
              f"{sum(1 for c in managed if c.running)} running")
    except Exception as exc:
        say(False, "docker daemon", str(exc))
    finally:
        docker.close()
    root = settings.state_root
    probe_dir = root
    while not os.path.isdir(probe_dir):  # the nearest existing ancestor decides whether it can be made
        probe_dir = os.path.dirname(probe_dir)
    say(os.access(probe_dir, os.W_OK), f"state root {root}",
        "" if os.path.isdir(root) else "missing; it will be created")
    if not settings.api_token:
        print("info RTMANAGER_API_TOKEN is empty: the REST API answers 503")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rtmanager", description="Runtime Manager of the Galaxy game platform")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the controller in the foreground")
    run_p.add_argument("--log-format", choices=("json", "text"), help="override RTMANAGER_LOG_FORMAT")
    sub.add_parser("migrate", help="apply pending database migrations")
    sub.add_parser("status", help="print a table of runtime records")
    sp = sub.add_parser("submit", help="publish a job as Lobby does")
    ssub = sp.add_subparsers(dest="kind", required=True)
    st = ssub.add_parser("start")
    st.add_argument("game_id")
    st.add_argument("image_ref")
    so = ssub.add_parser("stop")
    so.add_argument("game_id")
    so.add_argument("reason", nargs="?", default="admin_request")
    rp = sub.add_parser("results", help="print the results stream")
    rp.add_argument("--follow", action="store_true")
    rp.add_argument("--count", type=int, default=1000)
    rp.add_argument("--wait-for", nargs="+", default=[], metavar="ENTRY_ID",
                    help="print only the results of these job entries, waiting until all have arrived")
    rp.add_argument("--timeout", type=float, default=60.0, help="with --wait-for: seconds to wait")
    sub.add_parser("doctor", help="check Postgres, Redis and Docker")
    sub.add_parser("env", help="list the configuration variables and their defaults")
    args = parser.parse_args(argv)

    if args.command == "env":
        for var in VARIABLES:
            print(f"{var.name}={var.default!s:<45} # {var.help}")
        return
    settings = _settings()
    if args.command == "run":
        setup_logging(args.log_format or settings.log_format, settings.log_level)
        from controller.app import run
        raise SystemExit(asyncio.run(run(settings)))
    setup_logging("text", "WARNING")
    handlers = {
        "migrate": lambda: _migrate(settings),
        "status": lambda: _status(settings),
        "submit": lambda: _submit(settings, args.kind, args.game_id,
                                  getattr(args, "image_ref", None) or getattr(args, "reason", "")),
        "results": lambda: _results(settings, args.follow, args.count, args.wait_for, args.timeout),
        "doctor": lambda: _doctor(settings),
    }
    try:
        raise SystemExit(asyncio.run(handlers[args.command]()))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (OSError, ConnectionError) as exc:
        print(f"rtmanager {args.command}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
