"""Taking over another consumer's pending entries (``RedisStreams.claim_others``): which ids XCLAIM
leaves out are deleted entries, to be answered as such, and which are not."""

from __future__ import annotations

from controller.streams import RedisStreams


class Pipeline:
    def __init__(self, client: OneDeposedConsumer) -> None:
        self.client = client
        self.queued: list[tuple[str, str | None]] = []

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def xpending(self, stream, group):
        self.queued.append(("xpending", None))

    def xrange(self, stream, min, max, count):
        self.queued.append(("xrange", min))

    async def execute(self):
        n = len(self.client.pending)
        out = [{"pending": n, "consumers": [{"name": b"deposed", "pending": n}]} if op == "xpending"
               else ([(arg.encode(), {b"game_id": b"g"})] if arg in self.client.stored else [])
               for op, arg in self.queued]
        self.client.round_trips += 1
        return out


class OneDeposedConsumer:
    """A Redis whose stream ``s`` holds ``stored`` and whose consumer "deposed" has ``pending`` pending;
    XCLAIM returns only ``claimable`` (an id acknowledged or deleted meanwhile is left out)."""

    def __init__(self, pending: list[str], stored: set[str], claimable: set[str]) -> None:
        self.pending, self.stored, self.claimable = pending, stored, claimable
        self.round_trips = 0

    def pipeline(self, transaction: bool = False) -> Pipeline:
        return Pipeline(self)

    async def xpending_range(self, stream, group, min, max, count, consumername):
        return [{"message_id": i.encode()} for i in self.pending] if min == "-" else []

    async def xclaim(self, stream, group, consumer, min_idle_time, message_ids):
        return [(i.encode(), {b"game_id": b"g"}) for i in message_ids if i in self.claimable]


async def test_an_id_xclaim_leaves_out_is_deleted_only_when_the_stream_no_longer_holds_it():
    streams = RedisStreams("redis://127.0.0.1:1/0", group="g", consumer="leader")
    # 1-0 claimed; 2-0 deleted from the stream (Redis 7 drops it and leaves it out); 3-0 still in the
    # stream but no longer pending (the deposed consumer acknowledged it after admitting it).
    streams.client = OneDeposedConsumer(["1-0", "2-0", "3-0", "4-0"], stored={"1-0", "3-0"}, claimable={"1-0"})
    got = await streams.claim_others(["s"], 100)
    assert [(e.id, e.fields is None) for e in got] == [("1-0", False), ("2-0", True), ("4-0", True)]
    # The XPENDING of every stream, then one round trip for all the ids XCLAIM left out.
    assert streams.client.round_trips == 2
