"""Text that came from an engine or from Docker, made safe once, at the adapter boundary.

Log tails, exit details and daemon error messages end up in Postgres (text and
jsonb refuse NUL), in the results stream and in logs. Whatever bytes an engine
prints, what leaves ``observed/`` is valid UTF-8 without NUL or other control
characters (newlines and tabs kept), capped in length.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
_KEEP = {"\n", "\t"}


def safe_text(value: bytes | str | None, limit: int = 2000, *, keep_tail: bool = False) -> str:
    """Valid UTF-8, no NUL or control characters, at most ``limit`` characters.

    ``keep_tail`` keeps the end of a long text (log tails: the last lines matter)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    else:
        # Lone surrogates (from surrogateescape decoding) cannot be encoded as UTF-8.
        text = value.encode("utf-8", errors="replace").decode("utf-8") if _has_surrogates(value) else value
    if any(_bad(ch) for ch in text):
        text = "".join(REPLACEMENT if _bad(ch) else ch for ch in text)
    if len(text) > limit:
        text = ("…" + text[-(limit - 1):]) if keep_tail else (text[: limit - 1] + "…")
    return text


def _bad(ch: str) -> bool:
    return (ch < " " and ch not in _KEEP) or ch == "\x7f"


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)
