"""The one table of settings: each is declared once, as a field of its group, with its environment
variable, default, parser and the line that documents it (``controller.config`` reads the environment
by it, ``rtmanager env`` lists it, the README's settings table is generated from it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from controller.config_values import (
    ABSPATH,
    ALLOWLIST,
    ARCHIVE_DIR,
    BIND_HOST,
    FLAG,
    MIN_FREE,
    NAME,
    NANO_CPUS,
    OPTIONAL_ABSPATH,
    ROOT,
    STREAM_NAME,
    TEXT,
    TOKEN,
    URL_PATH,
    USER,
    ConfigError,
    Parser,
    archive_dir_allowed,
    choice,
    integer,
    number,
    pattern,
    port,
    size,
    url,
)
from controller.tokens import InvalidTokens, load
from desired.jobs import ImageAllowlist
from desired.policy import NodeLoss
from desired.storage import MinFree


class Backend(enum.StrEnum):
    DOCKER = "docker"
    SWARM = "swarm"


class VersionPolicy(enum.StrEnum):
    ALLOWLIST = "allowlist"
    REGISTRY = "registry"


class ProbeAddress(enum.StrEnum):
    IP = "ip"
    HOSTNAME = "hostname"
    PUBLISHED = "published"


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    help: str
    parser: Parser = field(repr=False)
    secret: bool = False
    shown: str | None = None  # the default as the README shows it, when "" does not mean empty


def setting(name: str, default: str, parser: Parser, help: str, *, secret: bool = False,
            shown: str | None = None) -> Any:
    return field(repr=not secret, metadata={"var": Var(name, default, help, parser, secret, shown)})


STREAM = pattern(STREAM_NAME, "must be a stream name")
SECONDS = number(0, 10**8)


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """PostgreSQL: desired state, the outbox, the lease."""

    database_url: str = setting("RTMANAGER_DATABASE_URL", "postgresql://postgres@127.0.0.1:55432/rtmanager",
                                url("postgresql", "postgres"), "PostgreSQL DSN (the default is the local stack of "
                                "`deploy/local/services.sh`)", secret=True)
    auto_migrate: bool = setting("RTMANAGER_AUTO_MIGRATE", "1", FLAG, "`rtmanager run` applies pending migrations "
                                 "at start, under the advisory lock")
    retention_days: float = setting("RTMANAGER_RETENTION_DAYS", "30", number(0, 36500, "days"), "days published "
                                    "results and finished operations are kept (0: forever); pruned hourly by the "
                                    "leader")


@dataclass(frozen=True, kw_only=True)
class LeadershipSettings:
    """Who this replica is and how it leads."""

    instance: str = setting("RTMANAGER_INSTANCE", "default", pattern(NAME, "must be 1-63 letters, digits, _ . -"),
                            "instance name, on every unit's labels; replicas of one instance elect a leader; a "
                            "database and a state root belong to one instance")
    lease_ttl: float = setting("RTMANAGER_LEASE_TTL", "5", number(1, 600), "seconds of a leadership lease; a "
                               "standby takes over within about this after the leader dies")


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    """Redis: the job streams Lobby writes, the results and snapshot streams rtmanager writes."""

    redis_url: str = setting("RTMANAGER_REDIS_URL", "redis://127.0.0.1:56379/0",
                             url("redis", "rediss", "unix", database_number=True),
                             "Redis URL (`rediss://` and `unix://` too)", secret=True)
    start_stream: str = setting("RTMANAGER_START_STREAM", "runtime:start_jobs", STREAM, "stream of start jobs")
    stop_stream: str = setting("RTMANAGER_STOP_STREAM", "runtime:stop_jobs", STREAM, "stream of stop jobs")
    control_stream: str = setting("RTMANAGER_CONTROL_STREAM", "runtime:control_jobs", STREAM, "stream of control "
                                  "jobs (pause, resume, force_next_turn, reconcile)")
    results_stream: str = setting("RTMANAGER_RESULTS_STREAM", "runtime:job_results", STREAM, "stream of job results")
    snapshot_stream: str = setting("RTMANAGER_SNAPSHOT_STREAM", "runtime:snapshots", STREAM,
                                   "stream of runtime snapshots to Lobby")
    consumer_group: str = setting("RTMANAGER_CONSUMER_GROUP", "rtmanager", pattern(STREAM_NAME, "must be a group "
                                  "name"), "consumer group on the job streams")
    consumer_name: str = setting("RTMANAGER_CONSUMER_NAME", "", TEXT, "the replica's name: its consumer name in the "
                                 "group and its name on the leadership lease (give every replica its own, stable "
                                 "across restarts)", shown="{instance}-{hostname}")
    dead_letter_stream: str = setting("RTMANAGER_DEAD_LETTER_STREAM", "runtime:dead_letters", STREAM,
                                      "copies of job entries that could not be handled")
    claim_idle: float = setting("RTMANAGER_CLAIM_IDLE", "60", number(1, 86400), "seconds an entry idles in another "
                                "consumer's list before a pending pass claims it (the leader also takes such entries "
                                "over after each of its reads)")
    max_deliveries: int = setting("RTMANAGER_MAX_DELIVERIES", "5", integer(1, 1000), "failed handling attempts of "
                                  "one entry before it is dead-lettered (outages do not count)")
    stream_keep: float = setting("RTMANAGER_STREAM_KEEP", "3600", SECONDS, "seconds of handled job-stream entries "
                                 "kept before the intake trims them (entries not yet handled are never trimmed)")
    dead_letter_maxlen: int = setting("RTMANAGER_DEAD_LETTER_MAXLEN", "10000", integer(0, 10**9),
                                      "approximate MAXLEN of the dead-letter stream (0: no trimming)")
    results_maxlen: int = setting("RTMANAGER_RESULTS_MAXLEN", "100000", integer(0, 10**9), "approximate MAXLEN of "
                                  "the results and snapshot streams (0: no trimming)")

    def __post_init__(self) -> None:
        """Six streams, six names: a results stream named as a job stream reads every answer back as a job
        (and answers that, for ever), a stop stream named as the start stream reads every start as a stop."""
        seen: dict[str, str] = {}
        for f in fields(self):
            if not f.name.endswith("_stream"):
                continue
            name, var = getattr(self, f.name), f.metadata["var"].name
            if name in seen:
                raise ConfigError(f"{var}: must differ from {seen[name]}, got {name!r} for both")
            seen[name] = var


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """Which engine images may run."""

    image_allowlist: ImageAllowlist = setting("RTMANAGER_IMAGE_ALLOWLIST", "galaxy/engine:*,galaxy/engine-stub:*",
                                              ALLOWLIST, "comma-separated shell patterns on the whole image reference")
    version_policy: VersionPolicy = setting("RTMANAGER_VERSION_POLICY", "allowlist", choice(VersionPolicy),
                                            "`allowlist`: the allowlist alone decides which images run; `registry`: "
                                            "only registered engine versions (active ones for new starts and "
                                            "patches), inside the allowlist")


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """The engine in its container: how it is reached, its limits, its health and crashes."""

    engine_port: int = setting("RTMANAGER_ENGINE_PORT", "8080", port(1), "the engine's HTTP port")
    health_path: str = setting("RTMANAGER_ENGINE_HEALTH_PATH", "/healthz", URL_PATH, "the engine's health path")
    admin_path: str = setting("RTMANAGER_ENGINE_ADMIN_PATH", "/admin/v1", URL_PATH, "path prefix of the engine's "
                              "admin API (status, turns); the stub engine serves it at `/cgi-bin/admin/v1`")
    proxy_max_body: int = setting("RTMANAGER_ENGINE_PROXY_MAX_BODY", "1m", size(1, "must be a size such as 1m"),
                                  "largest request body, and largest answer, of the engine pass-through "
                                  "(`/api/v1/runtimes/{game_id}/engine/proxy/...`)")
    proxy_timeout: float = setting("RTMANAGER_ENGINE_PROXY_TIMEOUT", "10", number(0.1, 3600), "seconds one "
                                   "exchange of the engine pass-through may take, its answer streamed included")
    engine_state_dir: str = setting("RTMANAGER_ENGINE_STATE_DIR", "/var/lib/galaxy-engine", ABSPATH,
                                    "mount point of the state directory in the engine")
    start_timeout: float = setting("RTMANAGER_START_TIMEOUT", "30", number(0.1, 3600), "seconds for a started "
                                   "engine to answer its health path")
    engine_memory: int = setting("RTMANAGER_ENGINE_MEMORY", "512m", size(6 * 1024**2, "must be a size such as 512m"),
                                 "engine memory limit (at least 6m; no extra swap)")
    engine_nano_cpus: int = setting("RTMANAGER_ENGINE_CPUS", "1.0", NANO_CPUS, "engine CPU limit, in CPUs")
    engine_pids: int = setting("RTMANAGER_ENGINE_PIDS", "256", integer(16, 1 << 22, "must be an integer 16 or more"),
                               "engine pids limit")
    engine_user: str | None = setting("RTMANAGER_ENGINE_USER", "10000:10000", USER, "`uid[:gid]` the engine runs "
                                      "as (its state directory is given to it); `image`: the image's own user")
    engine_read_only: bool = setting("RTMANAGER_ENGINE_READ_ONLY", "1", FLAG, "the engine's root filesystem is "
                                     "read-only (it writes to its state directory and `/tmp`)")
    engine_tmpfs: int = setting("RTMANAGER_ENGINE_TMPFS", "64m", size(0, "must be 0 or a size such as 64m"),
                                "size of the tmpfs at `/tmp` in the engine (0: none)")
    engine_disk: int = setting("RTMANAGER_ENGINE_DISK", "1g", size(0, "must be 0 or a size such as 1g"), "size limit "
                               "of the engine's writable layer where the storage driver supports it (overlay2 on xfs "
                               "with pquota); elsewhere logged once and skipped (0: none)")
    crash_limit: int = setting("RTMANAGER_CRASH_LIMIT", "5", integer(1, 1000), "the Nth crash within the crash "
                               "window gives the game up")
    crash_window: float = setting("RTMANAGER_CRASH_WINDOW", "600", number(1, 10**7), "seconds within which crashes "
                                  "count together")
    crash_backoff_max: float = setting("RTMANAGER_CRASH_BACKOFF_MAX", "30", number(0.1, 3600), "cap of the restart "
                                       "delay after a crash (from 0.1 s, doubling)")
    health_interval: float = setting("RTMANAGER_HEALTH_INTERVAL", "15", number(0, 86400), "seconds between health "
                                     "probes of running engines (0: off)")
    health_steady_every: int = setting("RTMANAGER_HEALTH_STEADY_EVERY", "4", integer(1, 1000), "a steady engine (up, "
                                       "healthy, nothing asked of it, its last probes found nothing new, no event "
                                       "since) is probed every Nth health round; every other engine every round "
                                       "(1: every engine every round)")
    unreachable_after: int = setting("RTMANAGER_UNREACHABLE_AFTER", "3", integer(1, 1000), "failed probes in a row "
                                     "after which an engine is `engine_unreachable`")
    unreachable_restart_after: float = setting("RTMANAGER_UNREACHABLE_RESTART_AFTER", "0", number(0, 10**7),
                                               "seconds an engine may stay unreachable before it is restarted, "
                                               "counted as a crash (0: never)")
    generation_timeout: float = setting("RTMANAGER_GENERATION_TIMEOUT", "600", number(1, 10**6), "seconds a "
                                        "generating engine may fail its probes before they count")


@dataclass(frozen=True, kw_only=True)
class RuntimeSettings:
    """The container daemon or Swarm, and how the controller acts on it."""

    backend: Backend = setting("RTMANAGER_BACKEND", "docker", choice(Backend), "`docker`: one container per game on "
                               "one Docker host; `swarm`: one service per game on a Docker Swarm")
    docker_network: str = setting("RTMANAGER_DOCKER_NETWORK", "galaxy-games", pattern(NAME, "must be a Docker "
                                  "network name"), "network of the engines, created if missing")
    probe_address: ProbeAddress = setting("RTMANAGER_PROBE_ADDRESS", "ip", choice(ProbeAddress), "how rtmanager "
                                          "reaches engines: the container's IP (`ip`, docker), its hostname "
                                          "(`hostname`, when rtmanager runs on the game network), or a host-mode "
                                          "port published on the engine's node (`published`, swarm)")
    concurrency: int = setting("RTMANAGER_CONCURRENCY", "4", integer(1, 64), "reconcile workers (the knee measured "
                               "on a 2-core machine)")
    resync_interval: float = setting("RTMANAGER_RESYNC_INTERVAL", "30", number(0.5, 86400), "seconds between full "
                                     "resyncs (also the turn clock's longest sleep)")
    job_timeout: float = setting("RTMANAGER_JOB_TIMEOUT", "300", number(1, 86400), "seconds a job waits for an "
                                 "unavailable container daemon (or Postgres) before it fails")
    stop_grace: float = setting("RTMANAGER_STOP_GRACE", "10", number(0, 3600), "seconds between SIGTERM and SIGKILL "
                                "when an engine is stopped (an engine version's `stop_grace` overrides it for its "
                                "engines)")
    disruption_wait: float = setting("RTMANAGER_DISRUPTION_WAIT", "600", number(0, 86400), "seconds a planned stop, "
                                     "removal or recreate (restart, patch, spec drift) of an engine waits while it "
                                     "generates a turn; after it, it goes ahead and says so (0: no wait); the stop's "
                                     "or replacement's job timeout is extended by it")
    rollout_interval: float = setting("RTMANAGER_ROLLOUT_INTERVAL", "2", number(0.1, 3600), "seconds between two "
                                      "steps of the leader's rollout loop at most (it is also woken by every answered "
                                      "job); a canary's hold is checked at this pace")
    cleanup_ttl: float = setting("RTMANAGER_CLEANUP_TTL", "86400", SECONDS, "seconds after which a stopped game's "
                                 "container is removed and the game becomes removed, for good (0: never)")
    orphan_grace: float = setting("RTMANAGER_ORPHAN_GRACE", "10", number(0, 86400), "seconds before a unit with our "
                                  "labels but no record is reported as unowned (it is never removed by the controller)")
    max_removals: int = setting("RTMANAGER_MAX_REMOVALS", "10", integer(0, 10**6), "units removed on the "
                                "controller's own initiative (cleanup TTL) at most per resync interval")
    node_loss: NodeLoss = setting("RTMANAGER_NODE_LOSS", "wait", choice(NodeLoss), "what becomes of a game whose "
                                  "Swarm node is down, unreachable or drained (status `node_lost`, never a crash), "
                                  "after `RTMANAGER_NODE_LOSS_GRACE`: `wait` for the node; `reschedule` on another "
                                  "node with its state when `RTMANAGER_STATE_SHARED=1` (else wait); "
                                  "`reschedule_without_state` on another node whatever its state; `stop` it (a node "
                                  "drained by its operator: the game waits, or moves with shared state)")
    node_loss_grace: float = setting("RTMANAGER_NODE_LOSS_GRACE", "120", number(0, 10**7), "seconds a game waits "
                                     "for its lost node before `RTMANAGER_NODE_LOSS` applies")
    dry_run: bool = setting("RTMANAGER_DRY_RUN", "0", FLAG, "`1`: log every container action the controller would "
                            "take, and take none")


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    """The games' state directories on the host."""

    state_root: str = setting("RTMANAGER_STATE_ROOT", "/var/lib/rtmanager/games", ROOT,
                              "host directory of the per-game state directories")
    state_shared: bool = setting("RTMANAGER_STATE_SHARED", "0", FLAG, "`1`: the state root is storage shared by "
                                 "every Swarm node at the same path, so a game's state follows it when it is moved "
                                 "to another node (a drain); `0`: node-local, a game is never moved without its "
                                 "state unless the operator says so")
    state_helper_image: str = setting("RTMANAGER_STATE_HELPER_IMAGE", "galaxy/statedir-helper:1", TEXT, "image of "
                                      "the one-shot task that makes a game's state directory on its Swarm node, as "
                                      "root (deploy/statedir-helper: a static busybox; load it on "
                                      "every node, pin it by digest when it comes from a registry); `engine`: the "
                                      "game's own engine image (weaker: see docs/security.md)")
    state_retention: float = setting("RTMANAGER_STATE_RETENTION", "604800", number(0, 10**9), "seconds after a "
                                     "game's removal before its state directory is deleted (or archived) by the "
                                     "leader's storage round (0: kept for ever)")
    state_archive_dir: str | None = setting("RTMANAGER_STATE_ARCHIVE_DIR", "", ARCHIVE_DIR, "absolute path outside "
                                            "the state root (or a directory in it whose name starts with a dot, "
                                            "which no game_id does): a removed game's state directory is moved "
                                            "there as `{game_id}-{removed_at}` instead of deleted (empty: deleted)")
    state_min_free: MinFree = setting("RTMANAGER_STATE_MIN_FREE", "2%", MIN_FREE, "bytes (`10g`) or percent of its "
                                      "size (`5%`) the state root's filesystem must keep free; with less, a start "
                                      "that would make a new game's state directory fails with `storage_full` and "
                                      "`/readyz` says so (`0`: no check)")
    state_scan_interval: float = setting("RTMANAGER_STATE_SCAN_INTERVAL", "300", number(0.5, 86400), "seconds "
                                         "between storage rounds: free space, the size of each live game's state "
                                         "directory, leftover copies, removed games' directories past the retention")

    def __post_init__(self) -> None:
        if self.state_archive_dir is not None and not archive_dir_allowed(self.state_archive_dir, self.state_root):
            raise ConfigError(f"RTMANAGER_STATE_ARCHIVE_DIR: {ARCHIVE_DIR.rule}, got {self.state_archive_dir!r}")


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    """/healthz, /readyz, /metrics and the REST API."""

    http_port: int = setting("RTMANAGER_HTTP_PORT", "8090", port(0), "port of `/healthz`, `/readyz`, `/metrics` "
                             "and the REST API (0: off)")
    http_host: str = setting("RTMANAGER_HTTP_HOST", "127.0.0.1", BIND_HOST, "address the HTTP server binds; "
                             "`off-game-network`: every address of this host or container except those on "
                             "`RTMANAGER_DOCKER_NETWORK` (no engine reaches the API)")
    api_token: str = setting("RTMANAGER_API_TOKEN", "", TOKEN, "bearer token of the REST API, at least 16 "
                             "characters, with the `admin` role and the name `default`; with "
                             "`RTMANAGER_API_TOKENS_FILE` empty too, the REST API is disabled (503)", secret=True)
    api_tokens_file: str | None = setting("RTMANAGER_API_TOKENS_FILE", "", OPTIONAL_ABSPATH, "file of named API "
                                          "tokens, one `NAME ROLE TOKEN` (or `NAME ROLE sha256:HEX`) a line, role "
                                          "`read`, `operate`, `admin` or `gateway` (docs/security.md); read again on "
                                          "SIGHUP and when it changes")

    def __post_init__(self) -> None:
        try:
            load(self.api_tokens_file, self.api_token)
        except InvalidTokens as exc:
            raise ConfigError(f"RTMANAGER_API_TOKENS_FILE: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    """The process's log lines on stderr."""

    log_format: LogFormat = setting("RTMANAGER_LOG_FORMAT", "json", choice(LogFormat), "`json` or `text` "
                                    "(`rtmanager run --log-format text` for people)")
    log_level: LogLevel = setting("RTMANAGER_LOG_LEVEL", "INFO", choice(LogLevel), "`DEBUG`, `INFO`, `WARNING` or "
                                  "`ERROR`")


# Rows of the README's table for variables rtmanager does not read itself, by group.
ELSEWHERE = {"runtime": [("DOCKER_HOST", "docker's own default", "the container daemon (with docker's "
                                                                 "`DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`)")]}
