"""The NVML source on a real NVIDIA GPU (`pytest -m gpu`; skipped cleanly without one).

Run on a GPU machine with scripts/gpu-check.sh.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from agent.errors import ErrorLog
from agent.nvml import NvmlGpuSource

pytestmark = pytest.mark.gpu

ALLOC_GIB = 4

# A child process that holds ALLOC_GIB on every visible GPU until told to stop.
ALLOCATE = f"""
import sys, torch
blocks = [torch.empty({ALLOC_GIB} * 2**30, dtype=torch.uint8, device=f"cuda:{{i}}")
          for i in range(torch.cuda.device_count())]
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def source() -> NvmlGpuSource:
    return NvmlGpuSource(ErrorLog(CollectorRegistry()))


def test_every_device_is_read_and_healthy(source: NvmlGpuSource) -> None:
    import pynvml

    reading = source.read_sync()
    assert len({g.index for g in reading.gpus}) == pynvml.nvmlDeviceGetCount()
    for g in reading.gpus:
        assert g.healthy, g.error
        assert g.uuid.startswith(("GPU-", "MIG-"))
        assert g.name
        assert 0 <= g.hbm_used_bytes < g.hbm_total_bytes  # v2 leaves out driver-reserved memory
        assert 0.0 <= g.util <= 1.0 and 0.0 <= g.mem_bw_util <= 1.0
        assert g.temp_c is not None and 0 < g.temp_c < 120
        assert g.power_w is None or g.power_w > 0


def test_gpm_sm_activity_on_hopper(source: NvmlGpuSource) -> None:
    first = source.read_sync()
    if not any("H100" in g.name or "H200" in g.name or "B200" in g.name for g in first.gpus):
        pytest.skip("GPM metrics need Hopper or newer")
    time.sleep(0.2)
    second = source.read_sync()
    for g in second.gpus:
        assert g.sm_active is not None and 0.0 <= g.sm_active <= 1.0


def test_a_torch_process_allocating_memory_is_seen(source: NvmlGpuSource) -> None:
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    before = source.read_sync()
    proc = subprocess.Popen(
        [sys.executable, "-c", ALLOCATE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        during = source.read_sync()
        grown = sum(g.hbm_used_bytes for g in during.gpus) - sum(
            g.hbm_used_bytes for g in before.gpus
        )
        assert grown >= ALLOC_GIB * 2**30 * torch.cuda.device_count()
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(30)
    after = source.read_sync()
    assert sum(g.hbm_used_bytes for g in after.gpus) < sum(g.hbm_used_bytes for g in during.gpus)


async def test_agent_publishes_real_gpus_with_dcgm_names() -> None:
    import dataclasses

    import aiohttp

    from agent.run import agent_config, running_agent

    cfg = agent_config([], gpus="nvml", node="gpu-node", scrape_interval_s=0.1)
    cfg = dataclasses.replace(
        cfg, agent=dataclasses.replace(cfg.agent, dcgm_compatible_metrics=True)
    )
    async with running_agent(cfg) as url, aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"{url}/v1/state") as r:
                if r.status == 200 and (await r.json())["gpus"]:
                    break
            await asyncio.sleep(0.1)
        async with session.get(f"{url}/v1/state") as r:
            state = await r.json()
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
    assert state["gpus"] and all(g["healthy"] for g in state["gpus"])
    uuid = state["gpus"][0]["uuid"]
    assert any(x.startswith("DCGM_FI_DEV_FB_USED{") and uuid in x for x in text.splitlines())
    assert any(
        x.startswith("kvpilot_gpu_memory_total_bytes{") and uuid in x for x in text.splitlines()
    )
