"""Request bodies of the REST API, read as JSON.

Python's decoder raises RecursionError, not ValueError, on arrays or objects nested a few thousand
deep (a few kilobytes, far under the body limit): such a body is as bad as one that is not JSON, a 400
for the route that reads it, never an error of the server."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deep") from None


async def json_body(request: web.Request) -> Any:
    """The body's JSON value; ValueError (UnicodeDecodeError included) when it is not one, or when its
    Content-Type names a charset Python does not know."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ValueError("the body must be sent uncompressed (Content-Encoding is not accepted)")
    try:
        return await request.json(loads=_loads)
    except LookupError:
        raise ValueError("the body's charset is not one Python knows") from None
