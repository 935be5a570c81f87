"""``--api``: the registry, drain and rollout commands through the REST API instead of the database.

``rtmanager versions|drain|undrain|drains|rollout ... --api`` sends what the command would write to
the REST API (``RTMANAGER_API_URL``, ``RTMANAGER_API_TOKEN``; controller/cli/api.py), so that it runs
from a host with no database access and is checked, and recorded, as any admin request is. The output
is the local command's (the same lines, tables and ``--json``); the exit status is that of the REST
commands (controller/cli/runtimes.py): 0 done, 1 refused, 2 a bad request.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controller.cli.api import ApiClient, refused, with_api
from controller.cli.common import fail, print_json, table
from controller.cli.rollouts import show_rollout, show_rollouts, start_body

VERSIONS = "/api/v1/admin/engine-versions"


async def admin_command(args: argparse.Namespace) -> int:
    run = {"versions": _versions, "rollout": _rollout}.get(args.command, _drains)
    return await with_api(args, lambda client: run(client, args))


# ------------------------------------------------------------------ versions
async def _versions(client: ApiClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        answer = await client.call("GET", VERSIONS, query={"status": args.status} if args.status else None)
        if answer.status != 200:
            return refused("versions", answer)
        if args.json:
            print_json(answer.body)
            return 0
        table([("VERSION", "STATUS", "IMAGE", "STOP_GRACE", "IMAGE_PRESENT", "NOTES")] + [
            (e["version"], e["status"], e["image_ref"],
             "default" if e.get("stop_grace") is None else str(e["stop_grace"]),
             {True: "yes", False: "no"}.get(e.get("image_present"), "?"),
             e["notes"].splitlines()[0] if e.get("notes") else "") for e in answer.body["engine_versions"]])
        return 0
    version = args.version
    path = f"{VERSIONS}/{version}"
    if args.action == "add":
        body: dict[str, Any] = {"version": version, "image_ref": args.image_ref, "notes": args.notes or ""}
        if args.stop_grace is not None and args.stop_grace != "default":
            body["stop_grace"] = int(args.stop_grace) if args.stop_grace.isdigit() else args.stop_grace
        answer = await client.call("POST", VERSIONS, query={"pull": "1" if args.pull else "0"}, body=body,
                                   timeout=600.0 if args.pull else 30.0)
        ok = 201
    elif args.action == "remove":
        answer = await client.call("DELETE", path)
        if answer.status == 204:
            print(f"{version}: removed")
            return 0
        return refused("versions", answer)
    elif args.action == "stop-grace":
        raw = args.stop_grace
        answer = await client.call("PATCH", path, body={"stop_grace": None if raw == "default" else (
            int(raw) if raw.isdigit() else raw)})
        ok = 200
    else:
        status = {"deprecate": "deprecated", "disable": "disabled", "activate": "active"}[args.action]
        answer = await client.call("PATCH", path, body={"status": status})
        ok = 200
    if answer.status != ok:
        return refused("versions", answer)
    e = answer.body
    if args.action == "stop-grace":
        shown = "RTMANAGER_STOP_GRACE" if e.get("stop_grace") is None else f"{e['stop_grace']}s"
        print(f"{e['version']}: stop grace {shown}")
    elif args.action == "add":
        print(f"{e['version']}: {e['image_ref']} ({e['status']})")
    else:
        print(f"{e['version']}: {e['status']}")
    return 0


# ------------------------------------------------------------------ drains
async def _drains(client: ApiClient, args: argparse.Namespace) -> int:
    command = args.command
    if command == "drain":
        body: dict[str, Any] = {"host": True} if args.host else {"node": args.node}
        for name in ("max_parallel", "deadline", "on_deadline", "local_state"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        answer = await client.call("POST", "/api/v1/drains", body=body)
        if answer.status != 201:
            return refused(command, answer)
        d = answer.body
        print(f"drain {d['id']}: {d['target']} draining, {d['max_parallel']} at a time, deadline {d['deadline_at']}")
        return 0
    if command == "undrain":
        target_ = args.target
        listed = await client.call("GET", "/api/v1/drains")
        if listed.status != 200:
            return refused(command, listed)
        live = [d for d in listed.body["drains"] if d["status"] not in ("undrained", "failed")]
        if args.host:
            active = [d for d in live if d["target"] == "host"]
        else:
            active = [d for d in live if d["target"] != "host" and target_ in (d["target"], d.get("node_name"))]
        by_id = target_ is not None and target_.isdigit() and not args.host and not args.node
        unnamed = [d for d in live if d["target"] != "host" and "node_name" not in d]
        if by_id and not args.id and (active and str(active[0]["id"]) != target_ or unnamed):
            # a number that is (or, the Swarm not naming its nodes now, may be) a drained node's hostname
            which = f"node {target_}'s drain {active[0]['id']}" if active else "a drained node's hostname"
            print(f"rtmanager undrain: {target_} is ambiguous: drain {target_}, or {which}; say `undrain --id "
                  f"{target_}` for the drain or `undrain --node {target_}` for the node", file=sys.stderr)
            return 2
        if not by_id and len(active) > 1:
            ids = ", ".join(str(d["id"]) for d in active)
            return fail(command, f"node {target_} names more than one drained node (drains {ids}); undrain by id")
        if by_id:
            drain_id = target_
        else:
            if not active and unnamed and not args.host:
                ids = ", ".join(str(d["id"]) for d in unnamed)
                return fail(command, f"node {target_}: the Swarm does not name its drained nodes now (drains of "
                                     f"unnamed nodes: {ids}); try again, or undrain by id: `undrain --id N`")
            if not active:
                return fail(command, f"{'the host' if args.host else 'node ' + target_} has no active drain")
            drain_id = str(active[0]["id"])
        answer = await client.call("POST", f"/api/v1/drains/{drain_id}/undrain")
        if answer.status != 200:
            return refused(command, answer)
        print(f"drain {answer.body['id']}: {answer.body['target']} {answer.body['status']}")
        return 0
    if args.id is not None:
        answer = await client.call("GET", f"/api/v1/drains/{args.id}")
        if answer.status != 200:
            return refused(command, answer)
        d = answer.body
        if args.json:
            print_json(d)
            return 0
        print(f"drain {d['id']}: {d['target']} {d['status']}; counts {d['counts']}")
        table([("GAME", "ACTION", "STATE", "FROM", "TO", "NOTE")] + [
            (g["game_id"], g["action"], g["state"], g.get("from_node") or "-", g.get("to_node") or "-",
             g.get("note") or "") for g in d["games"]])
        return 0
    answer = await client.call("GET", "/api/v1/drains")
    if answer.status != 200:
        return refused(command, answer)
    if args.json:
        print_json(answer.body)
        return 0
    table([("ID", "TARGET", "STATUS", "PARALLEL", "DEADLINE", "CREATED")] + [
        (str(d["id"]), d["target"], d["status"], str(d["max_parallel"]), d["deadline_at"], d["created_at"])
        for d in answer.body["drains"]])
    return 0


# ------------------------------------------------------------------ rollouts
async def _rollout(client: ApiClient, args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    if args.action == "start":
        answer = await client.call("POST", "/api/v1/rollouts", body=start_body(args))
        ok = 201
    elif args.action == "status" and args.rollout_id is None:
        answer = await client.call("GET", "/api/v1/rollouts", query={"state": args.state} if args.state else None)
        if answer.status != 200:
            return refused("rollout", answer)
        show_rollouts(answer.body, as_json)
        return 0
    elif args.action == "status":
        answer = await client.call("GET", f"/api/v1/rollouts/{args.rollout_id}")
        ok = 200
    else:
        answer = await client.call("POST", f"/api/v1/rollouts/{args.rollout_id}/{args.action}")
        ok = 200
    if answer.status != ok:
        return refused("rollout", answer)
    show_rollout(answer.body, as_json)
    return 0
