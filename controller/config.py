"""Configuration from the environment.

Every variable has a default (listed in ``VARIABLES`` and the README). A bad
value raises ``ConfigError`` whose message is one line starting with the
variable's name; ``rtmanager`` prints it and exits with status 2.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from desired.jobs import ImageAllowlist, RecordDefaults
from desired.storage import MinFree


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    help: str


VARIABLES: tuple[Var, ...] = (
    Var("RTMANAGER_DATABASE_URL", "postgresql://postgres@127.0.0.1:55432/rtmanager",
        "PostgreSQL DSN (the default is the local stack of deploy/local/services.sh)"),
    Var("RTMANAGER_REDIS_URL", "redis://127.0.0.1:56379/0", "Redis URL"),
    Var("RTMANAGER_DOCKER_NETWORK", "galaxy-games", "user-defined network for engine containers, created if missing"),
    Var("RTMANAGER_STATE_ROOT", "/var/lib/rtmanager/games", "host directory holding one state directory per game"),
    Var("RTMANAGER_ENGINE_STATE_DIR", "/var/lib/galaxy-engine", "where the state directory is mounted in the engine"),
    Var("RTMANAGER_STATE_RETENTION", "604800", "seconds after a game's removal before its state directory is "
        "deleted or archived (0: kept for ever)"),
    Var("RTMANAGER_STATE_ARCHIVE_DIR", "", "absolute path: a removed game's state directory is moved there "
        "instead of deleted (empty: deleted)"),
    Var("RTMANAGER_STATE_MIN_FREE", "2%", "bytes (10g) or percent (5%) the state root's filesystem must keep "
        "free; below it new starts fail with storage_full (0: no check)"),
    Var("RTMANAGER_STATE_SCAN_INTERVAL", "300", "seconds between storage rounds: sizes, free space, disposal of "
        "removed games' directories, leftover copies"),
    Var("RTMANAGER_IMAGE_ALLOWLIST", "galaxy/engine:*,galaxy/engine-stub:*",
        "comma-separated shell patterns; only matching image refs may run"),
    Var("RTMANAGER_INSTANCE", "default", "instance name, written on container labels; replicas share it"),
    Var("RTMANAGER_VERSION_POLICY", "allowlist", "allowlist: RTMANAGER_IMAGE_ALLOWLIST alone decides which images "
        "run; registry: only registered engine versions (active for new starts), inside the allowlist"),
    Var("RTMANAGER_ENGINE_PORT", "8080", "engine HTTP port inside the container"),
    Var("RTMANAGER_ENGINE_HEALTH_PATH", "/healthz", "engine health path"),
    Var("RTMANAGER_ENGINE_ADMIN_PATH", "/admin/v1", "path prefix of the engine's admin API (status, turns)"),
    Var("RTMANAGER_START_TIMEOUT", "30", "seconds for a started engine to answer its health path"),
    Var("RTMANAGER_CLEANUP_TTL", "86400", "seconds after which a stopped container is removed (0: never)"),
    Var("RTMANAGER_RESYNC_INTERVAL", "30", "seconds between full resyncs of Docker against Postgres"),
    Var("RTMANAGER_CONCURRENCY", "4", "reconcile workers (about the knee of a 2-core machine)"),
    Var("RTMANAGER_HTTP_PORT", "8090", "port of /healthz, /readyz, /metrics and the REST API (0: off)"),
    Var("RTMANAGER_HTTP_HOST", "127.0.0.1", "address the HTTP server binds; off-game-network: every address of "
        "this host or container except those on RTMANAGER_DOCKER_NETWORK"),
    Var("RTMANAGER_API_TOKEN", "", "bearer token of the REST API; empty disables the REST API"),
    Var("RTMANAGER_START_STREAM", "runtime:start_jobs", "stream of start jobs"),
    Var("RTMANAGER_STOP_STREAM", "runtime:stop_jobs", "stream of stop jobs"),
    Var("RTMANAGER_CONTROL_STREAM", "runtime:control_jobs", "stream of control jobs (pause, resume, "
        "force_next_turn, reconcile)"),
    Var("RTMANAGER_RESULTS_STREAM", "runtime:job_results", "stream of job results"),
    Var("RTMANAGER_SNAPSHOT_STREAM", "runtime:snapshots", "stream of runtime snapshots to Lobby"),
    Var("RTMANAGER_CONSUMER_GROUP", "rtmanager", "consumer group on the job streams"),
    Var("RTMANAGER_CONSUMER_NAME", "", "consumer name in the group (default: instance-hostname)"),
    Var("RTMANAGER_DEAD_LETTER_STREAM", "runtime:dead_letters", "copies of job entries that could not be handled"),
    Var("RTMANAGER_CLAIM_IDLE", "60", "seconds an entry idles in another consumer's list before a pending pass "
        "claims it (the leader also takes such entries over after each of its reads)"),
    Var("RTMANAGER_MAX_DELIVERIES", "5", "failed handling attempts of one entry before it is dead-lettered "
        "(outages do not count)"),
    Var("RTMANAGER_STREAM_KEEP", "3600", "seconds of handled job-stream entries kept before trimming (entries "
        "not yet handled are never trimmed)"),
    Var("RTMANAGER_DEAD_LETTER_MAXLEN", "10000", "approximate MAXLEN of the dead-letter stream (0: no trimming)"),
    Var("RTMANAGER_RESULTS_MAXLEN", "100000", "approximate MAXLEN of the results stream (0: no trimming)"),
    Var("RTMANAGER_STOP_GRACE", "10", "seconds between SIGTERM and SIGKILL when stopping an engine"),
    Var("RTMANAGER_DISRUPTION_WAIT", "600", "seconds a planned stop, removal or recreate of an engine waits while "
        "it generates a turn (0: no wait)"),
    Var("RTMANAGER_JOB_TIMEOUT", "300", "seconds a job may wait for Docker before it fails with docker_unavailable"),
    Var("RTMANAGER_ENGINE_MEMORY", "512m", "engine memory limit (bytes, or with k/m/g)"),
    Var("RTMANAGER_ENGINE_CPUS", "1.0", "engine CPU limit in CPUs"),
    Var("RTMANAGER_ENGINE_PIDS", "256", "engine pids limit"),
    Var("RTMANAGER_ENGINE_USER", "10000:10000", "uid[:gid] the engine runs as (the state directory is owned by "
        "it); `image`: the image's own user"),
    Var("RTMANAGER_ENGINE_READ_ONLY", "1", "1: the engine's root filesystem is read-only (it writes to its state "
        "directory and /tmp)"),
    Var("RTMANAGER_ENGINE_TMPFS", "64m", "size of the tmpfs mounted at /tmp in the engine (0: none)"),
    Var("RTMANAGER_ENGINE_DISK", "1g", "size limit of the engine's writable layer where the storage driver "
        "supports it (0: none)"),
    Var("RTMANAGER_BACKEND", "docker", "docker: one container per game on one Docker host; swarm: one service per "
        "game on a Docker Swarm"),
    Var("RTMANAGER_PROBE_ADDRESS", "ip", "how the controller reaches engines: ip (the container's IP; docker), "
        "hostname (on the game network: rtmanager runs on it) or published (a host-mode port on the node; swarm)"),
    Var("RTMANAGER_ORPHAN_GRACE", "10", "seconds before an unrecorded container with our labels is reported "
        "as unowned (never removed by the controller)"),
    Var("RTMANAGER_MAX_REMOVALS", "10", "containers removed on the controller's own initiative (the "
        "cleanup TTL) at most per resync interval"),
    Var("RTMANAGER_DRY_RUN", "0", "1: log every container action the controller would take, take none"),
    Var("RTMANAGER_CRASH_LIMIT", "5", "crashes within the crash window that end in a terminal failure"),
    Var("RTMANAGER_CRASH_WINDOW", "600", "seconds without a crash after which the crash count starts again"),
    Var("RTMANAGER_CRASH_BACKOFF_MAX", "30", "cap in seconds of the restart delay after crashes (from 0.1, doubling)"),
    Var("RTMANAGER_HEALTH_INTERVAL", "15", "seconds between health probes of running engines (0: off)"),
    Var("RTMANAGER_UNREACHABLE_AFTER", "3", "failed health probes in a row after which an engine is "
        "engine_unreachable"),
    Var("RTMANAGER_UNREACHABLE_RESTART_AFTER", "0", "seconds an engine may stay unreachable before it is "
        "restarted (counted as a crash; 0: never)"),
    Var("RTMANAGER_GENERATION_TIMEOUT", "600", "seconds a generating engine may fail its health probes before "
        "they count"),
    Var("RTMANAGER_AUTO_MIGRATE", "1", "1: `rtmanager run` applies pending migrations at start (under the lock)"),
    Var("RTMANAGER_RETENTION_DAYS", "30", "days published results and finished operations are kept (0: forever)"),
    Var("RTMANAGER_LEASE_TTL", "5", "seconds of a leadership lease; a standby takes over within about this"),
    Var("RTMANAGER_LOG_FORMAT", "json", "json or text"),
    Var("RTMANAGER_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
)
_DEFAULTS = {v.name: v.default for v in VARIABLES}

_STREAM_NAME = re.compile(r"^[A-Za-z0-9:_.-]{1,200}$")
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


@dataclass(frozen=True, kw_only=True)
class Settings:
    database_url: str = field(repr=False)  # may carry a password
    redis_url: str = field(repr=False)
    docker_network: str
    state_root: str
    engine_state_dir: str
    state_retention: float = 604800.0
    state_archive_dir: str | None = None
    state_min_free: MinFree = MinFree(percent=2.0)
    state_scan_interval: float = 300.0
    image_allowlist: ImageAllowlist
    version_policy: str
    instance: str
    engine_port: int
    health_path: str
    admin_path: str
    start_timeout: float
    cleanup_ttl: float
    resync_interval: float
    concurrency: int
    http_port: int
    http_host: str
    api_token: str = field(repr=False)
    start_stream: str
    stop_stream: str
    control_stream: str
    results_stream: str
    snapshot_stream: str
    consumer_group: str
    consumer_name: str
    dead_letter_stream: str
    claim_idle: float
    max_deliveries: int
    stream_keep: float
    dead_letter_maxlen: int
    results_maxlen: int
    stop_grace: float
    disruption_wait: float
    job_timeout: float
    engine_memory: int
    engine_nano_cpus: int
    engine_pids: int
    engine_user: str | None
    engine_read_only: bool
    engine_tmpfs: int
    engine_disk: int
    probe_address: str
    backend: str
    orphan_grace: float
    max_removals: int
    dry_run: bool
    crash_limit: int
    crash_window: float
    crash_backoff_max: float
    health_interval: float
    unreachable_after: int
    unreachable_restart_after: float
    generation_timeout: float
    auto_migrate: bool
    lease_ttl: float
    retention_days: float
    log_format: str
    log_level: str

    @property
    def record_defaults(self) -> RecordDefaults:
        return RecordDefaults(docker_network=self.docker_network, state_root=self.state_root,
                              engine_port=self.engine_port)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, _DEFAULTS[name]).strip()

        def parse(name: str, conv: Callable[[str], object], rule: str, secret: bool = False) -> object:
            raw = get(name)
            try:
                return conv(raw)
            except (ValueError, TypeError) as exc:
                detail = f" ({exc})" if str(exc) and "invalid literal" not in str(exc) else ""
                shown = "" if secret else f", got {raw!r}"  # URLs may carry passwords
                raise ConfigError(f"{name}: {rule}{shown}{detail}") from None

        def number(lo: float, hi: float, kind=float):
            def conv(raw: str):
                v = kind(raw)
                if not lo <= v <= hi:
                    raise ValueError(f"out of range {lo}..{hi}")
                return v
            return conv

        def url(schemes: tuple[str, ...]):
            def conv(raw: str) -> str:
                parts = urlsplit(raw)
                if parts.scheme not in schemes:
                    raise ValueError(f"scheme must be one of {', '.join(schemes)}")
                if not (parts.hostname or (parts.scheme == "unix" and parts.path)):
                    raise ValueError("a host (or, for unix://, a socket path) is needed")
                return raw
            return conv

        def pattern(regex: re.Pattern[str]):
            def conv(raw: str) -> str:
                if not regex.fullmatch(raw):  # $ would let a trailing newline through
                    raise ValueError("")
                return raw
            return conv

        def abspath(raw: str) -> str:
            if not raw.startswith("/") or "\x00" in raw:
                raise ValueError("")
            return os.path.normpath(raw)

        def archive_dir(raw: str) -> str | None:
            """Never where a game's state directory could be: a game_id never starts with a dot."""
            if not raw:
                return None
            path = abspath(raw)
            rel = os.path.relpath(path, os.path.normpath(get("RTMANAGER_STATE_ROOT") or "/"))
            if rel == "." or not rel.startswith("."):
                raise ValueError("")
            if rel.split(os.sep, 1)[0] == ".backups":  # the copies' tree: dropping a copy would take it
                raise ValueError("")
            return path

        def allowlist(raw: str) -> ImageAllowlist:
            al = ImageAllowlist(raw)
            if not al.patterns:
                raise ValueError("at least one pattern is needed")
            return al

        def health_path(raw: str) -> str:
            if not raw.startswith("/") or any(c.isspace() for c in raw):
                raise ValueError("")
            return raw

        def size(raw: str) -> int:
            m = re.fullmatch(r"(\d+)([kmgKMG]?)[bB]?", raw)
            if not m:
                raise ValueError("")
            v = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
            if v < 6 * 1024**2:
                raise ValueError("at least 6m")
            return v

        def optional_size(raw: str) -> int:
            m = re.fullmatch(r"(\d+)([kmgKMG]?)[bB]?", raw)
            if not m:
                raise ValueError("")
            return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]

        def user(raw: str) -> str | None:
            if raw in ("", "image"):
                return None
            if not re.fullmatch(r"\d{1,10}(:\d{1,10})?", raw):
                raise ValueError("")
            return raw

        def choice(*options: str):
            def conv(raw: str) -> str:
                if raw.lower() not in options:
                    raise ValueError("")
                return raw.lower()
            return conv

        def flag(raw: str) -> bool:
            if raw.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ValueError("")
            return raw.lower() in ("1", "true", "yes")

        def token(raw: str) -> str:
            if raw and len(raw) < 16:
                raise ValueError("")
            return raw

        instance = parse("RTMANAGER_INSTANCE", pattern(_NAME), "must be 1-63 letters, digits, _ . -")
        consumer = get("RTMANAGER_CONSUMER_NAME") or f"{instance}-{socket.gethostname()}"
        return cls(
            database_url=parse("RTMANAGER_DATABASE_URL", url(("postgresql", "postgres")),
                               "must be a postgresql:// URL", secret=True),
            redis_url=parse("RTMANAGER_REDIS_URL", url(("redis", "rediss", "unix")), "must be a redis:// URL",
                            secret=True),
            docker_network=parse("RTMANAGER_DOCKER_NETWORK", pattern(_NAME), "must be a Docker network name"),
            state_root=parse("RTMANAGER_STATE_ROOT", abspath, "must be an absolute path"),
            engine_state_dir=parse("RTMANAGER_ENGINE_STATE_DIR", abspath, "must be an absolute path"),
            state_retention=parse("RTMANAGER_STATE_RETENTION", number(0, 10**9), "must be seconds, 0 or more"),
            state_archive_dir=parse("RTMANAGER_STATE_ARCHIVE_DIR", archive_dir,
                                    "must be empty or an absolute path outside RTMANAGER_STATE_ROOT (or a "
                                    "directory in it whose name starts with a dot, other than .backups)"),
            state_min_free=parse("RTMANAGER_STATE_MIN_FREE", MinFree.parse,
                                 "must be bytes (such as 10g) or a percentage (such as 5%)"),
            state_scan_interval=parse("RTMANAGER_STATE_SCAN_INTERVAL", number(0.5, 86400),
                                      "must be seconds in 0.5..86400"),
            image_allowlist=parse("RTMANAGER_IMAGE_ALLOWLIST", allowlist, "must list image patterns"),
            version_policy=parse("RTMANAGER_VERSION_POLICY", choice("allowlist", "registry"),
                                 "must be allowlist or registry"),
            instance=instance,
            engine_port=parse("RTMANAGER_ENGINE_PORT", number(1, 65535, int), "must be a port 1-65535"),
            health_path=parse("RTMANAGER_ENGINE_HEALTH_PATH", health_path, "must be a path starting with /"),
            admin_path=parse("RTMANAGER_ENGINE_ADMIN_PATH", health_path, "must be a path starting with /"),
            start_timeout=parse("RTMANAGER_START_TIMEOUT", number(0.1, 3600), "must be seconds in 0.1..3600"),
            cleanup_ttl=parse("RTMANAGER_CLEANUP_TTL", number(0, 10**8), "must be seconds, 0 or more"),
            resync_interval=parse("RTMANAGER_RESYNC_INTERVAL", number(0.5, 86400), "must be seconds in 0.5..86400"),
            concurrency=parse("RTMANAGER_CONCURRENCY", number(1, 64, int), "must be an integer 1..64"),
            http_port=parse("RTMANAGER_HTTP_PORT", number(0, 65535, int), "must be a port 0-65535"),
            http_host=get("RTMANAGER_HTTP_HOST"),
            api_token=parse("RTMANAGER_API_TOKEN", token, "must be empty or at least 16 characters",
                            secret=True),
            start_stream=parse("RTMANAGER_START_STREAM", pattern(_STREAM_NAME), "must be a stream name"),
            stop_stream=parse("RTMANAGER_STOP_STREAM", pattern(_STREAM_NAME), "must be a stream name"),
            control_stream=parse("RTMANAGER_CONTROL_STREAM", pattern(_STREAM_NAME), "must be a stream name"),
            results_stream=parse("RTMANAGER_RESULTS_STREAM", pattern(_STREAM_NAME), "must be a stream name"),
            snapshot_stream=parse("RTMANAGER_SNAPSHOT_STREAM", pattern(_STREAM_NAME), "must be a stream name"),
            consumer_group=parse("RTMANAGER_CONSUMER_GROUP", pattern(_STREAM_NAME), "must be a group name"),
            consumer_name=consumer,
            dead_letter_stream=parse("RTMANAGER_DEAD_LETTER_STREAM", pattern(_STREAM_NAME), "must be a stream name"),
            claim_idle=parse("RTMANAGER_CLAIM_IDLE", number(1, 86400), "must be seconds in 1..86400"),
            max_deliveries=parse("RTMANAGER_MAX_DELIVERIES", number(1, 1000, int), "must be an integer 1..1000"),
            stream_keep=parse("RTMANAGER_STREAM_KEEP", number(0, 10**8), "must be seconds, 0 or more"),
            dead_letter_maxlen=parse("RTMANAGER_DEAD_LETTER_MAXLEN", number(0, 10**9, int),
                                     "must be an integer, 0 or more"),
            results_maxlen=parse("RTMANAGER_RESULTS_MAXLEN", number(0, 10**9, int), "must be an integer, 0 or more"),
            stop_grace=parse("RTMANAGER_STOP_GRACE", number(0, 3600), "must be seconds in 0..3600"),
            disruption_wait=parse("RTMANAGER_DISRUPTION_WAIT", number(0, 86400), "must be seconds in 0..86400"),
            job_timeout=parse("RTMANAGER_JOB_TIMEOUT", number(1, 86400), "must be seconds in 1..86400"),
            engine_memory=parse("RTMANAGER_ENGINE_MEMORY", size, "must be a size such as 512m"),
            engine_nano_cpus=int(parse("RTMANAGER_ENGINE_CPUS", number(0.01, 1024), "must be CPUs, e.g. 1.5")
                                 * 1e9),
            engine_pids=parse("RTMANAGER_ENGINE_PIDS", number(16, 1 << 22, int), "must be an integer 16 or more"),
            engine_user=parse("RTMANAGER_ENGINE_USER", user, "must be uid, uid:gid or image"),
            engine_read_only=parse("RTMANAGER_ENGINE_READ_ONLY", flag, "must be 0 or 1"),
            engine_tmpfs=parse("RTMANAGER_ENGINE_TMPFS", optional_size, "must be 0 or a size such as 64m"),
            engine_disk=parse("RTMANAGER_ENGINE_DISK", optional_size, "must be 0 or a size such as 1g"),
            probe_address=parse("RTMANAGER_PROBE_ADDRESS", choice("ip", "hostname", "published"),
                                "must be ip, hostname or published"),
            backend=parse("RTMANAGER_BACKEND", choice("docker", "swarm"), "must be docker or swarm"),
            orphan_grace=parse("RTMANAGER_ORPHAN_GRACE", number(0, 86400), "must be seconds in 0..86400"),
            max_removals=parse("RTMANAGER_MAX_REMOVALS", number(0, 10**6, int), "must be an integer, 0 or more"),
            dry_run=parse("RTMANAGER_DRY_RUN", flag, "must be 0 or 1"),
            crash_limit=parse("RTMANAGER_CRASH_LIMIT", number(1, 1000, int), "must be an integer 1..1000"),
            crash_window=parse("RTMANAGER_CRASH_WINDOW", number(1, 10**7), "must be seconds, 1 or more"),
            crash_backoff_max=parse("RTMANAGER_CRASH_BACKOFF_MAX", number(0.1, 3600), "must be seconds in 0.1..3600"),
            health_interval=parse("RTMANAGER_HEALTH_INTERVAL", number(0, 86400), "must be seconds in 0..86400"),
            unreachable_after=parse("RTMANAGER_UNREACHABLE_AFTER", number(1, 1000, int), "must be an integer 1..1000"),
            unreachable_restart_after=parse("RTMANAGER_UNREACHABLE_RESTART_AFTER", number(0, 10**7),
                                            "must be seconds, 0 or more"),
            generation_timeout=parse("RTMANAGER_GENERATION_TIMEOUT", number(1, 10**6), "must be seconds, 1 or more"),
            auto_migrate=parse("RTMANAGER_AUTO_MIGRATE", flag, "must be 0 or 1"),
            lease_ttl=parse("RTMANAGER_LEASE_TTL", number(1, 600), "must be seconds in 1..600"),
            retention_days=parse("RTMANAGER_RETENTION_DAYS", number(0, 36500), "must be days, 0 or more"),
            log_format=parse("RTMANAGER_LOG_FORMAT", choice("json", "text"), "must be json or text"),
            log_level=parse("RTMANAGER_LOG_LEVEL", choice("debug", "info", "warning", "error"),
                            "must be DEBUG, INFO, WARNING or ERROR").upper(),
        )

