"""Configuration from the environment, by the one table of settings (``controller.config_table``).

``Settings.from_env`` reads each group's variables in the table's order. A bad value raises
``ConfigError`` whose message is one line starting with the variable's name; ``rtmanager`` prints it
and exits with status 2. Components take the group they need; ``Settings`` holds the groups.
``python -m controller.config --markdown`` prints the README's settings table.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.config_table import (
    ELSEWHERE,
    Backend,
    DatabaseSettings,
    EngineSettings,
    HttpSettings,
    ImageSettings,
    LeadershipSettings,
    LogFormat,
    LoggingSettings,
    LogLevel,
    ProbeAddress,
    RuntimeSettings,
    StorageSettings,
    StreamSettings,
    Var,
    VersionPolicy,
)
from controller.config_values import ConfigError
from desired.jobs import RecordDefaults

__all__ = ["VARIABLES", "Backend", "ConfigError", "DatabaseSettings", "EngineSettings", "HttpSettings",
           "ImageSettings", "LeadershipSettings", "LogFormat", "LogLevel", "LoggingSettings", "ProbeAddress",
           "RuntimeSettings", "Settings", "StorageSettings", "StreamSettings", "Var", "VersionPolicy", "markdown"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every group; the reconciler and the CLI take the whole, other components their group."""

    database: DatabaseSettings
    leadership: LeadershipSettings
    streams: StreamSettings
    images: ImageSettings
    engine: EngineSettings
    runtime: RuntimeSettings
    storage: StorageSettings
    http: HttpSettings
    logging: LoggingSettings

    @property
    def record_defaults(self) -> RecordDefaults:
        return RecordDefaults(docker_network=self.runtime.docker_network, state_root=self.storage.state_root,
                              engine_port=self.engine.engine_port)

    def __getattr__(self, name: str) -> Any:
        """``settings.foo`` for ``settings.<group>.foo``, for code not yet given its group (the reconciler)."""
        group = GROUP_OF.get(name)
        if group is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(getattr(self, group), name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        groups: dict[str, Any] = {}
        for group, kind in GROUPS.items():
            values: dict[str, Any] = {}
            for f in dataclasses.fields(kind):
                var: Var = f.metadata["var"]
                raw = env.get(var.name, var.default).strip()
                try:
                    values[f.name] = var.parser.conv(raw)
                except (ValueError, TypeError) as exc:
                    detail = f" ({exc})" if str(exc) and "invalid literal" not in str(exc) else ""
                    shown = "" if var.secret else f", got {raw!r}"  # URLs may carry passwords
                    raise ConfigError(f"{var.name}: {var.parser.rule}{shown}{detail}") from None
            if group == "streams" and not values["consumer_name"]:
                values["consumer_name"] = f"{groups['leadership'].instance}-{socket.gethostname()}"
            groups[group] = kind(**values)
        return cls(**groups)


GROUPS: dict[str, type] = {name: typing.get_type_hints(Settings)[name] for name in
                           (f.name for f in dataclasses.fields(Settings))}
GROUP_OF = {f.name: group for group, kind in GROUPS.items() for f in dataclasses.fields(kind)}
VARIABLES: tuple[Var, ...] = tuple(f.metadata["var"] for kind in GROUPS.values() for f in dataclasses.fields(kind))


def markdown() -> str:
    """The README's settings table: one table per group, in the table's order."""
    out = []
    for group, kind in GROUPS.items():
        out += ["", f"**{group.capitalize()}.** {kind.__doc__}", "", "| variable | default | meaning |",
                "|---|---|---|"]
        for f in dataclasses.fields(kind):
            v: Var = f.metadata["var"]
            default = f"`{v.shown or v.default}`" if (v.shown or v.default) else "empty"
            out.append(f"| `{v.name}` | {default} | {v.help} |")
        out += [f"| `{name}` | {default} | {help} |" for name, default, help in ELSEWHERE.get(group, [])]
    return "\n".join(out[1:]) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m controller.config --markdown")
    sys.stdout.write(markdown())
