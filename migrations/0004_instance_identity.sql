-- Which rtmanager instance this database belongs to. Records carry no instance
-- name, so a controller started with another RTMANAGER_INSTANCE against this
-- database would take every record's containers for somebody else's and give
-- the games up; rtmanager refuses to start instead (controller/app.py).
CREATE TABLE controller_identity (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    instance   text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
