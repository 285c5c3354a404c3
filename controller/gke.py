"""GKE node-pool actuator: `nodePools/NP:setSize` with a Workload Identity token.

The token comes from the metadata server (as every Google client library does on GKE); both base
URLs are configurable so tests run against a local server and nothing here knows real hosts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"


class GkeError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodePoolShape:
    gpus_per_node: int  # the machine type's accelerators
    zones: int = 1  # the node pool's `locations`: setSize's nodeCount is per zone


@dataclass
class GkeNodePools:
    session: aiohttp.ClientSession
    project: str
    location: str
    cluster: str
    api_url: str = "https://container.googleapis.com"
    metadata_url: str = "http://metadata.google.internal"
    timeout_s: float = 10.0
    retries: int = 4
    backoff_s: float = 0.5
    _token: str = ""
    _token_expires: float = 0.0
    _shapes: dict[str, NodePoolShape] = field(default_factory=dict)

    async def token(self) -> str:
        if self._token and time.monotonic() < self._token_expires - 60:
            return self._token
        async with self.session.get(
            self.metadata_url + TOKEN_PATH,
            headers={"Metadata-Flavor": "Google"},
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        ) as r:
            if r.status != 200:
                raise GkeError(f"metadata server token: HTTP {r.status}")
            body = await r.json()
        self._token = body["access_token"]
        self._token_expires = time.monotonic() + float(body.get("expires_in", 300))
        return self._token

    def node_pool_url(self, node_pool: str) -> str:
        return (
            f"{self.api_url}/v1/projects/{self.project}/locations/{self.location}"
            f"/clusters/{self.cluster}/nodePools/{node_pool}"
        )

    async def shape(self, node_pool: str) -> NodePoolShape:
        """GPUs on each node of the pool and the zones it spans, read once and kept.

        `GET .../nodePools/NP`: `config.accelerators[].acceleratorCount` (an int64, sent as a JSON
        string; g2-standard-48 has 4 L4s, a3-highgpu-8g 8 H100s: nodes = GPUs / this, not one
        node per replica) and `locations` (the zones of a regional or multi-zonal pool, where
        setSize's nodeCount applies to each zone, as `gcloud container clusters resize
        --num-nodes` does).
        """
        cached = self._shapes.get(node_pool)
        if cached is not None:
            return cached
        body = await self._call("GET", self.node_pool_url(node_pool), None, f"get {node_pool}")
        accelerators = (body.get("config") or {}).get("accelerators") or []
        n = sum(int(a.get("acceleratorCount", 0)) for a in accelerators)
        if n < 1:
            raise GkeError(f"node pool {node_pool} has no GPUs in its config: {accelerators!r}")
        shape = NodePoolShape(n, max(1, len(body.get("locations") or [])))
        self._shapes[node_pool] = shape
        return shape

    async def set_size(self, node_pool: str, node_count: int) -> dict[str, Any]:
        """Resize a node pool to `node_count` nodes in each of its zones; retries 5xx, 429 and
        timeouts with backoff; returns the Operation."""
        if node_count < 0:
            raise ValueError(f"node_count {node_count} < 0")
        url = self.node_pool_url(node_pool) + ":setSize"
        return await self._call(
            "POST", url, {"nodeCount": node_count}, f"setSize {node_pool}={node_count}"
        )

    async def _call(
        self, method: str, url: str, body: dict[str, Any] | None, what: str
    ) -> dict[str, Any]:
        """One API call with the metadata token; 5xx, 429 and timeouts retried with backoff."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                token = await self.token()
                async with self.session.request(
                    method,
                    url,
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as r:
                    if r.status == 200:
                        return await r.json()  # type: ignore[no-any-return]
                    text = await r.text()
                    if r.status == 401:
                        self._token = ""  # expired or revoked: fetch a new one
                    elif r.status < 500 and r.status != 429:
                        raise GkeError(f"{what}: HTTP {r.status}: {text}")
                    last = GkeError(f"HTTP {r.status}: {text[:200]}")
            except (aiohttp.ClientError, TimeoutError) as e:
                last = e
            log.warning("GKE %s attempt %d failed: %s", what, attempt + 1, last)
            await asyncio.sleep(self.backoff_s * 2**attempt)
        raise GkeError(f"{what} failed after retries: {last}")
