"""Which role each REST route needs: the one table (docs/security.md prints it).

``read`` reads; ``operate`` changes one game (jobs, its schedule, a snapshot resync); ``admin`` changes
the engine-version registry, rollouts and drains, and removes games (cleanup: the game's state is
disposed of). A route under ``/api/`` that is not in this table is refused to every token (403):
tests/unit/test_tokens.py checks that every route the server registers is here.
"""

from __future__ import annotations

import getpass
import os

from controller.tokens import Role

READ, OPERATE, ADMIN, GATEWAY = Role.READ, Role.OPERATE, Role.ADMIN, Role.GATEWAY
_GAME = "/api/v1/runtimes/{game_id}"
_VERSIONS = "/api/v1/admin/engine-versions"

ROUTE_ROLES: dict[tuple[str, str], Role] = {
    ("GET", "/api/v1/openapi.json"): READ,
    ("GET", "/api/v1/whoami"): READ,  # the token's name and role (the console)
    ("GET", "/api/v1/runtimes"): READ,
    ("GET", _GAME): READ,
    ("GET", _GAME + "/operations"): READ,
    ("GET", "/api/v1/operations"): READ,
    ("GET", "/api/v1/events"): READ,  # the watch API
    ("POST", _GAME + "/start"): OPERATE,
    ("POST", _GAME + "/stop"): OPERATE,
    ("POST", _GAME + "/restart"): OPERATE,
    ("POST", _GAME + "/patch"): OPERATE,
    ("POST", _GAME + "/pause"): OPERATE,
    ("POST", _GAME + "/resume"): OPERATE,
    ("POST", _GAME + "/force-next-turn"): OPERATE,
    ("POST", _GAME + "/reconcile"): OPERATE,
    ("POST", _GAME + "/cleanup"): ADMIN,          # removal of the game and its state: final
    ("PUT", _GAME + "/schedule"): OPERATE,
    ("POST", "/api/v1/snapshots/resync"): OPERATE,
    ("GET", _VERSIONS): READ,
    ("GET", _VERSIONS + "/{version}"): READ,
    ("POST", _VERSIONS): ADMIN,
    ("PATCH", _VERSIONS + "/{version}"): ADMIN,
    ("DELETE", _VERSIONS + "/{version}"): ADMIN,
    ("GET", "/api/v1/drains"): READ,
    ("GET", "/api/v1/drains/{drain_id}"): READ,
    ("POST", "/api/v1/drains"): ADMIN,
    ("POST", "/api/v1/drains/{drain_id}/undrain"): ADMIN,
    ("GET", "/api/v1/rollouts"): READ,
    ("GET", "/api/v1/rollouts/{rollout_id}"): READ,
    ("POST", "/api/v1/rollouts"): ADMIN,
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): ADMIN,
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): ADMIN,
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): ADMIN,
    # The engine proxy (controller/engine_proxy.py). Its status is a read: it changes nothing, and says
    # what the record's turn and phase say, only fresher; the admin token it is asked with stays inside.
    ("GET", _GAME + "/engine/status"): READ,
    **{(method, _GAME + "/engine/proxy/{path}"): GATEWAY for method in ("GET", "POST", "PUT", "PATCH", "DELETE")},
}


def markdown() -> str:
    """The table of docs/security.md (tests/unit/test_tokens.py keeps it the same as ROUTE_ROLES)."""
    rows = ["| call | role |", "|---|---|"]
    rows += [f"| `{method} {path}` | `{role.label}` |" for (method, path), role in ROUTE_ROLES.items()]
    return "\n".join(rows) + "\n"


def allows(role: Role, needed: Role) -> bool:
    """Whether a token of ``role`` may call a route that needs ``needed``: the gateway role and its
    routes only go together; otherwise a role may do what the ones below it may."""
    if role is GATEWAY or needed is GATEWAY:
        return role is needed
    return role >= needed


def required_role(method: str, path: str) -> Role | None:
    """The role a route needs (HEAD as GET), or None: a route nobody may call."""
    return ROUTE_ROLES.get(("GET" if method == "HEAD" else method, path))


def cli_actor() -> str:
    """The operation log's actor of a change made with the ``rtmanager`` command: ``cli:USER``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return "cli:" + "".join(c if c.isascii() and c.isprintable() and c != " " else "?" for c in user)[:64]
