"""What a game's unit should be: its ``ContainerSpec`` built from the record and the settings, and the
spec hash a running unit must carry (cached: a resync asks for every game)."""

from __future__ import annotations

from controller.config import Settings
from desired.model import RuntimeRecord, container_name
from observed.model import ContainerSpec

_CACHE_LIMIT = 200_000


def build_spec(settings: Settings, record: RuntimeRecord, *, database: str = "", epoch: int = 0) -> ContainerSpec:
    assert record.desired_image_ref
    return ContainerSpec(
        name=container_name(record.game_id),
        image=record.desired_image_ref,
        game_id=record.game_id,
        instance=settings.leadership.instance,
        network=settings.runtime.docker_network,
        state_path=record.state_path,
        state_target=settings.engine.engine_state_dir,
        env={
            "GAME_ID": record.game_id,
            "ENGINE_PORT": str(settings.engine.engine_port),
            "ENGINE_STATE_DIR": settings.engine.engine_state_dir,
        },
        memory_bytes=settings.engine.engine_memory,
        nano_cpus=settings.engine.engine_nano_cpus,
        pids_limit=settings.engine.engine_pids,
        generation=record.generation,
        spec_revision=record.spec_revision,
        user=settings.engine.engine_user,
        node=record.node_id,
        avoid_nodes=record.avoid_nodes,
        read_only=settings.engine.engine_read_only,
        tmpfs_bytes=settings.engine.engine_tmpfs,
        disk_bytes=settings.engine.engine_disk,
        database=database,
        epoch=epoch,
        # The unit's own stop timeout (an engine version's replaces it at the create): what dockerd gives the
        # engine when it stops it itself (its own shutdown without live-restore, a host's, a docker stop).
        stop_grace=settings.runtime.stop_grace,
    )


class Specs:
    """Specs for one controller's settings and database; the wanted spec hash of each record, cached."""

    def __init__(self, settings: Settings, database: str = "") -> None:
        self.settings = settings
        self.database = database  # the identity uid of the database, on every unit's labels
        self._hashes: dict[tuple[str, str, str, int], str] = {}

    def build(self, record: RuntimeRecord, epoch: int) -> ContainerSpec | None:
        """The spec of the unit the record asks for, or None when it asks for none."""
        if not record.desired_image_ref:
            return None
        return build_spec(self.settings, record, database=self.database, epoch=epoch)

    def want_hash(self, record: RuntimeRecord) -> str | None:
        """The spec hash a record's container should carry; cached, since a resync asks for every game
        and the spec changes only with the image, the state path or the spec revision."""
        if not record.desired_image_ref:
            return None
        key = (record.game_id, record.desired_image_ref, record.state_path, record.spec_revision)
        found = self._hashes.get(key)
        if found is None:
            if len(self._hashes) > _CACHE_LIMIT:
                self._hashes.clear()
            found = self._hashes[key] = build_spec(self.settings, record).spec_hash
        return found
