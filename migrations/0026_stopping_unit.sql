-- The unit a stop mark (stopping_since) is of: the record's engine, or a unit the record does not name (a
-- replacement's new unit that failed, or was cut before it was recorded), so that a stop of it whose call
-- timed out is not signalled again within its grace either. NULL: the record's engine (marks written before).
ALTER TABLE runtime_records ADD COLUMN stopping_unit text;
