-- rtmanager schema, version 1: desired and observed state of each game's
-- runtime, the operation log, and the outbox of job results.
-- The CHECK constraints repeat the invariants of desired/model.py so that a
-- bug cannot store a record the domain model would refuse.

CREATE TABLE runtime_records (
    game_id              text PRIMARY KEY
                         CHECK (game_id ~ '^[a-z0-9]([a-z0-9-]{0,49}[a-z0-9])?$'),
    status               text NOT NULL
                         CHECK (status IN ('starting', 'running', 'stopped', 'removed')),
    current_container_id text CHECK (current_container_id <> ''),
    current_image_ref    text CHECK (current_image_ref <> ''),
    engine_endpoint      text NOT NULL CHECK (engine_endpoint <> ''),
    state_path           text NOT NULL CHECK (state_path <> ''),
    docker_network       text NOT NULL CHECK (docker_network <> ''),
    started_at           timestamptz,
    stopped_at           timestamptz,
    removed_at           timestamptz,
    last_op_at           timestamptz NOT NULL,
    created_at           timestamptz NOT NULL,
    desired_status       text NOT NULL
                         CHECK (desired_status IN ('running', 'stopped', 'removed')),
    desired_image_ref    text CHECK (desired_image_ref <> ''),
    generation           bigint NOT NULL CHECK (generation >= 1),
    observed_generation  bigint NOT NULL CHECK (observed_generation >= 0),
    spec_revision        bigint NOT NULL DEFAULT 0 CHECK (spec_revision >= 0),
    stop_reason          text CHECK (stop_reason IN
                         ('orphan_cleanup', 'cancelled', 'finished', 'admin_request', 'timeout')),
    health               text NOT NULL DEFAULT 'unknown'
                         CHECK (health IN ('unknown', 'healthy', 'unreachable')),
    last_error_code      text,
    last_error_message   text,
    CONSTRAINT runtime_records_generation_chk CHECK (observed_generation <= generation),
    CONSTRAINT runtime_records_running_chk CHECK (status <> 'running' OR (
        current_container_id IS NOT NULL AND current_image_ref IS NOT NULL AND started_at IS NOT NULL)),
    CONSTRAINT runtime_records_stopped_chk CHECK (status <> 'stopped' OR (
        current_image_ref IS NOT NULL AND stopped_at IS NOT NULL)),
    CONSTRAINT runtime_records_removed_chk CHECK (status <> 'removed' OR (
        removed_at IS NOT NULL AND current_container_id IS NULL)),
    CONSTRAINT runtime_records_times_chk CHECK (
        last_op_at >= created_at
        AND (started_at IS NULL OR started_at >= created_at)
        AND (stopped_at IS NULL OR started_at IS NULL OR stopped_at >= started_at)
        AND (removed_at IS NULL OR removed_at >= created_at)),
    CONSTRAINT runtime_records_desired_chk CHECK (
        desired_status <> 'running' OR desired_image_ref IS NOT NULL)
);

CREATE INDEX runtime_records_status_idx ON runtime_records (status);

-- One row per job (stream or REST) and per action the controller takes on its own.
CREATE TABLE runtime_operations (
    id             bigserial PRIMARY KEY,
    game_id        text NOT NULL CHECK (length(game_id) <= 64),
    op             text NOT NULL
                   CHECK (op IN ('start', 'stop', 'restart', 'patch', 'cleanup', 'reconcile')),
    source         text NOT NULL CHECK (source IN ('lobby', 'admin', 'scheduler', 'reconciler')),
    status         text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    generation     bigint NOT NULL DEFAULT 0 CHECK (generation >= 0),
    stream         text,
    entry_id       text,
    params         jsonb NOT NULL DEFAULT '{}'::jsonb,
    error_code     text,
    error_message  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    CONSTRAINT runtime_operations_entry_key UNIQUE (stream, entry_id),
    CONSTRAINT runtime_operations_finished_chk CHECK (
        (status IN ('succeeded', 'failed')) = (finished_at IS NOT NULL)),
    CONSTRAINT runtime_operations_failed_chk CHECK (status <> 'failed' OR error_code IS NOT NULL),
    CONSTRAINT runtime_operations_entry_chk CHECK ((stream IS NULL) = (entry_id IS NULL))
);

CREATE INDEX runtime_operations_game_idx ON runtime_operations (game_id, id);
CREATE INDEX runtime_operations_pending_idx ON runtime_operations (game_id)
    WHERE status IN ('queued', 'running');

-- Transactional outbox: a result is written in the same transaction that ends
-- its operation, and the relay publishes it to the results stream afterwards.
CREATE TABLE job_results (
    seq             bigserial PRIMARY KEY,
    result_id       uuid NOT NULL UNIQUE,
    operation_id    bigint UNIQUE REFERENCES runtime_operations (id),
    game_id         text NOT NULL,
    fields          jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    stream_entry_id text
);

CREATE INDEX job_results_unpublished_idx ON job_results (seq) WHERE published_at IS NULL;
