"""AgentWatchClient: follow one agent's `/v1/state/watch` stream, reconnecting with backoff.

For the gateway and the controller:

    client = AgentWatchClient("http://10.0.0.5:9100", session)
    async for node_state in client:        # every NodeState the agent publishes
        ...
    client.latest                          # replica_id -> ReplicaState, from the newest state

`AgentSet` follows every agent behind a list of URLs (a headless Service name resolves to all).

When the agent goes away the client keeps `latest` as it was (each ReplicaState carries its
`observed_at`, so consumers judge staleness themselves) and reconnects after 0.1 s, 0.2 s, ...
up to `max_backoff_s`, with jitter so a fleet of gateways does not reconnect in lockstep.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import SplitResult, urlsplit, urlunsplit

import aiohttp

from kvpilot.signals import NodeState, ReplicaState, from_json
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger("kvpilot.agent.client")


class AgentWatchClient:
    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        min_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,  # no state for this long: the stream is dead, reconnect
    ) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self.state: NodeState | None = None
        self.latest: dict[str, ReplicaState] = {}
        self.connected = False
        self.connects = 0  # successful connections so far
        self.received_at = 0.0  # unix time the newest state arrived

    def __aiter__(self) -> AsyncIterator[NodeState]:
        return self.states()

    async def states(self) -> AsyncIterator[NodeState]:
        backoff = self.min_backoff_s
        while True:
            try:
                async with self.session.get(
                    f"{self.url}/v1/state/watch", timeout=self.timeout
                ) as resp:
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message=resp.reason or ""
                        )
                    self.connected = True
                    self.connects += 1
                    backoff = self.min_backoff_s
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        buf += chunk
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            if line.strip():
                                yield self._take(from_json(NodeState, line))
            except asyncio.CancelledError:
                raise
            except (
                aiohttp.ClientError,
                TimeoutError,
                ValueError,
                TypeError,
                KeyError,
                OSError,
            ) as e:
                log.debug("agent %s: %s: %s", self.url, type(e).__name__, e)
            self.connected = False
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff_s)

    def _take(self, state: NodeState) -> NodeState:
        self.state = state
        self.latest = {r.replica_id: r for r in state.replicas}
        self.received_at = time.time()
        return state

    async def run(self) -> None:
        """Consume the stream forever, only to keep `latest` current (run it as a task)."""
        async for _ in self.states():
            pass


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every IPv4 address of `host` (IPv6 only when it has none), sorted; a literal as is.

    A headless Service's name resolves to one address per ready pod, which is how the agents of
    every node are found from one configured URL.
    """
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except OSError:
            continue
        if infos:
            return sorted({info[4][0] for info in infos})
    return []


class AgentSet:
    """Follows every agent behind a list of URLs, re-resolving their host names periodically.

        agents = AgentSet(["http://kvpilot-agent.kvpilot.svc:9100"], session, on_state=cb)
        task = asyncio.create_task(agents.run())
        agents.replicas()       # newest ReplicaState per replica across all agents

    One AgentWatchClient per resolved address; addresses that leave the Service are dropped with
    their replicas, new ones are watched as they appear.
    """

    def __init__(
        self,
        urls: Sequence[str],
        session: aiohttp.ClientSession,
        *,
        on_state: Callable[[NodeState], None] | None = None,
        resolve_every_s: float = 30.0,
        resolver: Resolver = resolve_addresses,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.session = session
        self.on_state = on_state
        self.resolve_every_s = resolve_every_s
        self.resolver = resolver
        self.max_backoff_s = max_backoff_s
        self.clients: dict[str, AgentWatchClient] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def replicas(self) -> list[ReplicaState]:
        newest: dict[str, ReplicaState] = {}
        for c in self.clients.values():
            for rid, r in c.latest.items():
                if rid not in newest or r.observed_at > newest[rid].observed_at:
                    newest[rid] = r
        return list(newest.values())

    async def run(self) -> None:
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.resolve_every_s)
        finally:
            await self.close()

    async def refresh(self) -> None:
        """Resolve every URL once and start or stop watches to match."""
        wanted: set[str] = set()
        for url in self.urls:
            wanted |= await self._expand(url)
        for url in sorted(wanted - self.clients.keys()):
            client = AgentWatchClient(url, self.session, max_backoff_s=self.max_backoff_s)
            self.clients[url] = client
            self._tasks[url] = asyncio.create_task(self._follow(client), name=f"agent {url}")
        for url in sorted(self.clients.keys() - wanted):
            self._tasks.pop(url).cancel()
            del self.clients[url]
            log.info("agent %s left; dropping its replicas", url)

    async def _expand(self, url: str) -> set[str]:
        urls = await expand_url(url, self.resolver)
        if urls is None:
            # DNS trouble: keep watching what we had for this URL rather than drop every agent.
            log.warning("agent URL %s resolves to no address; keeping current watches", url)
            return {u for u in self.clients if u == url or _same_service(u, url)}
        return set(urls)

    async def _follow(self, client: AgentWatchClient) -> None:
        async for state in client:
            if self.on_state is not None:
                self.on_state(state)

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks.values())
        self._tasks.clear()


async def expand_url(url: str, resolver: Resolver = resolve_addresses) -> list[str] | None:
    """`url` once per address its host resolves to (a headless Service's name: one per ready
    pod), `[url]` for a literal address, None when the name resolves to nothing."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    addresses = await resolver(host, port)
    if not addresses:
        return None
    if addresses == [host]:
        return [url]
    return [_with_host(parts, a) for a in addresses]


def _with_host(parts: SplitResult, address: str) -> str:
    """`parts` (a split URL) with its host replaced by `address` (IPv6 in brackets)."""
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)).rstrip("/")


def _same_service(watched: str, configured: str) -> bool:
    a, b = urlsplit(watched), urlsplit(configured)
    return (a.scheme, a.port, a.path) == (b.scheme, b.port, b.path)
