-- Crash classification and restart backoff (observed columns, written by the reconciler).
ALTER TABLE runtime_records
    ADD COLUMN crash_count        integer NOT NULL DEFAULT 0 CHECK (crash_count >= 0),
    ADD COLUMN last_exit_code     integer,
    ADD COLUMN last_oom_killed    boolean NOT NULL DEFAULT false,
    ADD COLUMN last_crash_at      timestamptz,
    ADD COLUMN restart_not_before timestamptz,
    ADD COLUMN health_checked_at  timestamptz;
