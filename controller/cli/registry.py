"""``rtmanager versions``: the engine-version registry, straight in the database."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime

from controller.access import cli_actor
from controller.cli.common import open_backend, open_store, print_json, table
from controller.config import Settings


async def versions(settings: Settings, args: argparse.Namespace) -> int:
    """The engine-version registry, straight in the database (the controller reads it at every start)."""
    from desired.errors import NotFound, UniqueViolation
    from desired.jobs import IMAGE_REF_PATTERN
    from desired.values import VersionInUse
    from desired.versions import MAX_STOP_GRACE, VERSION_PATTERN, VersionStatus

    async with open_store(settings) as store:
        if args.action == "list":
            entries = await store.list_versions(VersionStatus(args.status) if args.status else None)
            if args.json:  # the REST answer's fields, but image_present (the daemon is not asked)
                print_json({"engine_versions": [
                    {k: getattr(v, "value", v) if not isinstance(v, datetime) else v.isoformat()
                     for k, v in dataclasses.asdict(e).items()} for e in entries]})
                return 0
            rows = [("VERSION", "STATUS", "IMAGE", "STOP_GRACE", "NOTES")] + [
                (e.version, e.status.value, e.image_ref, "default" if e.stop_grace is None else str(e.stop_grace),
                 e.notes.splitlines()[0] if e.notes else "") for e in entries]
            table(rows)
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
                    async with open_backend(settings) as backend:
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
