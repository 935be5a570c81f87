"""The daemon's list answers decoded one element at a time (observed/jsonarray.py).

At 100,000 units a list answer is over 100 MiB of JSON; one ``json.loads`` of it is one C call that
holds the GIL for seconds, so the event loop (and its lease renewal) waits as long even though the
call runs in an executor thread. ``decode_array`` decodes the same answer element by element, and the
interpreter can switch threads between two elements."""

from __future__ import annotations

import gc
import json
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from observed.jsonarray import decode_array

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)


@given(st.lists(json_values, max_size=20), st.sampled_from(["", " ", "\n  ", "\t"]))
def test_it_decodes_what_json_loads_decodes(values, ws):
    raw = json.dumps(values, indent=2 if ws == "\n  " else None)
    assert decode_array((ws + raw + ws).encode()) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"", b"{}", b"[", b"[1,", b"[1 2]", b"[1,]", b"[,1]", b"[1] x", b"[1]]", b"nul",
                                 b"\xff[]", b'["\xff"]'])
def test_what_is_not_one_json_array_is_refused(raw):
    with pytest.raises(ValueError):
        decode_array(raw)


def longest_wait_of_another_thread(decode, raw: bytes) -> tuple[float, float, object]:
    """Decode ``raw`` while another thread keeps time: (the decode's seconds, the longest the other thread
    waited between two of its steps meanwhile, what was decoded)."""
    stamps: list[float] = []
    done = threading.Event()

    def other() -> None:
        while not done.is_set():
            stamps.append(time.perf_counter())
            for _ in range(200):  # a little Python work, then the GIL may pass again
                pass

    t = threading.Thread(target=other)
    t.start()
    # The cyclic GC may run finalizers (Python code, where the GIL can pass) in the middle of any
    # allocation: off, the two decoders are compared as they are.
    gc.disable()
    try:
        while len(stamps) < 10:
            time.sleep(0.001)
        t0 = time.perf_counter()
        decoded = decode(raw)
        t1 = time.perf_counter()
    finally:
        gc.enable()
        done.set()
        t.join()
    inside = [t0] + [s for s in stamps if t0 <= s <= t1] + [t1]
    return t1 - t0, max(b - a for a, b in zip(inside, inside[1:], strict=False)), decoded


def test_another_thread_is_not_held_up_while_a_large_answer_is_decoded():
    entry = {"Id": "a" * 64, "Names": ["/galaxy-game-g1"], "Labels": {f"k{i}": "v" * 40 for i in range(8)},
             "NetworkSettings": {"Networks": {"galaxy": {"IPAddress": "10.0.0.2", "Gateway": "10.0.0.1"}}}}
    raw = json.dumps([entry] * 60_000).encode()  # about 37 MB
    # The measure itself: json.loads holds the GIL from the first byte to the last.
    took, longest, _ = longest_wait_of_another_thread(json.loads, raw)
    assert longest > 0.5 * took, (took, longest)
    took, longest, decoded = longest_wait_of_another_thread(decode_array, raw)
    assert isinstance(decoded, list) and len(decoded) == 60_000 and decoded[-1] == entry
    # Between two elements the interpreter hands the GIL over (every 5 ms by default): the other thread
    # waits a few milliseconds at a time, not the whole decode.
    assert longest < 0.25 * took, f"the other thread waited {longest:.3f} s of a {took:.3f} s decode"
