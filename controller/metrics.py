"""Prometheus metrics, prefixed ``rtmanager_``, registered on an injected registry.

Names follow controller-runtime's where there is one (reconcile totals and
durations, work queue depth / adds / retries) so that existing dashboards read
naturally.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from desired.errors import TemporaryError
from desired.leader import Fenced

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_FAST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_* (start time, CPU, memory, open files): a start time that keeps changing is rtmanager
        # itself in a crash loop (deploy/prometheus/alerts.yml). Read from /proc at each scrape.
        ProcessCollector(registry=r)
        self.reconciles = Counter("rtmanager_reconcile_total", "Reconciles by action and result",
                                  ["action", "result"], registry=r)
        self.reconcile_seconds = Histogram("rtmanager_reconcile_duration_seconds", "Time of one reconcile",
                                           ["action"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("rtmanager_workqueue_depth", "Keys waiting in the work queue", registry=r)
        self.queue_adds = Counter("rtmanager_workqueue_adds_total", "Keys added to the work queue", registry=r)
        self.queue_retries = Counter("rtmanager_workqueue_retries_total", "Keys re-added after a failure",
                                     registry=r)
        self.jobs = Counter("rtmanager_jobs_received_total", "Job entries read, by stream and outcome",
                            ["stream", "outcome"], registry=r)
        self.results = Counter("rtmanager_results_published_total", "Results published, by outcome and error code",
                               ["outcome", "error_code"], registry=r)
        self.snapshots = Counter("rtmanager_snapshots_published_total", "Runtime snapshots published, by reason",
                                 ["reason"], registry=r)
        self.engine_calls = Counter("rtmanager_engine_status_calls_total",
                                    "Calls of engines' admin API, by call and result", ["call", "result"], registry=r)
        self.turns = Counter("rtmanager_turns_total", "Turns generated and failed", ["result"], registry=r)
        self.generation_seconds = Histogram("rtmanager_generation_duration_seconds",
                                            "From asking an engine for a turn to the turn generated",
                                            buckets=_LATENCY_BUCKETS + (600,), registry=r)
        self.paused = Gauge("rtmanager_games_paused", "Games whose turn clock is paused", registry=r)
        self.turn_lateness = Gauge("rtmanager_turn_lateness_intervals",
                                   "How many turn intervals the most overdue game (running, not paused, on a "
                                   "schedule) is past its turn's due time, as of the last resync; 0 when none is",
                                   registry=r)
        self.turns_late = Gauge("rtmanager_turns_late_games",
                                "Games whose scheduled turn is at least one whole interval past due, as of the "
                                "last resync", registry=r)
        self.outbox_pending = Gauge("rtmanager_outbox_pending",
                                    "Outbox entries (results and snapshots) waiting to be published", registry=r)
        self.docker_calls = Counter("rtmanager_docker_api_calls_total", "Docker API calls by operation and result",
                                    ["operation", "result"], registry=r)
        self.docker_seconds = Histogram("rtmanager_docker_api_duration_seconds", "Docker API call time",
                                        ["operation"], buckets=_FAST_BUCKETS, registry=r)
        self.probes = Counter("rtmanager_engine_probes_total", "Engine health probes by result", ["result"],
                              registry=r)
        self.probes_deferred = Counter("rtmanager_engine_probes_deferred_total",
                                       "Probes a health round left out: of steady engines (to a later round, "
                                       "RTMANAGER_HEALTH_STEADY_EVERY) and of engines whose status the turn path got "
                                       "within the interval", registry=r)
        self.records = Gauge("rtmanager_runtime_records", "Runtime records by status", ["status"], registry=r)
        self.resync_seconds = Histogram("rtmanager_resync_duration_seconds",
                                        "One full resync: the backend's list, the live records, the planning",
                                        buckets=_FAST_BUCKETS, registry=r)
        self.health_round_seconds = Histogram("rtmanager_health_round_duration_seconds",
                                              "One health round over every running engine",
                                              buckets=_FAST_BUCKETS + (30, 60), registry=r)
        self.resyncs = Counter("rtmanager_resync_total", "Full resyncs by result", ["result"], registry=r)
        self.ready = Gauge("rtmanager_ready", "1 when Postgres, Redis and Docker answer", registry=r)
        self.convergence = Histogram(
            "rtmanager_job_convergence_seconds", "Job accepted to its result published",
            ["kind", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("rtmanager_job_phase_seconds",
                               "Time in each phase of a job: queued, container_created, engine_healthy, "
                               "result_published", ["phase"], buckets=_FAST_BUCKETS + (30, 60), registry=r)
        self.queue_wait = Histogram("rtmanager_workqueue_queue_duration_seconds", "Time a key waits in the queue",
                                    buckets=_FAST_BUCKETS, registry=r)
        self.queue_work = Histogram("rtmanager_workqueue_work_duration_seconds", "Time a key is worked on",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.leader = Gauge("rtmanager_leader", "1 while this replica holds the leadership lease", registry=r)
        self.leadership = Counter("rtmanager_leadership_changes_total",
                                  "Leadership terms won (elected) and lost (deposed)", ["event"], registry=r)
        self.unowned = Gauge("rtmanager_unowned_containers",
                             "Units with this instance's labels and no runtime record, left running and "
                             "untouched for an operator (rtmanager adopt / dispose)", registry=r)
        self.relay_stalled = Gauge("rtmanager_relay_stalled_seconds",
                                   "Seconds the outbox relay's pass under way (or its failures in a row) has gone "
                                   "without finishing or progress; 0 when idle", registry=r)
        self.daemon_restarts = Counter("rtmanager_engines_stopped_by_daemon_total",
                                       "Engines found stopped by a restart of the container daemon and started "
                                       "again without counting a crash", registry=r)
        self.node_lost = Counter("rtmanager_engines_node_lost_total",
                                 "Engines found out of reach on a lost Swarm node (status node_lost; not counted "
                                 "as crashes)", registry=r)
        self.reconcile_errors = Counter("rtmanager_reconcile_errors_total",
                                        "Reconciles that failed with an error that is neither an outage nor a "
                                        "conflict (a bug or bad data; see the log)", registry=r)
        # State directories: totals and a distribution, not a series per game (games come and go by
        # the thousand; the per-game size is on GET /api/v1/runtimes/{id}).
        self.state_bytes_total = Gauge("rtmanager_state_bytes",
                                       "Bytes the state directories of live games use, as last measured", registry=r)
        self.state_largest = Gauge("rtmanager_state_dir_largest_bytes",
                                   "The largest state directory of a live game, as last measured", registry=r)
        self.state_dir_bytes = Histogram("rtmanager_state_dir_bytes", "Sizes of state directories, one per game "
                                         "and storage round", buckets=tuple(float(1 << n) for n in range(10, 41, 3)),
                                         registry=r)
        self.state_free = Gauge("rtmanager_state_free_bytes",
                                "Bytes free on the state root's filesystem (for an unprivileged writer)", registry=r)
        self.state_full = Gauge("rtmanager_state_storage_full",
                                "1 while the state root's filesystem has less free than RTMANAGER_STATE_MIN_FREE "
                                "(new starts fail with storage_full)", registry=r)
        self.state_disposed = Counter("rtmanager_state_dirs_disposed_total",
                                      "State directories of removed games deleted or archived", ["how"], registry=r)
        self.state_copies = Counter("rtmanager_state_copies_total",
                                    "Copies of state directories around a replacement: taken, restored, dropped",
                                    ["event"], registry=r)
        self.rollouts = Gauge("rtmanager_rollouts", "Engine-version rollouts by state", ["state"], registry=r)
        self.rollout_games = Gauge("rtmanager_rollout_games",
                                   "Games of the rollouts not finished, by their state in the rollout", ["state"],
                                   registry=r)
        self.drains = Gauge("rtmanager_drains", "Drains not undrained yet, by status", ["status"], registry=r)
        self.drain_games = Gauge("rtmanager_drain_games", "Games of the draining drains: waiting to be taken, or "
                                 "in progress (being stopped or moved)", ["state"], registry=r)
        self.drain_actions = Counter("rtmanager_drain_actions_total", "Games a drain took, by what it does with "
                                     "them (stop, move) and whether past its deadline (forced)",
                                     ["action", "forced"], registry=r)
        self.watch_clients = Gauge("rtmanager_watch_clients", "Readers of GET /api/v1/events connected to this "
                                   "replica", registry=r)
        self.watch_closed = Counter("rtmanager_watch_refused_total", "Watch readers cut off or turned away, by "
                                    "why (slow: the reader did not read; full: too many readers)", ["reason"],
                                    registry=r)

        self.loop_errors = Counter("rtmanager_loop_errors_total",
                                   "Iterations of a loop that failed (an outage, or an error nobody classified: "
                                   "see the log); the loop backs off and tries again", ["loop"], registry=r)
        self.loop_failing = Gauge("rtmanager_loop_failing", "1 while a loop's last iteration failed", ["loop"],
                                  registry=r)
        self.loop_restarts = Counter("rtmanager_loop_restarts_total",
                                     "Loops that ended unexpectedly and were started again after a backoff",
                                     ["loop"], registry=r)
        # The intake's consumer group, per stream, measured by its maintenance pass (every few seconds).
        self.stream_lag = Gauge("rtmanager_stream_lag", "Entries of a job stream not yet read by the consumer "
                                "group (Redis's lag; not updated while Redis cannot tell it)", ["stream"], registry=r)
        self.stream_pending = Gauge("rtmanager_stream_pending",
                                    "Entries of a job stream read and not yet acknowledged", ["stream"], registry=r)
        self.stream_oldest_seconds = Gauge("rtmanager_stream_oldest_unhandled_seconds",
                                           "Age of the oldest entry of a job stream not handled yet (pending, or "
                                           "not read yet); 0 when every entry is handled", ["stream"], registry=r)
        self.crashes = Counter("rtmanager_engine_crashes_total",
                               "Crashes of engines nobody asked to change (an exit, too long unreachable, a "
                               "failed restart), by whether the crash policy gave the game up", ["given_up"],
                               registry=r)
        for given_up in ("true", "false"):  # both exported from the start: increase() sees the first crash
            self.crashes.labels(given_up)
        self.failing_loops: dict[str, str] = {}  # loop -> its last error, while failing (/readyz)

    def loop_failed(self, loop: str, exc: BaseException) -> None:
        self.loop_errors.labels(loop).inc()
        self.loop_failing.labels(loop).set(1)
        self.failing_loops[loop] = f"{exc.__class__.__name__}: {exc}"[:200]

    def loop_ok(self, loop: str) -> None:
        if self.failing_loops.pop(loop, None) is not None:
            self.loop_failing.labels(loop).set(0)

    def docker_observer(self, op: str, seconds: float, ok: bool) -> None:
        self.docker_calls.labels(op, "ok" if ok else "error").inc()
        self.docker_seconds.labels(op).observe(seconds)


async def one_round(loop: str, once: Callable[[], Awaitable[None]], metrics: Metrics, log: logging.Logger) -> None:
    """One round of a periodic loop: a failure (Postgres or the backend away, or a bug) is counted
    and logged, and the loop tries again next interval; only a lost leadership term ends it."""
    try:
        await once()
        metrics.loop_ok(loop)
    except Fenced:
        raise
    except Exception as exc:  # noqa: BLE001 - next interval
        metrics.loop_failed(loop, exc)
        if isinstance(exc, TemporaryError):
            log.warning("%s round failed: %s", loop, exc)
        else:
            log.exception("%s round failed unexpectedly; trying again next interval", loop)
