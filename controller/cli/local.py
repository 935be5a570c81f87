"""Commands on the database, the container daemon and the schema: migrate, status, adopt, dispose, doctor."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from controller.access import cli_actor
from controller.cli.common import open_backend, open_store, open_streams
from controller.config import Settings
from controller.logs import redact_url
from controller.tokens import InvalidTokens
from controller.tokens import load as load_tokens
from desired import versions

if TYPE_CHECKING:
    from desired.db.store import Store
    from observed.backend import RuntimeBackend
    from observed.model import ObservedContainer


async def migrate(settings: Settings) -> int:
    from desired.db.migrate import migrate, schema_refusal
    from desired.db.pool import connect

    conn = await connect(settings.database.database_url)
    try:
        applied = await migrate(conn)
        refusal = await schema_refusal(conn)  # a newer rtmanager's migrations: this one cannot run on it
    finally:
        await conn.close()
    if applied:
        print("applied: " + ", ".join(applied))
    if refusal is not None:
        print(f"rtmanager migrate: {refusal}", file=sys.stderr)
        return 1
    if not applied:
        print("schema is up to date")
    return 0


async def database_of_this_instance(settings: Settings, store: Store) -> str | None:
    """The database's uid, "" when no controller has claimed it yet; None, with a line on stderr, when it
    belongs to another instance: every unit of this instance would look unowned against its records."""
    identity = await store.identity()
    if identity is None:
        return ""
    if identity.instance != settings.leadership.instance:
        print(f"rtmanager: the database belongs to instance {identity.instance!r}, not "
              f"{settings.leadership.instance!r} (RTMANAGER_INSTANCE or RTMANAGER_DATABASE_URL is wrong); "
              "nothing done", file=sys.stderr)
        return None
    return identity.uid


async def unowned_containers(settings: Settings, store: Store,
                   backend: RuntimeBackend) -> list[tuple[str, ObservedContainer]]:
    """Containers of this instance that have no record, with their game ids, whoever created them (the
    controller never disposes of them: after a restored backup they may be games created under this
    very database)."""
    managed = [(c.game_id, c) for c in await backend.list_managed() if c.game_id]
    known = await store.game_ids([game for game, _ in managed])
    return [(game, c) for game, c in managed if game not in known]


async def status(settings: Settings) -> int:
    async with open_store(settings) as store, open_backend(settings) as backend:
        if await database_of_this_instance(settings, store) is None:
            return 1
        records = await store.list()
        try:
            unowned = await unowned_containers(settings, store, backend)
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


ADOPT_REVISIONS = 1_000  # spec revisions looked through for the one an adopted unit was made at


def adopted_revision(settings: Settings, game: str, image: str, unit_hash: str | None) -> int | None:
    """The spec revision at which this controller's settings make the spec hash ``unit_hash`` for the game on
    ``image`` (each restart or move of a game gives it a new revision), or None. An adopted record at
    another revision would ask for another unit: the game's engine replaced as soon as it is adopted."""
    from controller.spec import Specs
    from desired.model import DesiredStatus, RuntimeRecord, Status

    if not unit_hash:
        return None
    now = datetime.now(UTC)
    defaults = settings.record_defaults
    base = RuntimeRecord(
        game_id=game, status=Status.STARTING, current_container_id=None, current_image_ref=None,
        engine_endpoint=defaults.endpoint(game), state_path=defaults.state_path(game),
        docker_network=defaults.docker_network, started_at=None, stopped_at=None, removed_at=None, last_op_at=now,
        created_at=now, desired_status=DesiredStatus.RUNNING, desired_image_ref=image, generation=1,
        observed_generation=0)
    specs = Specs(settings)
    return next((rev for rev in range(ADOPT_REVISIONS)
                 if specs.want_hash(base.replace(spec_revision=rev)) == unit_hash), None)


async def adopt(settings: Settings, games: list[str], everything: bool) -> int:
    """Records that want the unowned containers running, on their own image and state directory: only of an
    image allowed now (the controller would otherwise confirm it running as it is), each naming its unit."""
    from desired import versions
    from desired.jobs import InvalidJob, validate_game_id

    failures = 0
    async with open_store(settings) as store, open_backend(settings) as backend:
        if await database_of_this_instance(settings, store) is None:
            return 1
        unowned = dict(await unowned_containers(settings, store, backend))
        wanted = sorted(unowned) if everything else games
        if not wanted:
            print("nothing to adopt: no unowned containers")
        for game in wanted:
            try:
                validate_game_id(game)
            except InvalidJob as exc:
                print(f"{game!r}: {exc}; not adopted", file=sys.stderr)
                failures += 1
                continue
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
            image = seen.image or c.image
            refusal = None
            if not settings.images.image_allowlist.allows(image):
                refusal = f"image {image} is not allowed by RTMANAGER_IMAGE_ALLOWLIST"
            elif settings.images.version_policy == "registry":
                refusal = versions.refuse_run(await store.engine_version_of(image), image)
            if refusal is not None:
                print(f"{game}: {refusal}; not adopted (dispose of it, or allow the image first)", file=sys.stderr)
                failures += 1
                continue
            revision = adopted_revision(settings, game, image, seen.spec_hash)
            try:
                await store.adopt(game, image, settings.record_defaults, container_id=seen.id, actor=cli_actor(),
                                  spec_revision=revision or 0, node_id=seen.node)
            except InvalidJob as exc:
                print(f"{game}: {exc.message}", file=sys.stderr)
                failures += 1
                continue
            where = f" on node {seen.node}" if seen.node else ""
            print(f"{game}: adopted (desired running on {image}, state {expected}{where}; no turn clock: "
                  f"rtmanager schedule {game} SECONDS sets it)")
            if revision is None:
                print(f"{game}: its unit was not made from this controller's settings as they are now; the "
                      "controller replaces it with one that is (at a turn boundary), as for any game",
                      file=sys.stderr)
    return 1 if failures else 0


async def dispose(settings: Settings, games: list[str], other_database: bool = False,
                  after_restore: bool = False) -> int:
    """Stop (SIGTERM, the grace period) and remove unowned containers; never one with a record, looked at
    again right before each removal (a start or an adoption may have given it one meanwhile), nor one another
    database created unless the operator says so (``other_database``), nor one made in a later leadership
    term than this database knows (restored from an older backup: a live game whose record it lost) unless
    told (``after_restore``)."""
    failures = 0
    async with open_store(settings) as store, open_backend(settings) as backend:
        uid = await database_of_this_instance(settings, store)
        if uid is None:
            return 1
        unowned = dict(await unowned_containers(settings, store, backend))
        for game in games:
            c = unowned.get(game)
            if c is not None and await store.game_ids([game]):  # given a record since the list (a start, adopt)
                c = None
            if c is None:
                print(f"{game}: no unowned container of instance {settings.leadership.instance} for this game "
                      "(a managed game is stopped with a stop job and removed with cleanup)", file=sys.stderr)
                failures += 1
                continue
            if c.database and c.database != uid and not other_database:
                print(f"{game}: container {c.id[:12]} was created under another database ({c.database}), not "
                      f"this one ({uid or 'not claimed yet'}); not disposed of (--other-database if that "
                      "database is gone for good)",
                      file=sys.stderr)
                failures += 1
                continue
            lease = await store.lease_info(settings.leadership.instance)
            known = int(lease["epoch"]) if lease else 0
            if c.database == uid and c.epoch > known and not after_restore:
                print(f"{game}: container {c.id[:12]} was created in leadership term {c.epoch}, later than this "
                      f"database knows ({known}): the database was restored from an older backup, and this is "
                      f"likely a live game whose record it lost (`rtmanager adopt {game}` keeps it); not disposed "
                      "of (--after-restore to dispose of it anyway)", file=sys.stderr)
                failures += 1
                continue
            # The grace its engine version registered (the one the create gave the container), as a stop by
            # the controller would give it: an engine that needs longer to save is not cut short.
            entry = await store.engine_version_of(c.image) if c.image else None
            await backend.remove(c.id, versions.stop_grace(entry, settings.runtime.stop_grace))
            await store.log_disposal(game, c.id, cli_actor())
            print(f"{game}: container {c.id[:12]} stopped and removed")
    return 1 if failures else 0



async def doctor(settings: Settings) -> int:
    from desired.db.migrate import load_migrations

    problems = 0

    def say(ok: bool, what: str, detail: str = "") -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}{(': ' + detail) if detail else ''}")

    where = f"postgres at {redact_url(settings.database.database_url)}"
    try:
        async with open_store(settings) as store:
            say(True, where)
            try:
                applied = await store.applied_migrations()
            except Exception:  # noqa: BLE001 - no schema_migrations table yet
                applied = set()
            known = {m.version for m in load_migrations()}
            pending = [m.name for m in load_migrations() if m.version not in applied]
            unknown = sorted(applied - known)
            if unknown:
                say(False, "schema", f"newer than this rtmanager: migrations {unknown} are unknown to it; run the "
                                     "rtmanager that applied them")
            else:
                say(not pending, "schema", f"pending migrations {pending}: run `rtmanager migrate`" if pending
                    else f"up to date ({len(applied)} migrations)")
            lease = None if pending or unknown else await store.lease_info(settings.leadership.instance)
            if lease is not None:
                print(f"info leader of instance {settings.leadership.instance}: {lease['holder']} "
                      f"(term {lease['epoch']}, {'live' if lease['live'] else 'expired'})")
    except Exception as exc:  # noqa: BLE001 - reported, the other checks still run
        say(False, where, str(exc))
    try:
        async with open_streams(settings) as streams:
            await streams.ping()
        say(True, f"redis at {redact_url(settings.streams.redis_url)}")
    except Exception as exc:  # noqa: BLE001
        say(False, f"redis at {redact_url(settings.streams.redis_url)}", str(exc))
    try:
        async with open_backend(settings) as backend:
            await backend.ping()
            say(True, "docker daemon")
            managed = await backend.list_managed()
            print(f"info {len(managed)} containers of instance {settings.leadership.instance}, "
                  f"{sum(1 for c in managed if c.running)} running")
    except Exception as exc:  # noqa: BLE001
        say(False, "docker daemon", str(exc))
    writable, exists = _state_root(settings.storage.state_root)
    say(writable, f"state root {settings.storage.state_root}", "" if exists else "missing; it will be created")
    try:
        tokens = load_tokens(settings.http.api_tokens_file or None, settings.http.api_token)
    except (InvalidTokens, OSError) as exc:
        say(False, "RTMANAGER_API_TOKENS_FILE", str(exc))
    else:
        if not tokens:
            print("info no API token (RTMANAGER_API_TOKEN empty, RTMANAGER_API_TOKENS_FILE without one): the REST "
                  "API answers 503")
    return 1 if problems else 0


def _state_root(root: str) -> tuple[bool, bool]:
    """(writable, exists): the nearest existing ancestor decides whether it can be made."""
    probe_dir = root
    while not os.path.isdir(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    return os.access(probe_dir, os.W_OK), os.path.isdir(root)
