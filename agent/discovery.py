"""Which model-server replicas live on this node: static endpoints, or a watch of the node's Pods.

Outside Kubernetes the replicas are `pools[].endpoints`. In Kubernetes each pool is watched with
kubernetes-asyncio: Pods in the pool's namespace that match its label selector and run on this
node (`spec.nodeName=$NODE_NAME`). The watch resumes from the last resourceVersion when the stream
ends, and lists afresh when the server answers 410 Gone (the version fell out of its window).
A replica is added when its Pod is Running with an IP, and removed only when it leaves the pool
(deleted, relabelled, or finished); a replica that merely stops answering stays, marked stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from agent.errors import ErrorLog
from kvpilot.config import Config, PoolConfig

log = logging.getLogger("kvpilot.agent")

ENGINE_LABEL = "kvpilot.io/engine"
ROLE_LABEL = "kvpilot.io/role"
ACCELERATOR_SELECTOR = "cloud.google.com/gke-accelerator"


@dataclass(frozen=True)
class Target:
    """One model server to scrape."""

    replica_id: str  # namespace/pod in Kubernetes, the endpoint URL outside it
    address: str  # base URL
    pool: str
    models: tuple[str, ...]
    engine: str = "auto"
    role: str = "both"
    accelerator: str = ""
    namespace: str = ""
    pod: str = ""
    pod_uid: str = ""


def static_targets(cfg: Config) -> dict[str, Target]:
    out: dict[str, Target] = {}
    for pool in cfg.pools:
        for ep in pool.endpoints:
            url = ep.rstrip("/")
            out[url] = Target(
                replica_id=url,
                address=url,
                pool=pool.name,
                models=pool.models,
                engine=pool.engine,
                accelerator=pool.accelerator,
            )
    return out


def pod_target(pool: PoolConfig, pod: dict[str, Any], node: str) -> Target | None:
    """The Target a Pod stands for, or None when it is not (or no longer) a serving replica."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    if meta.get("deletionTimestamp") or spec.get("nodeName") != node:
        return None
    if meta.get("namespace", pool.namespace) != pool.namespace:
        return None
    if any(labels.get(k) != v for k, v in pool.selector.items()):
        return None
    if status.get("phase") != "Running" or not status.get("podIP"):
        return None
    ip = status["podIP"]
    host = f"[{ip}]" if ":" in ip else ip
    engine = labels.get(ENGINE_LABEL) or pool.engine
    accelerator = (spec.get("nodeSelector") or {}).get(ACCELERATOR_SELECTOR) or pool.accelerator
    return Target(
        replica_id=f"{meta.get('namespace')}/{meta.get('name')}",
        address=f"http://{host}:{pool.port}",
        pool=pool.name,
        models=pool.models,
        engine=engine,
        role=labels.get(ROLE_LABEL, "both"),
        accelerator=accelerator,
        namespace=meta.get("namespace", ""),
        pod=meta.get("name", ""),
        pod_uid=meta.get("uid", ""),
    )


class PoolPodWatch:
    """Keeps `targets` equal to one pool's serving Pods on this node."""

    def __init__(
        self,
        pool: PoolConfig,
        node: str,
        api: Any,  # kubernetes_asyncio.client.CoreV1Api
        errors: ErrorLog,
        on_change: Callable[[], None] = lambda: None,
        watch_timeout_s: int = 300,
    ) -> None:
        self.pool = pool
        self.node = node
        self.api = api
        self.errors = errors
        self.on_change = on_change
        self.watch_timeout_s = watch_timeout_s
        self.targets: dict[str, Target] = {}
        self.synced = asyncio.Event()  # set after the first successful list
        self.lists = 0  # how many times it listed (a 410 makes it list again)

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"field_selector": f"spec.nodeName={self.node}"}
        if self.pool.selector:
            kw["label_selector"] = ",".join(f"{k}={v}" for k, v in self.pool.selector.items())
        return kw

    def _apply(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        target = None if kind == "DELETED" else pod_target(self.pool, pod, self.node)
        before = self.targets.get(key)
        if target is None:
            self.targets.pop(key, None)
        else:
            self.targets[key] = target
        if before != target:
            self.on_change()

    async def _list(self) -> str:
        resp = await self.api.list_namespaced_pod(
            self.pool.namespace, _preload_content=False, **self._kwargs()
        )
        body = orjson.loads(await resp.read())
        seen: dict[str, Target] = {}
        for pod in body.get("items") or ():
            t = pod_target(self.pool, pod, self.node)
            if t is not None:
                seen[t.replica_id] = t
        if seen != self.targets:
            self.targets = seen
            self.on_change()
        self.lists += 1
        self.synced.set()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def run(self) -> None:
        from kubernetes_asyncio import watch
        from kubernetes_asyncio.client.exceptions import ApiException

        key = f"pods/{self.pool.namespace}/{self.pool.name}"
        backoff = 0.5
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    rv = await self._list()
                w = watch.Watch(return_type="object")  # raw dicts: no model objects built
                try:
                    kw = self._kwargs()
                    if rv and rv != "...":
                        kw["resource_version"] = rv
                    async for event in w.stream(
                        self.api.list_namespaced_pod,
                        self.pool.namespace,
                        timeout_seconds=self.watch_timeout_s,
                        allow_watch_bookmarks=True,
                        **kw,
                    ):
                        raw = event["raw_object"]
                        if event["type"] != "BOOKMARK":
                            self._apply(event["type"], raw)
                        rv = (raw.get("metadata") or {}).get("resourceVersion") or rv
                finally:
                    await w.close()
                self.errors.clear(key)
                backoff = 0.5  # the stream ended normally: resume from rv
            except asyncio.CancelledError:
                raise
            except ApiException as e:
                if e.status == 410:
                    log.info("%s: resourceVersion %s expired (410 Gone); listing again", key, rv)
                    rv = None
                    continue
                self.errors.report("kubernetes", key, f"HTTP {e.status}: {e.reason}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception as e:  # connection refused, DNS, a broken stream: keep trying
                self.errors.report("kubernetes", key, f"{type(e).__name__}: {e}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
