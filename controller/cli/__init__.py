"""The ``rtmanager`` command (every subcommand is listed in the README), a module per concern.

Local commands, on the database, Redis and the container daemon directly (the configuration's
``RTMANAGER_*`` variables):

    rtmanager run                      the controller, in the foreground
    rtmanager migrate                  apply pending migrations (idempotent)
    rtmanager status                   a table of runtime records, and unowned containers   (local.py)
    rtmanager adopt GAME...|--all      hand unowned containers back to rtmanager
    rtmanager dispose GAME...          stop (gracefully) and remove unowned containers
    rtmanager doctor                   check every dependency, say what is wrong
    rtmanager env                      the configuration variables and their defaults
    rtmanager submit start GAME IMAGE  publish a start job as Lobby does                    (streams.py)
    rtmanager submit stop GAME REASON  publish a stop job as Lobby does
    rtmanager results [--follow]       print the results stream
    rtmanager versions list|add|stop-grace|deprecate|disable|activate|remove ...          (registry.py)
    rtmanager drain NODE|--host ... / undrain ID|NODE|--host / drains [ID] [--json]       (drains.py)
    rtmanager rollout start|status|pause|resume|abort ...                                 (rollouts.py)
    (versions, drain, undrain, drains and rollout take --api: through the REST API, admin_rest.py)

REST commands, through the controller's REST API (``RTMANAGER_API_URL``, ``RTMANAGER_API_TOKEN``;
api.py, runtimes.py):

    rtmanager runtimes [--status S] [--engine-version V] [--node N] [--limit N] [--json]
    rtmanager runtime GAME [--json]            one record
    rtmanager operations GAME [--json]         its operation log
    rtmanager start GAME IMAGE | stop GAME | restart GAME | patch GAME IMAGE | cleanup GAME
    rtmanager pause|resume|force-next-turn|reconcile GAME
    rtmanager schedule GAME SECONDS            the turn clock's interval (0: none)
    rtmanager resync [GAME]                    snapshots on demand

This module is light on purpose: ``rtmanager run`` catches SIGTERM and SIGINT here, before the
heavy imports (controller/cli/commands.py has the parser and the dispatch).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

# rtmanager run: SIGTERM and SIGINT are caught from the process's first moment, before the heavy
# imports and the event loop; one that comes before the event loop takes them over is noted here
# and honoured as soon as start-up can stop cleanly (exit 0). Without this, a SIGTERM in the first
# few hundred milliseconds killed the process (exit status -15).
_signalled: list[int] = []


def _note_signal(signum: int, frame: FrameType | None) -> None:
    _signalled.append(signum)


def catch_signals_early() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note_signal)


def signalled() -> bool:
    return bool(_signalled)


# `rtmanager run`, or `python -m controller.cli run` (argv[0] is "-m" while the package is imported)
if sys.argv[1:2] == ["run"] and sys.argv[0].rsplit("/", 1)[-1] in ("rtmanager", "-m", "__main__.py"):
    catch_signals_early()


def main(argv: list[str] | None = None) -> None:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["run"]:
        catch_signals_early()
    from controller.cli.commands import main as run_command

    run_command(argv)
