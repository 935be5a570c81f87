"""Named API tokens with a role, compared in constant time, reloaded without a restart.

A token is ``name role secret``: ``read`` reads, ``operate`` also submits jobs to games, ``admin``
also changes the engine-version registry, rollouts and drains, and removes games (cleanup).
``gateway`` stands apart: it reaches the engine pass-through (controller/engine_proxy.py) and nothing
else, and no other role reaches the pass-through (controller/access.py, ``allows``).
They come from

* ``RTMANAGER_API_TOKENS_FILE``: one token a line, ``NAME ROLE TOKEN`` or ``NAME ROLE sha256:HEX``
  (the SHA-256 of the token, so the file need not hold the secret); blank lines and ``#`` comments are
  skipped. A JSON list of ``{"name", "role", "token" | "sha256"}`` objects is read as well;
* ``RTMANAGER_API_TOKEN``: one more token, ``admin``, named ``default`` (the single token of earlier
  versions keeps working).

The file is read again on SIGHUP and when its modification time, size or inode changes: a file that
does not parse keeps the tokens in force and logs one line (never a secret); at start-up it stops
the process (``ConfigError``, naming the variable).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("rtmanager.tokens")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")
HASH_PATTERN = re.compile(r"sha256:([0-9a-f]{64})")
MIN_TOKEN = 16
MAX_TOKEN = 4096
MAX_FILE = 1 << 20
DEFAULT_NAME = "default"  # RTMANAGER_API_TOKEN's name


class Role(enum.IntEnum):
    """Ordered from READ up: each of those may do what the ones below it may. GATEWAY is outside
    the order (``controller.access.allows``): it is below READ only so that ``<`` never lets it in."""

    GATEWAY = 0
    READ = 1
    OPERATE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, raw: str) -> Role:
        for role in cls:
            if raw == role.label:
                return role
        # What was given is not shown: in a line whose columns are swapped it is the secret.
        raise InvalidTokens("the role (the second column) is not one of read, operate, admin, gateway")


class InvalidTokens(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    name: str
    role: Role
    digest: bytes  # SHA-256 of the secret: never the secret itself


def digest(secret: str | bytes) -> bytes:
    raw = secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else secret
    return hashlib.sha256(raw).digest()


def _secret_digest(token: Any, hashed: Any) -> bytes:
    if (token is None) == (hashed is None):
        raise InvalidTokens("give either the token or sha256:HEX")
    if hashed is not None:
        m = HASH_PATTERN.fullmatch(hashed) if isinstance(hashed, str) else None
        if m is None:
            raise InvalidTokens("the hash must be sha256: and 64 lower-case hex digits")
        return bytes.fromhex(m.group(1))
    if not isinstance(token, str) or not MIN_TOKEN <= len(token) <= MAX_TOKEN or not token.isprintable() \
            or any(c.isspace() for c in token):
        raise InvalidTokens(f"the token must be {MIN_TOKEN} to {MAX_TOKEN} printable characters without spaces")
    return digest(token)


def _entry(where: str, name: Any, role: Any, token: Any, hashed: Any) -> Token:
    """One token. Its errors name ``where`` it is (a line, an entry), never what a column holds: a line whose
    columns are swapped holds the secret where the name or the role should be."""
    try:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidTokens("a token name must be 1-64 characters of A-Z a-z 0-9 . _ @ : - (a letter or "
                                "digit first)")
        if not isinstance(role, str):
            raise InvalidTokens("the role must be read, operate, admin or gateway")
        return Token(name, Role.parse(role), _secret_digest(token, hashed))
    except InvalidTokens as exc:
        raise InvalidTokens(f"{where}: {exc}") from None


def parse_file(text: str) -> list[Token]:
    """The tokens of a file's text (lines, or a JSON list); ``InvalidTokens`` names the line, never a secret."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the decoder's depth
            raise InvalidTokens(f"not valid JSON (line {getattr(exc, 'lineno', '?')})") from None
        out = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict) or set(item) - {"name", "role", "token", "sha256"}:
                raise InvalidTokens(f"entry {i}: an object of name, role and token or sha256")
            hashed = item.get("sha256")
            if isinstance(hashed, str) and not hashed.startswith("sha256:"):
                hashed = f"sha256:{hashed}"
            out.append(_entry(f"entry {i}", item.get("name"), item.get("role"), item.get("token"), hashed))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise InvalidTokens(f"line {n}: expected NAME ROLE TOKEN (or NAME ROLE sha256:HEX)")
        name, role, secret = parts
        hashed = secret.startswith("sha256:")
        out.append(_entry(f"line {n}", name, role, None if hashed else secret, secret if hashed else None))
    return out


class TokenSet:
    """The tokens in force: ``find`` compares the given secret with every one of them."""

    def __init__(self, tokens: Iterable[Token]) -> None:
        self.tokens = tuple(tokens)
        names: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        for i, t in enumerate(self.tokens, 1):
            if t.name in names:  # by number: a name column may hold a secret (a line with its columns swapped)
                raise InvalidTokens(f"tokens {names[t.name]} and {i} have the same name")
            if t.digest in digests:
                raise InvalidTokens(f"tokens {digests[t.digest]} and {i} have the same secret")
            names[t.name] = i
            digests[t.digest] = i

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def find(self, secret: bytes) -> Token | None:
        """The token whose secret this is, or None. Every token is compared (no early exit), each on
        SHA-256 digests of the same length, so the time says nothing of which one or which prefix matched."""
        given = digest(secret)
        found: Token | None = None
        for t in self.tokens:
            if hmac.compare_digest(given, t.digest):
                found = t
        return found


def load(path: str | None, default_token: str) -> TokenSet:
    """The tokens of the file at ``path`` (if any) and of RTMANAGER_API_TOKEN (if set)."""
    tokens: list[Token] = []
    if path:
        tokens.extend(parse_file(_read(path)))
    if default_token:
        if any(t.name == DEFAULT_NAME for t in tokens):
            raise InvalidTokens(f"the name {DEFAULT_NAME} is RTMANAGER_API_TOKEN's; the file must not use it")
        tokens.append(Token(DEFAULT_NAME, Role.ADMIN, digest(default_token)))
    return TokenSet(tokens)


def _read(path: str) -> str:
    """The file's text. Opened without blocking and read only if it is a regular file: a FIFO (or a
    device) put there would otherwise block start-up, or the event loop on a reload, for ever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidTokens(f"{path} is not a regular file")
            raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise InvalidTokens(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    if len(raw) > MAX_FILE:
        raise InvalidTokens(f"{path} is larger than {MAX_FILE} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidTokens(f"{path} is not UTF-8") from None


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


class TokenSource:
    """The tokens in force, read again from the file on ``reload`` (SIGHUP) or when ``poll`` sees it changed."""

    def __init__(self, path: str | None, default_token: str) -> None:
        self.path = path or None
        self.default_token = default_token
        self._stamp = _stamp(self.path) if self.path else None
        self.current = load(self.path, default_token)  # InvalidTokens at start-up: the caller stops
        self.reloads = 0

    def reload(self) -> bool:
        """Read the file again; on any error keep the tokens in force and log one line. True if reloaded."""
        if self.path is None:
            return False
        self._stamp = _stamp(self.path)
        try:
            tokens = load(self.path, self.default_token)
        except InvalidTokens as exc:
            log.error("RTMANAGER_API_TOKENS_FILE: not reloaded, the tokens in force stay: %s", exc)
            return False
        old = {t.name for t in self.current.tokens}
        self.current = tokens
        self.reloads += 1
        new = {t.name for t in tokens.tokens}
        log.info("RTMANAGER_API_TOKENS_FILE reloaded: %d tokens (added: %s; removed: %s)", len(tokens.tokens),
                 ", ".join(sorted(new - old)) or "none", ", ".join(sorted(old - new)) or "none")
        return True

    def poll(self) -> bool:
        """Reload if the file's modification time, size or inode changed since it was last read."""
        if self.path is None or _stamp(self.path) == self._stamp:
            return False
        return self.reload()
