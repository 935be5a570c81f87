"""Whether an exit was a daemon restart's doing (observed/restarts.py), and the Docker backend's use
of it, without a daemon: from the daemon's lifecycle, never from the exit code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from observed.docker import DockerBackend
from observed.model import LABEL_GAME_ID, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY, ObservedContainer
from observed.restarts import Gap, stopped_by_daemon

T = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)  # the daemon's event stream ended (it exited)
S = timedelta(seconds=1)
BACK = T + 2 * S  # it answered again
CONNECTED = T - 3600 * S  # an event stream connected an hour before


def decide(finished_at, *, gaps=(), now=T + 60 * S, accepting=True, stream_since=None, started_before=None,
           clock=timedelta(), clock_slack=timedelta(seconds=0.1)):
    return stopped_by_daemon(finished_at, gaps=list(gaps), now=now, accepting=accepting, stream_since=stream_since,
                             clock=clock, started_before=started_before, clock_slack=clock_slack)


@pytest.mark.parametrize("before_the_end", [0.05, 10, 15, 59])
def test_an_exit_while_the_daemon_was_stopping_is_the_daemons(before_the_end):
    """A stopping dockerd answers on, and SIGKILLs an engine deaf to SIGTERM after its stop timeout
    (10 s), up to its shutdown timeout before its stream ends: the exit is the daemon's."""
    gap = Gap(T, BACK)
    assert decide(T - before_the_end * S, gaps=[gap], stream_since=BACK) is True


def test_an_exit_while_the_daemon_was_away_or_restoring_is_the_daemons():
    assert decide(T + S, gaps=[Gap(T, BACK)], stream_since=BACK) is True
    # A restarted daemon stops what survived it before it answers: before BACK, on our clock.
    assert decide(BACK - S / 5, gaps=[Gap(T, BACK)], stream_since=BACK) is True
    # Seconds after it answered again is a crash; with the clocks' difference unknown, 5 s are allowed.
    assert decide(BACK + 2 * S, gaps=[Gap(T, BACK)], stream_since=BACK) is False
    assert decide(BACK + 4 * S, gaps=[Gap(T, BACK)], stream_since=BACK, clock=None) is True
    assert decide(T + 50 * S, gaps=[Gap(T)], now=T + 50 * S, accepting=False, stream_since=None) is True


def test_an_exit_long_before_or_after_a_gap_is_the_engines_when_the_stream_vouches_for_the_daemon():
    assert decide(T - 120 * S, gaps=[Gap(T, BACK)], stream_since=CONNECTED) is False  # an older gap
    assert decide(BACK + 30 * S, gaps=[Gap(T, BACK)], stream_since=BACK) is False


def test_a_daemon_refusing_new_connections_is_stopping_now():
    """No gap seen yet (the pooled connection still answers), but a new connection is refused: the
    daemon has begun to stop its containers, and a recent exit is its doing."""
    now = T + 20 * S
    assert decide(T + 19 * S, now=now, accepting=False, stream_since=CONNECTED) is True
    assert decide(now - 600 * S, now=now, accepting=False, stream_since=CONNECTED) is False  # long before


def test_an_exit_with_the_stream_connected_since_before_and_the_daemon_accepting_is_a_crash():
    assert decide(T, stream_since=CONNECTED) is False
    assert decide(T, stream_since=CONNECTED, clock=None) is None  # its start cannot be put on the daemon's clock
    assert decide(T + 30 * S, stream_since=T + 10 * S, clock=30 * S) is None  # the daemon's clock 30 s ahead
    assert decide(T + 30 * S, stream_since=T + 10 * S, clock=-30 * S) is False
    assert decide(T, stream_since=T - S / 2) is False
    assert decide(T, stream_since=T - S / 20) is None  # too close to tell apart
    assert decide(T, stream_since=T - S / 2, clock_slack=S) is None  # the clocks known only to a second


def test_a_restart_nobody_saw_is_told_by_an_engine_that_outlived_the_exit():
    """The stream connected after the exit (this process was down, or reconnected): without
    live-restore no engine survives a daemon restart, so one still running from before the exit
    proves the daemon has run since; none at all leaves it the daemon's (the cheaper mistake)."""
    assert decide(T, stream_since=T + 30 * S) is None
    assert decide(T, stream_since=None) is None
    assert decide(T, stream_since=T + 30 * S, started_before=True) is False
    assert decide(T, stream_since=T + 30 * S, started_before=False) is True


def test_an_exit_without_a_time_cannot_be_placed():
    assert decide(None, gaps=[Gap(T)], accepting=False) is False


# --------------------------------------------------------------------------- the Docker backend
LABELS = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: "default", LABEL_GAME_ID: "g1"}


def container(cid: str, state: str, *, exit_code=None, finished_at=None, started_at=None,
              created_at=T - 7200 * S) -> ObservedContainer:
    return ObservedContainer(id=cid, name=f"galaxy-game-{cid}", image="galaxy/engine-stub:1.0", state=state,
                             labels=LABELS, exit_code=exit_code, finished_at=finished_at, started_at=started_at,
                             created_at=created_at)


def backend(accepting: bool, others: list[ObservedContainer] = (),
            clock: tuple[timedelta, timedelta] | None = (timedelta(), timedelta())) -> DockerBackend:
    b = DockerBackend(instance="default", network="unused")  # no daemon contacted
    b.probes = 0  # type: ignore[attr-defined]

    def accepts() -> bool:
        b.probes += 1  # type: ignore[attr-defined]
        return accepting

    b._accepts_connections = accepts  # type: ignore[method-assign]

    async def clock_difference():
        return clock

    b._clock_difference = clock_difference  # type: ignore[method-assign]

    async def list_managed():
        return list(others)

    async def inspect(cid):
        return next((c for c in others if c.id == cid), None)

    b.list_managed = list_managed  # type: ignore[method-assign]
    b.inspect = inspect  # type: ignore[method-assign]
    return b


@pytest.mark.parametrize("exit_code", [0, 143, 137, 3])
async def test_whatever_the_exit_code_an_exit_in_a_daemon_gap_is_the_daemons(exit_code):
    """Issue 21: a SIGKILL (137) from a stopping dockerd used to count as a crash."""
    b = backend(accepting=True)
    now = datetime.now(UTC)
    b.daemon_gaps.append(Gap(now - 5 * S, now - 2 * S))
    b._stream_since = now - 2 * S
    c = container("a", "exited", exit_code=exit_code, finished_at=now - 6 * S)
    assert await b.stopped_by_daemon(c) is True


@pytest.mark.parametrize("exit_code", [0, 143, 137, 3])
async def test_whatever_the_exit_code_an_exit_under_a_daemon_that_stayed_is_a_crash(exit_code):
    b = backend(accepting=True)
    now = datetime.now(UTC)
    b._stream_since = now - 600 * S
    c = container("a", "exited", exit_code=exit_code, finished_at=now - S)
    assert await b.stopped_by_daemon(c) is False


async def test_a_refused_connection_opens_a_gap():
    b = backend(accepting=False)
    now = datetime.now(UTC)
    b._stream_since = now - 600 * S  # the stream still delivers: the daemon is stopping, not gone
    c = container("a", "exited", exit_code=137, finished_at=now - S)
    assert await b.stopped_by_daemon(c) is True
    assert b._unreachable_since is not None


async def test_without_a_stream_from_before_an_engine_that_outlived_the_exit_decides():
    now = datetime.now(UTC)
    exited = container("a", "exited", exit_code=137, finished_at=now - 30 * S)
    survivor = container("b", "running", started_at=now - 3600 * S)
    assert await backend(True, [exited, survivor]).stopped_by_daemon(exited) is False
    restarted = container("b", "running", started_at=now - 10 * S)  # started again after the exit
    assert await backend(True, [exited, restarted]).stopped_by_daemon(exited) is True
    assert await backend(True, [exited]).stopped_by_daemon(exited) is True


async def test_the_stream_vouches_on_the_daemons_clock():
    """A daemon whose clock is 30 s ahead: an exit it times 10 s after our stream connected (on our
    clock) happened 20 s before it; the stream cannot vouch for the daemon then."""
    now = datetime.now(UTC)
    exited = container("a", "exited", exit_code=3, finished_at=now + 10 * S)
    b = backend(True, [exited], clock=(30 * S, timedelta()))
    b._stream_since = now
    assert await b.stopped_by_daemon(exited) is True  # no engine outlived it: the daemon's
    b = backend(True, [exited], clock=(-30 * S, timedelta()))
    b._stream_since = now
    assert await b.stopped_by_daemon(exited) is False
    b = backend(True, [exited], clock=None)  # the difference not known: the stream does not vouch
    b._stream_since = now - 600 * S
    assert await b.stopped_by_daemon(exited) is True


async def test_one_accepted_connection_after_the_exits_serves_them_all():
    """After a daemon restart every engine exited before the first probe: one probe, not one each;
    an exit after that probe is probed again (the daemon may have begun to stop since)."""
    now = datetime.now(UTC)
    b = backend(True)
    b._stream_since = now - 600 * S
    for n in range(3):
        assert await b.stopped_by_daemon(container(f"x{n}", "exited", exit_code=137, finished_at=now - 30 * S)) is False
    assert b.probes == 1  # type: ignore[attr-defined]
    assert await b.stopped_by_daemon(container("y", "exited", exit_code=3, finished_at=now + 5 * S)) is False
    assert b.probes == 2  # type: ignore[attr-defined]


async def test_nothing_is_started_while_the_daemon_refuses_new_connections():
    """A stopping dockerd still starts a container on a connection it had, and the half-started
    container cannot be started after the restart ("task already exists"): once a probe was
    refused, starts and creates wait for a new connection to be accepted."""
    from observed.errors import BackendUnavailable

    now = datetime.now(UTC)
    b = backend(False)
    b._stream_since = now - 600 * S
    assert await b.stopped_by_daemon(container("a", "exited", exit_code=137, finished_at=now - S)) is True
    with pytest.raises(BackendUnavailable, match="stopping"):
        await b.start("a")
    with pytest.raises(BackendUnavailable, match="stopping"):
        await b.create(None)  # type: ignore[arg-type]  # refused before the spec is looked at
    b._stream_connected()  # the restarted daemon accepted the event stream's new connection
    assert b._stopping_since is None
