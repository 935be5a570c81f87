"""A look at an ``rtmanager run`` process over HTTP: a plain GET, and the count of its full resyncs
(``rtmanager_resync_total``), the counter a test waits on to say "after N chances to act"."""

from __future__ import annotations

import re
import urllib.error
import urllib.request


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def resyncs(base: str) -> float:
    _, text = get(f"{base}/metrics")
    m = re.search(r'^rtmanager_resync_total\{result="ok"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0
