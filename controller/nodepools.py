"""How many GPUs each accelerator type needs, and what to ask for: pure code.

GPUs needed per accelerator = Σ over its pools (replicas wanted × GPUs per replica + headroom),
where "replicas wanted" is the larger of the decision and the forecast at the provisioning lead
time. What real replicas do not already request is held by placeholder pods (low-priority pause
pods that make Cluster Autoscaler / node auto-provisioning add nodes early, and that real replicas
preempt), or, for node pools without autoscaling, turned into a node count for the GKE API: each
node pool from the demands of the pools placed on it, never from its accelerator's total.

Against the cluster (`AcceleratorInventory`, from Ready nodes and Pending pods, `gpu_inventory`):

- `shortfall_gpus` = needed − allocatable on Ready nodes: GPUs that nodes must still be added for.
- `unrequested_gpus` = shortfall − GPUs that Pending (unscheduled) pods already ask for: the part
  of the shortfall nothing is asking nodes for yet.
- Pending GPUs never lower the placeholders or a node count. Both are absolute targets that are
  reconciled every tick, never increments, so what is on the way is not asked for twice: the
  Pending replicas of our pools are already in `gpus_requested` (spec.replicas), Pending
  placeholders are the ask itself (subtracting them would delete them the next tick and recreate
  them the one after), and other workloads' Pending pods compete for the new nodes rather than
  bring them. Free allocatable GPUs do not lower the placeholders either: placeholders land on
  them first (no new node), and keep the autoscaler from removing them.
- GPUs per node: the most any Ready node of the accelerator has allocatable; with none Ready (or
  no inventory), one replica's GPUs per node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelserver.profiles import resolve_gpu

GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GKE_NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
GPU_RESOURCE = "nvidia.com/gpu"
PLACEHOLDER_LABELS = {
    "app.kubernetes.io/managed-by": "kvpilot-controller",
    "kvpilot.io/role": "placeholder",
}


@dataclass(frozen=True)
class PoolGpuDemand:
    """One pool's share of an accelerator."""

    pool: str
    accelerator: str
    gpus_per_replica: int
    current_replicas: int  # spec.replicas now (their pods request GPUs, running or pending)
    desired_replicas: int
    forecast_replicas: int | None = None
    headroom_gpus: int = 0
    node_pool: str = ""


@dataclass(frozen=True)
class AcceleratorInventory:
    """What the cluster has of one accelerator type (from Nodes and Pods)."""

    accelerator: str
    allocatable_gpus: int = 0  # on Ready, schedulable nodes
    pending_gpus: int = 0  # requested by Pending pods not yet on a node (nodes on the way, or not)
    nodes: int = 0  # Ready, schedulable nodes
    gpus_per_node: int = 0  # 0: unknown (no Ready node): one replica's GPUs per node


@dataclass(frozen=True)
class AcceleratorPlan:
    accelerator: str
    gpus_needed: int
    gpus_requested: int  # by the real replicas that exist (spec.replicas × GPUs per replica)
    placeholder_gpus: int  # to hold with placeholder pods
    placeholders: tuple[tuple[str, int, str], ...]  # (pool, GPUs per pod, node pool) per pod
    shortfall_gpus: int  # needed beyond allocatable: nodes must be added
    target_nodes: int | None  # for fixed-size node pools (GKE setSize)
    unrequested_gpus: int = 0  # shortfall that no Pending pod asks nodes for yet
    node_pools: tuple[tuple[str, int], ...] = ()  # (node pool, GPUs held there) of pools naming one


def plan_accelerators(
    demands: Sequence[PoolGpuDemand],
    inventory: Mapping[str, AcceleratorInventory] | None = None,
) -> dict[str, AcceleratorPlan]:
    inventory = inventory or {}
    by_acc: dict[str, list[PoolGpuDemand]] = {}
    for d in demands:
        if d.accelerator:
            by_acc.setdefault(d.accelerator, []).append(d)
    plans: dict[str, AcceleratorPlan] = {}
    for acc, ds in sorted(by_acc.items()):
        needed = requested = 0
        pods: list[tuple[str, int, str]] = []
        # Per node pool, (needed, requested) of the pools placed on it.
        per_np: dict[str, tuple[int, int]] = {}
        for d in ds:
            wanted = max(d.desired_replicas, d.forecast_replicas or 0)
            need = wanted * d.gpus_per_replica + d.headroom_gpus
            req = d.current_replicas * d.gpus_per_replica
            needed += need
            requested += req
            if d.node_pool:
                n0, r0 = per_np.get(d.node_pool, (0, 0))
                per_np[d.node_pool] = (n0 + need, r0 + req)
            # Placeholders are sized like a replica, so one preemption frees exactly one slot.
            extra = max(0, wanted - d.current_replicas)
            pods += [(d.pool, d.gpus_per_replica, d.node_pool)] * extra
            pods += [(d.pool, 1, d.node_pool)] * d.headroom_gpus
        inv = inventory.get(acc, AcceleratorInventory(acc))
        # Unknown node shape: one replica per node (the largest replica of the accelerator).
        per_node = inv.gpus_per_node or max(d.gpus_per_replica for d in ds)
        shortfall = max(0, needed - inv.allocatable_gpus)
        plans[acc] = AcceleratorPlan(
            accelerator=acc,
            gpus_needed=needed,
            gpus_requested=requested,
            placeholder_gpus=sum(g for _, g, _ in pods),
            placeholders=tuple(pods),
            shortfall_gpus=shortfall,
            target_nodes=math.ceil(_held(needed, requested) / per_node) if per_node > 0 else None,
            unrequested_gpus=max(0, shortfall - inv.pending_gpus),
            node_pools=tuple((np, _held(n, r)) for np, (n, r) in sorted(per_np.items())),
        )
    return plans


def _held(needed: int, requested: int) -> int:
    # Never fewer GPUs than the replicas that exist request: shrinking is for them to do.
    return max(needed, requested)


def node_pool_sizes(
    plans: Mapping[str, AcceleratorPlan],
    gpus_per_node: Mapping[str, int],
    zones: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Nodes per zone for each fixed-size node pool: the GPUs the pools placed on it hold (each
    plan's `node_pools`), over the GPUs one of its nodes carries (its machine type: a
    g2-standard-48 has 4 L4s), spread over its zones (GKE's setSize counts per zone, so a
    regional pool over 3 zones gets ⌈nodes / 3⌉ in each: up to 2 nodes more than needed, never
    3x too many). Two node pools of one accelerator each get their own pools' share, not the
    accelerator's total.
    """
    gpus: dict[str, int] = {}
    for p in plans.values():
        for np, n in p.node_pools:
            gpus[np] = gpus.get(np, 0) + n
    zones = zones or {}
    return {
        np: math.ceil(math.ceil(n / gpus_per_node[np]) / max(1, zones.get(np, 1)))
        for np, n in sorted(gpus.items())
    }


def gpu_inventory(
    nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> dict[str, AcceleratorInventory]:
    """Per accelerator label: allocatable `nvidia.com/gpu` on Ready, schedulable nodes (by their
    `cloud.google.com/gke-accelerator` label), and the GPUs Pending pods not yet bound to a node
    request (by the same label in their nodeSelector; a pod that names no accelerator could land
    on any and is left out). Objects are Kubernetes JSON (camelCase), as the API serves them.
    """
    alloc: dict[str, int] = {}
    count: dict[str, int] = {}
    per_node: dict[str, int] = {}
    for n in nodes:
        acc = ((n.get("metadata") or {}).get("labels") or {}).get(GKE_ACCELERATOR_LABEL)
        if not acc or not _ready(n) or (n.get("spec") or {}).get("unschedulable"):
            continue
        g = _quantity(((n.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE))
        alloc[acc] = alloc.get(acc, 0) + g
        count[acc] = count.get(acc, 0) + 1
        per_node[acc] = max(per_node.get(acc, 0), g)
    pending: dict[str, int] = {}
    for p in pods:
        spec = p.get("spec") or {}
        # A Pending pod already bound to a node (pulling its image) holds that node's GPUs.
        if (p.get("status") or {}).get("phase") != "Pending" or spec.get("nodeName"):
            continue
        acc = (spec.get("nodeSelector") or {}).get(GKE_ACCELERATOR_LABEL)
        g = _pod_gpus(spec)
        if acc and g:
            pending[acc] = pending.get(acc, 0) + g
    return {
        acc: AcceleratorInventory(
            accelerator=acc,
            allocatable_gpus=alloc.get(acc, 0),
            pending_gpus=pending.get(acc, 0),
            nodes=count.get(acc, 0),
            gpus_per_node=per_node.get(acc, 0),
        )
        for acc in sorted(set(alloc) | set(pending))
    }


def _ready(node: Mapping[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _quantity(v: Any) -> int:
    # GPU counts are whole numbers ("4"); anything else counts as none rather than failing a tick.
    try:
        return max(0, int(str(v)))
    except (TypeError, ValueError):
        return 0


def _pod_gpus(spec: Mapping[str, Any]) -> int:
    """GPUs a pod requests: its containers' sum, or its largest init container if larger (the
    scheduler's rule). Extended resources need a limit; the request defaults to it."""

    def gpus(c: Mapping[str, Any]) -> int:
        r = c.get("resources") or {}
        req = (r.get("requests") or {}).get(GPU_RESOURCE)
        return _quantity(req if req is not None else (r.get("limits") or {}).get(GPU_RESOURCE))

    main = sum(gpus(c) for c in spec.get("containers") or [])
    init = max((gpus(c) for c in spec.get("initContainers") or []), default=0)
    return max(main, init)


def accelerator_label(name: str) -> str:
    """The GKE accelerator label for a pool's `accelerator` (a label or a GPU alias such as
    `l4`): node selectors and node labels only know labels. Names outside the catalog as given."""
    try:
        return resolve_gpu(name).label
    except ValueError:
        return name


def placeholder_pod(
    *,
    name: str,
    namespace: str,
    pool: str,
    accelerator: str,
    gpus: int,
    node_pool: str = "",
    priority_class: str = "kvpilot-placeholder",
    image: str = "registry.k8s.io/pause:3.10",
) -> dict[str, Any]:
    """A pause pod that holds `gpus` GPUs of `accelerator` at a priority real replicas preempt."""
    selector = {GKE_ACCELERATOR_LABEL: accelerator}
    if node_pool:
        selector[GKE_NODEPOOL_LABEL] = node_pool
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                **PLACEHOLDER_LABELS,
                "kvpilot.io/pool": pool,
                "kvpilot.io/accelerator": accelerator,
                "kvpilot.io/gpus": str(gpus),
            },
        },
        "spec": {
            "priorityClassName": priority_class,
            "terminationGracePeriodSeconds": 0,
            "nodeSelector": selector,
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "containers": [
                {
                    "name": "pause",
                    "image": image,
                    "resources": {
                        "requests": {"nvidia.com/gpu": str(gpus), "cpu": "10m", "memory": "16Mi"},
                        "limits": {"nvidia.com/gpu": str(gpus)},
                    },
                }
            ],
        },
    }


def warm_gpus(placeholders: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """GPUs per pool and node that the pool's placeholder pods hold (bound and Running): what a
    new replica of that pool takes at once, preempting them, without waiting for a node. Per
    node, since a replica's GPUs must all be on one: two 1-GPU placeholders on two nodes are no
    room for a 2-GPU replica."""
    out: dict[str, dict[str, int]] = {}
    for p in placeholders:
        spec, status = p.get("spec") or {}, p.get("status") or {}
        node = spec.get("nodeName")
        if not node or status.get("phase") != "Running":
            continue
        labels = (p.get("metadata") or {}).get("labels") or {}
        pool = labels.get("kvpilot.io/pool", "")
        if pool:
            per_node = out.setdefault(pool, {})
            per_node[node] = per_node.get(node, 0) + _quantity(labels.get("kvpilot.io/gpus", "1"))
    return out


def spare_replicas(
    warm: Mapping[str, Mapping[str, int]] | None, pool: str, gpus_per_replica: int
) -> int | None:
    """Replicas of `pool` that fit, whole, on the GPUs its placeholders hold per node
    (`warm_gpus`); None when the placeholders are not known."""
    if warm is None:
        return None
    per_replica = max(1, gpus_per_replica)
    return sum(g // per_replica for g in warm.get(pool, {}).values())
