"""controller.mode: local — replicas are `kvpilot modelserver` processes on this machine.

A pool's replicas are its `endpoints` in order; scaling to N runs a modelserver on the port of
each of the first N endpoints and stops the rest. For `make demo` and tests, no Kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from controller.loop import PoolTarget, WorkloadSize
from controller.replicas import Decision

log = logging.getLogger(__name__)


@dataclass
class LocalActuator:
    gpu: str = "l4"
    time_scale: float = 1.0
    python: str = sys.executable
    stop_timeout_s: float = 5.0
    procs: dict[tuple[str, int], asyncio.subprocess.Process] = field(default_factory=dict)

    def _running(self, t: PoolTarget) -> list[int]:
        out = []
        for i, _ in enumerate(t.pool.endpoints):
            p = self.procs.get((t.name, i))
            if p is not None and p.returncode is None:
                out.append(i)
        return out

    async def get_size(self, t: PoolTarget) -> WorkloadSize:
        return WorkloadSize(len(self._running(t)))  # a process starts at once: none Pending

    async def set_replicas(self, t: PoolTarget, replicas: int, d: Decision | None = None) -> bool:
        if replicas > len(t.pool.endpoints):
            log.warning(
                "pool %s: %d replicas wanted but only %d endpoints configured",
                t.name,
                replicas,
                len(t.pool.endpoints),
            )
            replicas = len(t.pool.endpoints)
        changed = False
        for i, ep in enumerate(t.pool.endpoints):
            p = self.procs.get((t.name, i))
            alive = p is not None and p.returncode is None
            if i < replicas and not alive:
                self.procs[(t.name, i)] = await self._start(t, ep)
                changed = True
            elif i >= replicas and alive:
                await self._stop(self.procs.pop((t.name, i)))
                changed = True
        return changed

    async def _start(self, t: PoolTarget, endpoint: str) -> asyncio.subprocess.Process:
        port = urlsplit(endpoint).port or 80
        gpu = t.pool.accelerator or self.gpu
        cmd = [
            self.python, "-m", "kvpilot", "modelserver",
            "--model", t.pool.models[0], "--gpu", gpu, "--gpus", str(t.pool.gpus_per_replica),
            "--port", str(port), "--time-scale", str(self.time_scale),
        ]  # fmt: skip
        log.info("pool %s: starting %s", t.name, " ".join(cmd))
        return await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

    async def _stop(self, p: asyncio.subprocess.Process) -> None:
        if p.returncode is not None:
            return
        p.terminate()
        try:
            await asyncio.wait_for(p.wait(), self.stop_timeout_s)
        except TimeoutError:
            p.kill()
            await p.wait()

    async def close(self) -> None:
        for key in list(self.procs):
            await self._stop(self.procs.pop(key))
