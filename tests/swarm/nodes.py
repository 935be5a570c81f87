"""Swarms of the tests' own: private dockerds, each in a network namespace of its own.

Nothing here touches the machine's main dockerd (/var/run/docker.sock) or its
networks. A ``Cluster`` of N nodes is:

* a network namespace per node (``rtmsw-<id>-<i>``) with a veth pair to the host:
  host side ``192.168.S.(4i+1)/30``, node side ``192.168.S.(4i+2)/30`` (the node's
  address), where ``192.168.S.0/24`` is a subnet no route of this host uses;
* between every two nodes a direct veth pair (``192.168.S.(128+4k)/30``) and, in
  both namespaces, a /32 route to the other node's address over it (source: the
  node's own address), so node-to-node traffic never crosses the host's firewall;
* a private dockerd per node (``tests.support.PrivateDockerd``: its own data root,
  exec root, pidfile, socket under /run/rtm-dockerd-<name>/ and containerd), started
  with ``nsenter --net`` into the node's namespace (``ip netns exec`` would remount
  /sys and hide the cgroups), with the userland proxy on (host-mode published ports
  work without iptables) and ``no-new-privileges`` in its daemon.json;
* ``docker swarm init --advertise-addr <node 0>`` on node 0 (its overlay subnets
  from a 10.x/16 of their own), ``swarm join`` of the others as workers.

So every address a test may send traffic to is one of these namespaces' (a node
address, or a port published on it), and the overlay's addresses exist only
inside them. ``down()`` undoes everything: swarm leave, daemons stopped and their
data removed, namespaces and veths deleted, the subnet's reservation released.
A run that was killed leaves a directory /run/rtm-swarm-<id>/ with the pid of its
pytest process; ``sweep()`` tears down those whose process is gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import docker

from tests.support import PrivateDockerd

SUBNETS = [f"192.168.{n}.0/24" for n in range(64, 128)]
RUN = Path("/run")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def need_tools() -> None:
    """Fail (never skip) when something the swarm tests need is missing."""
    if os.geteuid() != 0:
        raise AssertionError("the Swarm tests need root (network namespaces, dockerd)")
    for tool in ("ip", "nsenter", "dockerd", "containerd", "docker", "docker-proxy"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} is not installed (Debian: apt-get install docker.io iproute2 util-linux)")


class SwarmNode(PrivateDockerd):
    """A private dockerd (and its containerd) in the network namespace ``netns``.

    With ``state_dir`` (a host directory) and ``state_root`` (a path), the node has a disk of its own
    for the games' state: containerd starts in a mount namespace of its own (``unshare --mount``, private
    propagation) in which ``state_dir`` is bind-mounted at ``state_root``, and dockerd joins that mount
    namespace. So a bind mount of ``state_root/<game>`` in an engine on this node is this node's
    ``state_dir/<game>``: another node, and the host (where the controller runs), see other directories at
    that path. The namespace dies with the node's processes (stop, restart: a new one, the same mount)."""

    def __init__(self, netns: str, name: str, address: str, state_dir: Path | None = None,
                 state_root: str | None = None) -> None:
        super().__init__(name=name)
        self.netns = netns
        self.address = address
        self.state_dir = state_dir
        (self.run_dir / "daemon.json").write_text(json.dumps({"no-new-privileges": True}) + "\n")
        # containerd in the namespace too (host-network containers would otherwise share the host's).
        wrapper = self.run_dir / "bin" / "rtm-containerd-netns"
        run = f'nsenter --net=/run/netns/{netns} -- {self._containerd_bin} "$@"'
        if state_dir is not None and state_root is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            run = (f"unshare --mount --propagation private -- /bin/sh -c 'mkdir -p {state_root} && "
                   f"mount --bind {state_dir} {state_root} && exec {run}' sh \"$@\"")
        wrapper.write_text(f"#!/bin/sh\nexec {run}\n")
        wrapper.chmod(0o755)
        self._containerd_bin = str(wrapper)

    def _dockerd_args(self) -> list[str]:
        args = super()._dockerd_args()
        assert "--userland-proxy=false" in args, args  # PrivateDockerd changed: published ports need the proxy
        mount = []
        if self.state_dir is not None:
            assert self.containerd is not None and self.containerd.poll() is None
            mount = [f"--mount=/proc/{self.containerd.pid}/ns/mnt"]  # containerd's: its bind mount of the state
        return ["nsenter", f"--net=/run/netns/{self.netns}", *mount, "--",
                *[a for a in args if a != "--userland-proxy=false"]]

    @property
    def node_id(self) -> str:
        c = self.client()
        try:
            return c.info()["Swarm"]["NodeID"]
        finally:
            c.close()


# The stub engine images every test swarm's nodes get (deploy/engine-stub/build.sh builds them), and the
# state directory helper (deploy/statedir-helper/build.sh), loaded on the nodes as an operator does.
STUBS = ("galaxy/engine-stub:1.0", "galaxy/engine-stub:1.1", "galaxy/engine-stub:crash", "galaxy/engine-stub:mute",
         "galaxy/statedir-helper:1")


class Cluster:
    """``state_root``: each node gets a state disk of its own mounted there (``state_dirs[i]`` on the
    host, see ``SwarmNode``); without it every node sees the host's filesystem (shared storage)."""

    def __init__(self, nodes: int = 1, state_root: str | None = None, heartbeat: float | None = None) -> None:
        self.n = nodes
        self.state_root = state_root
        self.heartbeat = heartbeat  # seconds between a node's heartbeats (Swarm: 5; a node is down after ~3)
        self.id = uuid.uuid4().hex[:6]
        self.dir = RUN / f"rtm-swarm-{self.id}"
        self.nodes: list[SwarmNode] = []
        self.netns = [f"rtmsw-{self.id}-{i}" for i in range(nodes)]
        self.host_links = [f"rs{self.id}{i}h" for i in range(nodes)]
        self.subnet = ""
        self.overlay_pool = ""
        self.addresses: list[str] = []
        self.host_addresses: list[str] = []
        self.state_dirs: list[Path] = [self.dir / f"state-{i}" for i in range(nodes)] if state_root else []

    # ----------------------------------------------------------------- set-up
    def _record(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({
            "pid": os.getpid(), "netns": self.netns, "links": self.host_links,
            "daemons": [{"run_dir": str(d.run_dir), "data_dir": str(d.data_dir),
                         "containerd": d.containerd.pid if d.containerd else None} for d in self.nodes]}))

    def _free_subnet(self) -> str:
        used = []
        for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
            word = line.split()[0] if line.split() else ""
            try:
                if word not in ("default", "local", "broadcast"):
                    used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
        for line in sh("ip", "-4", "-o", "addr").stdout.splitlines():
            parts = line.split()
            if "inet" in parts:
                used.append(ipaddress.ip_network(parts[parts.index("inet") + 1], strict=False))
        for other in RUN.glob("rtm-swarm-*/subnet"):
            try:
                used.append(ipaddress.ip_network(other.read_text().strip()))
            except (OSError, ValueError):
                continue
        free = [s for s in SUBNETS if not any(ipaddress.ip_network(s).overlaps(u) for u in used if u.prefixlen > 0)]
        if not free:
            raise AssertionError("no free 192.168.x.0/24 for a test swarm")
        return random.choice(free)

    def up(self, timeout: float = 90.0) -> Cluster:
        need_tools()
        sweep()
        self.dir.mkdir(parents=True)
        self.subnet = self._free_subnet()
        (self.dir / "subnet").write_text(self.subnet)
        self._record()
        base = ipaddress.ip_network(self.subnet).network_address
        for i, ns in enumerate(self.netns):
            host_ip, node_ip = str(base + 4 * i + 1), str(base + 4 * i + 2)
            inner = f"rs{self.id}{i}n"
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", self.host_links[i], "type", "veth", "peer", "name", inner, "netns", ns)
            sh("ip", "addr", "add", f"{host_ip}/30", "dev", self.host_links[i])
            sh("ip", "link", "set", self.host_links[i], "up")
            sh("ip", "-n", ns, "addr", "add", f"{node_ip}/30", "dev", inner)
            sh("ip", "-n", ns, "link", "set", inner, "up")
            self.addresses.append(node_ip)
            self.host_addresses.append(host_ip)
        k = 0
        for i in range(self.n):
            for j in range(i + 1, self.n):
                a_ip, b_ip = str(base + 128 + 4 * k + 1), str(base + 128 + 4 * k + 2)
                a, b = f"rs{self.id}{i}{j}a", f"rs{self.id}{i}{j}b"
                sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
                sh("ip", "link", "set", a, "netns", self.netns[i])
                sh("ip", "link", "set", b, "netns", self.netns[j])
                sh("ip", "-n", self.netns[i], "addr", "add", f"{a_ip}/30", "dev", a)
                sh("ip", "-n", self.netns[j], "addr", "add", f"{b_ip}/30", "dev", b)
                sh("ip", "-n", self.netns[i], "link", "set", a, "up")
                sh("ip", "-n", self.netns[j], "link", "set", b, "up")
                sh("ip", "-n", self.netns[i], "route", "add", f"{self.addresses[j]}/32", "via", b_ip,
                   "src", self.addresses[i])
                sh("ip", "-n", self.netns[j], "route", "add", f"{self.addresses[i]}/32", "via", a_ip,
                   "src", self.addresses[j])
                k += 1
        for i, ns in enumerate(self.netns):
            node = SwarmNode(ns, f"sw{self.id}{i}", self.addresses[i],
                             self.state_dirs[i] if self.state_dirs else None, self.state_root)
            self.nodes.append(node)
            self._record()
            node.start(timeout)
            self._record()
        pools = {d.pool for d in self.nodes}
        self.overlay_pool = random.choice([p for p in PrivateDockerd.POOLS if p not in pools])
        manager = self.manager_client()
        try:
            beat = {"dispatcher_heartbeat_period": int(self.heartbeat * 1e9)} if self.heartbeat else {}
            manager.swarm.init(advertise_addr=self.addresses[0], listen_addr=f"{self.addresses[0]}:2377",
                               default_addr_pool=[self.overlay_pool], subnet_size=24, **beat)
            token = manager.swarm.attrs["JoinTokens"]["Worker"]
            for i in range(1, self.n):
                c = self.nodes[i].client()
                try:
                    c.swarm.join(remote_addrs=[f"{self.addresses[0]}:2377"], join_token=token,
                                 advertise_addr=self.addresses[i], listen_addr=f"{self.addresses[i]}:2377")
                finally:
                    c.close()
            deadline = time.monotonic() + timeout
            while True:
                nodes = manager.api.nodes()
                if len(nodes) == self.n and all(n["Status"]["State"] == "ready" for n in nodes):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"swarm nodes not ready: {[n['Status'] for n in nodes]}")
                time.sleep(0.2)
        finally:
            manager.close()
        return self

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    def manager_client(self, timeout: int = 60) -> docker.DockerClient:
        return self.manager.client(timeout=timeout)

    def load_images(self, *refs: str) -> None:
        for node in self.nodes:
            node.load_images(*refs)

    def node_of(self, node_id: str) -> SwarmNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise AssertionError(f"no node {node_id} in this cluster")

    # --------------------------------------------------------------- tear-down
    def down(self) -> list[str]:
        """Undo everything; returns what could not be undone."""
        problems: list[str] = []
        for node in reversed(self.nodes):  # workers first, the manager last
            if node.running:
                try:
                    c = node.client(timeout=60)
                    try:
                        c.swarm.leave(force=True)
                    finally:
                        c.close()
                except Exception as exc:  # noqa: BLE001 - reported, the rest goes on
                    if "not part of a swarm" not in str(exc):
                        problems.append(f"swarm leave on {node.id}: {exc}")
        for node in self.nodes:
            try:
                node.remove()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"removing dockerd {node.id}: {exc}")
            if node.run_dir.exists() or node.data_dir.exists():
                problems.append(f"dockerd {node.id} left {node.run_dir} or {node.data_dir}")
        for ns in self.netns:
            sh("ip", "netns", "del", ns, check=False)
        for link in self.host_links:
            sh("ip", "link", "del", link, check=False)
        left = [ns for ns in self.netns if Path(f"/run/netns/{ns}").exists()]
        if left:
            problems.append(f"network namespaces left: {left}")
        links = sh("ip", "-o", "link").stdout
        problems += [f"veth left: {link}" for link in self.host_links if f" {link}@" in links or f" {link}:" in links]
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems

    def __enter__(self) -> Cluster:
        try:
            return self.up()
        except BaseException as exc:
            problems = self.down()
            if problems:
                exc.add_note(f"test swarm {self.id} left things behind after a failed set-up: {problems}")
            raise

    def __exit__(self, *exc) -> None:
        problems = self.down()
        assert not problems, f"test swarm {self.id} left things behind: {problems}"


def sweep() -> None:
    """Tear down the clusters of test runs that were killed (their pytest process is gone)."""
    for state in RUN.glob("rtm-swarm-*/state.json"):
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        pid = info.get("pid")
        if pid and Path(f"/proc/{pid}").exists():
            continue
        for d in info.get("daemons", []):
            run_dir, data_dir = d["run_dir"], d["data_dir"]
            # The engines of that daemon (by their containers' cgroups), then its processes: dockerd,
            # containerd, shims (the run directory on their command lines) and anything else in the
            # nodes' namespaces (docker-proxy), by pid.
            ids = [p.name for p in Path(data_dir, "docker", "containers").glob("*") if len(p.name) == 64]
            victims: set[int] = set()
            for cid in ids:
                for procs in Path("/sys/fs/cgroup").glob(f"*/docker/{cid}/cgroup.procs"):
                    try:
                        victims.update(int(x) for x in procs.read_text().split())
                    except (OSError, ValueError):
                        pass
            netns = set()
            for ns in info.get("netns", []):
                try:
                    netns.add(os.stat(f"/run/netns/{ns}").st_ino)
                except OSError:
                    pass
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if ((run_dir.rstrip("/") + "/").encode() in (proc / "cmdline").read_bytes()
                            or os.stat(proc / "ns" / "net").st_ino in netns):  # docker-proxy, too
                        victims.add(int(proc.name))
                except OSError:
                    pass
            victims.discard(os.getpid())
            for victim in victims:
                try:
                    os.kill(victim, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.5)
            for root in (data_dir, run_dir):
                top = root.rstrip("/")
                with open("/proc/mounts") as f:  # the data root itself is a mount (a tmpfs of its own)
                    mounts = [line.split()[1] for line in f
                              if line.split()[1] == top or line.split()[1].startswith(top + "/")]
                for m in reversed(mounts):
                    sh("umount", "-l", m, check=False)
                sh("rm", "-rf", "--one-file-system", root, check=False)
        for ns in info.get("netns", []):
            sh("ip", "netns", "del", ns, check=False)
        for link in info.get("links", []):
            sh("ip", "link", "del", link, check=False)
        shutil.rmtree(state.parent, ignore_errors=True)


def task_node(client, game: str) -> str | None:
    """The node of the one running task of a game's service (None: none, or more than one)."""
    tasks = [t for t in client.api.tasks(filters={"service": f"galaxy-game-{game}"})
             if t["Status"]["State"] == "running"]
    return tasks[0]["NodeID"] if len(tasks) == 1 else None
