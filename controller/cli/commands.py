"""The parser of every ``rtmanager`` command, and the dispatch to the module of its concern."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from controller.cli import catch_signals_early, drains, local, registry, signalled, streams
from controller.cli.admin_rest import admin_command
from controller.cli.api import api_switch
from controller.cli.common import load_settings
from controller.cli.rollouts import add_rollout_parser, rollout
from controller.cli.runtimes import REST_COMMANDS, rest_command
from controller.cli.runtimes import add_parsers as add_rest_parsers
from controller.config import VARIABLES
from controller.logs import setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
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
    dp.add_argument("--other-database", action="store_true",
                    help="also a container another database created (that database is gone for good)")
    dp.add_argument("--after-restore", action="store_true",
                    help="also a container made in a later leadership term than the database knows (it was "
                         "restored from an older backup: rtmanager adopt keeps such a game)")
    api = api_switch()  # --api: through the REST API
    vp = sub.add_parser("versions", help="the engine-version registry")
    vsub = vp.add_subparsers(dest="action", required=True)
    vl = vsub.add_parser("list", parents=[api])
    vl.add_argument("--status", choices=("active", "deprecated", "disabled"))
    vl.add_argument("--json", action="store_true")
    va = vsub.add_parser("add", parents=[api])
    va.add_argument("version")
    va.add_argument("image_ref")
    va.add_argument("--notes", default="")
    va.add_argument("--pull", action="store_true", help="pull the image first")
    va.add_argument("--stop-grace", metavar="SECONDS",
                    help="seconds between SIGTERM and SIGKILL for its engines (default: RTMANAGER_STOP_GRACE)")
    vg = vsub.add_parser("stop-grace", parents=[api], help="set a version's seconds between SIGTERM and SIGKILL")
    vg.add_argument("version")
    vg.add_argument("stop_grace", metavar="SECONDS|default")
    for action in ("deprecate", "disable", "activate", "remove"):
        vsub.add_parser(action, parents=[api]).add_argument("version")
    drp = sub.add_parser("drain", parents=[api], help="take a Swarm node (NODE) or the Docker host (--host) out of use")
    drp.add_argument("node", nargs="?", metavar="NODE", help="the Swarm node id")
    drp.add_argument("--host", action="store_true", help="the Docker host (Docker backend)")
    drp.add_argument("--max-parallel", type=int, help="games stopped or moved at a time (default 1)")
    drp.add_argument("--deadline", type=int, metavar="SECONDS",
                     help="after this, the rest go without waiting for a turn boundary (default 3600)")
    drp.add_argument("--on-deadline", choices=("move", "stop"), help="Swarm: past the deadline, move or stop")
    drp.add_argument("--local-state", choices=("stop", "move_without_state"),
                     help="Swarm with node-local state (RTMANAGER_STATE_SHARED=0): stop the games (their state "
                          "stays on the node) or move them without it")
    unp = sub.add_parser("undrain", parents=[api], help="end a drain (by id, node, or --host)")
    unp.add_argument("target", nargs="?", metavar="ID|NODE")
    unp.add_argument("--host", action="store_true")
    unp.add_argument("--node", action="store_true", help="TARGET is a node's name (or id), even all digits")
    unp.add_argument("--id", action="store_true", help="TARGET is a drain's id (an all-digit node name aside)")
    dsp = sub.add_parser("drains", parents=[api], help="list the drains, or show one with its games")
    dsp.add_argument("id", nargs="?", type=int, metavar="ID")
    dsp.add_argument("--json", action="store_true")
    add_rollout_parser(sub, api)
    add_rest_parsers(sub)
    sub.add_parser("doctor", help="check Postgres, Redis and Docker")
    sub.add_parser("env", help="list the configuration variables and their defaults")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
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
    if args.command in REST_COMMANDS:  # the REST API's, not the controller's configuration
        setup_logging("text", "WARNING")
        _finish(args.command, rest_command(args))
    if getattr(args, "api", False):  # versions, drains, rollouts through the REST API
        setup_logging("text", "WARNING")
        _finish(args.command, admin_command(args))
    settings = load_settings()
    if args.command == "run":
        setup_logging(args.log_format or settings.logging.log_format, settings.logging.log_level)
        from controller.app import run
        if signalled():  # a SIGTERM or SIGINT during the imports: nothing has started yet
            raise SystemExit(0)
        raise_open_files_limit()
        code = asyncio.run(run(settings, signalled=signalled))
        catch_signals_early()  # closing the event loop gave the signals back to their defaults
        raise SystemExit(code)
    setup_logging("text", "WARNING")
    handlers: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "migrate": lambda: local.migrate(settings),
        "status": lambda: local.status(settings),
        "submit": lambda: streams.publish_job(settings, args.kind, args.game_id,
                                              getattr(args, "image_ref", "") or getattr(args, "reason", "")),
        "results": lambda: streams.results(settings, args.follow, args.count, args.wait_for, args.timeout),
        "adopt": lambda: local.adopt(settings, args.games, args.all),
        "dispose": lambda: local.dispose(settings, args.games, args.other_database, args.after_restore),
        "versions": lambda: registry.versions(settings, args),
        "doctor": lambda: local.doctor(settings),
        "drain": lambda: drains.drains(settings, args),
        "undrain": lambda: drains.drains(settings, args),
        "drains": lambda: drains.drains(settings, args),
        "rollout": lambda: rollout(settings, args),
    }
    _finish(args.command, handlers[args.command]())


def raise_open_files_limit() -> None:
    """The controller holds a socket per engine it talks to, per database and Redis connection, per API
    client: a soft limit of 1,024 open files (a common default) is reached at a few hundred games with API
    clients. Raise it to the hard limit, as the Go runtime does for its programs."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open files: soft limit raised from %d to %d", soft, target)
    except (ValueError, OSError) as exc:  # a limit the kernel refuses: keep the one we have
        log.warning("open files: could not raise the soft limit: %s", exc)


def _finish(command: str, work: Coroutine[Any, Any, int]) -> NoReturn:
    try:
        raise SystemExit(asyncio.run(work))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for an operator's command
        print(f"rtmanager {command}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
