"""The Redis adapter: consumer groups on the job streams, results, snapshots and dead letters.

This module owns redis-py: nothing else in the controller imports it, and its
errors do not leave here. A Redis that is away (connection refused, timeout, a
replica during fail-over, a server still loading) or that refuses writes for a while
(``MISCONF``: a failed background save or a full disk; ``NOREPLICAS``: too few replicas for
min-replicas-to-write; ``READONLY``, ``LOADING``, ``BUSY``, ``OOM``, ...) raises
``StreamsUnavailable`` (retry with backoff); a group or stream deleted under us raises ``GroupMissing``
(create it again); any other error is a bug and raises ``StreamsError``.

Entry fields stay bytes: a job entry may carry anything, and the job parser is
the place that says which bytes are a valid field.

Redis facts this relies on: XREADGROUP's COUNT applies to each stream
separately; XPENDING's range must be paged by exclusive ids; XCLAIM and
XAUTOCLAIM drop an entry deleted from the stream from the pending list (Redis 7),
so a deleted entry is never claimed; reading one's own pending entries again
(id 0) and claiming raise their delivery
count, so that count is *not* a count of handling attempts; trimming a stream
deletes entries whether or not they are pending, so job streams are only ever
trimmed below what has been handled (controller/intake.py).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import redis.asyncio as aioredis
import redis.exceptions

from desired.errors import RtmError, TemporaryError, translating

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,      # includes BusyLoadingError (a restarting server)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,        # a replica during a fail-over
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    ConnectionError,
    OSError,
    TimeoutError,
)


# Error codes of a Redis that answers but refuses for a while; redis-py raises most of them as a
# plain ResponseError (inside a pipeline, with its message rewritten: see _error_code).
_REFUSING = frozenset({"MISCONF", "NOREPLICAS", "READONLY", "LOADING", "BUSY", "OOM", "MASTERDOWN", "TRYAGAIN",
                       "CLUSTERDOWN"})
DELETED_MEMO = 10_000  # deleted entries claim_others remembers having handed over
DELETED_RETRY = 5.0  # seconds before a read hands over again a deleted entry whose answer failed
# A pipeline's rewritten error, or a transaction Redis refused at EXEC (EXECABORT ... because of: CODE ...).
_PIPELINE_ERROR = re.compile(r"(?:of pipeline caused error: \(?['\"]?|discarded because of: -?)([A-Z]+)\b")


class StreamsUnavailable(TemporaryError):
    """Redis did not answer: retry with backoff."""


class GroupMissing(RtmError):
    """The stream or its consumer group was deleted under us."""


class StreamsError(RtmError):
    """Redis answered with an error that is not an outage."""


def _error_code(exc: BaseException) -> str:
    """The code Redis put first in its error, also when a pipeline rewrote the message as
    ``Command # N (...) of pipeline caused error: ('CODE ...',)``, and the refusal behind a transaction
    Redis discarded at EXEC (``EXECABORT Transaction discarded because of: CODE ...``)."""
    message = str(exc)
    found = _PIPELINE_ERROR.findall(message)  # the last one: the command's text comes before it
    if found:
        return str(found[-1])
    return message.split(" ", 1)[0]


def _translate(exc: BaseException) -> BaseException | None:
    if isinstance(exc, _UNAVAILABLE) or (isinstance(exc, redis.exceptions.ResponseError)
                                         and _error_code(exc) in _REFUSING):
        return StreamsUnavailable(f"redis: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP" in str(exc):
        return GroupMissing(f"redis: {exc}")
    if isinstance(exc, redis.exceptions.RedisError):
        return StreamsError(f"redis: {exc.__class__.__name__}: {exc}")
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text_fields(fields: Fields | None) -> dict[str, str]:
    """An entry's fields as text for the plain reads (results, snapshots): bytes that are no UTF-8 (an entry
    someone else wrote) are replaced, so that one such entry fails no reader of the stream."""
    return {_lenient(k): _lenient(v) for k, v in (fields or {}).items()}


def _lenient(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# The shapes of the replies this adapter reads. redis-py types each reply as the union of its RESP2
# and RESP3 shapes (and of what a pipeline queues); whichever protocol the connection speaks, redis-py's
# response callbacks for these commands return the RESP2 shapes, so each reply is cast, where it
# arrives, to the shape named here.
Fields: TypeAlias = dict[bytes | str, bytes | str]
# An entry deleted from its stream while pending comes back as an id without fields: Redis sends a nil,
# which redis-py's stream parsing turns into an empty map (or, claimed, it is named apart or left out).
# XADD never writes an entry without a field, so an empty map can only mean deleted; ``Entry`` says so
# with ``fields=None``.
RawEntry: TypeAlias = tuple[bytes | str, Fields | None]
StreamReply: TypeAlias = list[tuple[bytes | str, list[RawEntry]]]  # XREAD, XREADGROUP
WriteFields: TypeAlias = dict[Any, Any]  # what XADD writes: str or bytes names, str/bytes/int values
Row: TypeAlias = dict[str, Any]  # XPENDING range


def entry_key(entry_id: str) -> tuple[int, int]:
    """Order of entry ids (``ms-seq``); ids of different streams compare by their millisecond."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


log = logging.getLogger("rtmanager.streams")

# The ids of an XRANGE page, without the entries' fields.
IDS_IN_RANGE = """local page = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local ids = {}
for i, e in ipairs(page) do ids[i] = e[1] end
return ids"""
# The newest entries' ids, each with one field's value (ARGV[2]), without the other fields.
NEWEST_IDS_WITH_FIELD = """local page = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
local out = {}
for i, e in ipairs(page) do
  local value = ''
  for j = 1, #e[2], 2 do
    if e[2][j] == ARGV[2] then value = e[2][j + 1] break end
  end
  out[i] = {e[1], value}
end
return out"""


@dataclass(frozen=True, kw_only=True)
class Entry:
    stream: str
    id: str
    fields: Fields | None  # None: deleted from the stream while pending

    def field(self, name: str) -> bytes | str | None:
        if self.fields is None:
            return None
        return self.fields.get(name.encode(), self.fields.get(name))


@dataclass
class GroupInfo:
    last_delivered: str
    pending: int
    oldest_pending: str | None = None
    consumers: dict[str, int] = field(default_factory=dict)
    lag: int | None = None  # entries not read by the group yet; None when Redis cannot tell (after deletions)
    oldest_unread: str | None = None  # the id of the first entry not read yet, when there is one


# Refusals that say the server is no primary now: after a fail-over that moved the name (a managed Redis'
# endpoint, a hand-run REPLICAOF) the old primary lives on as a replica, and pooled connections to it
# would be refused for ever (they are answers, not broken connections).
_NOT_PRIMARY = frozenset({"READONLY", "MASTERDOWN"})


async def _after_error(adapter: Any, exc: BaseException) -> None:
    """A refusal of a server that is no primary drops every pooled connection, so that the next command
    connects again, and resolves the server's name again."""
    if isinstance(exc, redis.exceptions.ReadOnlyError | redis.exceptions.MasterDownError) or (
            isinstance(exc, redis.exceptions.ResponseError) and _error_code(exc) in _NOT_PRIMARY):
        log.warning("redis: %s: the server is no primary now; its connections are dropped", _error_code(exc))
        try:
            await adapter.client.connection_pool.disconnect(inuse_connections=True)
        except Exception as drop:  # noqa: BLE001 - the refusal is what the caller hears of
            log.warning("redis: dropping the connections failed: %s", drop)


@translating(_translate, _after_error)
class RedisStreams:
    def __init__(self, url: str, *, group: str, consumer: str) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                              health_check_interval=15)
        self.group = group
        self.consumer = consumer
        self._scripts = True  # False once the server refused a script (IDS_IN_RANGE, NEWEST_IDS_WITH_FIELD)
        self._setid = True  # False once the server refused XSETID (raise_last_id)
        self._deleted: dict[tuple[str, str], float] = {}  # deleted entries a read handed over, and when

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        await self.client.ping()

    async def server_run_id(self) -> str:
        """Changes whenever the Redis server restarts."""
        info = await self.client.info("server")
        return str(info.get("run_id", ""))

    # ------------------------------------------------------------ consumer group
    async def ensure_group(self, stream: str, start_id: str = "0") -> bool:
        """Create the group (and the stream) from ``start_id``; False when it existed already."""
        try:
            await self.client.xgroup_create(stream, self.group, id=start_id, mkstream=True)
            return True
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            if isinstance(exc, redis.exceptions.OutOfMemoryError) or _error_code(exc) == "OOM":
                # A full Redis refuses XGROUP CREATE before it looks for the group (it may grow memory); the
                # reads and acknowledgments of a group that is there still work, and must go on.
                if await self._has_group(stream):
                    return False
            raise

    async def _has_group(self, stream: str) -> bool:
        try:
            groups = await self.client.xinfo_groups(stream)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return False
            raise
        return any(_text(g["name"]) == self.group for g in groups)

    async def last_id(self, stream: str) -> str | None:
        """The last id Redis gave in ``stream`` (XINFO STREAM), None when there is no such stream."""
        try:
            info = cast(dict[Any, Any], await self.client.xinfo_stream(stream))
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        return _text(info["last-generated-id"])

    async def entries_added(self, stream: str) -> int | None:
        """How many entries ``stream`` was ever given (XINFO STREAM ``entries-added``: trims do not lower it,
        a DEL or FLUSHDB does), 0 when there is no such stream, None when the server does not say (6.2)."""
        try:
            info = cast(dict[Any, Any], await self.client.xinfo_stream(stream))
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        added = info.get("entries-added", info.get(b"entries-added"))
        return None if added is None else int(added)

    @property
    def sets_ids(self) -> bool:
        """False once the server refused XSETID (``raise_last_id``)."""
        return self._setid

    async def raise_last_id(self, stream: str, floor: str) -> bool:
        """Make Redis give ``stream``'s new entries ids above ``floor`` (XSETID). True when it was raised.
        False when a newer entry came meanwhile (XSETID refuses an id below the stream's newest entry), the
        stream is gone, or the server refuses XSETID (an ACL, Redis before 5: logged once, and left as it
        is: a refusal must not stop the intake)."""
        if not self._setid:
            return False
        try:
            await self.client.execute_command("XSETID", stream, floor)  # type: ignore[no-untyped-call]
        except redis.exceptions.ResponseError as exc:
            if isinstance(_translate(exc), StreamsUnavailable):
                raise
            if "smaller than" in str(exc).lower() or "no such key" in str(exc).lower():
                return False  # an entry past it came (or the stream went) meanwhile: nothing to raise
            log.error("redis refused XSETID on %s (%s): entries it numbers at or below what was handled "
                      "(a Redis that lost its data, on a clock behind) are not read", stream, exc)
            self._setid = False
            return False
        return True

    async def group_info(self, stream: str) -> GroupInfo | None:
        try:
            groups = await self.client.xinfo_groups(stream)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        for g in groups:
            if _text(g["name"]) == self.group:
                lag = g.get("lag")
                info = GroupInfo(last_delivered=_text(g["last-delivered-id"]), pending=int(g["pending"]),
                                 lag=None if lag is None else int(lag))
                if info.lag is None or info.lag > 0:
                    first = await self.client.xrange(stream, f"({info.last_delivered}", "+", count=1)
                    first_id = first[0][0] if first else None
                    info.oldest_unread = _text(first_id) if first_id is not None else None
                if info.pending:
                    summary = await self.client.xpending(stream, self.group)
                    info.oldest_pending = _text(summary["min"]) if summary.get("min") else None
                    info.consumers = {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}
                return info
        return None

    async def read_new(self, streams: list[str], count: int, block_ms: int | None) -> list[Entry]:
        """Entries never delivered to the group, up to ``count`` of *each* stream."""
        reply = cast(StreamReply, await self.client.xreadgroup(self.group, self.consumer, {s: ">" for s in streams},
                                                               count=count, block=block_ms))
        return [Entry(stream=_text(stream), id=_text(eid), fields=fields or None)
                for stream, items in reply or [] for eid, fields in items]

    async def read_own_pending(self, stream: str, count: int) -> list[Entry]:
        """This consumer's delivered, unacknowledged entries (all of them, oldest first)."""
        out: list[Entry] = []
        last = "0"
        while True:
            reply = cast(StreamReply, await self.client.xreadgroup(self.group, self.consumer, {stream: last},
                                                                   count=count))
            batch = reply[0][1] if reply else []
            if not batch:
                return out
            out += [Entry(stream=stream, id=_text(eid), fields=fields or None) for eid, fields in batch]
            last = _text(batch[-1][0])

    async def claim_idle(self, stream: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries idle longer than ``min_idle_ms`` in other consumers' lists."""
        out: list[Entry] = []
        low, mine = "-", self.consumer.encode()
        while True:
            rows = cast(list[Row], await self.client.xpending_range(stream, self.group, min=low, max="+",
                                                                    count=count, idle=min_idle_ms))
            if not rows:
                return out
            out += await self._take_over(stream, [_text(r["message_id"]) for r in rows
                                                  if r["consumer"] not in (self.consumer, mine)], min_idle_ms)
            if len(rows) < count:
                return out
            low = f"({_text(rows[-1]['message_id'])}"

    async def claim_others(self, streams: list[str], count: int) -> list[Entry]:
        """Take over at once every entry pending in another consumer's list, however briefly idle
        (only the leader reads: another consumer's entries are a dead or deposed leader's). One
        round trip when no other consumer holds any."""
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xpending(stream, self.group)
            summaries = await pipe.execute()
        out: list[Entry] = []
        for stream, summary in zip(streams, summaries, strict=True):
            for c in summary.get("consumers") or []:
                name = c["name"]  # as Redis gave it: a name need not be UTF-8
                if name in (self.consumer, self.consumer.encode()) or not int(c["pending"]):
                    continue
                low = "-"
                while True:
                    rows = cast(list[Row], await self.client.xpending_range(stream, self.group, min=low, max="+",
                                                                            count=count, consumername=name))
                    if not rows:
                        break
                    ids = [_text(r["message_id"]) for r in rows]
                    # A deleted entry stays in the other consumer's list until its answer is acknowledged: one
                    # a read handed over whose answer failed is handed over again DELETED_RETRY later, not
                    # looked up, counted as an attempt and tried at every read.
                    now = time.monotonic()
                    got = await self._take_over(stream, [i for i in ids if now - self._deleted.get((stream, i),
                                                                                               -math.inf)
                                                         >= DELETED_RETRY], 0)
                    for e in got:
                        if e.fields is None:
                            self._remember_deleted(stream, e.id, now)
                    out += got
                    if len(rows) < count:
                        break
                    low = f"({ids[-1]}"
        return out

    def _remember_deleted(self, stream: str, entry_id: str, now: float) -> None:
        """When a read last handed a deleted entry over; the longest ago let go past a bound."""
        self._deleted.pop((stream, entry_id), None)
        self._deleted[(stream, entry_id)] = now
        if len(self._deleted) > DELETED_MEMO:
            del self._deleted[next(iter(self._deleted))]

    async def _take_over(self, stream: str, ids: list[str], min_idle_ms: int) -> list[Entry]:
        """Entries pending in other consumers' lists (``ids``, in order), handed over to this one.

        An entry deleted from the stream is handed over as deleted (``fields=None``) and not claimed:
        Redis 7 drops a deleted entry from the pending list when XCLAIM or XAUTOCLAIM meets it, so a
        crash, an outage or a lost term before its answer was committed would lose the answer. Left in
        the other consumer's list, it comes back at the next take-over until the intake's XACK, after
        the answer, removes it (XACK does not ask whose list an entry is in)."""
        if not ids:
            return []
        held = await self._still_held(stream, ids)
        keep = [i for i in ids if i in held]
        back: dict[str, Fields | None] = {}
        if keep:
            claimed = cast(list[RawEntry], await self.client.xclaim(stream, self.group, self.consumer,
                                                                    min_idle_time=min_idle_ms, message_ids=list(keep)))
            back = {_text(eid): fields for eid, fields in claimed if eid is not None}  # Redis 6.2: a nil if deleted
        # An id the claim left out was deleted in the moment since the look (Redis dropped it: handed over as
        # deleted, the only window left), or it is still held: the other consumer acknowledged it meanwhile
        # (after admitting it), an operator removed that consumer, or (min_idle_ms) it was read again.
        left = await self._still_held(stream, [i for i in keep if i not in back])
        return [Entry(stream=stream, id=i, fields=back.get(i) or None) for i in ids
                if i in back or (i not in left)]

    async def _still_held(self, stream: str, ids: list[str]) -> set[str]:
        """Which of ``ids`` the stream still holds: one pipelined XRANGE of each, in one round trip."""
        if not ids:
            return set()
        async with self.client.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.xrange(stream, min=i, max=i, count=1)
            found = await pipe.execute()
        return {i for i, got in zip(ids, found, strict=True) if got}

    async def ack(self, stream: str, *entry_ids: str) -> None:
        if entry_ids:
            await self.client.xack(stream, self.group, *entry_ids)

    async def trim_below(self, stream: str, min_id: str) -> int:
        """Delete entries older than ``min_id`` (approximately: whole nodes only, cheap)."""
        return int(await self.client.xtrim(stream, minid=min_id, approximate=True))

    # ------------------------------------------------------------------ writes
    async def add(self, stream: str, fields: WriteFields, maxlen: int | None = None) -> str:
        return _text(await self.client.xadd(stream, fields, maxlen=maxlen or None, approximate=True))

    async def add_many(self, items: list[tuple[str, WriteFields]], maxlen: int | None = None) -> list[str]:
        """XADD each (stream, fields) in order, in one round trip, all or none: a transaction (MULTI/EXEC).

        Not a bare pipeline: Redis would carry out the XADDs it takes and refuse the others, and a refusal
        that clears while a long pipeline is read (MISCONF after a good save, OOM after memory was freed,
        READONLY after a promotion, an ACL changed) would publish later entries before earlier ones. A
        command refused while queued (those, NOPERM) fails the whole transaction."""
        async with self.client.pipeline(transaction=True) as pipe:
            for stream, fields in items:
                pipe.xadd(stream, fields, maxlen=maxlen or None, approximate=True)
            ids = await pipe.execute()
        return [_text(i) for i in ids]

    async def recent(self, stream: str, count: int) -> list[tuple[str, dict[str, str]]]:
        """The newest ``count`` entries, newest first, with str fields."""
        return [(_text(eid), _text_fields(fields))
                for eid, fields in cast(list[RawEntry], await self.client.xrevrange(stream, count=count))]

    async def range(self, stream: str, start: str, end: str = "+",
                    count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        return [(_text(eid), _text_fields(fields))
                for eid, fields in cast(list[RawEntry], await self.client.xrange(stream, min=start, max=end,
                                                                                  count=count))]

    async def read_after(self, stream: str, last_id: str, count: int,
                         block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        """Plain reads (no group), as Lobby reads results: entries after ``last_id``, str fields."""
        reply = cast(StreamReply, await self.client.xread({stream: last_id}, count=count, block=block_ms))
        return [(_text(eid), _text_fields(fields))
                for _, items in reply or [] for eid, fields in items]

    async def recent_field(self, stream: str, count: int, name: str) -> list[tuple[str, str]]:
        """(id, the value of field ``name`` or "") of the newest ``count`` entries, newest first: what
        ``recent`` tells of them, the other fields left in Redis (a script; XREVRANGE when refused)."""
        got = await self._script(NEWEST_IDS_WITH_FIELD, stream, count, name)
        if got is not None:
            return [(_text(eid), _lenient(value)) for eid, value in cast(list[list[bytes]], got)]
        return [(eid, fields.get(name, "")) for eid, fields in await self.recent(stream, count)]

    async def range_ids(self, stream: str, start: str, end: str = "+", count: int = 1000) -> list[str]:
        """The ids of ``range``: a script leaves the entries' fields in Redis, so that checking which
        ids a stream holds costs a fraction of reading them (the relay checks thousands at once,
        on the path to a new leader's first answer). A server that refuses scripts gets XRANGE."""
        got = await self._script(IDS_IN_RANGE, stream, start, end, count)
        if got is not None:
            return [_text(i) for i in cast(list[bytes], got)]
        return [eid for eid, _ in await self.range(stream, start, end, count)]

    async def _script(self, script: str, key: str, *args: Any) -> Any | None:
        """A script's answer, or None once the server has refused scripts (NOPERM, scripting disabled): the
        callers then read whole entries, for the rest of the process. A Redis refusing for a while (busy with
        another script, loading its data, a replica cut off from its master; under a configuration that
        flags scripts as writing, a failed save, too few replicas, out of memory) is an outage like any
        other, not a refusal of scripts."""
        if not self._scripts:
            return None
        try:
            return await self.client.eval(script, 1, key, *args)
        except redis.exceptions.ResponseError as exc:
            if isinstance(_translate(exc), StreamsUnavailable):
                raise
            log.warning("redis refused a script (%s); reading whole entries to check a stream's ids", exc)
            self._scripts = False
            return None

    async def stream_first_id(self, stream: str) -> str | None:
        got = cast(list[RawEntry], await self.client.xrange(stream, count=1))
        return _text(got[0][0]) if got else None
