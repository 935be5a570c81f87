-- The turn clock counts from the last generated turn, or from when the game was started or
-- resumed, whichever is later (a desired column: written by admission).
ALTER TABLE runtime_records ADD COLUMN clock_from timestamptz;

-- The turn clock's one query looks only at games with a schedule.
CREATE INDEX runtime_records_scheduled_idx ON runtime_records (game_id) WHERE turn_interval > 0;
