"""GPU nodes and Pending pods read each tick (kmock's KubernetesEmulator over real HTTP), and
the node planning that must go on when that read, or a pool's accelerator choice, fails."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import kmock
import pytest
from kmock import KubernetesEmulator, KubernetesError
from prometheus_client import REGISTRY

from controller.actuators import GkeNodes, PlaceholderNodes
from controller.kube import Placeholders, Retry, api_client, read_gpu_inventory
from controller.loop import Controller, PoolTarget, WorkloadSize, planned_accelerator
from controller.nodepools import AcceleratorInventory, AcceleratorPlan
from controller.replicas import Decision
from kvpilot.config import parse_config

FAST = Retry(attempts=2, backoff_s=0.01, timeout_s=0.5)
ACC = "cloud.google.com/gke-accelerator"


class Cluster(KubernetesEmulator):
    """The emulator, with node lists failing while `fail_nodes` is set."""

    fail_nodes = False

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.fail_nodes and request.resource is not None and request.resource.plural == "nodes":
            raise KubernetesError(status=500, reason="Injected", message="injected fault")
        return await super()._handle(request)


def node(name: str, acc: str, gpus: int, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {ACC: acc}},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pending(name: str, ns: str, acc: str, gpus: int) -> dict[str, Any]:
    res = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeSelector": {ACC: acc}, "containers": [{"name": "c", "resources": res}]},
        "status": {"phase": "Pending"},
    }


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Cluster, Any]]:
    async with Cluster() as k8s, kmock.Server(k8s) as server:
        k8s.objects["v1/nodes", None, "l4-a"] = node("l4-a", "nvidia-l4", 4)
        k8s.objects["v1/nodes", None, "l4-b"] = node("l4-b", "nvidia-l4", 4, ready=False)
        k8s.objects["v1/nodes", None, "h100-a"] = node("h100-a", "nvidia-h100-80gb", 8)
        k8s.objects["v1/pods", "ml", "llama-9"] = pending("llama-9", "ml", "nvidia-l4", 1)
        k8s.objects["v1/pods", "other", "job"] = pending("job", "other", "nvidia-l4", 2)
        api = api_client(str(server.url).rstrip("/"))
        try:
            yield k8s, api
        finally:
            await api.close()


async def test_read_gpu_inventory_from_nodes_and_pending_pods(cluster: Any) -> None:
    _, api = cluster
    inv = await read_gpu_inventory(api, FAST)
    assert inv == {
        # l4-b is not Ready: its GPUs are on the way, not allocatable
        "nvidia-l4": AcceleratorInventory(
            "nvidia-l4", allocatable_gpus=4, pending_gpus=3, nodes=1, gpus_per_node=4
        ),
        "nvidia-h100-80gb": AcceleratorInventory(
            "nvidia-h100-80gb", allocatable_gpus=8, nodes=1, gpus_per_node=8
        ),
    }
    # The GKE actuator reads the same when it has the Kubernetes client, and nothing without.
    assert await GkeNodes(None, api=api).inventory() == inv  # type: ignore[arg-type]
    assert await GkeNodes(None).inventory() is None  # type: ignore[arg-type]


class Recording(PlaceholderNodes):
    """The placeholder actuator, keeping the plans it was handed."""

    plans: dict[str, AcceleratorPlan] | None = None
    reads = 0

    async def inventory(self) -> dict[str, AcceleratorInventory]:
        self.reads += 1
        return await super().inventory()

    async def apply(self, plans: dict[str, AcceleratorPlan], targets: Any) -> None:
        self.plans = plans
        await super().apply(plans, targets)


class Sizes:
    """The replica actuator (our own interface): fixed sizes; a read can be made to fail."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.failing: set[str] = set()

    async def get_size(self, t: PoolTarget) -> WorkloadSize:
        if t.name in self.failing:
            raise RuntimeError("injected read failure")
        return WorkloadSize(self.sizes[t.name])

    async def set_replicas(self, t: PoolTarget, replicas: int, d: Decision) -> bool:
        self.sizes[t.name] = replicas
        return True


def config(
    mode: str = "kubernetes",
    accelerator: str = "nvidia-l4",
    **extra: tuple[dict[str, Any], dict[str, Any]],
) -> Any:
    """The pool `llama` (one spare GPU), and `extra` pools: name=(pool, scaling)."""
    return parse_config(
        {
            "pools": [
                {"name": "llama", "models": ["llama-3.1-8b"], "accelerator": accelerator},
                *({"name": name, **pool} for name, (pool, _) in extra.items()),
            ],
            "controller": {
                "mode": mode,
                "pools": {
                    "llama": {"headroom_gpus": 1, "forecast": False},
                    **{name: {"forecast": False, **sc} for name, (_, sc) in extra.items()},
                },
            },
        }
    )


def errors(pool: str, op: str) -> float:
    v = REGISTRY.get_sample_value("kvpilot_controller_errors_total", {"pool": pool, "op": op})
    return v or 0.0


async def test_tick_plans_against_the_nodes_and_pending_pods(cluster: Any) -> None:
    k8s, api = cluster
    nodes = Recording(Placeholders(api, "kvpilot-placeholders", retry=FAST))
    cfg = config(accelerator="l4")
    ctl = Controller(cfg, Sizes({"llama": 6}), lambda: [], nodes=nodes, clock=lambda: 1e4)
    await ctl.tick()
    assert nodes.plans is not None
    l4 = nodes.plans["nvidia-l4"]  # the pool's `l4` alias planned under its GKE label
    assert (l4.gpus_needed, l4.shortfall_gpus, l4.unrequested_gpus) == (7, 3, 0)
    assert l4.target_nodes == 2  # 7 GPUs on the Ready node's 4 per node (not 7 one-GPU nodes)
    pods = await nodes.placeholders.list()
    assert [p["spec"]["nodeSelector"][ACC] for p in pods] == ["nvidia-l4"]

    # The read fails: the tick goes on without it (one replica per node) and counts an error.
    k8s.fail_nodes = True
    before = errors("*", "inventory")
    await ctl.tick()
    assert errors("*", "inventory") == before + 1
    l4 = nodes.plans["nvidia-l4"]
    assert (l4.shortfall_gpus, l4.target_nodes) == (7, 7)
    assert len(await nodes.placeholders.list()) == 1


async def test_no_inventory_read_in_local_mode(cluster: Any) -> None:
    _, api = cluster
    nodes = Recording(Placeholders(api, "kvpilot-placeholders", retry=FAST))
    ctl = Controller(
        config(mode="local"), Sizes({"llama": 2}), lambda: [], nodes=nodes, clock=lambda: 1e4
    )
    await ctl.tick()
    assert nodes.reads == 0 and nodes.plans is not None


async def test_a_pool_whose_size_cannot_be_read_keeps_its_placeholders(cluster: Any) -> None:
    _, api = cluster
    nodes = Recording(Placeholders(api, "kvpilot-placeholders", retry=FAST))
    sizes = Sizes({"llama": 2})
    ctl = Controller(config(), sizes, lambda: [], nodes=nodes, clock=lambda: 1e4)
    await ctl.tick()
    assert len(await nodes.placeholders.list()) == 1
    sizes.failing.add("llama")
    await ctl.tick()
    assert nodes.plans is not None and nodes.plans["nvidia-l4"].placeholder_gpus == 1
    assert len(await nodes.placeholders.list()) == 1  # held, not deleted


async def test_an_unknown_model_does_not_stop_node_planning(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool with `accelerators` whose model the planner does not know falls back to its
    `accelerator`; one with none is left out; the others are planned. Logged once, counted."""
    _, api = cluster
    several = {"accelerators": ["nvidia-l4", "nvidia-h100-80gb"]}
    cfg = config(
        odd=({"models": ["my-finetune"], "accelerator": "nvidia-h100-80gb"}, several),
        lost=({"models": ["my-other-finetune"]}, several),
    )

    nodes = Recording(Placeholders(api, "kvpilot-placeholders", retry=FAST))
    ctl = Controller(
        cfg,
        Sizes({"llama": 2, "odd": 1, "lost": 1}),
        lambda: [],
        nodes=nodes,
        clock=lambda: 1e4,
        accelerator_for=planned_accelerator,  # as `kvpilot controller` chooses
    )
    before = errors("odd", "accelerator")
    with caplog.at_level(logging.ERROR, logger="controller.loop"):
        await ctl.tick()
        await ctl.tick()
    assert nodes.plans is not None
    assert set(nodes.plans) == {"nvidia-l4", "nvidia-h100-80gb"}
    assert nodes.plans["nvidia-h100-80gb"].gpus_needed == 1  # odd, on its fallback
    logged = [r.getMessage() for r in caplog.records if "cannot choose" in r.getMessage()]
    assert len(logged) == 2  # odd and lost, once each over two ticks
    assert errors("odd", "accelerator") == before + 2
