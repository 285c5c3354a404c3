"""Which replicas a pool has: `pools[].endpoints` outside Kubernetes, EndpointSlices inside it.

In Kubernetes each pool is a Service (named like the pool unless `gateway.services` maps it
elsewhere); its EndpointSlices carry the label `kubernetes.io/service-name=<service>`. We list and
then watch them, keep every slice of the Service, and hand the fleet the union of their endpoints:
ready ones for new requests, terminating ones kept (so their in-flight requests are still
accounted) but never picked. Not-ready endpoints that are not terminating are left out.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

from gateway.fleet import Endpoint, Fleet
from kvpilot.config import PoolConfig
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"


def static_endpoints(pool: PoolConfig) -> list[Endpoint]:
    return [Endpoint(url.rstrip("/"), url.rstrip("/")) for url in pool.endpoints]


def slice_endpoints(obj: Mapping[str, Any], default_port: int) -> list[Endpoint]:
    """Endpoints of one EndpointSlice (as a JSON dict), terminating ones marked."""
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") in ("http", "")), None)
    if port is None and ports:
        port = ports[0].get("port")
    port = port or default_port
    namespace = (obj.get("metadata") or {}).get("namespace") or "default"
    family = obj.get("addressType", "IPv4")
    out = []
    for ep in obj.get("endpoints") or []:
        addresses = ep.get("addresses") or []
        if not addresses:
            continue
        cond = ep.get("conditions") or {}
        terminating = bool(cond.get("terminating", False))
        ready = cond.get("ready")
        if ready is False and not terminating:
            continue  # not ready yet (or failing its probe): not a replica to send to
        host = f"[{addresses[0]}]" if family == "IPv6" else addresses[0]
        url = f"http://{host}:{port}"
        ref = ep.get("targetRef") or {}
        rid = f"{ref.get('namespace') or namespace}/{ref['name']}" if ref.get("name") else url
        out.append(Endpoint(rid, url, terminating))
    return out


class EndpointSliceWatch:
    """Lists and watches one pool's EndpointSlices and keeps the fleet's pool in step."""

    def __init__(self, api_client: Any, pool: PoolConfig, service: str, fleet: Fleet) -> None:
        self.api_client = api_client
        self.pool = pool
        self.service = service
        self.fleet = fleet
        self.slices: dict[str, list[Endpoint]] = {}

    def _matches(self, obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return labels.get(SERVICE_LABEL) == self.service

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        if not self._matches(obj):
            return
        if event_type == "DELETED":
            self.slices.pop(name, None)
        else:
            self.slices[name] = slice_endpoints(obj, self.pool.port)
        self.publish()

    def publish(self) -> None:
        merged: dict[str, Endpoint] = {}
        for eps in self.slices.values():
            for ep in eps:
                # The same pod can appear in two slices during a handover: ready wins.
                if ep.replica_id not in merged or merged[ep.replica_id].terminating:
                    merged[ep.replica_id] = ep
        self.fleet.set_endpoints(self.pool.name, merged.values())

    async def run(self) -> None:
        from kubernetes_asyncio import client, watch

        api = client.DiscoveryV1Api(self.api_client)
        selector = f"{SERVICE_LABEL}={self.service}"
        backoff = 0.2
        while True:
            try:
                listing = await api.list_namespaced_endpoint_slice(
                    self.pool.namespace, label_selector=selector, _preload_content=False
                )
                data = await listing.json()
                self.slices = {}
                for obj in data.get("items") or []:
                    if self._matches(obj):
                        self.slices[obj["metadata"]["name"]] = slice_endpoints(obj, self.pool.port)
                self.publish()
                backoff = 0.2
                w = watch.Watch()
                async with w.stream(
                    api.list_namespaced_endpoint_slice,
                    self.pool.namespace,
                    label_selector=selector,
                    resource_version=(data.get("metadata") or {}).get("resourceVersion"),
                    _preload_content=False,
                    timeout_seconds=300,
                ) as stream:
                    async for event in stream:
                        self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API server went away, a 410 Gone, a bad object
                log.warning("EndpointSlice watch for pool %s: %s; retrying", self.pool.name, e)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 10.0)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, dict):
            etype = event.get("type", "")
            obj = event.get("raw_object") or event.get("object")
        else:
            return
        if etype == "ERROR":
            raise RuntimeError(f"watch error: {obj}")
        if etype == "BOOKMARK" or not isinstance(obj, dict):
            return
        self.apply(etype, obj)


class Discovery:
    """Runs one EndpointSlice watch per pool (Kubernetes) or loads the static endpoints."""

    def __init__(
        self,
        pools: tuple[PoolConfig, ...],
        fleet: Fleet,
        *,
        kubernetes: bool,
        services: Mapping[str, str] | None = None,
        api_client: Any = None,
    ) -> None:
        self.pools = pools
        self.fleet = fleet
        self.kubernetes = kubernetes
        self.services = dict(services or {})
        self.api_client = api_client
        self._tasks: list[asyncio.Task[None]] = []
        self._own_client = False

    async def start(self) -> None:
        if not self.kubernetes:
            for pool in self.pools:
                self.fleet.set_endpoints(pool.name, static_endpoints(pool))
            return
        if self.api_client is None:
            self.api_client = await _default_api_client()
            self._own_client = True
        for pool in self.pools:
            if pool.endpoints:  # a pool can still be static inside a cluster
                self.fleet.set_endpoints(pool.name, static_endpoints(pool))
                continue
            service = self.services.get(pool.name, pool.name)
            w = EndpointSliceWatch(self.api_client, pool, service, self.fleet)
            self._tasks.append(asyncio.create_task(w.run(), name=f"endpointslices {pool.name}"))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        if self._own_client and self.api_client is not None:
            await self.api_client.close()


async def _default_api_client() -> Any:
    from kubernetes_asyncio import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()
