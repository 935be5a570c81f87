"""Which up engines a health round probes (pure: no I/O; controller/triggers.py's HealthRound asks).

An engine takes orders only from rtmanager, so an engine nobody asked anything of, whose unit nothing
happened to, has nothing new to say but "I still answer". Such a *steady* engine is probed every
``every``-th round (``RTMANAGER_HEALTH_STEADY_EVERY``); every other up engine every round. Steady means
all of:

* its record is up and healthy, with nothing in flight: ``running``, ``generation_failed`` or
  ``finished``, no failed probe, desired running and converged (a job, a forced or scheduled turn, a
  patch all move the generation), no disruption waiting;
* its last ``STEADY_AFTER`` probes in a row found nothing new (the record was not written);
* the record is the one those probes saw (a fingerprint of what a job, a turn or an observation
  changes), and no event, action or resync finding touched its unit since (the unit cache's count).

Anything else makes the next round probe it, and a probe that fails or finds something new ends its
steadiness. The rounds share the steady engines (by a hash of the game id), so each round probes about
1/``every`` of them rather than all of them every ``every``-th round.

The cost, said in the README: an idle engine that hangs (its process alive, answering nothing) is first
probed within ``every`` rounds instead of one; from that failed probe on it is probed every round, so
it is ``engine_unreachable`` within ``every + RTMANAGER_UNREACHABLE_AFTER - 1`` rounds. An engine that
exits or vanishes is seen as before: by the backend's events, the resync, and the round's own list (a
game whose unit does not run is looked at every round, steady or not).

Memory: one small tuple per steady engine, forgotten when the game is no longer up. A new term (or a
restart) starts with nothing known: its first rounds probe every engine.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from desired.model import DesiredStatus, Health, RuntimeRecord, Status

STEADY_AFTER = 2  # probes in a row that found nothing new before an engine counts as steady
_QUIET = frozenset((Status.RUNNING, Status.GENERATION_FAILED, Status.FINISHED))


def quiet(record: RuntimeRecord) -> bool:
    """The record asks nothing of the engine and says it is well."""
    return (record.status in _QUIET and record.health is Health.HEALTHY and record.probe_failures == 0
            and record.desired_status is DesiredStatus.RUNNING and record.observed_generation == record.generation
            and record.disruption_wait_since is None)


def fingerprint(record: RuntimeRecord) -> int:
    """What a job, a turn or an observation changes in a record, hashed (compared, never stored in full)."""
    return hash((record.generation, record.observed_generation, record.status, record.current_container_id,
                 record.turn, record.phase, record.health, record.admin_api, record.last_op_at,
                 record.health_checked_at, record.last_error_code))


class ProbePacing:
    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self.round = 0
        # game -> (fingerprint, unit touches, quiet probes in a row, round of its last probe done)
        self._seen: dict[str, tuple[int, int, int, int]] = {}

    def start_round(self, up: Iterable[str]) -> None:
        """A new round over these up games; what is known of the others is forgotten."""
        self.round += 1
        up = set(up)
        if any(g not in up for g in self._seen):
            self._seen = {g: s for g, s in self._seen.items() if g in up}

    def due(self, record: RuntimeRecord, touches: int) -> bool:
        """Probe this engine in this round? ``touches``: the unit cache's count for the game now.

        A steady engine is due ``every`` rounds after its last probe that was done: a round that failed
        (an outage cancels its probes) or a probe that raised does not count, so the engine is due
        again at the next round, not ``every`` rounds later."""
        if self.every == 1:
            return True
        seen = self._seen.get(record.game_id)
        if (seen is None or seen[2] < STEADY_AFTER or seen[1] != touches or not quiet(record)
                or seen[0] != fingerprint(record)):
            return True
        return self.round - seen[3] >= self.every

    def probed(self, record: RuntimeRecord, touches: int, steady: bool) -> None:
        """The probe of ``record`` (taken with the unit's count ``touches`` before it) is done: ``steady``
        when it answered and found nothing new (the record was not written)."""
        if self.every == 1:
            return
        if not steady or not quiet(record):
            self._seen.pop(record.game_id, None)
            return
        fp = fingerprint(record)
        seen = self._seen.get(record.game_id)
        streak = seen[2] + 1 if seen is not None and seen[0] == fp and seen[1] == touches else 1
        last = self.round
        if streak == STEADY_AFTER:
            # Steady from now on: its first deferred probe is placed by a hash of the game id, so that
            # engines that became steady together (a start of many, a new term) share the rounds.
            last -= zlib.crc32(record.game_id.encode()) % self.every
        self._seen[record.game_id] = (fp, touches, streak, last)

    def forget(self, game_id: str) -> None:
        """The game's probe failed for a reason of its own (it raised): it is due at every round until
        a probe of it is done."""
        self._seen.pop(game_id, None)
