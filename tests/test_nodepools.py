"""Node-pool policy (pure) and the GKE setSize actuator against a local server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controller.gke import TOKEN_PATH, GkeError, GkeNodePools
from controller.nodepools import (
    PLACEHOLDER_LABELS,
    AcceleratorInventory,
    PoolGpuDemand,
    accelerator_label,
    gpu_inventory,
    node_pool_sizes,
    placeholder_pod,
    plan_accelerators,
    warm_gpus,
)


def test_gpus_needed_is_replicas_times_gpus_plus_headroom() -> None:
    plans = plan_accelerators(
        [
            PoolGpuDemand(
                "a", "nvidia-l4", 1, current_replicas=2, desired_replicas=3, headroom_gpus=1
            ),
            PoolGpuDemand(
                "b", "nvidia-l4", 2, current_replicas=1, desired_replicas=1, forecast_replicas=3
            ),
            PoolGpuDemand("c", "nvidia-h100-80gb", 8, current_replicas=1, desired_replicas=1),
        ],
        {"nvidia-l4": AcceleratorInventory("nvidia-l4", allocatable_gpus=6, gpus_per_node=4)},
    )
    l4 = plans["nvidia-l4"]
    assert l4.gpus_needed == 3 * 1 + 1 + 3 * 2  # 10
    assert l4.gpus_requested == 2 + 2
    # a: one missing replica + 1 headroom GPU; b: two forecast replicas of 2 GPUs.
    assert sorted(l4.placeholders) == [("a", 1, ""), ("a", 1, ""), ("b", 2, ""), ("b", 2, "")]
    assert l4.placeholder_gpus == 6
    assert l4.shortfall_gpus == 4
    assert l4.target_nodes == 3
    h100 = plans["nvidia-h100-80gb"]
    assert h100.placeholders == () and h100.gpus_needed == 8


def test_target_nodes_never_below_what_running_replicas_request() -> None:
    plans = plan_accelerators(
        [PoolGpuDemand("a", "nvidia-l4", 1, current_replicas=8, desired_replicas=2)],
        {"nvidia-l4": AcceleratorInventory("nvidia-l4", allocatable_gpus=8, gpus_per_node=2)},
    )
    assert plans["nvidia-l4"].target_nodes == 4


def test_node_pool_sizes_divide_the_gpus_held_by_each_node_pools_gpus_per_node() -> None:
    plans = plan_accelerators(
        [
            PoolGpuDemand("a", "nvidia-l4", 1, 4, 4, headroom_gpus=2, node_pool="l4-pool"),  # 6
            PoolGpuDemand("b", "nvidia-l4", 1, 3, 3, node_pool="l4-pool"),  # 3 more: 9 in all
            # 10 GPUs requested by replicas that exist
            PoolGpuDemand("c", "nvidia-h100-80gb", 2, 5, 1, node_pool="h100-pool"),
        ]
    )
    sizes = node_pool_sizes(plans, {"l4-pool": 4, "h100-pool": 8})
    # L4: both pools on one node pool (9 GPUs) -> 3 nodes; H100: never below the 10 GPUs
    # existing replicas request -> 2 nodes
    assert sizes == {"l4-pool": 3, "h100-pool": 2}


def test_node_pools_sharing_an_accelerator_are_each_sized_for_their_own_pools() -> None:
    """Two pools of 4 one-L4 replicas on two node pools: 4 nodes each, not 8 each (16 nodes
    for 8 GPUs), and a pool on no node pool does not count on either."""
    plans = plan_accelerators(
        [
            PoolGpuDemand("a", "nvidia-l4", 1, 4, 4, node_pool="np1"),
            PoolGpuDemand("b", "nvidia-l4", 1, 4, 4, node_pool="np2"),
            PoolGpuDemand("c", "nvidia-l4", 1, 2, 2),
        ]
    )
    assert plans["nvidia-l4"].node_pools == (("np1", 4), ("np2", 4))
    assert node_pool_sizes(plans, {"np1": 1, "np2": 1}) == {"np1": 4, "np2": 4}
    assert node_pool_sizes(plans, {"np1": 4, "np2": 2}) == {"np1": 1, "np2": 2}


def test_inventory_sets_shortfall_unrequested_and_gpus_per_node() -> None:
    demands = [
        PoolGpuDemand("a", "nvidia-l4", 1, current_replicas=6, desired_replicas=6, headroom_gpus=2),
        PoolGpuDemand(
            "b", "nvidia-l4", 2, current_replicas=1, desired_replicas=1, forecast_replicas=2
        ),
    ]  # needed 6 + 2 + 4 = 12; requested 6 + 2 = 8
    inv = AcceleratorInventory(
        "nvidia-l4", allocatable_gpus=4, pending_gpus=5, nodes=1, gpus_per_node=4
    )
    l4 = plan_accelerators(demands, {"nvidia-l4": inv})["nvidia-l4"]
    assert (l4.gpus_needed, l4.gpus_requested) == (12, 8)
    assert l4.shortfall_gpus == 8  # 12 needed, 4 allocatable on the Ready node
    assert l4.unrequested_gpus == 3  # 5 of the 8 already asked for by Pending pods
    assert l4.target_nodes == 3  # 12 GPUs on 4-GPU nodes
    # Pending GPUs never lower the placeholders: they are an absolute target, reconciled.
    assert l4.placeholder_gpus == 2 + 2
    # More pending than short: nothing left unasked; no node Ready yet: one 2-GPU replica per node.
    busy = AcceleratorInventory("nvidia-l4", pending_gpus=20)
    l4 = plan_accelerators(demands, {"nvidia-l4": busy})["nvidia-l4"]
    assert (l4.shortfall_gpus, l4.unrequested_gpus, l4.target_nodes) == (12, 0, 6)
    # Without any inventory: the same fallback, and every GPU needed is short.
    l4 = plan_accelerators(demands)["nvidia-l4"]
    assert (l4.shortfall_gpus, l4.unrequested_gpus, l4.target_nodes) == (12, 12, 6)


def node(name: str, acc: str | None, gpus: str, ready: str = "True", **spec: Any) -> dict:
    labels = {"cloud.google.com/gke-accelerator": acc} if acc else {}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
        "status": {
            "allocatable": {"nvidia.com/gpu": gpus, "cpu": "47"},
            "conditions": [{"type": "MemoryPressure", "status": "False"},
                           {"type": "Ready", "status": ready}],
        },
    }  # fmt: skip


def pod(phase: str, acc: str | None, limits: str | None, node_name: str = "", **extra: Any) -> dict:
    spec: dict[str, Any] = {"containers": [{"name": "c", "resources": {}}], **extra}
    if limits is not None:
        spec["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": limits}}
    if acc:
        spec["nodeSelector"] = {"cloud.google.com/gke-accelerator": acc}
    if node_name:
        spec["nodeName"] = node_name
    return {"metadata": {"name": "p"}, "spec": spec, "status": {"phase": phase}}


def test_gpu_inventory_counts_ready_nodes_and_unscheduled_pending_pods() -> None:
    nodes = [
        node("l4-a", "nvidia-l4", "4"),
        node("l4-b", "nvidia-l4", "4"),
        node("l4-booting", "nvidia-l4", "4", ready="False"),  # on the way: not allocatable yet
        node("l4-cordoned", "nvidia-l4", "4", unschedulable=True),
        node("h100-a", "nvidia-h100-80gb", "8"),
        node("cpu", None, "0"),
    ]
    init = {"initContainers": [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "3"}}}]}
    pods = [
        pod("Pending", "nvidia-l4", "2"),
        pod("Pending", "nvidia-l4", "1"),
        pod("Pending", "nvidia-l4", "1", node_name="l4-a"),  # bound: pulling its image
        pod("Running", "nvidia-l4", "1", node_name="l4-b"),
        pod("Pending", "nvidia-h100-80gb", "1", **init),  # the largest init container counts
        pod("Pending", "nvidia-tesla-t4", "1"),  # only pending: no node of it yet
        pod("Pending", None, "1"),  # could land on any accelerator: left out
        pod("Pending", "nvidia-l4", None),  # no GPUs
    ]
    inv = gpu_inventory(nodes, pods)
    assert inv["nvidia-l4"] == AcceleratorInventory(
        "nvidia-l4", allocatable_gpus=8, pending_gpus=3, nodes=2, gpus_per_node=4
    )
    assert inv["nvidia-h100-80gb"] == AcceleratorInventory(
        "nvidia-h100-80gb", allocatable_gpus=8, pending_gpus=3, nodes=1, gpus_per_node=8
    )
    assert inv["nvidia-tesla-t4"] == AcceleratorInventory("nvidia-tesla-t4", pending_gpus=1)
    assert set(inv) == {"nvidia-l4", "nvidia-h100-80gb", "nvidia-tesla-t4"}


def test_accelerator_label_resolves_aliases_and_keeps_other_labels() -> None:
    assert accelerator_label("l4") == "nvidia-l4"
    assert accelerator_label("H100") == "nvidia-h100-80gb"
    assert accelerator_label("nvidia-l4") == "nvidia-l4"
    assert accelerator_label("nvidia-tesla-t4") == "nvidia-tesla-t4"


def test_placeholder_pod_requests_gpus_at_low_priority_on_the_right_nodes() -> None:
    pod = placeholder_pod(
        name="ph-1",
        namespace="ph",
        pool="llama",
        accelerator="nvidia-l4",
        gpus=2,
        node_pool="l4-pool",
    )
    spec = pod["spec"]
    assert spec["priorityClassName"] == "kvpilot-placeholder"
    assert spec["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4",
        "cloud.google.com/gke-nodepool": "l4-pool",
    }
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}


class FakeGke:
    """The metadata token endpoint and the container API's nodePools:setSize, on 127.0.0.1."""

    def __init__(self) -> None:
        # GPUs per node of each node pool, as its machine type has them (g2-standard-48: 4 L4s)
        self.gpus: dict[str, int] = {"l4-pool": 4, "h100-pool": 8}
        self.zones: dict[str, list[str]] = {}  # a regional node pool's `locations`
        self.gets = 0
        self.sizes: dict[str, int] = {}
        self.fail: list[int | str] = []  # statuses (or "hang") for the next setSize calls
        self.tokens_issued = 0
        self.auth_seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(TOKEN_PATH, self.token)
        app.router.add_post(
            "/v1/projects/{p}/locations/{l}/clusters/{c}/nodePools/{np}:setSize", self.set_size
        )
        app.router.add_get("/v1/projects/{p}/locations/{l}/clusters/{c}/nodePools/{np}", self.get)
        return app

    async def get(self, request: web.Request) -> web.Response:
        """nodePools.get, the part we read: the machine type's accelerators (count as a string)."""
        self.gets += 1
        np = request.match_info["np"]
        if np not in self.gpus:
            return web.json_response({"error": {"code": 404}}, status=404)
        acc = {"acceleratorCount": str(self.gpus[np]), "acceleratorType": "nvidia-l4"}
        body: dict[str, Any] = {"name": np, "config": {"accelerators": [acc]}}
        if np in self.zones:
            body["locations"] = self.zones[np]
        return web.json_response(body)

    async def token(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        self.tokens_issued += 1
        return web.json_response(
            {
                "access_token": f"tok-{self.tokens_issued}",
                "expires_in": 3599,
                "token_type": "Bearer",
            }
        )

    async def set_size(self, request: web.Request) -> web.Response:
        self.auth_seen.append(request.headers.get("Authorization", ""))
        if self.fail:
            f = self.fail.pop(0)
            if f == "hang":
                await asyncio.sleep(1)
            return web.json_response({"error": {"code": f}}, status=int(f) if f != "hang" else 504)
        body: dict[str, Any] = await request.json()
        np = request.match_info["np"]
        self.sizes[np] = body["nodeCount"]
        return web.json_response(
            {"name": "operation-1", "operationType": "SET_NODE_POOL_SIZE", "status": "RUNNING"}
        )


@pytest.fixture
async def gke() -> Any:
    fake = FakeGke()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        client = GkeNodePools(
            session,
            "proj",
            "us-central1",
            "c1",
            api_url=f"http://127.0.0.1:{port}",
            metadata_url=f"http://127.0.0.1:{port}",
            timeout_s=0.5,
            backoff_s=0.01,
        )
        yield fake, client
    await runner.cleanup()


async def test_set_size_uses_the_metadata_token(gke: Any) -> None:
    fake, client = gke
    op = await client.set_size("l4-pool", 3)
    assert op["operationType"] == "SET_NODE_POOL_SIZE"
    assert fake.sizes == {"l4-pool": 3}
    assert fake.auth_seen == ["Bearer tok-1"]
    await client.set_size("l4-pool", 4)
    assert fake.tokens_issued == 1  # cached until it expires


async def test_set_size_retries_5xx_timeouts_and_refreshes_on_401(gke: Any) -> None:
    fake, client = gke
    fake.fail = [503, "hang", 401]
    await client.set_size("l4-pool", 5)
    assert fake.sizes == {"l4-pool": 5}
    assert fake.tokens_issued == 2  # the 401 forced a fresh token
    assert len(fake.auth_seen) == 4


async def test_set_size_gives_up_on_4xx_without_resizing(gke: Any) -> None:
    fake, client = gke
    fake.fail = [400]
    with pytest.raises(GkeError, match="HTTP 400"):
        await client.set_size("l4-pool", 2)
    assert fake.sizes == {}


async def test_gke_nodes_count_nodes_by_the_node_pools_gpus_per_node(gke: Any) -> None:
    """7 replicas x 1 GPU + 2 spare on 4-GPU nodes: 3 nodes (not 9 nodes of one replica each)."""
    from controller.actuators import GkeNodes
    from controller.loop import targets
    from kvpilot.config import parse_config

    fake, client = gke
    cfg = parse_config(
        {
            "pools": [
                {"name": "a", "models": ["m"], "accelerator": "nvidia-l4"},
                {"name": "b", "models": ["m"], "accelerator": "nvidia-l4"},
            ],
            "controller": {"pools": {"a": {"node_pool": "l4-pool"}, "b": {"node_pool": "l4-pool"}}},
        }
    )
    nodes = GkeNodes(client)

    def plans(a: int, b: int) -> Any:
        return plan_accelerators(
            [
                PoolGpuDemand("a", "nvidia-l4", 1, a, a, headroom_gpus=2, node_pool="l4-pool"),
                PoolGpuDemand("b", "nvidia-l4", 1, b, b, node_pool="l4-pool"),
            ]
        )

    await nodes.apply(plans(4, 3), targets(cfg))
    assert fake.sizes == {"l4-pool": 3}  # ceil((4 + 2 + 3) / 4)
    await nodes.apply(plans(4, 3), targets(cfg))  # no change: no call
    await nodes.apply(plans(5, 5), targets(cfg))
    assert fake.sizes == {"l4-pool": 3}  # 12 GPUs still fit 3 nodes
    await nodes.apply(plans(6, 5), targets(cfg))
    assert fake.sizes == {"l4-pool": 4}
    assert fake.gets == 1  # the node pool's shape is read once


async def test_gke_nodes_size_a_pool_that_may_use_several_accelerators(gke: Any) -> None:
    """A pool with `accelerators` and no single `accelerator` is sized on the one the controller
    chose (as `_nodes` plans it), not skipped; two node pools of one accelerator each get their
    own pools' GPUs."""
    from controller.actuators import GkeNodes
    from controller.loop import Controller, PoolTarget, WorkloadSize
    from kvpilot.config import parse_config

    fake, client = gke
    fake.gpus["l4-pool-2"] = 1
    cfg = parse_config(
        {
            "pools": [
                {"name": "a", "models": ["llama-3.1-8b"]},
                {"name": "b", "models": ["llama-3.1-8b"], "accelerator": "nvidia-l4"},
            ],
            "controller": {
                "pools": {
                    "a": {
                        "node_pool": "l4-pool",
                        "accelerators": ["nvidia-l4", "nvidia-h100-80gb"],
                        "forecast": False,
                    },
                    "b": {"node_pool": "l4-pool-2", "forecast": False},
                }
            },
        }
    )

    class Fixed:  # the replica actuator: sizes that do not change
        async def get_size(self, t: PoolTarget) -> WorkloadSize:
            return WorkloadSize({"a": 8, "b": 3}[t.name])

        async def set_replicas(self, t: PoolTarget, replicas: int, d: Any) -> None:
            raise AssertionError("no scaling expected")

    chosen = lambda t: "nvidia-l4" if t.scaling.accelerators else t.pool.accelerator  # noqa: E731
    ctl = Controller(
        cfg, Fixed(), lambda: [], nodes=GkeNodes(client), accelerator_for=chosen, clock=lambda: 1e4
    )
    await ctl.tick()
    # a: 8 one-L4 replicas on 4-L4 nodes; b: 3 on 1-L4 nodes (not 11 GPUs on each node pool)
    assert fake.sizes == {"l4-pool": 2, "l4-pool-2": 3}


async def test_gke_nodes_size_a_regional_node_pool_per_zone(gke: Any) -> None:
    """setSize's nodeCount is per zone: 9 one-L4 nodes over 3 zones is 3 a zone, not 9 (27)."""
    from controller.actuators import GkeNodes
    from controller.loop import targets
    from kvpilot.config import parse_config

    fake, client = gke
    fake.gpus["l4-regional"] = 1
    fake.zones["l4-regional"] = ["us-central1-a", "us-central1-b", "us-central1-c"]
    cfg = parse_config(
        {
            "pools": [{"name": "a", "models": ["m"], "accelerator": "nvidia-l4"}],
            "controller": {"pools": {"a": {"node_pool": "l4-regional"}}},
        }
    )
    nodes = GkeNodes(client)

    def plan(n: int) -> Any:
        return plan_accelerators(
            [PoolGpuDemand("a", "nvidia-l4", 1, n, n, node_pool="l4-regional")]
        )

    await nodes.apply(plan(9), targets(cfg))
    assert fake.sizes == {"l4-regional": 3}
    await nodes.apply(plan(10), targets(cfg))
    assert fake.sizes == {"l4-regional": 4}  # 10 nodes: 4 a zone (12), never fewer than asked
    assert (await client.shape("l4-regional")).zones == 3


def test_node_pool_sizes_round_up_per_zone() -> None:
    plans = plan_accelerators([PoolGpuDemand("a", "nvidia-l4", 1, 7, 7, node_pool="np")])
    assert node_pool_sizes(plans, {"np": 1}) == {"np": 7}
    assert node_pool_sizes(plans, {"np": 1}, {"np": 3}) == {"np": 3}
    assert node_pool_sizes(plans, {"np": 4}, {"np": 2}) == {"np": 1}  # 2 nodes over 2 zones


async def test_gke_nodes_refuse_a_node_pool_without_gpus(gke: Any) -> None:
    fake, client = gke
    fake.gpus["cpu-pool"] = 0
    with pytest.raises(GkeError, match="no GPUs"):
        await client.shape("cpu-pool")
    with pytest.raises(GkeError, match="HTTP 404"):
        await client.shape("missing-pool")


def test_warm_gpus_are_the_placeholders_running_on_a_node() -> None:
    def pod(pool: str, gpus: int, node: str, phase: str) -> dict[str, Any]:
        labels = {**PLACEHOLDER_LABELS, "kvpilot.io/pool": pool, "kvpilot.io/gpus": str(gpus)}
        return {
            "metadata": {"labels": labels},
            "spec": {"nodeName": node} if node else {},
            "status": {"phase": phase},
        }

    pods = [
        pod("llama", 1, "n1", "Running"),
        pod("llama", 1, "n1", "Running"),
        pod("llama", 1, "n2", "Running"),
        pod("llama", 1, "", "Pending"),  # waits for a node
        pod("llama", 1, "n3", "Pending"),  # bound, still starting
        pod("big", 8, "n4", "Running"),
    ]
    assert warm_gpus(pods) == {"llama": {"n1": 2, "n2": 1}, "big": {"n4": 8}}
