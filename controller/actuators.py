"""Actuators the control loop hands its decisions to, in Kubernetes and on GKE."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from controller.gke import GkeNodePools
from controller.kube import KubeScaler, Placeholders
from controller.loop import PoolTarget
from controller.nodepools import AcceleratorPlan
from controller.replicas import Decision

log = logging.getLogger(__name__)


@dataclass
class KubeActuator:
    """spec.replicas through /scale, and an Event on the workload for every change."""

    scaler: KubeScaler

    async def get_replicas(self, t: PoolTarget) -> int:
        return await self.scaler.get_replicas(t.scaling.kind, t.pool.namespace, t.workload)

    async def set_replicas(self, t: PoolTarget, replicas: int, d: Decision) -> None:
        before = await self.scaler.set_replicas(
            t.scaling.kind, t.pool.namespace, t.workload, replicas
        )
        reason = "ScaledUp" if replicas > before else "ScaledDown"
        try:
            await self.scaler.event(
                t.scaling.kind,
                t.pool.namespace,
                t.workload,
                reason=reason,
                message=f"kvpilot scaled {before} -> {replicas}: {d.reason}",
            )
        except Exception as e:  # the scale happened; a lost Event must not undo or repeat it
            log.warning("event for %s not recorded: %s", t.name, e)


@dataclass
class PlaceholderNodes:
    """Keeps placeholder pods equal to the plan, so Cluster Autoscaler adds nodes early."""

    placeholders: Placeholders

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
    """Sets fixed-size GKE node pools to the planned node count (only when it changes)."""

    gke: GkeNodePools
    _last: dict[str, int] = field(default_factory=dict)

    async def apply(self, plans: dict[str, AcceleratorPlan], targets: Sequence[PoolTarget]) -> None:
        by_np: dict[str, int] = {}
        for t in targets:
            p = plans.get(t.pool.accelerator)
            if t.scaling.node_pool and p is not None and p.target_nodes is not None:
                by_np[t.scaling.node_pool] = max(by_np.get(t.scaling.node_pool, 0), p.target_nodes)
        for np, n in sorted(by_np.items()):
            if self._last.get(np) != n:
                await self.gke.set_size(np, n)
                self._last[np] = n
