"""A JSON array decoded one element at a time: the daemon's list answers (``GET /containers/json``,
``/services``, ``/tasks``).

At 100,000 units such an answer is over 100 MiB. ``json.loads`` decodes it in one C call that holds
the GIL from the first byte to the last (seconds), so the event loop waits as long even though the
call runs in an executor thread: no lease renewal, no probe, no job meanwhile. Decoded element by
element, the interpreter may hand the GIL over between two elements, and the loop waits a few
milliseconds at a time instead. The result is what ``json.loads`` gives; anything but one JSON array
(UTF-8) raises ``ValueError``, as ``json.loads`` does.

``iter_array`` hands the elements over one at a time, so a caller that turns each into something
smaller keeps only that: decoded whole first, every element's dicts are alive at once (at 100,000
containers about five times the answer's size, a peak the process keeps long after).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"


def decode_array(raw: bytes | str) -> list[Any]:
    return list(iter_array(raw))


def iter_array(raw: bytes | str) -> Iterator[Any]:
    """The array's elements in order; a malformed array raises ``ValueError`` when the iteration
    reaches the fault (elements before it may have been handed over already)."""
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
    if i < end and text[i] == "]":
        i += 1
    else:
        while True:
            value, i = _DECODER.raw_decode(text, i)  # one element: a short C call
            yield value
            del value
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
