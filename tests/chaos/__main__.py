"""``python -m tests.chaos --seed N --minutes M [--keep]``: one chaos run; exit 1 on a violation.

``python -m tests.chaos --check DIR/history.json`` runs the checker again on a saved history."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.chaos.checker import check
from tests.chaos.history import History


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None, help="seed of the workload and the fault schedule "
                   "(default: from the clock, printed)")
    p.add_argument("--minutes", type=float, default=1.0, help="length of the workload (default 1)")
    p.add_argument("--games", type=int, default=8, help="number of games (default 8, two of them may be removed)")
    p.add_argument("--keep", action="store_true", help="keep the log directory (controller and service logs, "
                   "history.json, report.txt) even when every invariant holds")
    p.add_argument("--log-dir", type=Path, default=None, help="where logs go (default /var/tmp/rtm-chaos-logs/...)")
    p.add_argument("--no-dockerd-restart", action="store_true", help="skip the dockerd-restart faults (shown as "
                   "SKIPPED in the schedule)")
    p.add_argument("--quiesce-timeout", type=float, default=120.0, help="seconds to wait for quiet after healing")
    p.add_argument("--lenient-same-ms", action="store_true", help="do not order entries of the start and stop "
                   "streams sent within one millisecond (docs/contract.md orders them: start first); report such "
                   "pairs as information only")
    p.add_argument("--faults", default="", metavar="KINDS", help="opt-in fault kinds, comma-separated, or all: "
                   "backlog (bursts past one read, cut by a kill -9 / SIGTERM / SIGSTOP of the leader, a table "
                   "lock or a Redis blip), redis_readonly (Redis refuses writes), hostile_engine (an engine answers "
                   "hostile status values), db_restore (the database restored from an older dump), "
                   "stubborn_engines (1.1 engines ignore SIGTERM; dockerd restarts are watched)")
    p.add_argument("--plan", action="store_true", help="print the workload and fault schedule and exit")
    p.add_argument("--check", type=Path, default=None, help="re-check a saved history.json and exit")
    args = p.parse_args(argv)

    if args.check is not None:
        history = History.load(args.check)
        report = check(history, strict_same_ms=not args.lenient_same_ms)
        print(f"re-checked {args.check}: {'all invariants hold' if report.ok else report.by_invariant()}")
        for v in report.violations[:20]:
            print(v.render())
        return 0 if report.ok else 1

    from tests.chaos.plan import parse_extra
    try:
        extra = parse_extra(args.faults)
    except ValueError as exc:
        p.error(str(exc))
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    if args.plan:
        from tests.chaos.plan import game_names, plan_backlogs, plan_faults, plan_workload
        games, mortal = game_names(args.games)
        faults = plan_faults(seed, args.minutes * 60, args.games, dockerd_restart=not args.no_dockerd_restart,
                             extra=extra)
        jobs = plan_workload(seed, args.minutes * 60, games, mortal)
        if "backlog" in extra:
            jobs = sorted(jobs + plan_backlogs(seed, faults, games, mortal), key=lambda j: j.at)
        for j in jobs:
            print(f"{j.at:7.2f}s {j.describe()}")
        for f in faults:
            print(f.describe())
        return 0

    if os.geteuid() != 0:
        print("the chaos run needs root (a private dockerd, a Postgres cluster run as the postgres user)",
              file=sys.stderr)
        return 2
    from tests.chaos.runner import ChaosRun

    log_dir = args.log_dir or Path("/var/tmp/rtm-chaos-logs") / f"seed-{seed}-{time.strftime('%Y%m%d-%H%M%S')}"

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started in the background (SIGINT ignored there)
    run = ChaosRun(seed, args.minutes, log_dir, n_games=args.games, dockerd_restart=not args.no_dockerd_restart,
                   quiesce_timeout=args.quiesce_timeout, strict_same_ms=not args.lenient_same_ms,
                   out=lambda s: print(s, flush=True), extra=extra)
    try:
        report, _ = run.run()
    except KeyboardInterrupt:
        print(f"interrupted; everything the run started is removed. seed {seed}; logs in {log_dir}", flush=True)
        return 130
    print(run.render(report), flush=True)
    if report.ok and not args.keep:
        shutil.rmtree(log_dir, ignore_errors=True)
    elif report.ok:
        print(f"logs kept in {log_dir}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
