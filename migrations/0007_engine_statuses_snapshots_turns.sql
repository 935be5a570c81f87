-- The engine's own word on the record (its admin API), the wider status vocabulary, turn
-- operations as desired state, and snapshots to Lobby in the same outbox as job results.

ALTER TABLE runtime_records DROP CONSTRAINT runtime_records_status_check;
ALTER TABLE runtime_records ADD CONSTRAINT runtime_records_status_check CHECK (status IN (
    'starting', 'running', 'generation_in_progress', 'generation_failed', 'engine_unreachable', 'finished',
    'stopped', 'removed'));
-- Every status in which the engine's container runs needs what "running" needed.
ALTER TABLE runtime_records DROP CONSTRAINT runtime_records_running_chk;
ALTER TABLE runtime_records ADD CONSTRAINT runtime_records_up_chk CHECK (
    status NOT IN ('running', 'generation_in_progress', 'generation_failed', 'engine_unreachable', 'finished')
    OR (current_container_id IS NOT NULL AND current_image_ref IS NOT NULL AND started_at IS NOT NULL));

ALTER TABLE runtime_records
    -- observed: what the engine says of itself, and the probes
    ADD COLUMN turn                  integer CHECK (turn >= 0),
    ADD COLUMN phase                 text CHECK (phase IN ('idle', 'generating', 'finished')),
    ADD COLUMN admin_api             boolean,
    ADD COLUMN probe_failures        integer NOT NULL DEFAULT 0 CHECK (probe_failures >= 0),
    ADD COLUMN unreachable_since     timestamptz,
    ADD COLUMN generation_started_at timestamptz,
    ADD COLUMN last_turn_at          timestamptz,
    ADD COLUMN snapshot_revision     bigint NOT NULL DEFAULT 0 CHECK (snapshot_revision >= 0),
    -- desired: the turn clock and forced turns
    ADD COLUMN paused                boolean NOT NULL DEFAULT false,
    ADD COLUMN turn_interval         integer NOT NULL DEFAULT 0 CHECK (turn_interval >= 0),
    ADD COLUMN desired_turn          integer CHECK (desired_turn >= 0);

ALTER TABLE runtime_operations DROP CONSTRAINT runtime_operations_op_check;
ALTER TABLE runtime_operations ADD CONSTRAINT runtime_operations_op_check CHECK (op IN (
    'start', 'stop', 'restart', 'patch', 'cleanup', 'reconcile', 'pause', 'resume', 'force_next_turn', 'turn'));

-- One outbox, published in commit order: job results and snapshots.
ALTER TABLE job_results ADD COLUMN kind text NOT NULL DEFAULT 'result' CHECK (kind IN ('result', 'snapshot'));
