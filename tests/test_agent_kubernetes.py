"""Kubernetes: the Pod watch (kmock's KubernetesEmulator) and GPU -> pod through the kubelet's
PodResources gRPC API (a real gRPC server on a Unix socket)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import grpc
import kmock
import pytest
from kubernetes_asyncio import client as k8s
from prometheus_client import CollectorRegistry

from agent.client import AgentWatchClient
from agent.discovery import PoolPodWatch, pod_target
from agent.errors import ErrorLog
from agent.fakes import FakeGpuSource, MetricsServer, fake_gpu, fixture_text
from agent.podresources import ListPodResourcesResponse, list_handler
from agent.run import running_agent
from kvpilot.config import AgentConfig, Config, PoolConfig

NODE = "gke-gpu-node-1"
POOL = PoolConfig(
    name="llama", models=("llama-3.1-8b",), namespace="ml", selector={"app": "vllm"}, port=8000
)


def pod(name: str, *, node: str = NODE, labels: dict[str, str] | None = None, ip: str = "10.0.0.7",
        phase: str = "Running") -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "ml", "uid": f"uid-{name}",
            "labels": {"app": "vllm"} if labels is None else labels,
        },
        "spec": {
            "nodeName": node,
            "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            "containers": [{"name": "server", "image": "vllm/vllm-openai"}],
        },
        "status": {"phase": phase, "podIP": ip},
    }  # fmt: skip


@attrs.define(kw_only=True)
class GoneOnceEmulator(kmock.KubernetesEmulator):
    """Answers the first watch with 410 Gone, as an API server whose history window moved on."""

    gone: int = 1

    async def __call__(self, raw_request: Any) -> Any:
        # kubernetes-asyncio sends watch=True; the API server parses booleans like Go's
        # strconv.ParseBool (True, true, 1), kmock only knows "true".
        if raw_request.query.get("watch") in ("True", "1"):
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.update_query(watch="true"))
        return await super().__call__(raw_request)

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        if self.gone > 0:
            self.gone -= 1
            yield b""
            yield {
                "type": "ERROR",
                "object": {"kind": "Status", "apiVersion": "v1", "code": 410,
                           "reason": "Expired", "message": "too old resource version: 1 (5)"},
            }  # fmt: skip
            return
        async for event in super()._serve_watch(request):
            yield event


@pytest.fixture
async def kube() -> AsyncIterator[tuple[Any, k8s.CoreV1Api]]:
    async with GoneOnceEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources["v1/pods"] = {}
        conf = k8s.Configuration(host=str(server.url).rstrip("/"))
        async with k8s.ApiClient(conf) as api_client:
            yield emulator, k8s.CoreV1Api(api_client)


async def until(cond: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_pod_target_rules() -> None:
    t = pod_target(POOL, pod("a"), NODE)
    assert t is not None
    assert (t.replica_id, t.address, t.accelerator, t.pod_uid) == (
        "ml/a", "http://10.0.0.7:8000", "nvidia-l4", "uid-a"
    )  # fmt: skip
    assert pod_target(POOL, pod("b", node="other"), NODE) is None
    assert pod_target(POOL, pod("c", labels={"app": "tgi"}), NODE) is None
    assert pod_target(POOL, pod("d", phase="Pending"), NODE) is None
    assert pod_target(POOL, pod("e", ip="fd00::7"), NODE).address == "http://[fd00::7]:8000"  # type: ignore[union-attr]


async def test_pod_watch_follows_the_pool_and_relists_after_410(kube: Any) -> None:
    emulator, api = kube
    await api.create_namespaced_pod("ml", pod("vllm-0"))
    await api.create_namespaced_pod("ml", pod("vllm-elsewhere", node="other-node"))
    changes = []
    watch = PoolPodWatch(POOL, NODE, api, ErrorLog(CollectorRegistry()), lambda: changes.append(1))
    task = asyncio.create_task(watch.run())
    try:
        await until(lambda: watch.lists >= 2)  # first list, 410 on the watch, listed again
        assert set(watch.targets) == {"ml/vllm-0"}
        await api.create_namespaced_pod("ml", pod("vllm-1"))
        await until(lambda: "ml/vllm-1" in watch.targets)
        # relabelled out of the pool: it leaves
        await api.patch_namespaced_pod("vllm-0", "ml", {"metadata": {"labels": {"app": "other"}}})
        await until(lambda: "ml/vllm-0" not in watch.targets)
        await api.delete_namespaced_pod("vllm-1", "ml")
        await until(lambda: not watch.targets)
        assert watch.synced.is_set() and len(changes) >= 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def kubelet(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, list[str]]]]:
    """A fake kubelet PodResources server on a Unix socket; the dict says pod -> device ids."""
    sock = str(tmp_path / "kubelet.sock")
    devices: dict[str, list[str]] = {}

    def respond() -> Any:
        resp = ListPodResourcesResponse()
        for name, ids in devices.items():
            p = resp.pod_resources.add(name=name, namespace="ml")
            c = p.containers.add(name="server")
            c.devices.add(resource_name="nvidia.com/gpu", device_ids=ids)
            c.devices.add(resource_name="example.com/nic", device_ids=["nic0"])
        return resp

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((list_handler(respond),))
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    try:
        yield sock, devices
    finally:
        await server.stop(None)


async def test_agent_in_kubernetes_maps_gpus_to_pods_through_pod_resources(
    kube: Any, kubelet: tuple[str, dict[str, list[str]]]
) -> None:
    emulator, api = kube
    sock, devices = kubelet
    gpus = [fake_gpu(i, name="NVIDIA L4", total=24 * 2**30) for i in range(3)]
    devices["vllm-0"] = [gpus[0].uuid]  # NVIDIA device plugin: by UUID
    devices["vllm-1"] = ["nvidia1", "nvidia2"]  # GKE's device plugin: by index
    async with MetricsServer(lambda: fixture_text("vllm")) as ms_url:
        port = int(ms_url.rsplit(":", 1)[1])
        pool = dataclasses.replace(POOL, port=port)
        await api.create_namespaced_pod("ml", pod("vllm-0", ip="127.0.0.1"))
        await api.create_namespaced_pod("ml", pod("vllm-1", ip="127.0.0.1"))
        cfg = Config(
            pools=(pool,),
            agent=AgentConfig(
                listen="127.0.0.1:0", kubernetes=True, node_name=NODE, pod_resources_socket=sock,
                scrape_interval_s=0.05, dcgm_compatible_metrics=True,
            ),
        )  # fmt: skip
        async with (
            running_agent(cfg, gpu_source=FakeGpuSource(gpus), kube_api=api) as url,
            aiohttp.ClientSession() as session,
        ):
            async for state in AgentWatchClient(url, session):
                reps = {r.replica_id: r for r in state.replicas}
                if len(reps) == 2 and all(r.healthy and r.gpus for r in reps.values()):
                    break
            assert [g.uuid for g in reps["ml/vllm-0"].gpus] == [gpus[0].uuid]
            assert [g.index for g in reps["ml/vllm-1"].gpus] == [1, 2]
            assert reps["ml/vllm-0"].accelerator == "nvidia-l4"
            assert reps["ml/vllm-0"].engine == "vllm" and reps["ml/vllm-0"].running == 12
            async with session.get(f"{url}/readyz") as r:
                assert r.status == 200
            async with session.get(f"{url}/metrics") as r:
                text = await r.text()
            line = next(
                x for x in text.splitlines()
                if x.startswith("DCGM_FI_DEV_GPU_UTIL{") and gpus[2].uuid in x
            )  # fmt: skip
            assert 'namespace="ml"' in line and 'pod="vllm-1"' in line
            assert 'container="server"' in line and 'Hostname="gke-gpu-node-1"' in line
