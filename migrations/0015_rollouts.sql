-- Rolling engine-version rollouts: desired state, one row per rollout and one per game it moves.
-- The leader's rollout loop reads these rows (never its memory), so a rollout resumes after a
-- kill -9 or a failover; a game's row changes in the same transaction as the job it records (the
-- patch through admission, and its operation id).
CREATE TABLE rollouts (
    id              bigserial PRIMARY KEY,
    target_version  text NOT NULL,
    target_image_ref text NOT NULL,
    source_version  text,                 -- the games were chosen as "every live game on this version"
    state           text NOT NULL DEFAULT 'running'
                    CONSTRAINT rollouts_state_chk CHECK (state IN ('running', 'paused', 'completed', 'aborted')),
    max_parallel    integer NOT NULL CHECK (max_parallel BETWEEN 1 AND 100),
    canary          integer NOT NULL DEFAULT 0 CHECK (canary >= 0),
    canary_hold     double precision NOT NULL DEFAULT 0 CHECK (canary_hold >= 0),
    failure_budget  integer NOT NULL CHECK (failure_budget >= 1),
    on_failure      text NOT NULL DEFAULT 'rollback' CHECK (on_failure IN ('rollback', 'stop')),
    force           boolean NOT NULL DEFAULT false,
    state_reason    text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    resumed_at      timestamptz,          -- failures before it no longer count against the budget
    finished_at     timestamptz           -- completed or aborted, and no patch of it in flight
);
CREATE INDEX rollouts_unfinished_idx ON rollouts (id) WHERE finished_at IS NULL;

CREATE TABLE rollout_games (
    rollout_id     bigint NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    game_id        text NOT NULL,
    position       integer NOT NULL,
    state          text NOT NULL DEFAULT 'waiting'
                   CONSTRAINT rollout_games_state_chk
                   CHECK (state IN ('waiting', 'in_progress', 'done', 'failed', 'rolled_back', 'skipped')),
    canary         boolean NOT NULL DEFAULT false,
    from_image_ref text,
    operation_id   bigint,
    reason         text NOT NULL DEFAULT '',
    started_at     timestamptz,
    finished_at    timestamptz,
    -- The game belongs to this rollout: at most one active rollout touches a game.
    active         boolean NOT NULL DEFAULT true,
    PRIMARY KEY (rollout_id, game_id)
);
CREATE UNIQUE INDEX rollout_games_one_active_key ON rollout_games (game_id) WHERE active;
