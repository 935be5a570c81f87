-- Durable intake bookkeeping, so that what Redis forgets cannot make a job apply twice
-- or push a good job to the dead letters.
--
-- stream_marks: per job stream, the highest entry id at or below which every entry has been
-- handled (acknowledged after its commit). A consumer group that vanished (deleted, renamed,
-- Redis restored from an older snapshot) is created again from here, an entry at or below it
-- is never applied again, and the stream is trimmed only below it.
CREATE TABLE stream_marks (
    stream     text PRIMARY KEY,
    mark_ms    bigint NOT NULL CHECK (mark_ms >= 0),
    mark_seq   numeric(20, 0) NOT NULL CHECK (mark_seq >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- entry_attempts: handling attempts of entries read again from the pending list (after a
-- failure that was not an outage, or a crash of the process handling them). Only these count
-- toward RTMANAGER_MAX_DELIVERIES: Redis' own delivery count also grows with every re-read
-- during an outage.
CREATE TABLE entry_attempts (
    stream     text NOT NULL,
    entry_id   text NOT NULL,
    attempts   integer NOT NULL CHECK (attempts >= 0),
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);
