-- Leader election: one lease row per instance name. A term starts when a
-- replica takes an expired lease and bumps the epoch; every state write of the
-- controller checks, under FOR SHARE, that its term is still the current one.
-- Times come from the database clock only, so replicas' clocks do not matter.
CREATE TABLE leader_leases (
    instance    text PRIMARY KEY,
    holder      text NOT NULL,
    epoch       bigint NOT NULL CHECK (epoch >= 1),
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    CHECK (expires_at >= acquired_at)
);
