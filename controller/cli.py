"""The ``rtmanager`` command (every subcommand is listed in the README).

    rtmanager run                      the controller, in the foreground
    rtmanager migrate                  apply pending migrations (idempotent)
    rtmanager status                   a table of runtime records, and unowned containers
    rtmanager submit start GAME IMAGE  publish a start job as Lobby does
    rtmanager submit stop GAME REASON  publish a stop job as Lobby does
    rtmanager results [--follow]       print the results stream
    rtmanager adopt GAME...|--all      hand unowned containers back to rtmanager
    rtmanager dispose GAME...          stop (gracefully) and remove unowned containers
    rtmanager versions list [--status S]           the engine-version registry
    rtmanager versions add VERSION IMAGE [--pull] [--stop-grace S]  register an engine version
    rtmanager versions stop-grace VERSION S|default  its SIGTERM-to-SIGKILL seconds (default: RTMANAGER_STOP_GRACE)
    rtmanager versions deprecate|disable|activate VERSION
    rtmanager versions remove VERSION
    rtmanager drain NODE|--host [--max-parallel N] [--deadline S] [--on-deadline move|stop]
                    [--local-state stop|move_without_state]   take a Swarm node or the Docker host out of use
    rtmanager undrain ID|NODE|--host   end a drain: in use again, the games it stopped start again
    rtmanager drains [ID] [--json]     the drains (one with its games)
    rtmanager rollout start --to V (--from V | GAME...) [--max-parallel N] [--canary N] ...  a rolling rollout
    rtmanager rollout status [ID] [--json]      rollouts, or one with every game's state and why
    rtmanager rollout pause|resume|abort ID
    rtmanager doctor                   check every dependency, say what is wrong
    rtmanager env                      the configuration variables and their defaults
"""

from __future__ import annotations

import signal
import sys

# rtmanager run: SIGTERM and SIGINT are caught from the process's first moment, before the heavy
# imports and the event loop; one that comes before the event loop takes them over is noted here
# and honoured as soon as start-up can stop cleanly (exit 0). Without this, a SIGTERM in the first
# few hundred milliseconds killed the process (exit status -15).
_signalled: list[int] = []


def _note_signal(signum: int, frame: FrameType | None) -> None:
    _signalled.append(signum)


def _catch_signals_early() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note_signal)


if sys.argv[1:2] == ["run"] and sys.argv[0].rsplit("/", 1)[-1] in ("rtmanager", "cli.py"):
    _catch_signals_early()  # `rtmanager run` or `python -m controller.cli run`: before anything else

import argparse  # noqa: E402 - after the signal handlers, on purpose
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from types import FrameType  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from controller.access import cli_actor  # noqa: E402
from controller.config import VARIABLES, ConfigError, Settings  # noqa: E402
from controller.logs import redact_url, setup_logging  # noqa: E402

if TYPE_CHECKING:  # imported where they are used, after start-up
    from controller.streams import RedisStreams
    from desired.db.store import Store
    from observed.backend import RuntimeBackend
    from observed.model import ObservedContainer


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"rtmanager: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[Store]:
    from desired.db.pool import create_pool
    from desired.db.store import Store

    pool = await create_pool(settings.database.database_url, max_size=2, lease_ttl=settings.leadership.lease_ttl)
    try:
        yield Store(pool)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _backend(settings: Settings) -> AsyncIterator[RuntimeBackend]:
    from controller.app import make_backend

    backend = make_backend(settings)  # RTMANAGER_BACKEND: docker or swarm
    try:
        yield backend
    finally:
        backend.close()


@contextlib.asynccontextmanager
async def _streams(settings: Settings) -> AsyncIterator[RedisStreams]:
    from controller.streams import RedisStreams

    group = settings.streams
    streams = RedisStreams(group.redis_url, group=group.consumer_group, consumer=group.consumer_name)
    try:
        yield streams
    finally:
        await streams.close()


async def _migrate(settings: Settings) -> int:
    from desired.db.migrate import migrate
    from desired.db.pool import connect

    conn = await connect(settings.database.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


async def _unowned(settings: Settings, store: Store,
                   backend: RuntimeBackend) -> list[tuple[str, ObservedContainer]]:
    """Containers of this instance that have no record, with their game ids, whoever created them (the
    controller never disposes of them: after a restored backup they may be games created under this
    very database)."""
    managed = [(c.game_id, c) for c in await backend.list_managed() if c.game_id]
    known = await store.game_ids([game for game, _ in managed])
    return [(game, c) for game, c in managed if game not in known]


async def _status(settings: Settings) -> int:
    async with _store(settings) as store, _backend(settings) as backend:
        records = await store.list()
        try:
            unowned = await _unowned(settings, store, backend)
        except Exception as exc:  # noqa: BLE001 - the records are still worth printing
            unowned = []
            print(f"rtmanager status: could not list containers: {exc}", file=sys.stderr)
    rows = [("GAME", "STATUS", "DESIRED", "GEN", "HEALTH", "TURN", "PHASE", "IMAGE", "CONTAINER", "LAST ERROR")]
    for r in records:
        turn = "-" if r.turn is None else str(r.turn) + (" (paused)" if r.paused else "")
        rows.append((r.game_id, r.status.value, r.desired_status.value,
                     f"{r.observed_generation}/{r.generation}", r.health.value, turn,
                     r.phase or ("none" if r.admin_api is False else "-"),
                     r.current_image_ref or r.desired_image_ref or "-", (r.current_container_id or "-")[:12],
                     (r.last_error_code.value if r.last_error_code else "-")))
    for game, c in unowned:
        rows.append((game, "unowned", "-", "-", "-", "-", "-", c.image or "-", c.id[:12],
                     "no record: rtmanager adopt / dispose"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


async def _adopt(settings: Settings, games: list[str], everything: bool) -> int:
    """Records that want the unowned containers running, on their own image and state directory."""
    from desired.jobs import InvalidJob

    failures = 0
    async with _store(settings) as store, _backend(settings) as backend:
        unowned = dict(await _unowned(settings, store, backend))
        wanted = sorted(unowned) if everything else games
        if not wanted:
            print("nothing to adopt: no unowned containers")
        for game in wanted:
            c = unowned.get(game)
            if c is None:
                print(f"{game}: no unowned container of instance {settings.leadership.instance} for this game",
                      file=sys.stderr)
                failures += 1
                continue
            seen = await backend.inspect(c.id)
            expected = settings.record_defaults.state_path(game)
            sources = {src for src, dst in (seen.mounts if seen else ()) if dst == settings.engine.engine_state_dir}
            if seen is None or sources != {expected}:
                print(f"{game}: its state directory is {sorted(sources) or 'not mounted'}, not {expected}; "
                      "not adopted (a recreate would start it on another directory)", file=sys.stderr)
                failures += 1
                continue
            try:
                await store.adopt(game, seen.image or c.image, settings.record_defaults)
            except InvalidJob as exc:
                print(f"{game}: {exc.message}", file=sys.stderr)
                failures += 1
                continue
            print(f"{game}: adopted (desired running on {seen.image or c.image}, state {expected})")
    return 1 if failures else 0


async def _dispose(settings: Settings, games: list[str]) -> int:
    """Stop (SIGTERM, the grace period) and remove unowned containers; never one with a record."""
    failures = 0
    async with _store(settings) as store, _backend(settings) as backend:
        unowned = dict(await _unowned(settings, store, backend))
        for game in games:
            c = unowned.get(game)
            if c is None:
                print(f"{game}: no unowned container of instance {settings.leadership.instance} for this game "
                      "(a managed game is stopped with a stop job and removed with cleanup)", file=sys.stderr)
                failures += 1
                continue
            await backend.remove(c.id, settings.runtime.stop_grace)
            await store.log_disposal(game, c.id, cli_actor())
            print(f"{game}: container {c.id[:12]} stopped and removed")
    return 1 if failures else 0


async def _versions(settings: Settings, args: argparse.Namespace) -> int:
    """The engine-version registry, straight in the database (the controller reads it at every start)."""
    from desired.errors import NotFound, UniqueViolation
    from desired.jobs import IMAGE_REF_PATTERN
    from desired.values import VersionInUse
    from desired.versions import MAX_STOP_GRACE, VERSION_PATTERN, VersionStatus

    async with _store(settings) as store:
        if args.action == "list":
            entries = await store.list_versions(VersionStatus(args.status) if args.status else None)
            rows = [("VERSION", "STATUS", "IMAGE", "STOP_GRACE", "NOTES")] + [
                (e.version, e.status.value, e.image_ref, "default" if e.stop_grace is None else str(e.stop_grace),
                 e.notes.splitlines()[0] if e.notes else "") for e in entries]
            widths = [max(len(r[i]) for r in rows) for i in range(5)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
            return 0
        version = args.version
        if not VERSION_PATTERN.fullmatch(version):
            print("rtmanager versions: VERSION must be 1-64 characters of A-Z a-z 0-9 . _ -", file=sys.stderr)
            return 2
        grace: int | None = None
        raw_grace = getattr(args, "stop_grace", None)
        if raw_grace is not None and raw_grace != "default":
            if not raw_grace.isdigit() or int(raw_grace) > MAX_STOP_GRACE:
                print(f"rtmanager versions: stop grace must be whole seconds from 0 to {MAX_STOP_GRACE}, or default",
                      file=sys.stderr)
                return 2
            grace = int(raw_grace)
        try:
            if args.action == "add":
                image = args.image_ref
                if not IMAGE_REF_PATTERN.fullmatch(image) or not settings.images.image_allowlist.allows(image):
                    print(f"rtmanager versions: {image!r} is not a valid image allowed by RTMANAGER_IMAGE_ALLOWLIST",
                          file=sys.stderr)
                    return 2
                if args.pull:
                    async with _backend(settings) as backend:
                        await backend.ensure_image(image)
                entry = await store.create_version(version, image, VersionStatus.ACTIVE, args.notes or "", grace,
                                                   actor=cli_actor())
                print(f"{entry.version}: {entry.image_ref} ({entry.status.value})")
            elif args.action == "stop-grace":
                entry = await store.update_version(version, status=None, notes=None, stop_grace=grace,
                                                   actor=cli_actor())
                shown = "RTMANAGER_STOP_GRACE" if entry.stop_grace is None else f"{entry.stop_grace}s"
                print(f"{entry.version}: stop grace {shown}")
            elif args.action == "remove":
                await store.delete_version(version, actor=cli_actor())
                print(f"{version}: removed")
            else:
                status = {"deprecate": VersionStatus.DEPRECATED, "disable": VersionStatus.DISABLED,
                          "activate": VersionStatus.ACTIVE}[args.action]
                entry = await store.update_version(version, status=status, notes=None, actor=cli_actor())
                print(f"{entry.version}: {entry.status.value}")
        except NotFound:
            print(f"rtmanager versions: no engine version {version}", file=sys.stderr)
            return 1
        except UniqueViolation as exc:
            print(f"rtmanager versions: already registered ({exc.constraint})", file=sys.stderr)
            return 1
        except VersionInUse as exc:
            print(f"rtmanager versions: {exc}", file=sys.stderr)
            return 1
    return 0


async def _drains(settings: Settings, args: argparse.Namespace) -> int:
    """Drains, straight in the database: the leader's drain loop carries them out (controller/drains.py)."""
    import json

    from controller.drains import drain_json
    from desired import drains
    from desired.errors import NotFound
    from desired.model import OpSource

    async with _store(settings) as store:
        if args.command == "drain":
            body: dict[str, object] = {"host": True} if args.host else {"node": args.node}
            for name in ("max_parallel", "deadline", "on_deadline", "local_state"):
                if getattr(args, name) is not None:
                    body[name] = getattr(args, name)
            try:
                req = drains.parse_request(body, backend=settings.runtime.backend.value,
                                           state_shared=settings.storage.state_shared)
                drain = await store.create_drain(req, OpSource.ADMIN, actor=cli_actor())
            except (drains.InvalidDrain, drains.DrainExists) as exc:
                print(f"rtmanager drain: {exc}", file=sys.stderr)
                return 2 if isinstance(exc, drains.InvalidDrain) else 1
            print(f"drain {drain.id}: {drain.target} draining, {drain.max_parallel} at a time, deadline "
                  f"{drain.deadline_at.isoformat(timespec='seconds')}")
            return 0
        if args.command == "undrain":
            target = args.target
            if args.host or (target is not None and not target.isdigit()):
                found = await store.active_drain(None if args.host else target)
                if found is None:
                    print(f"rtmanager undrain: {'the host' if args.host else 'node ' + target} has no active drain",
                          file=sys.stderr)
                    return 1
                drain_id = found.id
            else:
                drain_id = int(target)
            try:
                drain = await store.request_undrain(drain_id, actor=cli_actor())
            except NotFound:
                print(f"rtmanager undrain: no drain {drain_id}", file=sys.stderr)
                return 1
            print(f"drain {drain.id}: {drain.target} {drain.status.value}")
            return 0
        if args.id is not None:
            try:
                drain, games = await store.get_drain(args.id)
            except NotFound:
                print(f"rtmanager drains: no drain {args.id}", file=sys.stderr)
                return 1
            body = drain_json(drain, games, await store.drain_counts(drain))
            if args.json:
                print(json.dumps(body, indent=2))
                return 0
            print(f"drain {drain.id}: {drain.target} {drain.status.value}; counts {body['counts']}")
            rows = [("GAME", "ACTION", "STATE", "FROM", "TO", "NOTE")] + [
                (g.game_id, g.action.value, g.state.value, g.from_node or "-", g.to_node or "-", g.note or "")
                for g in games]
        else:
            found_drains = await store.list_drains()
            if args.json:
                print(json.dumps({"drains": [drain_json(d) for d in found_drains]}, indent=2))
                return 0
            rows = [("ID", "TARGET", "STATUS", "PARALLEL", "DEADLINE", "CREATED")] + [
                (str(d.id), "host" if d.node is None else d.node, d.status.value, str(d.max_parallel),
                 d.deadline_at.isoformat(timespec="seconds"), d.created_at.isoformat(timespec="seconds"))
                for d in found_drains]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
async def _rollout(settings: Settings, args: argparse.Namespace) -> int:
    """Rollouts, straight in the database: the leader's rollout loop reads the rows."""
    from controller.rollouts_cli import rollout_command

    async with _store(settings) as store:
        return await rollout_command(store, settings, args)


async def _submit(settings: Settings, kind: str, game_id: str, value: str) -> int:
    async with _streams(settings) as streams:
        if kind == "start":
            entry = await streams.add(settings.streams.start_stream, {"game_id": game_id, "image_ref": value})
        else:
            entry = await streams.add(settings.streams.stop_stream, {"game_id": game_id, "reason": value})
    print(entry)
    return 0


async def _results(settings: Settings, follow: bool, count: int, wait_for: list[str],
                   timeout: float) -> int:
    """Print results; with --wait-for, only those of the given job entry ids, until all arrived."""
    last = "0-0"
    waiting = set(wait_for)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with _streams(settings) as streams:
        while True:
            block = 500 if (follow or waiting) else None
            entries = await streams.read_after(settings.streams.results_stream, last, count, block)
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
            if not follow and not wait_for and not entries:
                return 0


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
    from desired.db.migrate import load_migrations

    problems = 0

    def say(ok: bool, what: str, detail: str = "") -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}{(': ' + detail) if detail else ''}")

    where = f"postgres at {redact_url(settings.database.database_url)}"
    try:
        async with _store(settings) as store:
            say(True, where)
            try:
                applied = await store.applied_migrations()
            except Exception:  # noqa: BLE001 - no schema_migrations table yet
                applied = set()
            pending = [m.name for m in load_migrations() if m.version not in applied]
            say(not pending, "schema", f"pending migrations {pending}: run `rtmanager migrate`" if pending
                else f"up to date ({len(applied)} migrations)")
            lease = None if pending else await store.lease_info(settings.leadership.instance)
            if lease is not None:
                print(f"info leader of instance {settings.leadership.instance}: {lease['holder']} "
                      f"(term {lease['epoch']}, {'live' if lease['live'] else 'expired'})")
    except Exception as exc:  # noqa: BLE001 - reported, the other checks still run
        say(False, where, str(exc))
    try:
        async with _streams(settings) as streams:
            await streams.ping()
        say(True, f"redis at {redact_url(settings.streams.redis_url)}")
    except Exception as exc:  # noqa: BLE001
        say(False, f"redis at {redact_url(settings.streams.redis_url)}", str(exc))
    try:
        async with _backend(settings) as backend:
            await backend.ping()
            say(True, "docker daemon")
            managed = await backend.list_managed()
            print(f"info {len(managed)} containers of instance {settings.leadership.instance}, "
                  f"{sum(1 for c in managed if c.running)} running")
    except Exception as exc:  # noqa: BLE001
        say(False, "docker daemon", str(exc))
    writable, exists = _state_root(settings.storage.state_root)
    say(writable, f"state root {settings.storage.state_root}", "" if exists else "missing; it will be created")
    if not settings.http.api_token:
        print("info RTMANAGER_API_TOKEN is empty: the REST API answers 503")
    return 1 if problems else 0


def _state_root(root: str) -> tuple[bool, bool]:
    """(writable, exists): the nearest existing ancestor decides whether it can be made."""
    probe_dir = root
    while not os.path.isdir(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    return os.access(probe_dir, os.W_OK), os.path.isdir(root)


def main(argv: list[str] | None = None) -> None:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["run"]:
        _catch_signals_early()
    parser = argparse.ArgumentParser(prog="rtmanager", description="Runtime Manager of the Galaxy game platform")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the controller in the foreground")
    run_p.add_argument("--log-format", choices=("json", "text"), help="override RTMANAGER_LOG_FORMAT")
    sub.add_parser("migrate", help="apply pending database migrations")
    sub.add_parser("status", help="print a table of runtime records and unowned containers")
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
    ap = sub.add_parser("adopt", help="hand unowned containers back to rtmanager (records that keep them running)")
    ap.add_argument("games", nargs="*", metavar="GAME")
    ap.add_argument("--all", action="store_true", help="every unowned container")
    dp = sub.add_parser("dispose", help="stop gracefully and remove unowned containers")
    dp.add_argument("games", nargs="+", metavar="GAME")
    vp = sub.add_parser("versions", help="the engine-version registry")
    vsub = vp.add_subparsers(dest="action", required=True)
    vl = vsub.add_parser("list")
    vl.add_argument("--status", choices=("active", "deprecated", "disabled"))
    va = vsub.add_parser("add")
    va.add_argument("version")
    va.add_argument("image_ref")
    va.add_argument("--notes", default="")
    va.add_argument("--pull", action="store_true", help="pull the image first")
    va.add_argument("--stop-grace", metavar="SECONDS",
                    help="seconds between SIGTERM and SIGKILL for its engines (default: RTMANAGER_STOP_GRACE)")
    vg = vsub.add_parser("stop-grace", help="set a version's seconds between SIGTERM and SIGKILL")
    vg.add_argument("version")
    vg.add_argument("stop_grace", metavar="SECONDS|default")
    for action in ("deprecate", "disable", "activate", "remove"):
        vsub.add_parser(action).add_argument("version")
    drp = sub.add_parser("drain", help="take a Swarm node (NODE) or the Docker host (--host) out of use")
    drp.add_argument("node", nargs="?", metavar="NODE", help="the Swarm node id")
    drp.add_argument("--host", action="store_true", help="the Docker host (Docker backend)")
    drp.add_argument("--max-parallel", type=int, help="games stopped or moved at a time (default 1)")
    drp.add_argument("--deadline", type=int, metavar="SECONDS",
                     help="after this, the rest go without waiting for a turn boundary (default 3600)")
    drp.add_argument("--on-deadline", choices=("move", "stop"), help="Swarm: past the deadline, move or stop")
    drp.add_argument("--local-state", choices=("stop", "move_without_state"),
                     help="Swarm with node-local state (RTMANAGER_STATE_SHARED=0): stop the games (their state "
                          "stays on the node) or move them without it")
    unp = sub.add_parser("undrain", help="end a drain (by id, node, or --host)")
    unp.add_argument("target", nargs="?", metavar="ID|NODE")
    unp.add_argument("--host", action="store_true")
    dsp = sub.add_parser("drains", help="list the drains, or show one with its games")
    dsp.add_argument("id", nargs="?", type=int, metavar="ID")
    dsp.add_argument("--json", action="store_true")
    from controller.rollouts_cli import add_rollout_parser
    add_rollout_parser(sub)
    sub.add_parser("doctor", help="check Postgres, Redis and Docker")
    sub.add_parser("env", help="list the configuration variables and their defaults")
    args = parser.parse_args(argv)

    if args.command == "env":
        for var in VARIABLES:
            print(f"{var.name}={var.default!s:<45} # {var.help}")
        return
    if args.command == "adopt" and not (args.games or args.all):
        parser.error("adopt needs GAME... or --all")
    if args.command in ("drain", "undrain") and bool(getattr(args, "host", False)) == (
            (args.node if args.command == "drain" else args.target) is not None):
        what = "NODE" if args.command == "drain" else "ID|NODE"
        parser.error(f"{args.command} needs exactly one of {what} and --host")
    settings = _settings()
    if args.command == "run":
        setup_logging(args.log_format or settings.logging.log_format, settings.logging.log_level)
        from controller.app import run
        if _signalled:  # a SIGTERM or SIGINT during the imports: nothing has started yet
            raise SystemExit(0)
        code = asyncio.run(run(settings, signalled=lambda: bool(_signalled)))
        _catch_signals_early()  # closing the event loop gave the signals back to their defaults
        raise SystemExit(code)
    setup_logging("text", "WARNING")
    handlers = {
        "migrate": lambda: _migrate(settings),
        "status": lambda: _status(settings),
        "submit": lambda: _submit(settings, args.kind, args.game_id,
                                  getattr(args, "image_ref", "") or getattr(args, "reason", "")),
        "results": lambda: _results(settings, args.follow, args.count, args.wait_for, args.timeout),
        "adopt": lambda: _adopt(settings, args.games, args.all),
        "dispose": lambda: _dispose(settings, args.games),
        "versions": lambda: _versions(settings, args),
        "doctor": lambda: _doctor(settings),
        "drain": lambda: _drains(settings, args),
        "undrain": lambda: _drains(settings, args),
        "drains": lambda: _drains(settings, args),
        "rollout": lambda: _rollout(settings, args),
    }
    try:
        raise SystemExit(asyncio.run(handlers[args.command]()))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for an operator's command
        print(f"rtmanager {args.command}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
