"""``rtmanager submit`` and ``results``: the job and result streams, as Lobby sees them."""

from __future__ import annotations

import asyncio
import sys

from controller.cli.common import open_streams
from controller.config import Settings


async def publish_job(settings: Settings, kind: str, game_id: str, value: str) -> int:
    async with open_streams(settings) as streams:
        if kind == "start":
            entry = await streams.add(settings.streams.start_stream, {"game_id": game_id, "image_ref": value})
        else:
            entry = await streams.add(settings.streams.stop_stream, {"game_id": game_id, "reason": value})
    print(entry)
    return 0


async def results(settings: Settings, follow: bool, count: int, wait_for: list[str],
                   timeout: float) -> int:
    """Print results; with --wait-for, only those of the given job entry ids, until all arrived."""
    last = "0-0"
    waiting = set(wait_for)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with open_streams(settings) as streams:
        while True:
            block = 500 if (follow or waiting) else None
            entries = await streams.read_after(settings.streams.results_stream, last, count, block)
            for entry_id, fields in entries:
                last = entry_id
                if wait_for and fields.get("job_entry_id") not in waiting:
                    continue
                waiting.discard(fields.get("job_entry_id", ""))
                print(_format_result(fields), flush=True)
            if wait_for and not waiting:
                return 0
            if wait_for and loop.time() > deadline:
                print(f"rtmanager results: no result within {timeout:g}s for {', '.join(sorted(waiting))}",
                      file=sys.stderr)
                return 1
            if not follow and not wait_for and not entries:
                return 0


def _format_result(f: dict[str, str]) -> str:
    parts = [f"{f.get('job', '?'):<5}", f"{f.get('game_id', '?'):<14}", f"{f.get('outcome', '?'):<8}"]
    if f.get("error_code"):
        parts.append(f"error_code={f['error_code']}")
    if f.get("container_id"):
        parts.append(f"container={f['container_id'][:12]}")
    if f.get("engine_endpoint"):
        parts.append(f"endpoint={f['engine_endpoint']}")
    if f.get("error_message"):
        parts.append(f"message={f['error_message']!r}")
    parts.append(f"entry={f.get('job_entry_id') or '-'}")
    return "  ".join(parts)
