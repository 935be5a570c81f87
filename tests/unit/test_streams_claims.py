"""Taking over another consumer's pending entries (``RedisStreams.claim_others``, ``claim_idle``): a
deleted entry is handed over as deleted and never claimed (a claim drops it from the pending list
before its answer is committed), and an id XCLAIM leaves out is deleted only when the stream no longer
holds it."""

from __future__ import annotations

import controller.streams as streams_module
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
    XCLAIM returns only ``claimable`` (an id acknowledged or deleted meanwhile is left out), and deletes
    ``deleted_at_claim`` from the stream just before it runs."""

    def __init__(self, pending: list[str], stored: set[str], claimable: set[str],
                 deleted_at_claim: frozenset[str] = frozenset()) -> None:
        self.pending, self.stored, self.claimable = pending, stored, claimable
        self.deleted_at_claim = deleted_at_claim
        self.round_trips = 0
        self.claimed: list[str] = []

    def pipeline(self, transaction: bool = False) -> Pipeline:
        return Pipeline(self)

    async def xpending_range(self, stream, group, min, max, count, consumername=None, idle=None):
        self.round_trips += 1
        return [{"message_id": i.encode(), "consumer": b"deposed"} for i in self.pending] if min == "-" else []

    async def xclaim(self, stream, group, consumer, min_idle_time, message_ids):
        self.round_trips += 1
        self.claimed += message_ids
        self.stored -= self.deleted_at_claim
        return [(i.encode(), {b"game_id": b"g"}) for i in message_ids
                if i in self.claimable and i not in self.deleted_at_claim]


def deposed(**kw) -> RedisStreams:
    streams = RedisStreams("redis://127.0.0.1:1/0", group="g", consumer="leader")
    streams.client = OneDeposedConsumer(**kw)
    return streams


async def test_a_deleted_entry_is_handed_over_unclaimed_and_a_left_out_id_is_deleted_only_when_gone():
    # 1-0 claimed; 2-0 and 4-0 deleted from the stream (handed over as deleted, not claimed: the claim
    # would drop them from the pending list); 3-0 still in the stream but no longer pending (the deposed
    # consumer acknowledged it after admitting it): XCLAIM leaves it out, and it is not deleted.
    for take_over, trips in ((lambda s: s.claim_others(["s"], 100), 5), (lambda s: s.claim_idle("s", 30_000, 100), 4)):
        streams = deposed(pending=["1-0", "2-0", "3-0", "4-0"], stored={"1-0", "3-0"}, claimable={"1-0"})
        got = await take_over(streams)
        assert [(e.id, e.fields is None) for e in got] == [("1-0", False), ("2-0", True), ("4-0", True)]
        assert streams.client.claimed == ["1-0", "3-0"]
        # (For claim_others, the XPENDING summary of every stream,) the pending range, the look at the
        # stream, the claim, and one look for the ids the claim left out.
        assert streams.client.round_trips == trips


async def test_an_entry_deleted_between_the_look_and_the_claim_is_handed_over_as_deleted():
    streams = deposed(pending=["1-0", "2-0"], stored={"1-0", "2-0"}, claimable={"1-0", "2-0"},
                      deleted_at_claim=frozenset({"2-0"}))
    got = await streams.claim_others(["s"], 100)
    assert [(e.id, e.fields is None) for e in got] == [("1-0", False), ("2-0", True)]


async def test_nothing_to_take_over_costs_no_look():
    streams = deposed(pending=["1-0"], stored={"1-0"}, claimable={"1-0"})
    streams.client.pending = []
    assert await streams.claim_idle("s", 0, 100) == []
    assert streams.client.round_trips == 1


async def test_a_read_hands_a_deleted_entry_over_again_only_after_a_while(monkeypatch):
    """Left in the other consumer's list until its answer is acknowledged, a deleted entry whose answer
    failed would come back at every read (each counted as an attempt, each looked up again): a read hands
    it over again DELETED_RETRY later; the pending pass whenever it is idle long enough."""
    now = [1000.0]
    monkeypatch.setattr(streams_module.time, "monotonic", lambda: now[0])
    streams = deposed(pending=["1-0", "2-0"], stored={"1-0"}, claimable={"1-0"})
    first = await streams.claim_others(["s"], 100)
    assert [(e.id, e.fields is None) for e in first] == [("1-0", False), ("2-0", True)]
    streams.client.pending = ["2-0"]  # 1-0 is this consumer's now; 2-0's answer failed
    trips = streams.client.round_trips
    now[0] += streams_module.DELETED_RETRY - 0.1
    assert await streams.claim_others(["s"], 100) == []
    assert streams.client.round_trips == trips + 2  # the summary and the range: no look, no claim
    assert [e.id for e in await streams.claim_idle("s", 30_000, 100)] == ["2-0"]
    now[0] += 0.1
    assert [(e.id, e.fields is None) for e in await streams.claim_others(["s"], 100)] == [("2-0", True)]
