"""How one configuration value is read: each parser turns the raw string into its value and says,
in one phrase, what it expects (the error line after the variable's name). Pure: no environment."""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from desired.jobs import ImageAllowlist
from desired.storage import MinFree


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Parser:
    conv: Callable[[str], Any]  # raises ValueError (its text, if any, is added to the error line)
    rule: str                   # "must be ..."


STREAM_NAME = re.compile(r"^[A-Za-z0-9:_.-]{1,200}$")
NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MAX_SIZE = 2**63 - 1
MAX_ID = 2**32 - 2  # a uid or gid: 2**32 - 1 is -1 to chown (no change), and past it is no id


def number(lo: float, hi: float, unit: str = "seconds") -> Parser:
    def conv(raw: str) -> float:
        v = float(raw)
        if not lo <= v <= hi:
            raise ValueError(f"out of range {lo}..{hi}")
        return v
    rule = f"must be {unit}, {lo:g} or more" if hi > 86400 else f"must be {unit} in {lo:g}..{hi:g}"
    return Parser(conv, rule)


def integer(lo: int, hi: int, rule: str = "") -> Parser:
    def conv(raw: str) -> int:
        v = int(raw)
        if not lo <= v <= hi:
            raise ValueError(f"out of range {lo}..{hi}")
        return v
    wide = hi >= 10**6
    return Parser(conv, rule or (f"must be an integer, {lo} or more" if wide else f"must be an integer {lo}..{hi}"))


def port(lo: int) -> Parser:
    return integer(lo, 65535, f"must be a port {lo}-65535")


def url(*schemes: str, database_number: bool = False) -> Parser:
    """A URL of one of ``schemes`` with a host (or a unix socket path) and, if any, a port 1-65535;
    with ``database_number``, its path is empty or a database number (Redis': ``/0``)."""
    def conv(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes:
            raise ValueError(f"scheme must be one of {', '.join(schemes)}")
        if not (parts.hostname or (parts.scheme == "unix" and parts.path)):
            raise ValueError("a host (or, for unix://, a socket path) is needed")
        try:
            port = parts.port  # urllib raises for a port that is no number or past 65535
        except ValueError:
            raise ValueError("the port must be a number 1-65535") from None
        if port == 0:
            raise ValueError("the port must be a number 1-65535")
        if database_number and parts.scheme != "unix" and not re.fullmatch(r"/?([0-9]{1,5}/?)?", parts.path):
            raise ValueError("the path must be a database number, such as /0")
        return raw
    return Parser(conv, f"must be a {schemes[0]}:// URL")


OFF_GAME_NETWORK = "off-game-network"
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")  # Docker's service names take _


def _bind_host(raw: str) -> str:
    """An IP address, a host name (whose last label is not all digits: ``999.1.1.1`` is no address) or
    ``off-game-network``. An empty value would bind every address, the engines' network's too."""
    if raw.lower() == OFF_GAME_NETWORK:
        return OFF_GAME_NETWORK
    try:
        ipaddress.ip_address(raw)
        return raw
    except ValueError:
        pass
    labels = raw.removesuffix(".").split(".")
    if (len(raw) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValueError("")
    return raw


BIND_HOST = Parser(_bind_host, "must be an IP address, a host name or off-game-network")


def pattern(regex: re.Pattern[str], rule: str) -> Parser:
    def conv(raw: str) -> str:
        if not regex.fullmatch(raw):  # $ would let a trailing newline through
            raise ValueError("")
        return raw
    return Parser(conv, rule)


def _abspath(raw: str) -> str:
    if not raw.startswith("/") or "\x00" in raw:
        raise ValueError("")
    return os.path.normpath(raw)


def _root(raw: str) -> str:
    path = _abspath(raw)
    if not path.strip("/"):  # / (or //): a game called etc would have /etc for its state directory
        raise ValueError("")
    return path


ABSPATH = Parser(_abspath, "must be an absolute path")
ROOT = Parser(_root, "must be an absolute path other than /")
OPTIONAL_ABSPATH = Parser(lambda raw: _abspath(raw) if raw else None, "must be empty or an absolute path")
ARCHIVE_DIR = Parser(lambda raw: _abspath(raw) if raw else None,
                     "must be empty or an absolute path outside RTMANAGER_STATE_ROOT (or a directory in it whose "
                     "name starts with a dot, other than .backups)")


def archive_dir_allowed(path: str, state_root: str) -> bool:
    """Never where a game's state directory could be: a game_id never starts with a dot."""
    rel = os.path.relpath(path, state_root or "/")
    if rel == "." or not rel.startswith("."):
        return False
    return rel.split(os.sep, 1)[0] != ".backups"  # the copies' tree: dropping a copy would take it


def _urlpath(raw: str) -> str:
    if not raw.startswith("/") or any(c.isspace() for c in raw):
        raise ValueError("")
    return raw


URL_PATH = Parser(_urlpath, "must be a path starting with /")


def _allowlist(raw: str) -> ImageAllowlist:
    al = ImageAllowlist(raw)
    if not al.patterns:
        raise ValueError("at least one pattern is needed")
    return al


ALLOWLIST = Parser(_allowlist, "must list image patterns")
MIN_FREE = Parser(MinFree.parse, "must be bytes (such as 10g) or a percentage (such as 5%)")


def size(least: int, rule: str) -> Parser:
    def conv(raw: str) -> int:
        m = re.fullmatch(r"([0-9]{1,19})([kmgKMG]?)[bB]?", raw)  # ASCII digits: \d takes any script's
        if not m:
            raise ValueError("")
        v = int(m.group(1)) * _UNITS[m.group(2).lower()]
        if v < least:
            raise ValueError(f"at least {least // 1024**2}m")
        if v > MAX_SIZE:  # Docker's sizes are signed 64-bit: a larger one fails every create
            raise ValueError("larger than Docker takes")
        return v
    return Parser(conv, rule)


NANO_CPUS = Parser(lambda raw: int(number(0.01, 1024).conv(raw) * 1e9), "must be CPUs, e.g. 1.5")


def _user(raw: str) -> str | None:
    if raw in ("", "image"):
        return None
    if not re.fullmatch(r"[0-9]{1,10}(:[0-9]{1,10})?", raw) or any(int(i) > MAX_ID for i in raw.split(":")):
        raise ValueError("")
    return raw


USER = Parser(_user, "must be uid, uid:gid or image")


def _flag(raw: str) -> bool:
    if raw.lower() not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError("")
    return raw.lower() in ("1", "true", "yes")


FLAG = Parser(_flag, "must be 0 or 1")


def _token(raw: str) -> str:
    if raw and len(raw) < 16:
        raise ValueError("")
    return raw


TOKEN = Parser(_token, "must be empty or at least 16 characters")
TEXT = Parser(str, "")


def choice(kind: type[enum.StrEnum]) -> Parser:
    """One of an enum's values, in any case."""
    values = [m.value for m in kind]

    def conv(raw: str) -> enum.StrEnum:
        for m in kind:
            if m.value.lower() == raw.lower():
                return m
        raise ValueError("")
    return Parser(conv, "must be " + (", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]))
