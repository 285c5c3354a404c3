"""Stand-ins for tests, the benchmark and demos without GPUs: a GPU source and a metrics server.

`FakeGpuSource` implements our GpuSource interface (not NVML's): GPUs whose load the caller sets,
and per-device failures, as an NVML error would show them. `MetricsServer` is a tiny aiohttp
server answering `/metrics` with whatever text a callable renders, optionally slowly or with an
error status: recorded engine output for adapters, a hung server for fault tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from agent.gpus import GpuReading
from kvpilot.signals import GpuStats

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "agent"


def fake_gpu(index: int, name: str = "NVIDIA H100 80GB HBM3", total: int = 80 * 2**30) -> GpuStats:
    return GpuStats(
        uuid=f"GPU-00000000-0000-0000-0000-{index:012d}", index=index, name=name,
        hbm_used_bytes=0, hbm_total_bytes=total, util=0.0, mem_bw_util=0.0, sm_active=0.0,
        power_w=70.0, temp_c=30.0, sm_clock_mhz=1980,
    )  # fmt: skip


class FakeGpuSource:
    def __init__(self, gpus: Sequence[GpuStats], owners: dict[str, str] | None = None) -> None:
        self.gpus = {g.uuid: g for g in gpus}
        self.owners = dict(owners or {})
        self.reads = 0

    def set(self, uuid: str, **fields: object) -> None:
        """Change what the next read reports, e.g. set(uuid, util=0.9, hbm_used_bytes=...)."""
        self.gpus[uuid] = dataclasses.replace(self.gpus[uuid], **fields)  # type: ignore[arg-type]

    def fail(self, uuid: str, error: str) -> None:
        """As an NVML error on one device: reported unhealthy, the rest unaffected."""
        self.set(uuid, healthy=False, error=error)

    async def read(self, endpoints: Sequence[str]) -> GpuReading:
        self.reads += 1
        return GpuReading(gpus=tuple(self.gpus.values()), owners=dict(self.owners))

    async def close(self) -> None:
        return None


class MetricsServer:
    """`async with MetricsServer(render) as url:` serves GET /metrics on an ephemeral port."""

    def __init__(
        self, render: Callable[[], str], *, delay_s: float = 0.0, status: int = 200
    ) -> None:
        self.render = render
        self.delay_s = delay_s
        self.status = status
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _metrics(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(text=self.render(), status=self.status, content_type="text/plain")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def fixture_text(name: str) -> str:
    """A recorded /metrics text of an engine: vllm, vllm-old, sglang, tgi, trtllm."""
    return (FIXTURES / f"{name}.txt").read_text()
