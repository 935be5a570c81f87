-- On a Swarm backend a game's state directory lives on one node: the game is pinned to the node
-- that first ran it (a placement constraint), recorded here.
ALTER TABLE runtime_records ADD COLUMN node_id text CHECK (node_id <> '');
