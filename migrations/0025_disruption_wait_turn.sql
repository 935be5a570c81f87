-- The turn the engine had finished when a planned disruption's wait began (observed, written with
-- disruption_wait_since): a generation of a later turn, found when the wait has run out, has a wait of its
-- own. Kept in the record, so neither the health round (which moves the record's turn on) nor a restore of
-- the database from an older backup (whose wait is not the turn generated now) hides that later turn.
ALTER TABLE runtime_records ADD COLUMN disruption_wait_turn integer;
