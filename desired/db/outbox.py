"""The results outbox: what the relay publishes, marks and re-publishes, snapshots on demand, and
retention."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import asyncpg

from desired.db.base import StoreBase
from desired.db.pool import translating
from desired.db.rows import GAME_LOCK_SPACE, RECENTLY_PUBLISHED_SQL, record_from_row
from desired.db.watch import sequence_snapshots
from desired.values import PendingResult

UNPUBLISHED = ("SELECT r.seq, r.result_id, r.game_id, r.fields, r.kind, r.created_at, o.created_at AS accepted_at"
               " FROM job_results r LEFT JOIN runtime_operations o ON o.id = r.operation_id"
               " WHERE r.published_at IS NULL")


def _pending(rows: list[asyncpg.Record]) -> list[PendingResult]:
    return [PendingResult(seq=r["seq"], result_id=str(r["result_id"]), game_id=r["game_id"],
                          fields=json.loads(r["fields"]) if isinstance(r["fields"], str) else r["fields"],
                          kind=r["kind"], written_at=r["created_at"], accepted_at=r["accepted_at"])
            for r in rows]


FLOOR_CHUNK = 500  # games' floors stored per transaction (each takes that many advisory locks)
RESYNC_BATCH = 200  # games a snapshot resync of the fleet holds (and writes) per transaction
FLOOR_DUE = ""  # the snapshot_floors row of a raise found due (no game id is empty)


@translating
class Outbox(StoreBase):
    """The job_results table as the relay, the status surfaces and retention see it."""

    async def floor_state(self, snapshot_ids: list[str]) -> tuple[set[str], bool]:
        """(which of these snapshots the outbox holds, whether a raise found due is still to do): what
        controller/snapshot_floor.py asks before a term publishes. An id that is no UUID is none of ours."""
        ids = []
        for snapshot_id in snapshot_ids:
            try:
                ids.append(uuid.UUID(snapshot_id))
            except ValueError:
                continue
        row = await self.pool.fetchrow(
            "SELECT ARRAY(SELECT result_id::text FROM job_results WHERE result_id = ANY($1::uuid[])) AS known,"
            " EXISTS (SELECT 1 FROM snapshot_floors WHERE game_id = $2) AS due", ids, FLOOR_DUE)
        assert row is not None
        return set(row["known"]), bool(row["due"])

    async def note_floor_due(self) -> None:
        """The database was found behind the snapshot stream: remembered until the raise went through, by
        whichever term or process (a row no game id can name)."""
        async with self._tx() as (conn, _):
            await conn.execute("INSERT INTO snapshot_floors (game_id, revision) VALUES ($1, 0)"
                               " ON CONFLICT (game_id) DO NOTHING", FLOOR_DUE)

    async def raise_snapshot_revisions(self, floors: dict[str, int], on_stream: frozenset[str] = frozenset()) -> int:
        """Each game's revisions above ``floors[game]`` (the highest Lobby was sent, controller/snapshot_floor.py),
        for the games whose record holds a lower one or that numbered a snapshot not published yet at or
        below it. Those snapshots (but for the ones already on the stream, ``on_stream``: published, not marked
        yet, they keep their revision) are numbered again above the floor, in their order, and carry the game's
        state to Lobby; a game with none gets a resync snapshot above the floor, as Lobby's view of it came
        from what the database lost. A game without a record keeps its floor (snapshot_floors) for the record
        made again later. The raise found due is done when this commits. Returns how many games were raised."""
        ordered = sorted(floors)
        for at in range(0, len(ordered), FLOOR_CHUNK):
            # Under the games' locks, as admission (and adopt) takes them before it makes a record: a record
            # made meanwhile is either seen here (and raised below) or made after, reading the floor.
            chunk = ordered[at:at + FLOOR_CHUNK]
            async with self._tx() as (conn, _):
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext(g)) FROM unnest($2::text[]) AS g"
                                   " ORDER BY g", GAME_LOCK_SPACE, chunk)
                await conn.execute(
                    "INSERT INTO snapshot_floors (game_id, revision)"
                    " SELECT f.game_id, f.rev FROM unnest($1::text[], $2::bigint[]) AS f(game_id, rev)"
                    " WHERE NOT EXISTS (SELECT 1 FROM runtime_records r WHERE r.game_id = f.game_id)"
                    " ON CONFLICT (game_id) DO UPDATE SET revision = greatest(snapshot_floors.revision,"
                    " excluded.revision)", chunk, [floors[g] for g in chunk])
        games, revs, seen = list(floors), [floors[g] for g in floors], list(on_stream)
        pending = ("q.kind = 'snapshot' AND q.published_at IS NULL AND NOT (q.result_id::text = ANY($3::text[]))")
        async with self._tx() as (conn, now):
            # The games to raise, locked first (one grouped pass over the unpublished rows, not a count per
            # game: quadratic at thousands). What they have pending is counted only once they are locked, by
            # the statement that numbers it: a transition that committed while this waited is in both.
            # The candidates are chosen as of the statement's start (MATERIALIZED), then locked by their id
            # alone: a lock's wait re-checks a changed row against the conditions on it, but not against the
            # pending rows read before, so a game whose transition committed meanwhile would drop out.
            rows = await conn.fetch(
                "WITH f AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS f(game_id, rev)),"
                " p AS (SELECT q.game_id, min((q.fields->>'revision')::bigint) AS low"
                f"       FROM job_results q JOIN f USING (game_id) WHERE {pending} GROUP BY q.game_id),"
                " c AS MATERIALIZED (SELECT r.game_id, f.rev FROM runtime_records r JOIN f USING (game_id)"
                "       LEFT JOIN p USING (game_id) WHERE r.snapshot_revision < f.rev OR p.low <= f.rev)"
                " SELECT r.*, c.rev AS floor FROM runtime_records r JOIN c USING (game_id)"
                " ORDER BY r.game_id FOR UPDATE OF r", games, revs, seen)
            if rows:
                numbered = await conn.fetch(
                    "UPDATE job_results j SET fields = jsonb_set(j.fields, '{revision}', to_jsonb((p.rev + p.n)::text))"
                    " FROM (SELECT q.seq, f.rev, row_number() OVER (PARTITION BY q.game_id ORDER BY q.seq) AS n"
                    "       FROM job_results q JOIN unnest($1::text[], $2::bigint[]) AS f(game_id, rev) USING (game_id)"
                    f"       WHERE {pending}) p"
                    " WHERE j.seq = p.seq RETURNING j.game_id", [r["game_id"] for r in rows],
                    [r["floor"] for r in rows], seen)
                counts = Counter(n["game_id"] for n in numbered)
                # A game with snapshots to publish: they carry its state, the next one comes after them. A game
                # with none: Lobby's view of it came from what the database lost, so a resync snapshot of its
                # state now, above the floor (all in one statement each, not a round trip per game).
                carried = [r for r in rows if counts[r["game_id"]]]
                # (the row as locked: a transition that committed meanwhile may have numbered past the floor)
                resynced = [record_from_row(r) for r in rows
                            if not counts[r["game_id"]] and r["snapshot_revision"] < r["floor"]]
                floor_of = {r["game_id"]: r["floor"] for r in rows}
                news = [cur.replace(snapshot_revision=floor_of[cur.game_id] + 1) for cur in resynced]
                await conn.execute(
                    "UPDATE runtime_records r SET snapshot_revision = v.rev"
                    " FROM unnest($1::text[], $2::bigint[]) AS v(game_id, rev) WHERE r.game_id = v.game_id",
                    [r["game_id"] for r in carried] + [n.game_id for n in news],
                    [r["floor"] + counts[r["game_id"]] for r in carried] + [n.snapshot_revision for n in news])
                if news:
                    outbox = [self._snapshot_row(conn, new, cur.status, "resync", now)
                              for cur, new in zip(resynced, news, strict=True)]
                    await conn.executemany(
                        "INSERT INTO job_results (result_id, game_id, fields, kind) VALUES ($1, $2, $3::jsonb,"
                        " 'snapshot')", outbox)
            await conn.execute("DELETE FROM snapshot_floors WHERE game_id = $1", FLOOR_DUE)
            return len(rows)

    async def snapshot_resync(self, game_id: str | None = None) -> int:
        """A snapshot with reason resync (and a new revision) of every live game, or of one. The fleet goes
        RESYNC_BATCH games at a time, in game order, each batch its own transaction: the records it locks
        are held for a batch, not for the whole fleet (every write, admission and turn-clock tick of a game
        waits for its record's lock)."""
        done, after = 0, ""
        while True:
            async with self._tx() as (conn, now):
                rows = await conn.fetch(
                    "SELECT * FROM runtime_records WHERE ($1::text IS NULL OR game_id = $1)"
                    " AND (status <> 'removed' OR $1::text IS NOT NULL) AND game_id > $2"
                    " ORDER BY game_id LIMIT $3 FOR UPDATE", game_id, after, RESYNC_BATCH)
                for row in rows:
                    cur = record_from_row(row)
                    await self._write(conn, cur, cur, now, "resync")
            done += len(rows)
            if len(rows) < RESYNC_BATCH:
                return done
            after = rows[-1]["game_id"]

    async def result_for(self, op_id: int) -> dict[str, str] | None:
        raw = await self.pool.fetchval("SELECT fields FROM job_results WHERE operation_id = $1", op_id)
        return json.loads(raw) if isinstance(raw, str) else raw

    async def results_of(self, op_ids: list[int]) -> dict[int, dict[str, str]]:
        """The results of those operations that have one (the REST requests waiting for theirs, in one query)."""
        rows = await self.pool.fetch("SELECT operation_id, fields FROM job_results WHERE operation_id = ANY($1)",
                                     op_ids)
        return {r["operation_id"]: json.loads(r["fields"]) if isinstance(r["fields"], str) else r["fields"]
                for r in rows}

    async def unpublished(self, limit: int = 100) -> list[PendingResult]:
        return _pending(await self.pool.fetch(f"{UNPUBLISHED} ORDER BY r.seq LIMIT $1", limit))

    async def mark_and_read_unpublished(self, marks: list[tuple[int, str]], limit: int = 100) -> list[PendingResult]:
        """``mark_published_many(marks)`` and then ``unpublished(limit)``, in one statement (the relay's loop:
        the marks of one batch go with the read of the next). The read is the statement's snapshot, from
        before the marks: what they mark is left out of it by its seq."""
        if not marks:
            return await self.unpublished(limit)
        rows = await self._fenced_read(
            "UPDATE job_results r SET published_at = now(), stream_entry_id = m.entry_id"
            " FROM unnest($1::bigint[], $2::text[]) AS m(seq, entry_id)"
            " WHERE r.seq = m.seq AND EXISTS (SELECT 1 FROM fence_ok) RETURNING r.seq",
            f"{UNPUBLISHED} AND r.seq <> ALL($1::bigint[]) ORDER BY r.seq LIMIT $3",
            [s for s, _ in marks], [e for _, e in marks], limit)
        return _pending(rows)

    async def unpublished_count(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM job_results WHERE published_at IS NULL")

    async def mark_published_many(self, marks: list[tuple[int, str]]) -> None:
        """(seq, stream entry id) of each entry published, in one statement."""
        await self._fenced(
            "UPDATE job_results r SET published_at = now(), stream_entry_id = m.entry_id"
            " FROM unnest($1::bigint[], $2::text[]) AS m(seq, entry_id)"
            " WHERE r.seq = m.seq AND EXISTS (SELECT 1 FROM fence_ok) RETURNING r.seq",
            [s for s, _ in marks], [e for _, e in marks])

    async def mark_published(self, seq: int, stream_entry_id: str) -> None:
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE job_results SET published_at = now(), stream_entry_id = $2 WHERE seq = $1",
                               seq, stream_entry_id)

    async def recently_published(self, kind: str, seconds: float, limit: int = 20000) -> list[tuple[int, str, str]]:
        """(seq, stream entry id, result_id) of the entries of ``kind`` published in the last ``seconds``."""
        rows = await self.pool.fetch(RECENTLY_PUBLISHED_SQL, seconds, limit, kind)
        return [(r["seq"], r["stream_entry_id"], str(r["result_id"])) for r in rows]

    async def mark_unpublished(self, seqs: list[int]) -> None:
        """Results the stream lost: the relay publishes them again (same result_id)."""
        async with self._tx() as (conn, _):
            await conn.execute("UPDATE job_results SET published_at = NULL, stream_entry_id = NULL"
                               " WHERE seq = ANY($1::bigint[])", seqs)

    async def prune(self, older_than_days: float, batch: int = 1000) -> tuple[int, int]:
        """Retention: published results and finished operations older than the horizon.

        Small batches, each its own short transaction and not fenced (old history is
        nobody's to contend for), so that a large backlog never holds locks for long.
        A redelivered stream entry is recognised by its operation row, so the horizon
        must be far longer than any entry can stay pending (days against seconds).
        """
        seconds = older_than_days * 86400
        totals = [0, 0, 0]
        # The watch API (desired/db/watch.py): every snapshot has its position before any goes, and
        # watch_state.pruned_through remembers the highest one removed, so that a reader resuming
        # from below it is told to reset instead of missing what was removed.
        await sequence_snapshots(self.pool)
        statements = (
            "WITH gone AS (DELETE FROM job_results WHERE seq IN (SELECT seq FROM job_results"
            " WHERE published_at < now() - make_interval(secs => $1)"
            " AND (kind <> 'snapshot' OR position IS NOT NULL) LIMIT $2) RETURNING position),"
            " horizon AS (UPDATE watch_state SET pruned_through = GREATEST(pruned_through,"
            " (SELECT max(position) FROM gone)) WHERE (SELECT max(position) FROM gone) IS NOT NULL)"
            " SELECT 'DELETE ' || count(*) FROM gone",
            "DELETE FROM runtime_operations WHERE id IN (SELECT o.id FROM runtime_operations o"
            " WHERE o.finished_at < now() - make_interval(secs => $1)"
            " AND NOT EXISTS (SELECT 1 FROM job_results r WHERE r.operation_id = o.id) LIMIT $2)",
            "DELETE FROM entry_attempts WHERE (stream, entry_id) IN (SELECT stream, entry_id FROM entry_attempts"
            " WHERE updated_at < now() - make_interval(secs => $1) LIMIT $2)",
        )
        for i, sql in enumerate(statements):
            while True:
                status = await (self.pool.fetchval(sql, seconds, batch) if i == 0
                                else self.pool.execute(sql, seconds, batch))
                done = int(status.split()[-1])
                totals[i] += done
                if done < batch:
                    break
        return totals[0], totals[1]
