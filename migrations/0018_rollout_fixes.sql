-- Rollouts, second pass: a canary that fails its hold is patched back to the image it ran, and that
-- patch back is followed until the game runs its old image again (or is known stopped) before the
-- game's row settles. Its operation is kept apart from the forward patch's (operation_id), so the
-- loop can tell which of the two it is following after a kill -9 or a failover.
ALTER TABLE rollout_games ADD COLUMN back_operation_id bigint;
