"""AgentWatchClient: follow one agent's `/v1/state/watch` stream, reconnecting with backoff.

For the gateway and the controller:

    client = AgentWatchClient("http://10.0.0.5:9100", session)
    async for node_state in client:        # every NodeState the agent publishes
        ...
    client.latest                          # replica_id -> ReplicaState, from the newest state

When the agent goes away the client keeps `latest` as it was (each ReplicaState carries its
`observed_at`, so consumers judge staleness themselves) and reconnects after 0.1 s, 0.2 s, ...
up to `max_backoff_s`, with jitter so a fleet of gateways does not reconnect in lockstep.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp

from kvpilot.signals import NodeState, ReplicaState, from_json

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
