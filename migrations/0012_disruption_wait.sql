-- A planned disruption (stop, removal, recreate of a running engine) waits while the engine
-- generates a turn, up to RTMANAGER_DISRUPTION_WAIT seconds counted from when the wait began;
-- kept here so that a restart or a failover of the controller does not reset the limit (observed).
ALTER TABLE runtime_records ADD COLUMN disruption_wait_since timestamptz;
-- The generation an operator forced (REST or CLI ``force``): that generation's disruption does not
-- wait; a later generation without force waits again (desired).
ALTER TABLE runtime_records ADD COLUMN force_generation bigint CHECK (force_generation >= 1);
-- The seconds between SIGTERM and SIGKILL when an engine of this version is stopped (NULL: the
-- global RTMANAGER_STOP_GRACE).
ALTER TABLE engine_versions ADD COLUMN stop_grace integer
    CONSTRAINT engine_versions_stop_grace_chk CHECK (stop_grace >= 0 AND stop_grace <= 3600);
