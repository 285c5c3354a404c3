"""Which replicas a pool has: `pools[].endpoints` outside Kubernetes, EndpointSlices inside it.

In Kubernetes each pool is a Service (named like the pool unless `gateway.services` maps it
elsewhere); its EndpointSlices carry the label `kubernetes.io/service-name=<service>`. We list and
then watch them, keep every slice of the Service, and hand the fleet the union of their endpoints:
ready ones for new requests, terminating ones kept (so their in-flight requests are still
accounted) but never picked. Not-ready endpoints that are not terminating are left out.

A watch that keeps failing (a server that answers it with a plain list, a dropped connection,
RBAC that allows list but not watch) backs off up to `MAX_BACKOFF_S` between re-lists; the
backoff starts over only once a watch has delivered an event or stayed open `HEALTHY_WATCH_S`.
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
MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 30.0
HEALTHY_WATCH_S = 30.0  # a watch open this long without an event is a quiet one, not a broken one


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


def retry_backoff(backoff: float, *, events: int, watched_s: float) -> tuple[float, float]:
    """(base wait before listing again, backoff after that) once a list-and-watch round ended.

    A successful list proves nothing: a watch that fails right after it would re-list at the
    floor rate forever. Only a watch that delivered an event or stayed open a while resets."""
    if events > 0 or watched_s >= HEALTHY_WATCH_S:
        backoff = MIN_BACKOFF_S
    return backoff, min(backoff * 2, MAX_BACKOFF_S)


class EndpointSliceWatch:
    """Lists and watches one pool's EndpointSlices and keeps the fleet's pool in step."""

    def __init__(self, api_client: Any, pool: PoolConfig, service: str, fleet: Fleet) -> None:
        self.api_client = api_client
        self.pool = pool
        self.service = service
        self.fleet = fleet
        self.slices: dict[str, list[Endpoint]] = {}
        self.lists = 0  # lists done (the first one and every re-list after the watch ended)
        self.backoff = MIN_BACKOFF_S

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
        loop = asyncio.get_running_loop()
        while True:
            events, watch_started = 0, None
            try:
                listing = await api.list_namespaced_endpoint_slice(
                    self.pool.namespace, label_selector=selector, _preload_content=False
                )
                data = await listing.json()
                self.lists += 1
                self.slices = {}
                for obj in data.get("items") or []:
                    if self._matches(obj):
                        self.slices[obj["metadata"]["name"]] = slice_endpoints(obj, self.pool.port)
                self.publish()
                w = watch.Watch()
                watch_started = loop.time()
                async with w.stream(
                    api.list_namespaced_endpoint_slice,
                    self.pool.namespace,
                    label_selector=selector,
                    resource_version=(data.get("metadata") or {}).get("resourceVersion"),
                    _preload_content=False,
                    timeout_seconds=300,
                ) as stream:
                    async for event in stream:
                        events += self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API server went away, a 410 Gone, a bad object
                log.warning("EndpointSlice watch for pool %s: %s; retrying", self.pool.name, e)
            watched_s = 0.0 if watch_started is None else loop.time() - watch_started
            wait, self.backoff = retry_backoff(self.backoff, events=events, watched_s=watched_s)
            await asyncio.sleep(wait * (0.5 + random.random()))

    def _on_event(self, event: Any) -> bool:
        """Applies one watch event; True when it was one (the watch works), False for noise."""
        if not isinstance(event, dict):
            return False  # a line that is not JSON: kubernetes-asyncio hands it over as is
        etype = event.get("type", "")
        obj = event.get("raw_object") or event.get("object")
        if etype == "ERROR":
            raise RuntimeError(f"watch error: {obj}")
        if etype == "BOOKMARK":
            return True
        if not isinstance(obj, dict):
            return False
        self.apply(etype, obj)
        return True


class Discovery:
    """Runs one EndpointSlice watch per pool (Kubernetes) or loads the static endpoints.

    The API client is either given (the caller closes it) or made in `start()`; a client made
    here is closed in `stop()` and forgotten (`api_client` back to None), so whoever hands
    `api_client` on after a stop hands None, never a closed client. A config reload calls
    `restart()`, which keeps the client."""

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

    async def restart(
        self, pools: tuple[PoolConfig, ...], services: Mapping[str, str] | None = None
    ) -> None:
        """A config reload: the new pools' watches (or static endpoints) on the same client."""
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        self.pools, self.services = pools, dict(services or {})
        await self.start()

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        if self._own_client and self.api_client is not None:
            await self.api_client.close()
            self.api_client = None
            self._own_client = False


async def _default_api_client() -> Any:
    from kubernetes_asyncio import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()
