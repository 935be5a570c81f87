-- The watch API (GET /api/v1/events): every snapshot gets a position in commit order.
--
-- seq (bigserial) is taken at INSERT, not at COMMIT: under concurrent transactions a smaller seq
-- can commit after a larger one, and a reader resuming "after seq N" would skip it. So a snapshot
-- is given its position only once it has committed, by a sequencing pass that holds the one row of
-- watch_state (FOR UPDATE) and numbers, in seq order, the committed snapshots that have none yet.
-- A snapshot that commits later is numbered by a later pass, above every position given before:
-- positions grow in the order the snapshots became visible, and a reader that has seen every
-- position up to P never sees a new one at or below P. One game's snapshots are serialised by its
-- record row, so their seq order is their commit order.
ALTER TABLE job_results ADD COLUMN position bigint;
CREATE UNIQUE INDEX job_results_position_idx ON job_results (position) WHERE position IS NOT NULL;
CREATE INDEX job_results_unpositioned_idx ON job_results (seq) WHERE kind = 'snapshot' AND position IS NULL;

-- last_position: the highest position given; pruned_through: the highest position retention
-- removed (a reader asking for an older one is told to reset, never handed a silent gap).
CREATE TABLE watch_state (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_position  bigint NOT NULL DEFAULT 0 CHECK (last_position >= 0),
    pruned_through bigint NOT NULL DEFAULT 0 CHECK (pruned_through >= 0)
);
INSERT INTO watch_state DEFAULT VALUES;
