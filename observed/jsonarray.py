"""A JSON array decoded one element at a time: the daemon's list answers (``GET /containers/json``,
``/services``, ``/tasks``).

At 100,000 units such an answer is over 100 MiB. ``json.loads`` decodes it in one C call that holds
the GIL from the first byte to the last (seconds), so the event loop waits as long even though the
call runs in an executor thread: no lease renewal, no probe, no job meanwhile. Decoded element by
element, the interpreter may hand the GIL over between two elements, and the loop waits a few
milliseconds at a time instead. The result is what ``json.loads`` gives; anything but one JSON array
(UTF-8) raises ``ValueError``, as ``json.loads`` does.
"""

from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"


def decode_array(raw: bytes | str) -> list[Any]:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw  # UnicodeDecodeError is a ValueError
    end = len(text)

    def skip(i: int) -> int:
        while i < end and text[i] in _SPACE:
            i += 1
        return i

    i = skip(0)
    if i >= end or text[i] != "[":
        raise ValueError("the answer is not a JSON array")
    i = skip(i + 1)
    out: list[Any] = []
    if i < end and text[i] == "]":
        i += 1
    else:
        while True:
            value, i = _DECODER.raw_decode(text, i)  # one element: a short C call
            out.append(value)
            i = skip(i)
            if i < end and text[i] == ",":
                i = skip(i + 1)
                continue
            if i < end and text[i] == "]":
                i += 1
                break
            raise ValueError(f"the JSON array is malformed at character {i}")
    if skip(i) != end:
        raise ValueError(f"extra data after the JSON array at character {i}")
    return out
