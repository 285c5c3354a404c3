"""How many GPUs each accelerator type needs, and what to ask for: pure code.

GPUs needed per accelerator = Σ over its pools (replicas wanted × GPUs per replica + headroom),
where "replicas wanted" is the larger of the decision and the forecast at the provisioning lead
time. What real replicas do not already request is held by placeholder pods (low-priority pause
pods that make Cluster Autoscaler / node auto-provisioning add nodes early, and that real replicas
preempt), or, for node pools without autoscaling, turned into a node count for the GKE API.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GKE_NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
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
    allocatable_gpus: int = 0  # on Ready nodes
    pending_gpus: int = 0  # requested by Pending pods (nodes on the way, or not)
    nodes: int = 0
    gpus_per_node: int = 1


@dataclass(frozen=True)
class AcceleratorPlan:
    accelerator: str
    gpus_needed: int
    gpus_requested: int  # by the real replicas that exist (spec.replicas × GPUs per replica)
    placeholder_gpus: int  # to hold with placeholder pods
    placeholders: tuple[tuple[str, int, str], ...]  # (pool, GPUs per pod, node pool) per pod
    shortfall_gpus: int  # needed beyond allocatable: nodes must be added
    target_nodes: int | None  # for fixed-size node pools (GKE setSize)


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
        for d in ds:
            wanted = max(d.desired_replicas, d.forecast_replicas or 0)
            needed += wanted * d.gpus_per_replica + d.headroom_gpus
            requested += d.current_replicas * d.gpus_per_replica
            # Placeholders are sized like a replica, so one preemption frees exactly one slot.
            extra = max(0, wanted - d.current_replicas)
            pods += [(d.pool, d.gpus_per_replica, d.node_pool)] * extra
            pods += [(d.pool, 1, d.node_pool)] * d.headroom_gpus
        inv = inventory.get(acc, AcceleratorInventory(acc))
        target_nodes = None
        if inv.gpus_per_node > 0:
            target_nodes = math.ceil(_held(needed, requested) / inv.gpus_per_node)
        plans[acc] = AcceleratorPlan(
            accelerator=acc,
            gpus_needed=needed,
            gpus_requested=requested,
            placeholder_gpus=sum(g for _, g, _ in pods),
            placeholders=tuple(pods),
            shortfall_gpus=max(0, needed - inv.allocatable_gpus),
            target_nodes=target_nodes,
        )
    return plans


def _held(needed: int, requested: int) -> int:
    # Never fewer GPUs than the replicas that exist request: shrinking is for them to do.
    return max(needed, requested)


def node_pool_sizes(
    plans: Mapping[str, AcceleratorPlan],
    node_pools: Iterable[tuple[str, str]],
    gpus_per_node: Mapping[str, int],
) -> dict[str, int]:
    """Nodes for each fixed-size node pool: the GPUs its accelerators' plans hold, over the GPUs
    one of its nodes carries (its machine type: a g2-standard-48 has 4 L4s).

    `node_pools` are (node pool, accelerator) pairs, one per scaled pool that names a node pool;
    an accelerator counts once per node pool however many pools share it.
    """
    gpus: dict[str, int] = {}
    for np, acc in sorted(set(node_pools)):
        p = plans.get(acc)
        if p is not None:
            gpus[np] = gpus.get(np, 0) + _held(p.gpus_needed, p.gpus_requested)
    return {np: math.ceil(n / gpus_per_node[np]) for np, n in gpus.items()}


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
