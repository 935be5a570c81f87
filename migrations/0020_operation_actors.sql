-- Who asked (issue 26: scoped tokens and an audit trail).
--
-- actor: "token:NAME" for a REST call (the name of the API token, never the token), "stream:STREAM" for a
-- job entry, NULL for what rtmanager does on its own (source says reconciler or scheduler).
-- requested_by: on whose behalf, as a job entry's optional requested_by field (or a REST body's) said.
ALTER TABLE runtime_operations ADD COLUMN actor text CHECK (length(actor) <= 200);
ALTER TABLE runtime_operations ADD COLUMN requested_by text CHECK (length(requested_by) <= 128);

-- Changes of the engine-version registry, drains and rollouts are in the same log; they concern no
-- one game (desired/values.py FLEET_OPS).
ALTER TABLE runtime_operations ALTER COLUMN game_id DROP NOT NULL;
ALTER TABLE runtime_operations DROP CONSTRAINT runtime_operations_op_check;
ALTER TABLE runtime_operations ADD CONSTRAINT runtime_operations_op_check CHECK (op IN (
    'start', 'stop', 'restart', 'patch', 'cleanup', 'reconcile', 'pause', 'resume', 'force_next_turn', 'turn',
    'version_create', 'version_update', 'version_delete', 'drain_create', 'drain_undrain',
    'rollout_create', 'rollout_pause', 'rollout_resume', 'rollout_abort'));
ALTER TABLE runtime_operations ADD CONSTRAINT runtime_operations_game_chk
    CHECK ((game_id IS NULL) = (op IN ('version_create', 'version_update', 'version_delete', 'drain_create',
                                       'drain_undrain', 'rollout_create', 'rollout_pause', 'rollout_resume',
                                       'rollout_abort')));

-- GET /api/v1/operations: the newest first, of everyone or of one actor.
CREATE INDEX runtime_operations_actor_idx ON runtime_operations (actor, id) WHERE actor IS NOT NULL;
