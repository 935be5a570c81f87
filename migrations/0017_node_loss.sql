-- A Swarm node that is lost is not an engine crash: the status node_lost (its engine's fate is
-- unknown), when it was seen so, and the nodes a game's unit must avoid once it was moved off one.
ALTER TABLE runtime_records DROP CONSTRAINT runtime_records_status_check;
ALTER TABLE runtime_records ADD CONSTRAINT runtime_records_status_check CHECK (status IN (
    'starting', 'running', 'generation_in_progress', 'generation_failed', 'engine_unreachable', 'finished',
    'node_lost', 'stopped', 'removed'));

ALTER TABLE runtime_records
    ADD COLUMN node_lost_since timestamptz CHECK (node_lost_since IS NULL OR status = 'node_lost'),
    ADD COLUMN avoid_nodes     text[] NOT NULL DEFAULT '{}';
