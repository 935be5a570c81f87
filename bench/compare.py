"""The scale goals, before and after: one table from two runs of the same benchmark code.

    .venv/bin/python bench/compare.py DIR

DIR holds what ``bash bench/run.sh --scale --before REV`` wrote there: ``scale-before.json`` and
``scale-after.json`` (bench/scale.py), ``run-before.json`` and ``run-after.json`` (bench/run.py),
and ``meta.json`` (the two revisions). Each figure comes from one run; the two columns are two runs
on the same machine, one after the other, with the same benchmark code (only the controller's code
differs). A figure a run did not produce prints as "-".
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Json = dict[str, Any]


def load(path: Path) -> Json:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def dig(d: Json, *keys: Any) -> Any:
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def num(v: Any, spec: str) -> str:
    return "-" if not isinstance(v, (int, float)) else format(v, spec)


def joined(values: list[Any], spec: str, sep: str = " / ") -> str:
    return sep.join(num(v, spec) for v in values) if values else "-"


def single(r: Json) -> str:
    s = r.get("single")
    if not s:
        return "-"
    ratio = s["rtmanager_median"] / s["plain_median"] if s.get("plain_median") else None
    return f"{num(s.get('overhead_median_ms'), '.0f')} ms, {num(ratio, '.2f')}x"


def bursts(r: Json) -> str:
    parts = []
    for b in r.get("bursts", []):
        for what in ("start", "stop"):
            if b.get(f"plain_par_{what}"):
                parts.append(f"{what} {b['n']} {b[f'rtm_{what}'] / b[f'plain_par_{what}']:.2f}x")
    return ", ".join(parts) or "-"


def sizes(r: Json) -> list[Json]:
    return dig(r, "start", "sizes") or []


def per_size(r: Json, get: Callable[[Json], Any], spec: str) -> str:
    sz = sizes(r)
    if not sz:
        return "-"
    return " / ".join(num(get(s), spec) for s in sz) + " at " + " / ".join(str(s["games"]) for s in sz)


def start_ratio(r: Json) -> str:
    return per_size(r, lambda s: s.get("ratio"), ".2f")


def failover(r: Json) -> str:
    k = dig(r, "failover", "kill")
    if not k:
        return "-"
    return (f"replay {num(k.get('to_replay_answer_s'), '.2f')} s, start {num(k.get('to_start_answer_s'), '.2f')} s"
            f" (TTL {num(dig(r, 'failover', 'lease_ttl'), 'g')} s)")


def sim_size(r: Json) -> Json:
    return (dig(r, "sim", "sizes") or [{}])[-1]


def sim_round(r: Json) -> str:
    z = sim_size(r)
    return "-" if not z else f"{num(z.get('health_round_s'), '.1f')} at {z['games']:,}"


def sim_resync(r: Json) -> str:
    z = sim_size(r)
    if not z:
        return "-"
    return f"{num(z.get('resync_s_median'), '.1f')} / {num(z.get('rss_mib'), '.0f')} at {z['games']:,}"


def drift(r: Json) -> str:
    d = dig(r, "sim", "drift")
    if not d:
        return "-"
    if not d.get("converged"):
        return f"{d['drifted']:,} exits: not converged within the timeout"
    return f"{d['drifted']:,} exits: converged in {d['seconds']:.1f} s ({d['games_per_s']:.0f}/s)"


ROWS: list[tuple[str, Callable[[Json, Json], str], str]] = [
    ("one game, XADD -> result: overhead over the plain loop", lambda s, r: single(r), "< 10 ms"),
    ("bursts, rtmanager / plain loop at the same concurrency", lambda s, r: bursts(r), "each <= 1.10x"),
    ("controller CPU at rest, % of one core", lambda s, r: per_size(s, lambda z: dig(z, "rest", "cpu_pct"), ".1f"),
     "< 2 % at 1,000"),
    ("controller CPU ms per game started",
     lambda s, r: per_size(s, lambda z: z.get("rtm_cpu_ms_per_game"), ".0f"), "< 20, flat in N"),
    ("start, rtmanager / plain loop at the same concurrency", lambda s, r: start_ratio(s), "<= 1.10 at every size"),
    ("per generated turn: controller CPU ms / inspects / SQL statements",
     lambda s, r: joined([dig(s, "turns", "cpu_ms_per_turn"), dig(s, "turns", "inspect_per_turn"),
                          dig(s, "turns", "sql_per_turn")], ".1f"), "< 5 ms / 0 / <= 6"),
    ("job flood: entries handled per second", lambda s, r: num(dig(s, "flood", "entries_per_s"), ".0f"), ">= 2,000"),
    ("a real start inside the flood, p50 / idle p50",
     lambda s, r: num(dig(s, "flood", "ratio_p50"), ".1f") + "x", "<= 2x"),
    ("failover after kill -9: first answers", lambda s, r: failover(s), "<= TTL + 1 s"),
    ("simulated: health round s (interval 15 s)", lambda s, r: sim_round(s), "within the interval"),
    ("simulated: resync s / RSS MiB", lambda s, r: sim_resync(s), "< 5 / < 1,024"),
    ("simulated: 10 % of engines exit at once", lambda s, r: drift(s), "repaired at dockerd's pace"),
]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = Path(sys.argv[1])
    meta = load(d / "meta.json")
    cols = [(f"before ({meta.get('before', '?')})", load(d / "scale-before.json"), load(d / "run-before.json")),
            (f"after ({meta.get('after', '?')})", load(d / "scale-after.json"), load(d / "run-after.json"))]
    rows = [[name] + [get(s, r) for _, s, r in cols] + [goal] for name, get, goal in ROWS]
    header = ["", *(c[0] for c in cols), "goal"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    for label, s, _ in cols:
        for what in ("failed",):
            if s.get(what):
                print(f"{label}: the scale run FAILED: {s[what]}")


if __name__ == "__main__":
    main()
