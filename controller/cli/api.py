"""The REST API as the CLI's REST commands call it: where, with which token, and its errors in one line.

``RTMANAGER_API_URL`` (default ``http://127.0.0.1:$RTMANAGER_HTTP_PORT``, or ``--url``) and the bearer
token of ``RTMANAGER_API_TOKEN`` (or ``--token-file``). Nothing of the controller's configuration is
read, so that the commands run from any host that reaches the API.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from controller.cli.common import fail

SLACK = 30.0  # seconds a request may take beyond the job's own ?wait=
CONNECT = 10.0  # seconds at most to look the API's name up and connect (within the call's own bound)


class ApiError(Exception):
    """The call did not get an answer (the server is unreachable, or answered something that is not JSON)."""


class AnswerLost(ApiError):
    """A request that changes something was sent and its answer did not come (a timeout, a cut connection): it
    may have been applied. Exit status 3, as a job whose result did not come in time."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any

    @property
    def error(self) -> str:
        """The server's one-line explanation of a refusal."""
        if isinstance(self.body, dict):
            message = self.body.get("error") or self.body.get("error_message")
            if message:
                return f"{message} (HTTP {self.status})"
        return f"HTTP {self.status}"


def add_api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the REST API (default: RTMANAGER_API_URL, else http://127.0.0.1:"
                                      "$RTMANAGER_HTTP_PORT)")
    parser.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE "
                                                             "(default: RTMANAGER_API_TOKEN)")


def api_switch() -> argparse.ArgumentParser:
    """A parent parser: ``--api`` (through the REST API, not the database) and where the API is."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--api", action="store_true", help="through the REST API instead of the database "
                                                            "(RTMANAGER_API_URL, RTMANAGER_API_TOKEN)")
    add_api_options(parent)
    return parent


def target(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(base URL, token); ValueError with the reason when there is no token."""
    env = dict(os.environ) if environ is None else environ
    url = args.url or env.get("RTMANAGER_API_URL") or f"http://127.0.0.1:{env.get('RTMANAGER_HTTP_PORT', '8090')}"
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    else:
        token = env.get("RTMANAGER_API_TOKEN", "").strip()
    if not token:
        raise ValueError("no token: set RTMANAGER_API_TOKEN or pass --token-file")
    return url.rstrip("/"), token


class ApiClient:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, *, query: dict[str, str] | None = None,
                   body: dict[str, Any] | None = None, timeout: float | None = None,
                   headers: dict[str, str] | None = None) -> Answer:
        """``timeout``: seconds for the whole call (SLACK by default). A change (not a GET) whose answer did not
        come once it was sent (a timeout, a cut connection, a proxy's 502 or 504 or another error page of a
        proxy's) is ``AnswerLost``: it may have been applied. One that never left is ApiError "cannot reach"."""
        assert self._session is not None, "use the client as an async context manager"
        total = SLACK if timeout is None else timeout
        changes = method not in ("GET", "HEAD")
        try:
            # connect (a name lookup, the connection) ends before the whole call can: a timeout there never left
            async with self._session.request(method, self.url + path, params=query, json=body, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=total,
                                                                           connect=min(CONNECT, total / 2))) as resp:
                text = await resp.text()
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # never sent
            raise ApiError(f"cannot reach {self.url}: {exc.__class__.__name__}: {exc}".rstrip(": ")) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not changes:
                raise ApiError(f"cannot reach {self.url}: {exc.__class__.__name__}: {exc}".rstrip(": ")) from None
            raise self._lost(method, path, exc.__class__.__name__) from None
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = ValueError
        if changes and (resp.status in (502, 504) or (resp.status >= 500 and not isinstance(parsed, dict))):
            raise self._lost(method, path, f"HTTP {resp.status} from what stands between (a proxy)")
        if parsed is ValueError:
            raise ApiError(f"{method} {path}: HTTP {resp.status} with a body that is not JSON: "
                           f"{text[:200]!r}") from None
        return Answer(resp.status, parsed)

    @staticmethod
    def _lost(method: str, path: str, why: str) -> AnswerLost:
        game = path.split("/")[4] if path.startswith("/api/v1/runtimes/") and path.count("/") >= 5 else None
        where = f"`rtmanager operations {game}`" if game else "GET /api/v1/operations"
        return AnswerLost(f"{method} {path} was sent and its answer was lost ({why}): it may have been applied; "
                          f"see {where} before sending it again")


async def with_api(args: argparse.Namespace, command: Callable[[ApiClient], Awaitable[int]]) -> int:
    """Run one REST command with a client for ``args``' API. Exit status 2 when there is no token, 1 (and
    the reason in one line) when the API gives no answer; otherwise the command's own."""
    try:
        url, token = target(args)
    except (ValueError, OSError) as exc:
        return fail(args.command, str(exc), 2)
    try:
        async with ApiClient(url, token) as client:
            return await command(client)
    except AnswerLost as exc:
        return fail(args.command, str(exc), 3)
    except ApiError as exc:
        return fail(args.command, str(exc))


def refused(command: str, answer: Answer, prefix: str = "") -> int:
    """A refusal in one line: exit status 2 for a bad request (HTTP 400), 1 for anything else."""
    return fail(command, prefix + answer.error, 2 if answer.status == 400 else 1)
