"""What the Docker and the Swarm backends share: one docker-py client behind a bounded thread pool.

docker-py is synchronous. Every call runs in a ``ThreadPoolExecutor`` whose size equals the
client's HTTP connection pool, so no thread ever waits for a connection and the event loop never
blocks. Cancelling the awaiting task does not cancel the call already running in its thread:
callers must treat every action as "may have happened" and re-read the truth next time, which the
reconciler does.

Driver errors are translated here, once, into the port's (``observed.errors``): connection
failures, timeouts and 5xx answers become ``BackendUnavailable``; a 404 or another 4xx is an
answer and stays docker-py's exception for the backend to interpret; an image that is neither
present nor pullable is ``ImageMissing``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
import docker.transport
import docker.utils
import requests.exceptions
import urllib3.exceptions

from observed.errors import BackendUnavailable, ImageMissing, NotSent, Refused
from observed.jsonarray import iter_array
from observed.text import safe_text

T = TypeVar("T")

# Calls that change something: refused once this replica may no longer act (lost leadership).
MUTATING = frozenset({"network", "pull", "create", "start", "stop", "update", "remove"})
_TRANSIENT = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)


def never_sent(exc: BaseException) -> bool:
    """The driver's error says the request never left: the connection was refused or timed out while it
    was made, or the daemon's socket is not there. Mutating calls open a new connection each (``_guard``'s
    caller), and the driver does not retry, so such an error means the daemon never saw the call."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (ConnectionRefusedError, FileNotFoundError, requests.exceptions.ConnectTimeout,
                          urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)):
            return True
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ()))
                 if isinstance(x, BaseException)]
    return False


def short_error(exc: BaseException) -> str:
    """One printable line of a driver error (daemon messages may carry any bytes)."""
    text = getattr(exc, "explanation", None) or str(exc)
    text = safe_text(str(text)).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__


def get_list(api: docker.APIClient, path: str, filters: dict[str, Any] | None = None, *,
             each: Callable[[Any], T] | None = None, **params: Any) -> list[Any]:
    """A list the daemon answers (``/containers/json``, ``/services``, ``/tasks``), fetched as docker-py
    would and decoded one element at a time (observed/jsonarray.py) instead of one ``json.loads`` of
    the whole answer: at 100,000 units that one call held the GIL, and so the event loop, for seconds.
    ``each`` turns every element into what is kept as soon as it is decoded, so the decoded elements
    are never all alive at once. Errors as docker-py's own list calls raise them."""
    if filters:
        params["filters"] = docker.utils.convert_filters(filters)
    res = api._get(api._url(path), params=params)
    api._raise_for_status(res)
    text = res.content.decode("utf-8")  # UnicodeDecodeError is a ValueError, as json.loads would raise
    del res  # its bytes: the text is what is read from here on
    if each is None:
        return list(iter_array(text))
    return [each(element) for element in iter_array(text)]


class OnePoolAdapter(docker.transport.UnixHTTPAdapter):  # type: ignore[misc]  # docker-py has no types
    """docker-py's adapter for the daemon's socket: reads share kept-alive connections, and every call that
    changes something goes out on a new connection.

    docker-py keys its pools by the request's whole URL, so each container's own paths
    (``/containers/<id>/json``, a create's ``?name=``) got a pool of their own, with a new connection to
    the daemon, and past 25 paths every new one closed the oldest pool's: each read about a game not
    touched lately paid a connect and a close (0.1-0.2 ms of our CPU, about 0.05 of the daemon's,
    0.15-0.3 ms of wall time here). Reads (GET, HEAD) now share one pool of ``max_pool_size``
    connections, as many as the calling threads.

    A call that changes something (a create, a start, a stop, a removal, a pull) asks for its connection
    to be closed after it (``Connection: close``), so the next one opens a new connection. A stopping
    dockerd refuses new connections but still carries out what comes on the ones it has
    (observed/restarts.py): a container created or started then is half made and cannot be started after
    the restart. docker-py's keying gave such calls a new connection only by the chance of a path not
    called lately (a second start of the same container, a Swarm's ``/services/create``, rode a kept one)."""

    READS = frozenset({"GET", "HEAD"})
    READ_POOL, CHANGE_POOL = "rtmanager:reads", "rtmanager:changes"  # keys no request URL can be

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> Any:
        return self.get_connection(self.READ_POOL if request.method in self.READS else self.CHANGE_POOL, proxies)

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.method not in self.READS:
            request.headers["Connection"] = "close"
        return super().send(request, *args, **kwargs)


class DaemonClient:
    """The plumbing of a backend that talks to a Docker daemon (``name`` prefixes its errors).

    ``observer(op, seconds, ok)`` sees every call (metrics); ``guard()`` runs before every
    mutating call and raises when this replica may no longer change anything. Subclasses may
    override ``_reachable`` / ``_unreachable`` to track the daemon's outages.
    """

    name = "docker"
    network: str  # the game network, set by the subclass

    def __init__(self, *, pool_size: int, timeout: float, observer: Callable[[str, float, bool], None] | None,
                 guard: Callable[[], None] | None, base_url: str | None = None) -> None:
        self.pool_size = pool_size
        self._timeout = timeout
        self._base_url = base_url  # None: DOCKER_HOST and friends, as docker.from_env reads them
        self._client: docker.DockerClient | None = None
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix=self.name)
        self._observer = observer
        self._guard = guard
        self._network_ready = False  # reset when an action finds the network gone
        self._network_lock = asyncio.Lock()  # Docker accepts two networks with one name: create once

    def _new_client(self, timeout: float | None) -> docker.DockerClient:
        if self._base_url:
            client = docker.DockerClient(base_url=self._base_url, timeout=timeout, max_pool_size=self.pool_size)
        else:
            client = docker.from_env(timeout=timeout, max_pool_size=self.pool_size)
        if client.api.base_url.startswith("http+docker://"):
            # A local socket: no proxy, .netrc or CA bundle of the environment applies to it, and requests
            # read them all again on every call (a third of an inspect's CPU).
            client.api.trust_env = False
            old = client.api.adapters.get("http+docker://")
            if type(old) is docker.transport.UnixHTTPAdapter:
                one = OnePoolAdapter("http+unix://" + old.socket_path, old.timeout, max_pool_size=old.max_pool_size)
                client.api.mount("http+docker://", one)
                client.api._custom_adapter = one  # the adapter docker-py falls back to, as it was
                old.close()
        return client

    def _docker(self) -> docker.DockerClient:
        if self._client is None:
            self._client = self._new_client(int(self._timeout))
        return self._client

    def _reachable(self) -> None:
        """The daemon answered a call."""

    def _unreachable(self) -> None:
        """A call could not reach the daemon."""

    async def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call: Callable[[], T] = functools.partial(fn, *args, **kwargs)
        guard = self._guard if op in MUTATING else None
        if guard is not None:
            guard()
            made = call

            def call() -> T:
                guard()  # again when a thread takes it: a call queued behind busy threads may start past the term
                return made()
        loop = asyncio.get_running_loop()
        started = loop.time()
        ok = False
        try:
            result = await loop.run_in_executor(self._executor, call)
            ok = True
            self._reachable()
            return result
        except docker.errors.NotFound:
            ok = True  # an answer, not a failure of the daemon
            raise
        except docker.errors.APIError as exc:
            if exc.status_code is not None and exc.status_code < 500:
                ok = True
                raise
            raise BackendUnavailable(f"{self.name} {op}: {short_error(exc)}") from exc
        except docker.errors.DockerException as exc:
            self._unreachable()
            raise (NotSent if never_sent(exc) else BackendUnavailable)(f"{self.name} {op}: {short_error(exc)}") from exc
        except _TRANSIENT as exc:
            self._unreachable()
            raise (NotSent if never_sent(exc) else BackendUnavailable)(
                f"{self.name} {op}: {exc.__class__.__name__}: {exc}") from exc
        finally:
            if self._observer is not None:
                self._observer(op, loop.time() - started, ok)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    # --------------------------------------------------------------- network
    async def ensure_network(self) -> None:
        """The game network, made once per process (and again after it was found gone)."""
        async with self._network_lock:
            if not self._network_ready:
                await self._call("network", self._ensure_network_sync)
                self._network_ready = True

    def _ensure_network_sync(self) -> None:
        raise NotImplementedError

    async def network_subnets(self) -> list[str]:
        """The subnets of the game network, e.g. ``["172.20.0.0/16"]``; Refused when it does not exist
        (read at start, before this replica may make it: the deployment declares it)."""
        try:
            attrs = await self._call("inspect", lambda: self._docker().api.inspect_network(self.network))
        except docker.errors.NotFound as exc:
            raise Refused(f"the game network {self.network} does not exist yet") from exc
        subnets = [str(c["Subnet"]) for c in ((attrs.get("IPAM") or {}).get("Config") or []) if c.get("Subnet")]
        if not subnets:
            raise Refused(f"the game network {self.network} has no subnet to keep off")
        return subnets

    # ---------------------------------------------------------------- images
    async def image_present(self, image: str) -> bool:
        try:
            await self._call("image_inspect", lambda: self._docker().api.inspect_image(image))
            return True
        except docker.errors.NotFound:
            return False

    async def ensure_image(self, image: str) -> None:
        """Present locally, or pulled once; otherwise ImageMissing."""
        if await self.image_present(image):
            return
        try:
            logging.getLogger(f"rtmanager.{self.name}").info("pulling image %s", image)
            await self._call("pull", lambda: self._docker().images.pull(image))
        except (docker.errors.NotFound, docker.errors.APIError, BackendUnavailable) as exc:
            # One pull, then image_unavailable (the contract): the daemon reports an unreachable
            # registry and an unknown image alike, as a 5xx, so they cannot be told apart here.
            raise ImageMissing(f"image {image} is not present and could not be pulled: {short_error(exc)}") from exc
