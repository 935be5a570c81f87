-- Snapshot revisions that never go back after a restore of the database (controller/snapshot_floor.py).
-- A game the snapshot stream knows and the database does not (restored from a backup older than the
-- game, or emptied) gets the highest revision the stream holds of it here; the game's record, when it
-- is made again (a start sent again, an adoption), numbers its snapshots above it (records are never
-- deleted: a row serves its game once).
CREATE TABLE snapshot_floors (
    game_id  text PRIMARY KEY,
    revision bigint NOT NULL CHECK (revision >= 0)
);
