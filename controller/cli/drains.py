"""``rtmanager drain``, ``undrain`` and ``drains``: drains, straight in the database."""

from __future__ import annotations

import argparse
import sys

from controller.access import cli_actor
from controller.cli.common import open_store
from controller.config import Settings


async def drains(settings: Settings, args: argparse.Namespace) -> int:
    """Drains, straight in the database: the leader's drain loop carries them out (controller/drains.py)."""
    import json

    from controller.drains import drain_json
    from desired import drains
    from desired.errors import NotFound
    from desired.model import OpSource

    async with open_store(settings) as store:
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
            found = await store.active_drain(None if args.host else target)
            by_id = target is not None and target.isdigit() and not args.host and not args.node
            # This command does not know the nodes' hostnames: a number while any node is drained may be one.
            node_drains = [d for d in await store.list_drains()
                           if d.node and d.status not in (drains.DrainStatus.UNDRAINED, drains.DrainStatus.FAILED)]
            if by_id and not args.id and (found is not None and found.id != int(target) or node_drains):
                print(f"rtmanager undrain: {target} is ambiguous: drain {target}, or a drained node's hostname; say "
                      f"`undrain --id {target}` for the drain or `undrain --node NODE_ID` for the node",
                      file=sys.stderr)
                return 2
            if by_id:
                drain_id = int(target)
            else:
                if found is None:
                    print(f"rtmanager undrain: {'the host' if args.host else 'node ' + target} has no active drain",
                          file=sys.stderr)
                    return 1
                drain_id = found.id
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
