"""GPU sources behind one small interface: what the node's GPUs look like right now.

`GpuSource.read(endpoints)` returns a `GpuReading`: every GPU (or MIG slice) as `GpuStats`, plus
whatever the source itself knows about who owns which GPU. The NVML source (agent/nvml.py) knows
processes; the emulated source knows which local modelserver reported which GPU. Mapping GPUs to
pods beyond that is agent/owners.py's job.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import orjson

from agent.errors import ErrorLog
from kvpilot.signals import GpuStats, from_dict


@dataclass(frozen=True)
class GpuReading:
    gpus: tuple[GpuStats, ...] = ()
    owners: dict[str, str] = field(default_factory=dict)  # GPU uuid -> replica address
    pids: dict[str, tuple[int, ...]] = field(default_factory=dict)  # GPU uuid -> compute PIDs
    accelerators: dict[str, str] = field(default_factory=dict)  # replica address -> GKE label


class GpuSource(Protocol):
    async def read(self, endpoints: Sequence[str]) -> GpuReading: ...

    async def close(self) -> None: ...


class NoGpuSource:
    """A node without GPUs (or a test that needs none)."""

    async def read(self, endpoints: Sequence[str]) -> GpuReading:
        return GpuReading()

    async def close(self) -> None:
        return None


class EmulatedGpuSource:
    """Reads each local `kvpilot modelserver`'s `/v1/engine/state`: what NVML would see there.

    Every modelserver numbers its own GPUs from 0; on the node they are renumbered in endpoint
    order so that index (dcgm-exporter's `gpu` label) is unique, as it would be on a real node.
    """

    def __init__(self, session: aiohttp.ClientSession, errors: ErrorLog, timeout_s: float) -> None:
        self.session = session
        self.errors = errors
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def read(self, endpoints: Sequence[str]) -> GpuReading:
        states = await asyncio.gather(*(self._fetch(ep) for ep in endpoints))
        gpus: list[GpuStats] = []
        owners: dict[str, str] = {}
        accelerators: dict[str, str] = {}
        for ep, state in zip(endpoints, states, strict=True):
            if state is None:
                continue
            if state.get("accelerator"):
                accelerators[ep] = str(state["accelerator"])
            for raw in state.get("gpus") or ():
                g = from_dict(GpuStats, raw)
                g = dataclasses.replace(g, index=len(gpus))
                gpus.append(g)
                owners[g.uuid] = ep
        return GpuReading(gpus=tuple(gpus), owners=owners, accelerators=accelerators)

    async def _fetch(self, endpoint: str) -> dict | None:
        key = f"{endpoint}/v1/engine/state"
        try:
            async with self.session.get(key, timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=resp.reason or ""
                    )
                state = orjson.loads(await resp.read())
            if not isinstance(state, dict):
                raise ValueError("engine state is not a JSON object")
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as e:
            self.errors.report("engine_state", key, f"{type(e).__name__}: {e}")
            return None
        self.errors.clear(key)
        return state

    async def close(self) -> None:
        return None
