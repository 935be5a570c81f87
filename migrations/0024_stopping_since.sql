-- A stop of the running engine under way (observed): written before the engine is asked to stop, so that the
-- gateway's pass-through (served by every replica, from the record) sends it nothing more while it saves its
-- state on its way out. Cleared when the game is recorded stopped, removed, starting or running again.
ALTER TABLE runtime_records ADD COLUMN stopping_since timestamptz;
