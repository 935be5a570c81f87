"""controller.config: defaults, and one clear line naming the variable for every bad value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controller.config import (
    VARIABLES,
    Backend,
    ConfigError,
    LogFormat,
    LogLevel,
    ProbeAddress,
    Settings,
    VersionPolicy,
    markdown,
)
from desired.jobs import RecordDefaults


def test_defaults_parse() -> None:
    s = Settings.from_env({})
    assert s.database.database_url == "postgresql://postgres@127.0.0.1:55432/rtmanager"
    assert s.streams.redis_url == "redis://127.0.0.1:56379/0"
    assert s.runtime.docker_network == "galaxy-games"
    assert s.storage.state_root == "/var/lib/rtmanager/games"
    assert s.engine.engine_state_dir == "/var/lib/galaxy-engine"
    assert s.images.image_allowlist.patterns == ("galaxy/engine:*", "galaxy/engine-stub:*")
    assert s.leadership.instance == "default"
    assert s.engine.engine_port == 8080 and isinstance(s.engine.engine_port, int)
    assert s.engine.health_path == "/healthz"
    assert s.engine.start_timeout == 30.0
    assert s.runtime.cleanup_ttl == 86400.0
    assert s.runtime.resync_interval == 30.0
    assert s.runtime.concurrency == 4
    assert s.http.http_port == 8090
    assert s.http.http_host == "127.0.0.1"
    assert s.http.api_token == ""
    assert (s.streams.start_stream, s.streams.stop_stream, s.streams.results_stream) == (
        "runtime:start_jobs", "runtime:stop_jobs", "runtime:job_results")
    assert s.streams.consumer_group == "rtmanager"
    assert s.streams.consumer_name.startswith("default-")
    assert s.streams.results_maxlen == 100000
    assert s.runtime.stop_grace == 10.0
    assert s.runtime.job_timeout == 300.0
    assert s.engine.engine_memory == 512 * 1024 ** 2
    assert s.engine.engine_nano_cpus == 1_000_000_000
    assert s.engine.engine_pids == 256
    assert s.engine.engine_user == "10000:10000"  # engines run as a non-root user by default
    assert s.engine.engine_read_only is True
    assert s.engine.engine_tmpfs == 64 * 1024 ** 2 and s.engine.engine_disk == 1024 ** 3
    assert Settings.from_env({"RTMANAGER_ENGINE_USER": "image"}).engine.engine_user is None
    off = Settings.from_env({"RTMANAGER_ENGINE_READ_ONLY": "0", "RTMANAGER_ENGINE_TMPFS": "0",
                             "RTMANAGER_ENGINE_DISK": "0"})
    assert (off.engine.engine_read_only, off.engine.engine_tmpfs, off.engine.engine_disk) == (False, 0, 0)
    assert s.runtime.probe_address == "ip"
    assert s.runtime.orphan_grace == 10.0
    assert s.runtime.max_removals == 10
    assert s.runtime.dry_run is False
    assert s.engine.crash_limit == 5
    assert s.engine.crash_window == 600.0
    assert s.engine.crash_backoff_max == 30.0
    assert s.engine.health_interval == 15.0
    assert s.database.auto_migrate is True
    assert s.logging.log_format == "json"
    assert s.logging.log_level == "INFO"
    assert s.record_defaults == RecordDefaults(docker_network="galaxy-games",
                                               state_root="/var/lib/rtmanager/games", engine_port=8080)


def test_every_variable_has_a_default_and_help() -> None:
    names = [v.name for v in VARIABLES]
    assert len(names) == len(set(names))
    for v in VARIABLES:
        assert v.name.startswith("RTMANAGER_") and v.help
    for contract in ("RTMANAGER_DATABASE_URL", "RTMANAGER_REDIS_URL", "RTMANAGER_DOCKER_NETWORK",
                     "RTMANAGER_STATE_ROOT", "RTMANAGER_ENGINE_STATE_DIR", "RTMANAGER_IMAGE_ALLOWLIST",
                     "RTMANAGER_INSTANCE", "RTMANAGER_ENGINE_PORT", "RTMANAGER_ENGINE_HEALTH_PATH",
                     "RTMANAGER_START_TIMEOUT", "RTMANAGER_CLEANUP_TTL", "RTMANAGER_RESYNC_INTERVAL",
                     "RTMANAGER_CONCURRENCY", "RTMANAGER_HTTP_PORT", "RTMANAGER_API_TOKEN"):
        assert contract in names


def test_overrides_parse() -> None:
    s = Settings.from_env({
        "RTMANAGER_ENGINE_PORT": " 9000 ",
        "RTMANAGER_ENGINE_MEMORY": "1g",
        "RTMANAGER_ENGINE_CPUS": "1.5",
        "RTMANAGER_ENGINE_USER": "1000:1000",
        "RTMANAGER_LOG_LEVEL": "debug",
        "RTMANAGER_LOG_FORMAT": "TEXT",
        "RTMANAGER_API_TOKEN": "x" * 16,
        "RTMANAGER_STATE_ROOT": "/srv/games/../rtm/",
        "RTMANAGER_CLEANUP_TTL": "0",
        "RTMANAGER_HTTP_PORT": "0",
        "RTMANAGER_CONSUMER_NAME": "c1",
        "RTMANAGER_DATABASE_URL": "postgres://u:pw@db:5432/rtm",
        "RTMANAGER_REDIS_URL": "rediss://:pw@redis:6380/1",
    })
    assert s.engine.engine_port == 9000
    assert s.engine.engine_memory == 1024 ** 3
    assert s.engine.engine_nano_cpus == 1_500_000_000
    assert s.engine.engine_user == "1000:1000"
    assert s.logging.log_level == "DEBUG"
    assert s.logging.log_format == "text"
    assert s.http.api_token == "x" * 16
    assert s.storage.state_root == "/srv/rtm"
    assert s.runtime.cleanup_ttl == 0 and s.http.http_port == 0
    assert s.streams.consumer_name == "c1"
    # secrets are kept out of repr (settings may end up in a log line)
    assert "x" * 16 not in repr(s)
    assert "pw" not in repr(s)


@pytest.mark.parametrize(("raw", "value"), [
    ("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False),
])
def test_flags(raw: str, value: bool) -> None:
    s = Settings.from_env({"RTMANAGER_DRY_RUN": raw, "RTMANAGER_AUTO_MIGRATE": raw})
    assert s.runtime.dry_run is value and s.database.auto_migrate is value


def test_redis_unix_socket_url_is_accepted() -> None:
    # "unix" is one of the accepted schemes; a socket URL has a path and no host.
    s = Settings.from_env({"RTMANAGER_REDIS_URL": "unix:///run/redis/redis.sock?db=0"})
    assert s.streams.redis_url == "unix:///run/redis/redis.sock?db=0"


BAD = [
    ("RTMANAGER_ENGINE_PORT", "abc"),
    ("RTMANAGER_ENGINE_PORT", "0"),
    ("RTMANAGER_ENGINE_PORT", "65536"),
    ("RTMANAGER_HTTP_PORT", "-1"),
    ("RTMANAGER_HTTP_PORT", "http"),
    ("RTMANAGER_START_TIMEOUT", "-1"),
    ("RTMANAGER_START_TIMEOUT", "nan"),
    ("RTMANAGER_START_TIMEOUT", "soon"),
    ("RTMANAGER_CLEANUP_TTL", "-5"),
    ("RTMANAGER_RESYNC_INTERVAL", "0"),
    ("RTMANAGER_CONCURRENCY", "0"),
    ("RTMANAGER_CONCURRENCY", "2.5"),
    ("RTMANAGER_IMAGE_ALLOWLIST", ""),
    ("RTMANAGER_IMAGE_ALLOWLIST", " , ,"),
    ("RTMANAGER_ENGINE_HEALTH_PATH", "healthz"),
    ("RTMANAGER_ENGINE_HEALTH_PATH", "/health z"),
    ("RTMANAGER_ENGINE_MEMORY", "12x"),
    ("RTMANAGER_ENGINE_MEMORY", "1m"),
    ("RTMANAGER_ENGINE_CPUS", "0"),
    ("RTMANAGER_ENGINE_PIDS", "8"),
    ("RTMANAGER_ENGINE_USER", "root"),
    ("RTMANAGER_API_TOKEN", "short"),
    ("RTMANAGER_DATABASE_URL", "mysql://u@h/x"),
    ("RTMANAGER_DATABASE_URL", "postgresql:///nohost"),
    ("RTMANAGER_REDIS_URL", "http://h:6379"),
    ("RTMANAGER_DOCKER_NETWORK", "bad network"),
    ("RTMANAGER_INSTANCE", "-x"),
    ("RTMANAGER_INSTANCE", "a" * 64),
    ("RTMANAGER_STATE_ROOT", "relative/path"),
    ("RTMANAGER_ENGINE_STATE_DIR", "state"),
    ("RTMANAGER_START_STREAM", "bad stream"),
    ("RTMANAGER_CONSUMER_GROUP", ""),
    ("RTMANAGER_RESULTS_MAXLEN", "-1"),
    ("RTMANAGER_STOP_GRACE", "3601"),
    ("RTMANAGER_JOB_TIMEOUT", "0"),
    ("RTMANAGER_PROBE_ADDRESS", "dns"),
    ("RTMANAGER_ORPHAN_GRACE", "-1"),
    ("RTMANAGER_MAX_REMOVALS", "many"),
    ("RTMANAGER_DRY_RUN", "maybe"),
    ("RTMANAGER_CRASH_LIMIT", "0"),
    ("RTMANAGER_CRASH_WINDOW", "0"),
    ("RTMANAGER_CRASH_BACKOFF_MAX", "0"),
    ("RTMANAGER_HEALTH_INTERVAL", "-1"),
    ("RTMANAGER_AUTO_MIGRATE", "2"),
    ("RTMANAGER_LOG_FORMAT", "xml"),
    ("RTMANAGER_LOG_LEVEL", "TRACE"),
    ("RTMANAGER_BACKEND", "kubernetes"),
    ("RTMANAGER_VERSION_POLICY", "any"),
    # Red-team, stop 43: values each parser let through, which failed later with a traceback, bound
    # every interface, chowned the wrong user or made every start fail.
    ("RTMANAGER_HTTP_HOST", ""),
    ("RTMANAGER_HTTP_HOST", "not a host"),
    ("RTMANAGER_HTTP_HOST", "999.1.1.1"),
    ("RTMANAGER_DATABASE_URL", "postgresql://127.0.0.1:abc/x"),
    ("RTMANAGER_DATABASE_URL", "postgresql://127.0.0.1:99999/x"),
    ("RTMANAGER_REDIS_URL", "redis://h:abc/0"),
    ("RTMANAGER_REDIS_URL", "redis://h:99999/0"),
    ("RTMANAGER_REDIS_URL", "redis://h/abc"),
    ("RTMANAGER_STATE_ROOT", "/"),
    ("RTMANAGER_STATE_ROOT", "/.."),
    ("RTMANAGER_STATE_ROOT", "//"),
    ("RTMANAGER_ENGINE_USER", "4294967296"),
    ("RTMANAGER_ENGINE_USER", "4294967295"),
    ("RTMANAGER_ENGINE_USER", "1000:4294967295"),
    ("RTMANAGER_ENGINE_USER", "\u0661\u0662"),
    ("RTMANAGER_ENGINE_MEMORY", "9223372036854775808"),
    ("RTMANAGER_ENGINE_MEMORY", "\u0661\u0662g"),
    ("RTMANAGER_ENGINE_TMPFS", "10000000000000g"),
    ("RTMANAGER_ENGINE_DISK", "10000000000000g"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_value_is_one_line_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({name: value})
    msg = str(exc.value)
    assert msg.startswith(name + ":")
    assert "\n" not in msg and "\r" not in msg
    assert len(msg) < 300


GOOD_HOSTS = ["127.0.0.1", "::1", "0.0.0.0", "::", "fe80::1%eth0", "localhost", "rtmanager.internal",
              "rt_manager", "off-game-network"]  # a compose service's name may have an underscore


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_an_address_or_a_host_name_is_a_bind_address(host: str) -> None:
    assert Settings.from_env({"RTMANAGER_HTTP_HOST": host}).http.http_host == host
    # the keyword in any case is the keyword, not a host name to look up
    assert Settings.from_env({"RTMANAGER_HTTP_HOST": "Off-Game-Network"}).http.http_host == "off-game-network"


@pytest.mark.parametrize("url", ["redis://h:6379/0", "redis://h:6379/0/", "redis://h/", "redis://h",
                                 "rediss://u:p@h:1/15",
                                 "unix:///run/redis.sock?db=2"])
def test_a_redis_url_with_or_without_a_database_number(url: str) -> None:
    assert Settings.from_env({"RTMANAGER_REDIS_URL": url}).streams.redis_url == url


STREAM_VARS = ["RTMANAGER_START_STREAM", "RTMANAGER_STOP_STREAM", "RTMANAGER_CONTROL_STREAM",
               "RTMANAGER_RESULTS_STREAM", "RTMANAGER_SNAPSHOT_STREAM", "RTMANAGER_DEAD_LETTER_STREAM"]


@pytest.mark.parametrize(("first", "second"), [(a, b) for i, a in enumerate(STREAM_VARS) for b in STREAM_VARS[i + 1:]])
def test_two_streams_of_the_same_name_are_refused(first: str, second: str) -> None:
    """Red-team, stop 43: with the results stream named as the start stream, every failure answer was read
    back as a malformed start, answered again, and so on for ever; with the stop stream named as the start
    stream, every start was read as a stop and refused."""
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({first: "runtime:same", second: "runtime:same"})
    msg = str(exc.value)
    assert msg.startswith(second + ":") and first in msg and "\n" not in msg


def test_a_tokens_file_that_is_no_regular_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """Red-team, stop 43: a FIFO as the tokens file blocked start-up (and, read again on SIGHUP, the
    event loop with the lease renewal) for ever."""
    import os
    import subprocess
    import sys
    fifo = tmp_path / "tokens"
    os.mkfifo(fifo)
    code = ("from controller.config import Settings, ConfigError\n"
            "try:\n"
            f"    Settings.from_env({{'RTMANAGER_API_TOKENS_FILE': {str(fifo)!r}}})\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.startswith("RTMANAGER_API_TOKENS_FILE:") and "regular file" in out.stdout, out


def test_value_with_newline_still_gives_one_line() -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({"RTMANAGER_ENGINE_HEALTH_PATH": "/a\nb"})
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith("RTMANAGER_ENGINE_HEALTH_PATH:")


def test_first_bad_variable_is_reported_even_with_several() -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({"RTMANAGER_ENGINE_PORT": "x", "RTMANAGER_CONCURRENCY": "0"})
    assert str(exc.value).startswith("RTMANAGER_ENGINE_PORT:")


def test_non_secret_values_are_echoed() -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({"RTMANAGER_ENGINE_PORT": "abc"})
    assert "'abc'" in str(exc.value)


SECRETS = [
    ("RTMANAGER_DATABASE_URL", "mysql://u:secret@h/x", "secret"),
    ("RTMANAGER_DATABASE_URL", "postgresql://u:secret@/x", "secret"),
    ("RTMANAGER_DATABASE_URL", "postgresql://u:secret@[::1/x", "secret"),
    ("RTMANAGER_REDIS_URL", "http://:secret@h:6379", "secret"),
    ("RTMANAGER_API_TOKEN", "s3cr3t-token", "s3cr3t"),
]


@pytest.mark.parametrize(("name", "value", "secret"), SECRETS, ids=[s[1] for s in SECRETS])
def test_secrets_never_shown(name: str, value: str, secret: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({name: value})
    msg = str(exc.value)
    assert msg.startswith(name + ":")
    assert secret not in msg
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


CHOICES = [
    ("RTMANAGER_BACKEND", "runtime.backend", Backend, "must be docker or swarm"),
    ("RTMANAGER_VERSION_POLICY", "images.version_policy", VersionPolicy, "must be allowlist or registry"),
    ("RTMANAGER_PROBE_ADDRESS", "runtime.probe_address", ProbeAddress, "must be ip, hostname or published"),
    ("RTMANAGER_LOG_FORMAT", "logging.log_format", LogFormat, "must be json or text"),
    ("RTMANAGER_LOG_LEVEL", "logging.log_level", LogLevel, "must be DEBUG, INFO, WARNING or ERROR"),
]


@pytest.mark.parametrize(("name", "attr", "kind", "rule"), CHOICES, ids=[c[0] for c in CHOICES])
def test_a_choice_is_its_enum_in_any_case_and_a_bad_one_lists_the_values(name, attr, kind, rule) -> None:
    for member in kind:
        for raw in (member.value.lower(), member.value.upper()):
            group, field = attr.split(".")
            value = getattr(getattr(Settings.from_env({name: raw}), group), field)
            assert value is member and value == member.value  # a str too: compared with plain strings
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({name: "neither"})
    assert str(exc.value) == f"{name}: {rule}, got 'neither'"


def test_defaults_of_the_choices() -> None:
    s = Settings.from_env({})
    assert (s.runtime.backend, s.images.version_policy, s.runtime.probe_address) == (
        Backend.DOCKER, VersionPolicy.ALLOWLIST, ProbeAddress.IP)
    assert (s.logging.log_format, s.logging.log_level) == (LogFormat.JSON, LogLevel.INFO)


def test_every_setting_is_in_one_group_and_read_by_its_variable() -> None:
    s = Settings.from_env({"RTMANAGER_CONSUMER_NAME": "c1"})
    seen = []
    for group in dataclasses.fields(s):
        for f in dataclasses.fields(getattr(s, group.name)):
            var = f.metadata["var"]
            seen.append(var.name)
    assert seen == [v.name for v in VARIABLES]
    assert s.streams.consumer_name == "c1" and s.streams.start_stream == "runtime:start_jobs"
    with pytest.raises(AttributeError):
        s.no_such_setting  # noqa: B018


def test_the_readme_settings_table_is_the_generated_one() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    begin = "<!-- generated by `python -m controller.config --markdown`"
    end = "<!-- end of the generated settings table -->"
    assert readme.count(begin) == 1 and readme.count(end) == 1
    table = readme.split(begin, 1)[1].split("\n", 1)[1].split(end, 1)[0]
    assert table == markdown(), "the README's settings table is stale: paste `python -m controller.config --markdown`"
