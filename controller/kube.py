"""The Kubernetes edge: /scale subresources, placeholder pods, Events, the leader Lease and
the leader's saved state (a ConfigMap).

Everything here is I/O through kubernetes-asyncio; the decisions come from replicas.py and
nodepools.py. Every API call retries 5xx, 429 and timeouts with exponential backoff; a scale write
is optimistic (the Scale's resourceVersion goes with it) and on 409 it re-reads and tries again,
so a concurrent change is never overwritten blindly and an error never leaves a wrong size.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import Counter, Gauge

from controller.loop import WorkloadSize
from controller.nodepools import (
    PLACEHOLDER_LABELS,
    AcceleratorInventory,
    gpu_inventory,
    placeholder_pod,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

WORKLOADS = {
    "Deployment": ("apps", "v1", "deployments"),
    "StatefulSet": ("apps", "v1", "statefulsets"),
    "LeaderWorkerSet": ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets"),
}
COMPONENT = "kvpilot-controller"

API_ERRORS = Counter(
    "kvpilot_controller_api_errors_total",
    "Kubernetes API calls that failed (each try), by operation and status.",
    ["op", "status"],
)
IS_LEADER = Gauge("kvpilot_controller_leader", "1 while this controller holds the leader lease.")


class KubeError(RuntimeError):
    """An API call that failed for good (after retries, or with a non-retryable status)."""


class SizeChanged(KubeError):
    """The workload's size is no longer the one the decision was made from: not written, so the
    next tick decides again from what is there now."""


@dataclass
class Retry:
    attempts: int = 4
    backoff_s: float = 0.2
    timeout_s: float = 10.0


def _retryable(e: BaseException) -> bool:
    if isinstance(e, ApiException):
        return e.status in (429,) or (e.status or 0) >= 500 or e.status == 0
    return isinstance(e, TimeoutError | aiohttp.ClientError)


async def call(op: str, fn: Callable[[], Awaitable[T]], retry: Retry) -> T:
    """Run one API call with retries on transient failures; other errors go straight up."""
    for attempt in range(retry.attempts):
        try:
            return await fn()
        except Exception as e:
            status = str(getattr(e, "status", type(e).__name__))
            API_ERRORS.labels(op, status).inc()
            if not _retryable(e) or attempt == retry.attempts - 1:
                raise
            log.warning("%s failed (%s), retrying", op, status)
            await asyncio.sleep(retry.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


async def call_or_none(op: str, fn: Callable[[], Awaitable[T]], retry: Retry) -> T | None:
    """`call`, with 404 (the object is not there) as None: read-or-create and replace-or-create
    paths branch on it."""
    try:
        return await call(op, fn, retry)
    except ApiException as e:
        if e.status != 404:
            raise
        return None


def _spec_replicas(scale: dict[str, Any]) -> int:
    return int(scale.get("spec", {}).get("replicas", 0) or 0)


@dataclass
class KubeScaler:
    """Reads and writes workload sizes through the /scale subresource."""

    api: client.ApiClient
    retry: Retry = field(default_factory=Retry)
    conflict_retries: int = 5

    def _co(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    async def get_scale(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        group, version, plural = WORKLOADS[kind]
        return await call(
            "get_scale",
            lambda: self._co().get_namespaced_custom_object_scale(
                group, version, namespace, plural, name, _request_timeout=self.retry.timeout_s
            ),
            self.retry,
        )

    async def get_replicas(self, kind: str, namespace: str, name: str) -> int:
        scale = await self.get_scale(kind, namespace, name)
        return _spec_replicas(scale)

    async def get_size(self, kind: str, namespace: str, name: str) -> WorkloadSize:
        """spec.replicas, and how many of the workload's pods are Pending with no node yet
        (found by the label selector the /scale subresource reports; a Pending pod already
        bound to a node is pulling its image or running init containers: its node is bought).
        The count is what lets the replica policy treat those pods as the HPA does (unready,
        not missing); if it cannot be read, it is 0: they count as missing, the more
        conservative reading."""
        scale = await self.get_scale(kind, namespace, name)
        replicas = _spec_replicas(scale)
        selector = (scale.get("status") or {}).get("selector") or ""
        if not selector or replicas == 0:
            return WorkloadSize(replicas)
        core = client.CoreV1Api(self.api)
        try:
            pods = await call(
                "list_pods",
                lambda: core.list_namespaced_pod(
                    namespace,
                    label_selector=selector,
                    field_selector="status.phase=Pending,spec.nodeName=",
                    _request_timeout=self.retry.timeout_s,
                ),
                self.retry,
            )
        except (ApiException, TimeoutError, aiohttp.ClientError) as e:
            log.warning("%s %s/%s: cannot list its pods: %r", kind, namespace, name, e)
            return WorkloadSize(replicas)
        pending = sum(
            1
            for p in pods.items
            if p.status is not None
            and p.status.phase == "Pending"  # the field selector only saves the transfer
            and not (p.spec is not None and p.spec.node_name)
            and (p.metadata is None or p.metadata.deletion_timestamp is None)
        )
        return WorkloadSize(replicas, min(pending, replicas))

    async def set_replicas(
        self, kind: str, namespace: str, name: str, replicas: int, *, expect: int | None = None
    ) -> int:
        """Set spec.replicas; returns the size it had before. 409 -> re-read and retry.

        `expect`: the size the decision was made from; if a re-read finds another (someone
        scaled in between), nothing is written (SizeChanged) rather than a stale target.
        """
        group, version, plural = WORKLOADS[kind]
        for _ in range(self.conflict_retries):
            scale = await self.get_scale(kind, namespace, name)
            before = _spec_replicas(scale)
            if before == replicas:
                return before
            if expect is not None and before != expect:
                raise SizeChanged(
                    f"scale {kind} {namespace}/{name}: {before} replicas now, decided from {expect}"
                )
            body = {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "resourceVersion": scale.get("metadata", {}).get("resourceVersion"),
                },
                "spec": {"replicas": replicas},
            }
            try:
                await call(
                    "replace_scale",
                    lambda body=body: self._co().replace_namespaced_custom_object_scale(
                        group,
                        version,
                        namespace,
                        plural,
                        name,
                        body,
                        _request_timeout=self.retry.timeout_s,
                    ),
                    self.retry,
                )
                return before
            except ApiException as e:
                if e.status != 409:
                    raise
                log.info("scale %s/%s: conflict, re-reading", namespace, name)
        raise KubeError(f"scale {kind} {namespace}/{name}: still conflicting after retries")

    async def event(
        self,
        kind: str,
        namespace: str,
        name: str,
        *,
        reason: str,
        message: str,
        type_: str = "Normal",
    ) -> None:
        """One Event per scaling decision, on the workload, so `kubectl describe` shows why."""
        group, version, _ = WORKLOADS[kind]
        now = dt.datetime.now(dt.UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{group}/{version}",
                "kind": kind,
                "name": name,
                "namespace": namespace,
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        await call(
            "create_event",
            lambda: client.CoreV1Api(self.api).create_namespaced_event(
                namespace, body, _request_timeout=self.retry.timeout_s
            ),
            self.retry,
        )


@dataclass
class Placeholders:
    """Keeps the placeholder pause pods in one namespace equal to a wanted list."""

    api: client.ApiClient
    namespace: str
    priority_class: str = "kvpilot-placeholder"
    image: str = "registry.k8s.io/pause:3.10"
    retry: Retry = field(default_factory=Retry)

    async def list(self) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in PLACEHOLDER_LABELS.items())
        resp = await call(
            "list_placeholders",
            lambda: client.CoreV1Api(self.api).list_namespaced_pod(
                self.namespace, label_selector=selector, _request_timeout=self.retry.timeout_s
            ),
            self.retry,
        )
        pods = [self.api.sanitize_for_serialization(p) for p in resp.items]
        # Filter here too: the label selector is a server-side courtesy, not a guarantee.
        return [
            p
            for p in pods
            if all(
                p["metadata"].get("labels", {}).get(k) == v for k, v in PLACEHOLDER_LABELS.items()
            )
        ]

    async def reconcile(self, wanted: Sequence[tuple[str, str, int, str]]) -> tuple[int, int]:
        """wanted: (pool, accelerator, gpus, node_pool) per pod. Returns (created, deleted)."""
        have: dict[tuple[str, str, int, str], list[str]] = {}
        for p in await self.list():
            labels = p["metadata"].get("labels", {})
            node_pool = p["spec"].get("nodeSelector", {}).get("cloud.google.com/gke-nodepool", "")
            key = (
                labels.get("kvpilot.io/pool", ""),
                labels.get("kvpilot.io/accelerator", ""),
                int(labels.get("kvpilot.io/gpus", "1")),
                node_pool,
            )
            have.setdefault(key, []).append(p["metadata"]["name"])
        want: dict[tuple[str, str, int, str], int] = {}
        for key in wanted:
            want[key] = want.get(key, 0) + 1
        core = client.CoreV1Api(self.api)
        created = deleted = 0
        for key in sorted(set(have) | set(want)):
            names = sorted(have.get(key, []))
            n = want.get(key, 0)
            for name in names[n:]:
                try:
                    await call(
                        "delete_placeholder",
                        lambda name=name: core.delete_namespaced_pod(
                            name, self.namespace, _request_timeout=self.retry.timeout_s
                        ),
                        self.retry,
                    )
                    deleted += 1
                except ApiException as e:
                    if e.status != 404:  # already gone (preempted): fine
                        raise
            pool, acc, gpus, node_pool = key
            for _ in range(n - len(names)):
                pod = placeholder_pod(
                    name=f"kvpilot-ph-{pool}-{uuid.uuid4().hex[:8]}",
                    namespace=self.namespace,
                    pool=pool,
                    accelerator=acc,
                    gpus=gpus,
                    node_pool=node_pool,
                    priority_class=self.priority_class,
                    image=self.image,
                )
                await call(
                    "create_placeholder",
                    lambda pod=pod: core.create_namespaced_pod(
                        self.namespace, pod, _request_timeout=self.retry.timeout_s
                    ),
                    self.retry,
                )
                created += 1
        return created, deleted


@dataclass
class StateConfigMap:
    """The leader's learned state (each pool's daily profile) in one ConfigMap, under
    `profiles.json`: read at the start of each term, written every few minutes while leading
    (controller/loop.py `StateStore`). One writer at a time (the leader); a write replaces the
    whole ConfigMap, created on first use."""

    api: client.ApiClient
    namespace: str
    name: str
    retry: Retry = field(default_factory=Retry)
    KEY = "profiles.json"

    async def load(self) -> dict[str, dict]:
        core = client.CoreV1Api(self.api)
        cm = await call_or_none(
            "read_state",
            lambda: core.read_namespaced_config_map(
                self.name, self.namespace, _request_timeout=self.retry.timeout_s
            ),
            self.retry,
        )
        if cm is None:
            return {}  # nothing saved yet
        raw = (cm.data or {}).get(self.KEY)
        if not raw:
            return {}
        doc = json.loads(raw)
        pools = doc.get("pools") if isinstance(doc, dict) else None
        if not isinstance(pools, dict):
            raise ValueError(f"configmap {self.namespace}/{self.name}: no pools in {self.KEY}")
        return {k: v for k, v in pools.items() if isinstance(v, dict)}

    async def save(self, profiles: dict[str, dict]) -> None:
        core = client.CoreV1Api(self.api)
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/component": COMPONENT},
            },
            "data": {self.KEY: json.dumps({"version": 1, "pools": profiles})},
        }
        replaced = await call_or_none(
            "write_state",
            lambda: core.replace_namespaced_config_map(
                self.name, self.namespace, body, _request_timeout=self.retry.timeout_s
            ),
            self.retry,
        )
        if replaced is None:  # not there yet: the first save
            await call(
                "write_state",
                lambda: core.create_namespaced_config_map(
                    self.namespace, body, _request_timeout=self.retry.timeout_s
                ),
                self.retry,
            )


def _micro_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).timestamp()
    return dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()


@dataclass
class LeaderElector:
    """Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does.

    `try_acquire()` renews our lease, takes an expired one, or reports that another holder is
    alive. Writes carry the resourceVersion, so of two candidates racing for an expired lease
    exactly one wins (the other gets 409). As in client-go, "expired" is judged on this
    process's own monotonic clock: a lease record counts as renewed when this candidate *saw* it
    change, and expires `lease_duration_s` after that, whatever the holder's wall clock wrote
    (so clock skew between nodes cannot hand the lease over early; a candidate that has just
    started waits one lease duration).

    `run()` calls it every `lease_duration_s / 5` (client-go's 2 s retry period for a 15 s
    lease), apart from the control loop, whose tick can take longer than a lease; each try is
    cut off at the renew deadline. `holds()` is true only while our last renewal is younger
    than the renew deadline (2/3 of the lease, client-go's 10 s of 15), so a leader that cannot
    renew stops acting well before another may take over; `remaining()` is what is left of it,
    the bound the control loop puts on each write.
    """

    api: client.ApiClient
    namespace: str
    name: str
    identity: str
    lease_duration_s: float = 15.0
    clock: Callable[[], float] = time.time  # wall clock: the times written into the Lease
    monotonic: Callable[[], float] = time.monotonic  # this process's clock: deadlines, expiry
    retry: Retry = field(default_factory=Retry)
    is_leader: bool = False
    renewed_at: float | None = None  # monotonic() when our lease was last written
    # The other holder's record as last seen, and monotonic() when it was first seen so.
    _seen: tuple[Any, ...] | None = None
    _seen_at: float = 0.0

    @property
    def renew_deadline_s(self) -> float:
        return self.lease_duration_s * 2 / 3

    async def try_acquire(self) -> bool:
        started = self.monotonic()
        self.is_leader = await self._try()
        if self.is_leader:
            self.renewed_at = started  # the lease says renewTime <= this: count from here
        IS_LEADER.set(1 if self.holds() else 0)
        return self.is_leader

    def remaining(self) -> float:
        """Seconds this leader may still act (0 when it does not lead)."""
        if not self.is_leader or self.renewed_at is None:
            return 0.0
        return max(0.0, self.renewed_at + self.renew_deadline_s - self.monotonic())

    def holds(self) -> bool:
        """Whether to act now: leader, and renewed within the renew deadline."""
        return self.remaining() > 0

    async def leader(self) -> bool:
        """The control loop's check (no API call: `run` keeps the lease)."""
        held = self.holds()
        IS_LEADER.set(1 if held else 0)
        return held

    async def run(self, stop: asyncio.Event) -> None:
        """Keep trying / renewing until `stop`; API failures leave `holds()` to expire."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.renew_deadline_s):
                    await self.try_acquire()
            except Exception as e:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.lease_duration_s / 5)

    async def release(self) -> None:
        """On shutdown, hand the lease back (client-go's ReleaseOnCancel): the standby takes
        over at its next try instead of after a whole lease duration."""
        # Not only when is_leader: a renewer cancelled mid-takeover may hold it without knowing.
        self.is_leader = False
        IS_LEADER.set(0)
        coord = client.CoordinationV1Api(self.api)
        lease = await coord.read_namespaced_lease(self.name, self.namespace, _request_timeout=2)
        spec = lease.spec
        if spec is None or spec.holder_identity != self.identity:
            return
        now = self.clock()
        body = self._body(
            lease.metadata.resource_version,
            self._spec(now, now, spec.lease_transitions or 0, holder=""),
        )
        await coord.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=2)

    def _spec(
        self, now: float, acquire: float, transitions: int, holder: str | None = None
    ) -> dict[str, Any]:
        """Our record; `holder=""` gives the lease back (a 1 s lease nobody holds)."""
        return {
            "holderIdentity": self.identity if holder is None else holder,
            "leaseDurationSeconds": int(round(self.lease_duration_s)) if holder is None else 1,
            "acquireTime": _micro_time(acquire),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }

    def _body(self, resource_version: str | None, spec: dict[str, Any]) -> dict[str, Any]:
        """A Lease to write: on a version read, it lands only on that version (409 otherwise)."""
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version is not None:
            meta["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    async def _try(self) -> bool:
        coord = client.CoordinationV1Api(self.api)
        now = self.clock()
        lease = await call_or_none(
            "read_lease",
            lambda: coord.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.retry.timeout_s
            ),
            self.retry,
        )
        if lease is None:
            body = self._body(None, self._spec(now, now, 0))
            try:
                await call(
                    "create_lease",
                    lambda: coord.create_namespaced_lease(
                        self.namespace, body, _request_timeout=self.retry.timeout_s
                    ),
                    self.retry,
                )
                return True
            except ApiException as e:
                if e.status == 409:
                    return False  # someone else created it first
                raise
        spec = lease.spec
        holder = spec.holder_identity if spec else None
        duration = (spec.lease_duration_seconds if spec else None) or self.lease_duration_s
        transitions = (spec.lease_transitions if spec else None) or 0
        if holder and holder != self.identity:
            # Someone else's: alive until `duration` after we last saw its record change.
            record = (holder, spec.renew_time, spec.acquire_time, transitions)
            mono = self.monotonic()
            if record != self._seen:
                self._seen, self._seen_at = record, mono
            if mono < self._seen_at + duration:
                return False  # held by a live leader
        acquire = now
        if holder == self.identity and spec and spec.acquire_time:
            acquire = _parse_time(spec.acquire_time) or now
        else:
            transitions += 1
        body = self._body(lease.metadata.resource_version, self._spec(now, acquire, transitions))
        try:
            await call(
                "replace_lease",
                lambda: coord.replace_namespaced_lease(
                    self.name, self.namespace, body, _request_timeout=self.retry.timeout_s
                ),
                self.retry,
            )
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True


def api_client(
    host: str | None = None, headers: Mapping[str, str] | None = None
) -> client.ApiClient:
    """An ApiClient for `host` (tests), else from the in-cluster service account or kubeconfig."""
    cfg = client.Configuration()
    if host:
        cfg.host = host
    return client.ApiClient(configuration=cfg)


async def load_api_client() -> client.ApiClient:
    from kubernetes_asyncio import config as kconfig

    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        await kconfig.load_kube_config()
    return client.ApiClient()


async def read_gpu_inventory(
    api: client.ApiClient, retry: Retry | None = None
) -> dict[str, AcceleratorInventory]:
    """Read-only: every Node, and the Pending pods of all namespaces, turned into GPUs per
    accelerator (allocatable on Ready nodes, requested by Pending pods) by nodepools.gpu_inventory.
    """
    retry = retry or Retry()
    core = client.CoreV1Api(api)
    nodes = await call(
        "list_nodes", lambda: core.list_node(_request_timeout=retry.timeout_s), retry
    )
    pods = await call(
        "list_pending_pods",
        lambda: core.list_pod_for_all_namespaces(
            field_selector="status.phase=Pending", _request_timeout=retry.timeout_s
        ),
        retry,
    )
    # gpu_inventory checks the phase itself: the field selector only saves the transfer.
    return gpu_inventory(
        (api.sanitize_for_serialization(n) for n in nodes.items),
        (api.sanitize_for_serialization(p) for p in pods.items),
    )
