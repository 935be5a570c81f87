"""``rtmanager rollout``: start, show and steer rollouts from the command line.

The CLI writes the rollout's rows straight in the database, as the REST API does; the leader's
rollout loop picks them up within RTMANAGER_ROLLOUT_INTERVAL. The request is checked by the same
function as the REST body (desired/rollouts.py ``parse_request``).

    rtmanager rollout start --to 1.1 --from 1.0 --max-parallel 3 --canary 1 --canary-hold 60
    rtmanager rollout start --to 1.1 game-a game-b --on-failure stop
    rtmanager rollout status [ID] [--json] [--state S]
    rtmanager rollout pause|resume|abort ID
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controller.access import cli_actor
from controller.cli.common import open_store, print_json, table
from controller.config import Settings
from desired.errors import NotFound
from desired.ports import RolloutAdminStore
from desired.rollouts import (
    Action,
    InvalidRollout,
    Rollout,
    RolloutConflict,
    RolloutGame,
    RolloutState,
    counts,
    parse_request,
    rollout_json,
)


def add_rollout_parser(sub: Any, api: argparse.ArgumentParser) -> None:
    """``api``: the parent parser of ``--api`` (controller/cli/admin_rest.py)."""
    rp = sub.add_parser("rollout", help="rolling engine-version rollouts")
    rsub = rp.add_subparsers(dest="action", required=True)
    st = rsub.add_parser("start", parents=[api], help="move games to an engine version, a few at a time")
    st.add_argument("games", nargs="*", metavar="GAME", help="these games (or --from)")
    st.add_argument("--to", dest="target_version", required=True, metavar="VERSION", help="the target version")
    st.add_argument("--from", dest="source_version", metavar="VERSION", help="every live game on this version")
    st.add_argument("--max-parallel", type=int, default=1)
    st.add_argument("--canary", type=int, default=0, help="games patched first, which must stay healthy")
    st.add_argument("--canary-hold", type=float, default=60.0, metavar="SECONDS")
    st.add_argument("--failure-budget", type=int, default=1, help="failures after which the rollout pauses")
    st.add_argument("--on-failure", choices=("rollback", "stop"), default="rollback")
    st.add_argument("--force", action="store_true", help="do not wait for a turn generation to end")
    st.add_argument("--json", action="store_true")
    ss = rsub.add_parser("status", parents=[api], help="rollouts, or one rollout's games")
    ss.add_argument("rollout_id", nargs="?", type=int, metavar="ID")
    ss.add_argument("--state", choices=[s.value for s in RolloutState])
    ss.add_argument("--json", action="store_true")
    for action in Action:
        ap = rsub.add_parser(action.value, parents=[api])
        ap.add_argument("rollout_id", type=int, metavar="ID")
        ap.add_argument("--json", action="store_true")


def start_body(args: argparse.Namespace) -> dict[str, Any]:
    """``rollout start``'s request, as the REST API takes it (checked by ``parse_request``)."""
    body: dict[str, Any] = {
        "target_version": args.target_version, "max_parallel": args.max_parallel, "canary": args.canary,
        "canary_hold": args.canary_hold, "failure_budget": args.failure_budget, "on_failure": args.on_failure,
        "force": args.force}
    if args.source_version is not None:
        body["source_version"] = args.source_version
    if args.games:
        body["game_ids"] = args.games
    return body


def _summary(by_state: dict[str, int]) -> str:
    return " ".join(f"{state}={n}" for state, n in by_state.items())


def show_rollout(r: dict[str, Any], as_json: bool) -> None:
    """One rollout as the REST API answers it (``rollout_json``), with its games."""
    if as_json:
        print_json(r)
        return
    source = f"from {r['source_version']} " if r.get("source_version") else ""
    why = f": {r['state_reason']}" if r.get("state_reason") else ""
    print(f"rollout {r['id']}: {source}to {r['target_version']} ({r['target_image_ref']}) {r['state']}{why}")
    print(f"  max_parallel={r['max_parallel']} canary={r['canary']} canary_hold={r['canary_hold']:g}s "
          f"failure_budget={r['failure_budget']} on_failure={r['on_failure']}")
    print(f"  {_summary(r['games_by_state'])}")
    table([("GAME", "STATE", "CANARY", "WHY")] + [
        (g["game_id"], g["state"], "yes" if g.get("canary") else "", g.get("reason") or "") for g in r["games"]])


def show_rollouts(body: dict[str, Any], as_json: bool) -> None:
    """The rollouts as ``GET /api/v1/rollouts`` answers them."""
    if as_json:
        print_json(body)
        return
    table([("ID", "STATE", "TARGET", "SOURCE", "GAMES", "WHY")] + [
        (str(r["id"]), r["state"], r["target_version"], r.get("source_version") or "-",
         _summary(r["games_by_state"]), r.get("state_reason") or "") for r in body["rollouts"]])


def _show(rollout: Rollout, games: list[RolloutGame], as_json: bool) -> None:
    show_rollout(rollout_json(rollout, counts(games), games), as_json)


async def rollout_command(store: RolloutAdminStore, settings: Settings, args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    try:
        if args.action == "start":
            req = parse_request(start_body(args))
            rollout, games = await store.create_rollout(req, settings.images.image_allowlist,
                                                        settings.images.version_policy == "registry",
                                                        actor=cli_actor())
            _show(rollout, games, as_json)
            return 0
        if args.action == "status":
            if args.rollout_id is not None:
                rollout, games = await store.get_rollout(args.rollout_id)
                _show(rollout, games, as_json)
                return 0
            found = await store.list_rollouts(RolloutState(args.state) if args.state else None)
            show_rollouts({"rollouts": [rollout_json(r, c) for r, c in found]}, as_json)
            return 0
        await store.steer_rollout(args.rollout_id, Action(args.action), actor=cli_actor())
        rollout, games = await store.get_rollout(args.rollout_id)
        _show(rollout, games, as_json)
        return 0
    except InvalidRollout as exc:
        print(f"rtmanager rollout: {exc}", file=sys.stderr)
        return 2
    except RolloutConflict as exc:
        print(f"rtmanager rollout: {exc}", file=sys.stderr)
        return 1
    except NotFound:
        print(f"rtmanager rollout: no rollout {args.rollout_id}", file=sys.stderr)
        return 1


async def rollout(settings: Settings, args: argparse.Namespace) -> int:
    """Rollouts, straight in the database: the leader's rollout loop reads the rows."""
    async with open_store(settings) as store:
        return await rollout_command(store, settings, args)
