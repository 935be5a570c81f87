"""Reading the results stream as Lobby would: from a process's Redis URL (``ResultReader``), with
an asyncio client (``read_results``), or as ``redis-cli --json XRANGE`` prints it inside a stack
(``xrange_json_results``)."""

from __future__ import annotations

import json
import time

import redis


class ResultReader:
    """Reads the results stream from the start, as Lobby would."""

    def __init__(self, redis_url: str, stream: str) -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.stream = stream
        self.last = "0-0"
        self.seen: list[dict[str, str]] = []

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "result") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        for fields in self.seen:
            if predicate(fields):
                return fields
        while time.monotonic() < deadline:
            reply = self.r.xread({self.stream: self.last}, count=100, block=200)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    self.seen.append(fields)
                    if predicate(fields):
                        return fields
        raise AssertionError(f"no {what} within {timeout}s; results so far: {self.seen}")

    def for_entry(self, entry_id: str, timeout: float = 30.0) -> dict[str, str]:
        return self.wait_for(lambda f: f.get("job_entry_id") == entry_id, timeout, f"result for {entry_id}")

    def close(self) -> None:
        self.r.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_results(redis_client, stream: str) -> list[dict[str, str]]:
    """The whole stream ``stream``, oldest first, through an asyncio Redis client."""
    entries = await redis_client.xrange(stream)
    return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]


def xrange_json_results(output: str) -> list[dict[str, str]]:
    """The entries of ``redis-cli --json XRANGE <stream> - +`` output, oldest first."""
    entries = json.loads(output or "[]")
    return [dict(zip(fields[::2], fields[1::2], strict=True)) for _, fields in entries or []]
