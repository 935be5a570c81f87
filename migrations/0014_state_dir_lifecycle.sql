-- A game's state directory: its size as last measured (a lower bound when the walk was cut), and
-- when rtmanager deleted or archived the directory of a removed game (after RTMANAGER_STATE_RETENTION).
-- Written by the storage round alone, outside the record's compare-and-swap.
ALTER TABLE runtime_records
    ADD COLUMN state_bytes       bigint CHECK (state_bytes >= 0),
    ADD COLUMN state_measured_at timestamptz,
    ADD COLUMN state_disposed_at timestamptz;

CREATE INDEX runtime_records_state_disposal_idx ON runtime_records (removed_at)
    WHERE status = 'removed' AND state_disposed_at IS NULL;
