"""REST commands on games: list them a page at a time, show one and its operations, and every job the
REST API takes (start, stop, restart, patch, cleanup, pause, resume, force-next-turn, reconcile), the
turn clock's schedule and snapshots on demand.

Exit status: 0 done (a job's outcome ``success``); 1 refused or failed (the job's outcome
``failure``, an unknown game, a conflict, a standby, the server unreachable); 2 a bad request
(HTTP 400: nothing was recorded); 3 a job accepted whose result did not come within ``--wait``
(it will be published on the results stream). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from controller.cli import api
from controller.cli.api import Answer, ApiClient, add_api_options, refused, with_api
from controller.cli.common import fail, game_id_arg, print_json, table

# the job commands: CLI name -> the REST path under /api/v1/runtimes/{game_id}/
JOBS = ("start", "stop", "restart", "patch", "cleanup", "pause", "resume", "force-next-turn", "reconcile")
FORCEABLE = ("stop", "restart", "patch", "cleanup")
PAGE = 1000  # records asked per page when walking the whole list
PENDING = 3  # exit status: accepted, the result did not come within --wait

REST_COMMANDS = ("runtimes", "runtime", "operations", "schedule", "resync", *JOBS)


def add_parsers(sub: Any) -> None:
    api = argparse.ArgumentParser(add_help=False)
    add_api_options(api)
    rp = sub.add_parser("runtimes", parents=[api], help="list runtime records, a page at a time (REST)")
    rp.add_argument("--status", help="only games in this status")
    rp.add_argument("--engine-version", metavar="VERSION", help="only games on this registered engine version")
    rp.add_argument("--node", help="only games whose state lives on this Swarm node")
    rp.add_argument("--limit", type=int, metavar="N", help="at most N records (default: every one)")
    rp.add_argument("--cursor", help="continue after a previous answer's next")
    rp.add_argument("--page-size", type=int, default=PAGE, metavar="N", help=f"records per request (default {PAGE})")
    rp.add_argument("--json", action="store_true")
    one = sub.add_parser("runtime", parents=[api], help="one runtime record (REST)")
    one.add_argument("game_id", metavar="GAME", type=game_id_arg)
    one.add_argument("--json", action="store_true")
    op = sub.add_parser("operations", parents=[api], help="a game's operation log, newest first (REST)")
    op.add_argument("game_id", metavar="GAME", type=game_id_arg)
    op.add_argument("--json", action="store_true")
    for name in JOBS:
        jp = sub.add_parser(name, parents=[api], help=f"a {name} job through the REST API, waiting for its result")
        jp.add_argument("game_id", metavar="GAME", type=game_id_arg)
        if name in ("start", "patch"):
            jp.add_argument("image_ref", metavar="IMAGE")
        if name == "start":
            jp.add_argument("--turn-interval", type=int, metavar="SECONDS", help="the turn clock's interval")
        if name == "stop":
            jp.add_argument("--reason", help="the stop reason (default admin_request)")
        if name in FORCEABLE:
            jp.add_argument("--force", action="store_true",
                            help="at once, even while the engine generates a turn")
        jp.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the result (0-300, default 30)")
        jp.add_argument("--idempotency-key", metavar="KEY",
                        help="the job's Idempotency-Key (default: a new one): a command sent again with the key "
                             "a lost answer printed is the same job, applied at most once")
        jp.add_argument("--json", action="store_true")
    sp = sub.add_parser("schedule", parents=[api], help="set a game's turn interval (0: no schedule) (REST)")
    sp.add_argument("game_id", metavar="GAME", type=game_id_arg)
    sp.add_argument("turn_interval", type=int, metavar="SECONDS")
    sp.add_argument("--json", action="store_true")
    rs = sub.add_parser("resync", parents=[api], help="publish a snapshot of every live game, or of one (REST)")
    rs.add_argument("game_id", nargs="?", metavar="GAME", type=game_id_arg)
    rs.add_argument("--json", action="store_true")


async def rest_command(args: argparse.Namespace) -> int:
    return await with_api(args, lambda client: _rest(client, args))


async def _rest(client: ApiClient, args: argparse.Namespace) -> int:
    command = args.command
    if command == "runtimes":
        return await _runtimes(client, args)
    if command == "runtime":
        return _shown(command, await client.call("GET", f"/api/v1/runtimes/{args.game_id}"), args.json,
                      _record_lines)
    if command == "operations":
        return _shown(command, await client.call("GET", f"/api/v1/runtimes/{args.game_id}/operations"),
                      args.json, _operation_lines)
    if command == "schedule":
        answer = await client.call("PUT", f"/api/v1/runtimes/{args.game_id}/schedule",
                                   body={"turn_interval": args.turn_interval})
        return _shown(command, answer, args.json, lambda b: [
            f"{b['game_id']}: turn interval {b['turn_interval']}s" if b["turn_interval"]
            else f"{b['game_id']}: no schedule"])
    if command == "resync":
        answer = await client.call("POST", "/api/v1/snapshots/resync",
                                   query={"game_id": args.game_id} if args.game_id else None)
        return _shown(command, answer, args.json, lambda b: [f"{b['snapshots']} snapshots published"])
    return await _job(client, args)


def _shown(command: str, answer: Answer, as_json: bool, lines: Any) -> int:
    if answer.status != 200:
        return refused(command, answer)
    if as_json:
        print_json(answer.body)
    else:
        for line in lines(answer.body):
            print(line)
    return 0


async def _runtimes(client: ApiClient, args: argparse.Namespace) -> int:
    """Every page (or up to --limit records), following next; the table or the answer's own shape."""
    if args.page_size < 1 or (args.limit is not None and args.limit < 1):
        return fail("runtimes", "--limit and --page-size must be at least 1", 2)
    query: dict[str, str] = {k: v for k, v in (("status", args.status), ("engine_version", args.engine_version),
                                               ("node", args.node)) if v is not None}
    found: list[dict[str, Any]] = []
    cursor: str | None = args.cursor
    while True:
        want = args.page_size if args.limit is None else min(args.page_size, args.limit - len(found))
        page = {**query, "limit": str(want), **({"cursor": cursor} if cursor else {})}
        answer = await client.call("GET", "/api/v1/runtimes", query=page)
        if answer.status != 200:
            return refused("runtimes", answer)
        found += answer.body["runtimes"]
        cursor = answer.body.get("next")
        if cursor is None or (args.limit is not None and len(found) >= args.limit):
            break
    if args.json:
        print_json({"runtimes": found, "next": cursor})
        return 0
    rows = [("GAME", "STATUS", "DESIRED", "GEN", "HEALTH", "TURN", "VERSION", "NODE", "IMAGE", "LAST ERROR")]
    for r in found:
        turn = "-" if r.get("turn") is None else str(r["turn"]) + (" (paused)" if r.get("paused") else "")
        rows.append((r["game_id"], r["status"], r["desired_status"], f"{r['observed_generation']}/{r['generation']}",
                     r["health"], turn, r.get("engine_version") or "-", r.get("node_id") or "-",
                     r.get("current_image_ref") or r.get("desired_image_ref") or "-", r.get("last_error_code") or "-"))
    table(rows)
    if cursor is not None:
        print(f"more: rtmanager runtimes --cursor {cursor}", file=sys.stderr)
    return 0


def _record_lines(r: dict[str, Any]) -> list[str]:
    shown = ("status", "desired_status", "generation", "observed_generation", "health", "turn", "phase", "paused",
             "turn_interval", "engine_version", "node_id", "current_image_ref", "desired_image_ref",
             "current_container_id", "engine_endpoint", "crash_count", "last_error_code", "last_error_message",
             "state_bytes", "last_op_at")
    return [r["game_id"]] + [f"  {k}: {'-' if r.get(k) is None else r[k]}" for k in shown if k in r]


def _operation_lines(body: dict[str, Any]) -> list[str]:
    rows = [("ID", "OP", "SOURCE", "STATUS", "GEN", "ERROR", "AT")]
    for o in body["operations"]:
        rows.append((str(o.get("id", "-")), str(o.get("op", "-")), str(o.get("source", "-")), str(o.get("status", "-")),
                     str(o.get("generation") if o.get("generation") is not None else "-"),
                     str(o.get("error_code") or "-"), str(o.get("created_at") or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


async def _job(client: ApiClient, args: argparse.Namespace) -> int:
    command = args.command
    body: dict[str, Any] = {}
    if getattr(args, "image_ref", None) is not None:
        body["image_ref"] = args.image_ref
    if getattr(args, "turn_interval", None) is not None:
        body["turn_interval"] = args.turn_interval
    if getattr(args, "reason", None) is not None:
        body["reason"] = args.reason
    if getattr(args, "force", False):
        body["force"] = True
    key = args.idempotency_key or str(uuid.uuid4())
    try:
        answer = await client.call("POST", f"/api/v1/runtimes/{args.game_id}/{command}",
                                   query={"wait": f"{args.wait:g}"}, body=body, timeout=args.wait + api.SLACK,
                                   headers={"Idempotency-Key": key})
    except api.AnswerLost as exc:
        raise api.AnswerLost(f"{exc}; or send it again with --idempotency-key {key}: it is then applied at most "
                             "once") from None
    if answer.status not in (200, 202):
        if args.json and isinstance(answer.body, dict):
            print_json(answer.body)
        return refused(command, answer, f"{args.game_id}: ")
    b = answer.body
    if args.json:
        print_json(b)
    if answer.status == 202:
        if not args.json:
            print(f"{args.game_id} {command}: {b.get('status')} (operation {b.get('operation_id')}): no result within "
                  f"{args.wait:g}s; it will be published on the results stream")
        return PENDING
    ok = b.get("outcome") == "success"
    if not args.json:
        parts = [f"{args.game_id} {command}: {b.get('outcome')}"]
        if b.get("error_code"):
            parts.append(f"error_code={b['error_code']}")
        if b.get("container_id"):
            parts.append(f"container={b['container_id'][:12]}")
        if b.get("engine_endpoint"):
            parts.append(f"endpoint={b['engine_endpoint']}")
        parts.append(f"operation={b.get('operation_id')}")
        line = "  ".join(parts)
        if ok:
            print(line)
        else:
            print(f"rtmanager {command}: {line}  message={b.get('error_message', '')!r}", file=sys.stderr)
    return 0 if ok else 1
