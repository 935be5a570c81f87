-- Drains: an operator takes the Docker host, or one Swarm node, out of use. Desired state: the
-- leader's drain loop converges it from these rows and the runtime records (never from memory), so
-- a drain goes on after a kill -9 or a failover, and undrain stops it.
--
-- node NULL: the host (Docker backend); else a Swarm node id. At most one drain of a target is
-- active (draining, drained or undraining) at a time.
CREATE TABLE drains (
    id            bigserial PRIMARY KEY,
    node          text CHECK (node IS NULL OR node ~ '^[a-z0-9]{1,64}$'),
    max_parallel  integer NOT NULL CHECK (max_parallel BETWEEN 1 AND 1000),
    deadline_at   timestamptz NOT NULL,
    on_deadline   text NOT NULL CHECK (on_deadline IN ('move', 'stop')),
    local_state   text CHECK (local_state IN ('stop', 'move_without_state')),
    state_shared  boolean NOT NULL,
    status        text NOT NULL CHECK (status IN ('draining', 'drained', 'undraining', 'undrained')),
    source        text NOT NULL,
    created_at    timestamptz NOT NULL,
    drained_at    timestamptz,
    undrain_at    timestamptz,
    undrained_at  timestamptz,
    CONSTRAINT drains_undrain_chk CHECK ((status IN ('undraining', 'undrained')) = (undrain_at IS NOT NULL))
);

CREATE UNIQUE INDEX drains_active_target_key ON drains ((coalesce(node, ''))) WHERE status <> 'undrained';

-- One row per game a drain took: what it did (stop, or move to another node), how far it is, and,
-- for a stop, what the game was (image, pause, schedule) so that undrain starts it again as it was.
-- op_id: the drain's latest stop operation of the game; a stop or cleanup after it is somebody
-- else's (Lobby's, an operator's), and such a game is not brought back.
CREATE TABLE drain_games (
    drain_id      bigint NOT NULL REFERENCES drains (id),
    game_id       text NOT NULL,
    action        text NOT NULL CHECK (action IN ('stop', 'move')),
    state         text NOT NULL CHECK (state IN ('in_progress', 'done', 'restored', 'skipped')),
    forced        boolean NOT NULL DEFAULT false,
    image_ref     text,
    paused        boolean NOT NULL DEFAULT false,
    turn_interval integer NOT NULL DEFAULT 0,
    from_node     text,
    to_node       text,
    generation    bigint NOT NULL,
    op_id         bigint,
    note          text,
    taken_at      timestamptz NOT NULL,
    done_at       timestamptz,
    PRIMARY KEY (drain_id, game_id)
);

CREATE INDEX drain_games_game_idx ON drain_games (game_id);
