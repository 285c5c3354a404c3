"""Actuators the control loop hands its decisions to, in Kubernetes and on GKE."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kubernetes_asyncio import client

from controller.gke import GkeNodePools
from controller.kube import KubeScaler, Placeholders, SizeChanged, read_gpu_inventory
from controller.loop import PoolTarget, WorkloadSize
from controller.nodepools import (
    AcceleratorInventory,
    AcceleratorPlan,
    node_pool_sizes,
    warm_gpus,
)
from controller.replicas import Decision

log = logging.getLogger(__name__)


@dataclass
class KubeActuator:
    """spec.replicas through /scale, and an Event on the workload for every change."""

    scaler: KubeScaler

    async def get_size(self, t: PoolTarget) -> WorkloadSize:
        return await self.scaler.get_size(t.scaling.kind, t.pool.namespace, t.workload)

    async def set_replicas(self, t: PoolTarget, replicas: int, d: Decision) -> bool:
        try:
            before = await self.scaler.set_replicas(
                t.scaling.kind, t.pool.namespace, t.workload, replicas, expect=d.current
            )
        except SizeChanged as e:  # someone else scaled since the read: decide again next tick
            log.info("pool %s: not scaled: %s", t.name, e)
            return False
        if before == replicas:
            # Already there when written: someone else's scale (or, rarely, our own PUT that
            # timed out after it applied, which then goes uncounted): no Event for it.
            log.info("pool %s: already at %d replicas", t.name, replicas)
            return False
        return True

    async def record(self, t: PoolTarget, d: Decision) -> None:
        """The Event for a scale that was written: apart from the write, so that a slow Event
        API neither holds the write past the lease nor makes a done scale look failed."""
        reason = "ScaledUp" if d.desired > d.current else "ScaledDown"
        try:
            await self.scaler.event(
                t.scaling.kind,
                t.pool.namespace,
                t.workload,
                reason=reason,
                message=f"kvpilot scaled {d.current} -> {d.desired}: {d.reason}",
            )
        except Exception as e:  # the scale happened; a lost Event must not undo or repeat it
            log.warning("event for %s not recorded: %s", t.name, e)


@dataclass
class PlaceholderNodes:
    """Keeps placeholder pods equal to the plan, so Cluster Autoscaler adds nodes early."""

    placeholders: Placeholders

    async def inventory(self) -> dict[str, AcceleratorInventory]:
        """GPU nodes and Pending GPU pods, read with the placeholders' API client."""
        return await read_gpu_inventory(self.placeholders.api, self.placeholders.retry)

    async def warm(self) -> dict[str, dict[str, int]]:
        """GPUs per pool and node its placeholders hold on nodes that are up
        (controller/nodepools.py `warm_gpus`): replicas that start without a new node."""
        return warm_gpus(await self.placeholders.list())

    async def apply(self, plans: dict[str, AcceleratorPlan], targets: Sequence[PoolTarget]) -> None:
        wanted = [
            (pool, acc, gpus, node_pool)
            for acc, p in plans.items()
            for pool, gpus, node_pool in p.placeholders
        ]
        created, deleted = await self.placeholders.reconcile(wanted)
        if created or deleted:
            log.info("placeholders: %d created, %d deleted", created, deleted)


@dataclass
class GkeNodes:
    """Sets fixed-size GKE node pools to the nodes their pools' GPUs need (only on a change).

    Nodes = ⌈GPUs needed on the node pool / GPUs per node⌉, GPUs per node read from the node
    pool's own config (GKE API), so a 4-L4 g2-standard-48 pool gets a quarter of the nodes a
    1-GPU-per-replica count would ask for; a regional or multi-zonal node pool gets that many
    divided over its zones (setSize counts per zone).
    """

    gke: GkeNodePools
    api: client.ApiClient | None = None  # Kubernetes, to read GPU nodes and Pending pods
    _last: dict[str, int] = field(default_factory=dict)

    async def inventory(self) -> dict[str, AcceleratorInventory] | None:
        if self.api is None:
            return None  # plan without it
        return await read_gpu_inventory(self.api)

    def reset(self) -> None:
        """A new leadership term: another leader may have resized the node pools since."""
        self._last.clear()

    async def apply(self, plans: dict[str, AcceleratorPlan], targets: Sequence[PoolTarget]) -> None:
        # Node pools come from the plans: the pools placed on them, on the accelerator the
        # controller chose for each (a pool with several `accelerators` has no single one here).
        node_pools = sorted({np for p in plans.values() for np, _ in p.node_pools})
        shapes = {np: await self.gke.shape(np) for np in node_pools}
        per_node = {np: s.gpus_per_node for np, s in shapes.items()}
        zones = {np: s.zones for np, s in shapes.items()}
        for np, nodes in sorted(node_pool_sizes(plans, per_node, zones).items()):
            if self._last.get(np) != nodes:
                await self.gke.set_size(np, nodes)
                self._last[np] = nodes
