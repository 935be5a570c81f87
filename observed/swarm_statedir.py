"""A game's state directory on a Swarm, made on the node that will run the game.

The controller talks to one manager; a node's filesystem is reachable only through a task on
that node. So the directory is made by a one-shot *helper service*: one replica, restart
condition ``none``, constrained with ``node.id==<node>``, running as root with every capability
dropped but CHOWN and DAC_OVERRIDE (``chown`` needs CHOWN; DAC_OVERRIDE because the state root is
rtmanager's, uid 10001 mode 0711 (deploy/swarm/prepare.sh), where root is "other" and could not
create a directory without it; never FOWNER: the directory is created with its mode, as root, and
only then given away), a read-only root filesystem, no network, and nothing
mounted but the state root (at ``/rtm-state-root``). Its script makes ``<root>/<name>`` with mode
0700 and gives it to the engine user, and refuses what the Docker backend refuses: a name that is
not one path component directly under the root, a symbolic link, anything there but a directory.
A state root missing on the node is a rejected task (Swarm does not create bind sources): the
start fails with that message, never an engine on an empty state.

The helper runs RTMANAGER_STATE_HELPER_IMAGE: by default ``galaxy/statedir-helper:1``, a static
busybox and nothing else (deploy/statedir-helper/build.sh), loaded on the nodes as the engine images
are; never a game's engine image unless the operator says so (``engine``): the helper runs as root
with DAC_OVERRIDE and the whole state root mounted, where an engine image is otherwise confined to its own
directory (docs/security.md). The image needs ``/bin/sh`` with ``mkdir`` and ``chown``.

A helper task that has not ended when HELPER_WAIT is over (its image still being pulled, a node
slow to take it) is a temporary failure, tried again; only a task the node rejected or that failed
(a script refusal) is a permanent one.

Which node: the game's pin (``spec.node``) when it has one; otherwise rtmanager places the new
game itself, before Swarm does: a node that is ready, active, not lost and not in
``spec.avoid_nodes``, the one with the fewest running engines of this instance (Swarm's own spread
strategy, counted on rtmanager's units only). The service is then created pinned to that node, so
the directory and the engine are on the same node by construction, and the pin is recorded when
the engine runs (as before).

The helper's service is labelled as rtmanager's helper (not with the instance label, so no
resync or task poll ever sees it as a game), named ``galaxy-statedir-<game_id>-<digest>`` (the digest
of the instance and the game: instances sharing a swarm never share a helper; ``helper_name``),
removed once its task ended; one left behind by a kill is removed by the next attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import posixpath
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import docker.errors

from observed.daemon import short_error
from observed.docker import user_ids
from observed.errors import BackendUnavailable, NodeLost, Refused
from observed.model import LABEL_GAME_ID, LABEL_MANAGED_BY, MANAGED_BY, ContainerSpec

if TYPE_CHECKING:
    from observed.swarm import SwarmBackend

log = logging.getLogger("rtmanager.swarm")

LABEL_HELPER = "com.galaxy.helper"
HELPER_PREFIX = "galaxy-statedir-"
MAX_SERVICE_NAME = 63  # Swarm's limit on a service's name (a DNS label)
DIGEST = 12  # hex characters of the instance-and-game digest in a helper's name
MOUNT = "/rtm-state-root"
HELPER_WAIT = 30.0  # seconds for the helper's task to end (then tried again later: not a refusal)
DEFAULT_HELPER_IMAGE = "galaxy/statedir-helper:1"
ENGINE_AS_HELPER = "engine"  # RTMANAGER_STATE_HELPER_IMAGE: the game's own engine image (the operator's choice)
POLL = 0.2
# $1: the directory's name under the root; $2: uid[:gid] to give it to, or "".
SCRIPT = r"""set -eu
d="$0/$1"
if [ ! -d "$0" ] || [ -L "$0" ]; then echo "the state root is not a directory on this node" >&2; exit 3; fi
if [ -L "$d" ]; then echo "refused: $1 is a symbolic link" >&2; exit 3; fi
if [ -e "$d" ] && [ ! -d "$d" ]; then echo "refused: $1 exists and is not a directory" >&2; exit 3; fi
[ -d "$d" ] || mkdir -m 0700 "$d"
if [ -L "$d" ]; then echo "refused: $1 is a symbolic link" >&2; exit 3; fi
if [ -n "$2" ]; then chown -h "$2" "$d"; fi
"""
_LOST_STATES = frozenset({"down", "unknown", "disconnected"})


def node_usable(info: Mapping[str, str]) -> bool:
    """A node a new engine may be placed on: ready and active."""
    return info.get("state") == "ready" and info.get("availability", "active") == "active"


def node_lost(info: Mapping[str, str] | None) -> bool:
    """A node whose engines are out of reach: down, unknown or disconnected to the manager. Not a node
    its operator drained (``node_drained``): that one is up and its engines' state intact. A node never
    seen is not lost (the next read of the list tells)."""
    if info is None:
        return False
    return info.get("state") in _LOST_STATES


def node_drained(info: Mapping[str, str] | None) -> bool:
    """A node that is up but taken out of use by its operator: drained (Swarm availability ``drain``: Swarm
    shuts its tasks down and places none there) or paused (``pause``: its tasks run on, but none is placed
    there, so an engine that exited cannot start again there). Nothing is started on it; its engines did not
    crash and are not lost."""
    return info is not None and not node_lost(info) and info.get("availability") in ("drain", "pause")


def relative_name(state_root: str, path: str) -> str:
    root = posixpath.normpath(state_root)
    name = posixpath.basename(posixpath.normpath(path))
    if (posixpath.dirname(posixpath.normpath(path)) != root or name in ("", ".", "..")
            or not posixpath.isabs(root)):
        raise Refused(f"state path {path} is not directly under {root}")
    return name


def _owner(user: str | None) -> str:
    uid, gid = user_ids(user)
    if uid is None:
        return ""
    return f"{uid}:{gid}" if gid is not None else str(uid)


def helper_name(instance: str, game_id: str) -> str:
    """The helper's service name: ``galaxy-statedir-{game_id}-{digest}``, the game id cut to fit 63
    characters and the digest of the instance and the game id. An attempt removes a leftover helper of
    its name first, so two instances (sharing a swarm) must never name theirs alike; the helper is
    internal, not part of the contract. The same instance and game give the same name again (a
    killed attempt's leftover is found)."""
    digest = hashlib.sha256(f"{instance}\0{game_id}".encode()).hexdigest()[:DIGEST]
    room = MAX_SERVICE_NAME - len(HELPER_PREFIX) - 1 - DIGEST
    return f"{HELPER_PREFIX}{game_id[:room].rstrip('-')}-{digest}"


def helper_spec(state_root: str, spec: ContainerSpec, node: str, image: str, instance: str) -> dict[str, Any]:
    name = relative_name(state_root, spec.state_path)
    return {
        "Name": helper_name(instance, spec.game_id),
        "Labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_HELPER: f"statedir:{instance}", LABEL_GAME_ID: spec.game_id},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": image,
                "Command": ["/bin/sh", "-c", SCRIPT, MOUNT, name, _owner(spec.user)],
                "User": "0:0",
                "Labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_HELPER: f"statedir:{instance}"},
                "Mounts": [{"Type": "bind", "Source": posixpath.normpath(state_root), "Target": MOUNT,
                            "ReadOnly": False}],
                "ReadOnly": True,
                "CapabilityDrop": ["ALL"],
                "CapabilityAdd": ["CAP_CHOWN", "CAP_DAC_OVERRIDE"],
                "Init": False,
            },
            "Resources": {"Limits": {"MemoryBytes": 32 * 1024 * 1024, "Pids": 32}},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "Placement": {"Constraints": [f"node.id=={node}"]},
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "1m", "max-file": "1"}},
        },
        "Mode": {"Replicated": {"Replicas": 1}},
    }


async def pick_node(backend: SwarmBackend, spec: ContainerSpec) -> str:
    """The node a new (unpinned) game goes to: usable, not avoided, with the fewest running engines."""
    filters = backend._labels_filter()
    tasks = await backend._call("tasks", lambda: backend._docker().api.tasks(filters=filters))
    await backend._know_nodes(tasks, force=True)
    load: dict[str, int] = {}
    for t in tasks:
        if t.get("DesiredState") == "running" and t.get("NodeID"):
            load[t["NodeID"]] = load.get(t["NodeID"], 0) + 1
    candidates = [n for n, info in backend._nodes.items() if node_usable(info) and n not in spec.avoid_nodes]
    if not candidates:
        avoided = f" (avoiding {', '.join(a[:12] for a in spec.avoid_nodes)})" if spec.avoid_nodes else ""
        raise NodeLost(f"no Swarm node is ready and active to run {spec.name}{avoided}")
    return min(candidates, key=lambda n: (load.get(n, 0), n))


async def _remove(backend: SwarmBackend, name: str) -> None:
    try:
        await backend._call("remove", lambda: backend._docker().api.remove_service(name))
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        raise BackendUnavailable(f"remove {name}: {short_error(exc)}") from exc


async def make_on_node(backend: SwarmBackend, state_root: str, spec: ContainerSpec, node: str,
                       image: str) -> None:
    """Run the helper on ``node`` and wait for its task to end; Refused with its message when it failed."""
    body = helper_spec(state_root, spec, node, image, backend.instance)
    name = body["Name"]
    await _remove(backend, name)  # one left by a killed attempt (its task, if any, ended or is stopped with it)

    def create_raw() -> str:
        api = backend._docker().api
        res = api._post_json(api._url("/services/create"), data=body)
        return str(api._result(res, json=True)["ID"])

    try:
        service_id = await backend._call("create", create_raw)
    except docker.errors.APIError as exc:
        raise Refused(f"state directory of {spec.name} on node {node[:12]}: {short_error(exc)}") from exc
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HELPER_WAIT
        while True:
            tasks = await backend._call("tasks", lambda: backend._docker().api.tasks(filters={"service": service_id}))
            done = [t for t in tasks if (t.get("Status") or {}).get("State") in
                    ("complete", "failed", "rejected", "shutdown", "orphaned")]
            if done:
                task = done[0]
                status = task.get("Status") or {}
                code = (status.get("ContainerStatus") or {}).get("ExitCode")
                if status.get("State") == "complete" and code in (0, None):
                    log.info("state directory %s made on node %s", spec.state_path, node[:12],
                             extra={"game_id": spec.game_id})
                    return
                detail = str(status.get("Err") or status.get("Message") or status.get("State"))
                logs = await _task_logs(backend, str(task.get("ID")))
                message = f"state directory {spec.state_path} on node {node[:12]}: {logs or detail}"[:500]
                if status.get("State") in ("shutdown", "orphaned"):
                    raise BackendUnavailable(message)  # shut down by Swarm (a drain, a lost node): not an answer
                raise Refused(message)
            if node in await backend.unavailable_nodes():  # lost or drained meanwhile: its task would wait
                raise NodeLost(f"state directory {spec.state_path}: node {node[:12]} is down, unreachable or "
                               "drained")
            if loop.time() > deadline:
                # Still pending or preparing (its image being pulled, say): temporary, tried again later.
                state = ", ".join(sorted({str((t.get("Status") or {}).get("State")) for t in tasks})) or "no task"
                raise BackendUnavailable(f"state directory {spec.state_path} on node {node[:12]}: the helper task "
                                         f"did not end within {HELPER_WAIT:g}s ({state}); tried again later")
            await asyncio.sleep(POLL)
    finally:
        try:
            await _remove(backend, service_id)
        except BackendUnavailable as exc:  # removed by the next attempt
            log.warning("could not remove the state directory helper %s: %s", name, exc.message)


async def _task_logs(backend: SwarmBackend, task_id: str) -> str:
    def logs_raw() -> bytes:
        api = backend._docker().api
        res = api._get(api._url("/tasks/{0}/logs", task_id), params={"stdout": 1, "stderr": 1, "tail": 5},
                       stream=False)
        return bytes(api._get_result_tty(False, res, False))

    try:
        raw = await backend._call("logs", logs_raw)
    except (docker.errors.APIError, BackendUnavailable):
        return ""
    return raw.decode("utf-8", "replace").strip().splitlines()[-1] if raw.strip() else ""
