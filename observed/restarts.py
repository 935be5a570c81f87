"""Whether an engine's exit was a restart of the Docker daemon's doing: decided from the daemon's
lifecycle (when it went away and came back, whether it is stopping now, how long it has run), never
from the exit code. Pure; the Docker backend gathers the evidence (observed/docker.py).

How a dockerd without live-restore restarts (measured on Docker 20.10): asked to stop, it first
closes its listening socket (new connections are refused), then stops every container: SIGTERM, and
SIGKILL after the container's stop timeout (10 s unless the container sets one). Connections it had
accepted before keep being answered, and its event streams keep reporting the exits, until it
exits; only then do the streams end. A daemon killed outright leaves its containers to be stopped
when it starts again, before it answers. So an engine stopped by a daemon restart may exit 0, 143
or 137, seconds before any call fails, and a SIGKILL says nothing about who sent it.

Times of this process (the gaps, ``now``) are on its own clock, and the margins cover a difference
from the daemon's; the exit's time and ``stream_since`` are on the daemon's.

The risks are not symmetric: a crash put down to the daemon costs one restart not counted; a daemon
restart counted as a crash costs every game on the host a crash, and a few restarts give them all
up. Where the evidence cannot tell, the exit is the daemon's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

# Before a gap: a daemon stops its containers for up to its shutdown timeout (15 s by default, at
# least the longest stop timeout + 5 s) before its streams end; generous, and it covers a clock of
# the daemon's host that is off from ours.
STOP_MARGIN = timedelta(seconds=60)
# After a gap: a restarted daemon stops what survived it before it answers, so an exit it caused
# is never later than its first answer; only how far off the clocks may be. Without the clocks'
# difference measured, LATE_MARGIN.
LATE_SLACK = timedelta(seconds=0.5)
LATE_MARGIN = timedelta(seconds=5)
# The event stream must have been connected this long before an exit to vouch for the daemon
# (the uncertainty of the measured clocks' difference comes on top).
CLOCK_SLACK = timedelta(seconds=0.1)


@dataclass(frozen=True)
class Gap:
    """A time this process lost the daemon: its event stream ended or a call could not reach it
    (``gone``), until it answered again (``back``; None while it does not)."""

    gone: datetime
    back: datetime | None = None


def in_gap(exited: datetime, gaps: Iterable[Gap], now: datetime, late: timedelta = LATE_MARGIN) -> bool:
    """The exit (on this process' clock) falls in the stretch of a gap a daemon restart stops its
    containers in."""
    return any(g.gone - STOP_MARGIN <= exited <= (g.back or now) + late for g in gaps)


def stopped_by_daemon(finished_at: datetime | None, *, gaps: Iterable[Gap], now: datetime, accepting: bool,
                      stream_since: datetime | None, clock: timedelta | None, started_before: bool | None = None,
                      clock_slack: timedelta = CLOCK_SLACK) -> bool | None:
    """True: the engine was stopped by a restart of its daemon (not a crash). False: it exited on its
    own or was killed by someone else (a crash). None: ask again with ``started_before``.

    * ``finished_at``: the exit, on the daemon's clock; ``clock``: the daemon's clock minus ours
      (None: not known), measured to within ``clock_slack``;
    * ``gaps``: the daemon's absences this process saw;
    * ``accepting``: the daemon accepted a new connection after the exit (a stopping daemon does
      not, from the moment it begins to stop its containers);
    * ``stream_since``: since when the event stream has been connected without a break (None: it is
      not): a stream that outlived the exit proves the daemon did not go away since; it vouches
      only with the clocks' difference known;
    * ``started_before``: whether an engine that still runs was started before this exit (None: not
      looked yet). Without live-restore no container survives a daemon restart, so one that did
      proves the daemon has run since before the exit: the look for a restart nobody saw (this
      process was down, or its stream came after the exit).

    An exit without a time cannot be placed against anything: it is the engine's, as before."""
    if finished_at is None:
        return False
    if clock is None:
        exited, late = finished_at, LATE_MARGIN
    else:
        exited, late = finished_at - clock, LATE_SLACK + clock_slack
    if not accepting:
        gaps = [*gaps, Gap(now)]  # the daemon is stopping (or gone) now
    if in_gap(exited, gaps, now, late):
        return True
    if not accepting:
        return False  # an exit long before the daemon began to stop
    if clock is not None and stream_since is not None and stream_since <= exited - clock_slack:
        return False
    if started_before is None:
        return None
    return not started_before
