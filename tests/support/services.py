"""Processes and services of a test's own: ``rtmanager run`` as a subprocess, a throwaway Redis,
a throwaway Postgres cluster, a private dockerd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``rtmanager <args>`` with ``env`` over this process's environment, its output captured."""
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def migrate(env: dict[str, str]) -> None:
    """``rtmanager migrate`` on the database of ``env``; fails the test when it fails."""
    out = cli(env, "migrate")
    assert out.returncode == 0, out.stderr


def running(docker_client, game: str) -> list[str]:
    """The ids of the running containers of ``game``."""
    return [c.id for c in docker_client.containers.list(filters={"label": f"com.galaxy.game-id={game}"})]


class ControllerProcess:
    """``rtmanager run`` as a subprocess, with its log kept for failure messages."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> ControllerProcess:
        exe = Path(sys.executable).with_name("rtmanager")
        cmd = [str(exe), "run"] if exe.exists() else [sys.executable, "-m", "controller.cli", "run"]
        self._log = open(self.log_path, "ab")
        self._log_from = self._log.tell()  # several processes may share one log: this one's part
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until this process has logged its first line: from then on a SIGTERM is its to handle (one
        before the interpreter has run any of our code kills it with -15, as for any program)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_from)
                if b"rtmanager: starting" in f.read():
                    return
            assert self.proc.poll() is None, f"rtmanager exited {self.proc.returncode}: {self.log()[-2000:]}"
            time.sleep(0.05)
        raise AssertionError(f"rtmanager did not log its start within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Services of a test's own, so that a test may stop, kill or restart them: a throwaway Redis, a
# throwaway Postgres cluster and a private dockerd. Nothing here touches the machine's shared
# services (deploy/local/services.sh).

class RedisServer:
    """A throwaway redis-server of the test's own, so that it can be stopped.

    AOF with ``appendfsync always``: every acknowledged write is on disk before the reply, so a
    restart (even after SIGKILL) loses no acknowledged entry. The port and directory are kept
    across restarts."""

    def __init__(self, directory, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SHUTDOWN (the AOF is flushed), as an operator's restart would."""
        if self.running:
            client = redis.Redis.from_url(self.url, socket_timeout=5)
            try:
                client.shutdown()
            except (redis.ConnectionError, redis.ResponseError):
                pass
            finally:
                client.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash. With appendfsync always, acknowledged writes survive it."""
        if self.running:
            self.proc.kill()
            self.proc.wait(10)


class PostgresCluster:
    """A throwaway cluster of the test's own (initdb as the postgres user), so that it can be stopped."""

    def __init__(self) -> None:
        import glob
        import tempfile
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.dir = tempfile.mkdtemp(prefix="rtm-pg-", dir="/var/tmp")
        subprocess.run(["chown", "postgres:", self.dir], check=True)
        self.port = free_port()
        self.data = f"{self.dir}/data"
        self._as_pg(f"{self.bin}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _as_pg(self, *cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        self._as_pg(f"{self.bin}/pg_ctl", "-D", self.data, "-l", f"{self.dir}/log", "-w", "-o",
                    f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (clients are disconnected, a clean shutdown) or ``immediate`` (a crash: WAL replay at start)."""
        subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bin}/pg_ctl", "-D", self.data, "-m", mode,
                        "stop"], capture_output=True)

    def remove(self) -> None:
        self.stop()
        subprocess.run(["rm", "-rf", self.dir])


class PrivateDockerd:
    """A dockerd of the test's own, next to the machine's main one, so that a test may restart it.

    Everything it uses is its own: ``--data-root`` (under /var/tmp), ``--exec-root``, ``--pidfile``
    and its socket (under /run/rtm-dockerd-<id>/), and its own containerd. Engines' networks get
    addresses from a private pool (``--default-address-pool``, a 10.x/16 no route uses yet); with
    ``--iptables=false --ip-masq=false --bridge=none`` it writes no firewall rule and has no default
    bridge, so it never meets the main daemon's networks. The host reaches container IPs on its
    user-defined bridges directly (each bridge carries a connected route).

    Two details keep it out of the main daemon's way:

    * dockerd and containerd run under other process names (``rtm-dockerd``, ``rtm-containerd``:
      symlinks), so that ``pgrep -x dockerd`` / ``containerd`` (an operator's, or a test's, look
      for the machine's daemon) never sees them; containerd is therefore started by this class
      (``--containerd``), not by dockerd.
    * its registry traffic goes to a proxy at 127.0.0.1:9 where nothing listens: a pull of a
      missing image fails at once instead of reaching the internet.

    ``restart()`` is an operator's daemon restart: SIGTERM to dockerd (pid from its pidfile), wait
    until it has exited, then its containerd likewise, start both again with the same arguments,
    wait until the daemon answers. Without live-restore every container stops with the daemon.
    ``remove()`` removes everything it created: containers, networks, mounts, the data root.
    """

    POOLS = [f"10.{n}.0.0/16" for n in range(213, 251)]

    def __init__(self, name: str | None = None, address_pool: str | None = None, pool_size: int = 24) -> None:
        import shutil
        import tempfile
        import uuid

        self.id = name or uuid.uuid4().hex[:8]
        self.run_dir = Path(f"/run/rtm-dockerd-{self.id}")
        self.run_dir.mkdir(parents=True, exist_ok=False)
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"rtm-dockerd-{self.id}-", dir="/var/tmp"))
        # The data root is a tmpfs of its own: removing a daemon that was loaded with the stack's images
        # (about 1 GB of layer files) took 30 s of `rm -rf` on this disk (ext4 with online discard), a
        # second or so here. overlay2 works on tmpfs; the memory goes with the mount in remove().
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", f"rtm-dockerd-{self.id}", str(self.data_dir)],
                       check=True, capture_output=True)
        self.pool = address_pool or self._free_pool()
        (self.run_dir / "pool").write_text(self.pool)
        self.pool_size = pool_size
        self.socket = self.run_dir / "docker.sock"
        self.pidfile = self.run_dir / "docker.pid"
        self.containerd_socket = self.run_dir / "containerd" / "containerd.sock"
        self.log_path = self.data_dir / "dockerd.log"
        bin_dir = self.run_dir / "bin"
        bin_dir.mkdir()
        binaries = {"dockerd": shutil.which("dockerd") or "/usr/sbin/dockerd",
                    "containerd": shutil.which("containerd") or "/usr/bin/containerd"}
        for name_, path in binaries.items():
            if not os.path.exists(path):
                raise AssertionError(f"{name_} is not installed (Debian: apt-get install docker.io)")
            (bin_dir / f"rtm-{name_}").symlink_to(path)
        self._dockerd_bin = str(bin_dir / "rtm-dockerd")
        self._containerd_bin = str(bin_dir / "rtm-containerd")
        (self.run_dir / "daemon.json").write_text("{}\n")
        (self.run_dir / "containerd.toml").write_text(
            "version = 2\n"
            f'root = "{self.data_dir}/containerd"\n'
            f'state = "{self.run_dir}/containerd/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.containerd_socket}"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n')
        self.dockerd: subprocess.Popen | None = None
        self.containerd: subprocess.Popen | None = None
        self.restarts = 0

    # ------------------------------------------------------------------ helpers
    @classmethod
    def _free_pool(cls) -> str:
        """A 10.x/16 that no route of this host and no other private dockerd uses."""
        import ipaddress
        import random

        routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
        used = []
        for line in routes.splitlines():
            word = line.split()[0] if line.split() else ""
            try:
                used.append(ipaddress.ip_network(word if word != "default" else "0.0.0.0/32", strict=False))
            except ValueError:
                continue
        for other in Path("/run").glob("rtm-dockerd-*/pool"):
            try:
                used.append(ipaddress.ip_network(other.read_text().strip()))
            except (OSError, ValueError):
                continue
        free = [p for p in cls.POOLS if not any(ipaddress.ip_network(p).overlaps(u) for u in used
                                                if u.prefixlen > 0)]
        if not free:
            raise AssertionError("no free 10.x/16 address pool for a private dockerd")
        return random.choice(free)

    @property
    def host(self) -> str:
        """The DOCKER_HOST of this daemon."""
        return f"unix://{self.socket}"

    def client(self, timeout: int = 30):
        import docker

        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def _dockerd_args(self) -> list[str]:
        return [self._dockerd_bin, "--data-root", str(self.data_dir / "docker"), "--exec-root",
                str(self.run_dir / "exec"), "--pidfile", str(self.pidfile), "-H", self.host,
                "--containerd", str(self.containerd_socket), "--config-file", str(self.run_dir / "daemon.json"),
                "--iptables=false", "--ip-masq=false", "--ip-forward=false", "--bridge=none",
                "--userland-proxy=false",
                "--default-address-pool", f"base={self.pool},size={self.pool_size}"]

    def _wait_gone(self, proc: subprocess.Popen | None, pid: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            alive = proc.poll() is None if proc is not None else (pid is not None and _alive(pid))
            if not alive:
                return
            if time.monotonic() > deadline:
                if proc is not None:
                    proc.kill()
                    proc.wait(10)
                elif pid is not None:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    def _pid(self) -> int | None:
        """This daemon's dockerd: the pid its pidfile names, if that process is still this dockerd. A daemon
        killed with SIGKILL leaves its pidfile, and with pids numbered up to 32,768 a busy run gives that
        number to another process: a stop signalled it (a controller of the chaos test ran in parallel
        got a SIGTERM from nowhere)."""
        try:
            pid = pid_running(int(self.pidfile.read_text().strip()), str(self.pidfile))
        except (OSError, ValueError):
            pid = None
        if pid is None and self.dockerd is not None and self.dockerd.poll() is None:
            pid = self.dockerd.pid
        return pid

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60.0) -> None:
        proxy = "http://127.0.0.1:9"
        env = {**os.environ, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
               "https_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
        env.pop("DOCKER_HOST", None)
        self.containerd_socket.unlink(missing_ok=True)  # a killed containerd leaves its socket behind
        config = str(self.run_dir / "containerd.toml")
        with open(self.data_dir / "containerd.log", "ab") as out:
            self.containerd = subprocess.Popen([self._containerd_bin, "--config", config], stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while not self.containerd_socket.exists():
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"containerd did not start: {self._tail('containerd.log')}")
            time.sleep(0.05)
        with open(self.log_path, "ab") as out:
            self.dockerd = subprocess.Popen(self._dockerd_args(), stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=env)
        while True:
            try:
                client = self.client(timeout=5)  # asks the daemon for its API version at once
                try:
                    client.ping()
                    return
                finally:
                    client.close()
            except Exception:  # noqa: BLE001 - not up yet
                if self.dockerd.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"private dockerd did not start: {self._tail('dockerd.log')}") from None
                time.sleep(0.1)

    def _tail(self, name: str) -> str:
        try:
            return (self.data_dir / name).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.dockerd is not None and self.dockerd.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM dockerd (pid from its pidfile) and wait; then its containerd likewise."""
        pid = self._pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._wait_gone(self.dockerd if self.dockerd is not None and self.dockerd.pid == pid else None,
                            pid, timeout)
        if self.dockerd is not None and self.dockerd.poll() is None:
            self.dockerd.terminate()
            self._wait_gone(self.dockerd, None, timeout)
        if self.containerd is not None and self.containerd.poll() is None:
            self.containerd.terminate()
            self._wait_gone(self.containerd, None, timeout)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop(timeout)
        self.start(timeout)
        self.restarts += 1

    def load_images(self, *refs: str, source_host: str | None = None) -> None:
        """``docker save`` from the main daemon (or ``source_host``) piped into ``docker load`` here."""
        src = ["docker"] + (["-H", source_host] if source_host else [])
        env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
        save = subprocess.Popen([*src, "save", *refs], stdout=subprocess.PIPE, env=env)
        load = subprocess.run(["docker", "-H", self.host, "load", "-q"], stdin=save.stdout, capture_output=True,
                              env=env)
        save.stdout.close()
        if save.wait() != 0 or load.returncode != 0:
            raise AssertionError(f"could not load {refs} into the private dockerd: {load.stderr.decode()[-500:]}")

    def remove(self) -> None:
        """Remove everything this daemon created: containers, networks, mounts, data root, run dir."""
        if self.running:
            try:
                client = self.client(timeout=30)
                try:
                    for c in client.containers.list(all=True):
                        try:
                            c.remove(force=True)
                        except Exception:  # noqa: BLE001 - best effort, the data root goes anyway
                            pass
                    for n in client.networks.list():
                        if n.name not in ("bridge", "host", "none"):
                            try:
                                n.remove()
                            except Exception:  # noqa: BLE001
                                pass
                finally:
                    client.close()
            except Exception:  # noqa: BLE001
                pass
        self.stop()
        # Shims outlive their containerd by design; those of this daemon's containerd must go too.
        for pid in self._own_shims():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Whatever a killed daemon left mounted (container rootfs, netns, shm) must go before rm -rf,
        # which must never walk into a bind mount (a game's state directory).
        for root in (str(self.data_dir), str(self.run_dir)):
            for mount in reversed(_mounts_under(root)):
                subprocess.run(["umount", "-l", mount], capture_output=True)
        for path in (self.data_dir, self.run_dir):
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)

    def _own_shims(self) -> list[int]:
        """containerd-shim processes serving this daemon's containerd (by the socket in their arguments)."""
        mine = []
        needle = str(self.containerd_socket).encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                mine.append(int(proc.name))
        return mine

    def __enter__(self) -> PrivateDockerd:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def pid_running(pid: int, needle: str) -> int | None:
    """``pid`` if it runs a command line with ``needle`` in it (a pid from a file may be another process's)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if needle.encode() in cmdline else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _mounts_under(root: str) -> list[str]:
    """The mounts at ``root`` (a daemon's tmpfs data root) and under it, outermost first."""
    root = root.rstrip("/")
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            target = line.split()[1].encode().decode("unicode_escape")
            if target == root or target.startswith(root + "/"):
                out.append(target)
    return out
