-- Drains, second pass.
--
-- A generation's planned disruption may have a turn-boundary deadline of its own: a drain's stop or
-- move waits for the engine's turn boundary until the drain's deadline, not only
-- RTMANAGER_DISRUPTION_WAIT. It applies to that generation only (disruption_generation).
ALTER TABLE runtime_records ADD COLUMN disruption_until timestamptz;
ALTER TABLE runtime_records ADD COLUMN disruption_generation bigint;

-- A drain the leader could not carry out (its node is not a node of the Swarm) is failed, with why.
-- A failed drain is not active: it refuses nothing, and the target may be drained again.
ALTER TABLE drains ADD COLUMN note text;
ALTER TABLE drains DROP CONSTRAINT drains_status_check;
ALTER TABLE drains ADD CONSTRAINT drains_status_check
    CHECK (status IN ('draining', 'drained', 'undraining', 'undrained', 'failed'));
DROP INDEX drains_active_target_key;
CREATE UNIQUE INDEX drains_active_target_key ON drains ((coalesce(node, ''))) WHERE status NOT IN ('undrained', 'failed');

-- drain_games.op_id is now the operation that took the game (the drain's stop that changed desired
-- state, or the move's record change), never raised afterwards. The drain's own jobs carry its id
-- (runtime_operations.params->>'drain_id'); any other stop or cleanup of the game after op_id is
-- somebody else's, and undrain leaves such a game stopped.
