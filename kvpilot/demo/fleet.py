"""The demo's local fleet: two emulated nodes, their replica slots, the config it writes and runs,
and the controller's local actuator with a GPU per slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.local import LocalActuator
from controller.loop import PoolTarget
from controller.replicas import Decision

GiB = 1024**3
POOL = "llama-8b"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpu: str  # modelserver --gpu profile
    slots: int  # replicas this node can hold


@dataclass(frozen=True)
class DemoSettings:
    duration_s: float = 20.0  # wall seconds of load
    time_scale: float = 10.0
    concurrency: int = 24  # closed-loop clients through the gateway
    refresh_s: float = 1.0
    seed: int = 0
    port: int = 8080  # gateway; 0 picks a free one
    serve: bool = True  # keep serving after the load when stdin is a terminal
    model: str = "llama-3.1-8b"
    # The H100 first: local mode starts a pool's endpoints in order, so the controller's first
    # `min_replicas` are the H100 and one L4, and scaling up adds the second L4.
    nodes: tuple[NodeSpec, ...] = (NodeSpec("h100-node", "h100", 1), NodeSpec("l4-node", "l4", 2))
    min_replicas: int = 2
    controller_interval_s: float = 1.0


@dataclass(frozen=True)
class Slot:
    """One replica place: a node, its GPU profile, and the loopback URL a replica there serves."""

    node: str
    gpu: str
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------
# Configuration: what the demo writes is what it runs.


def main_config(settings: DemoSettings, slots: list[Slot], agents: list[str], port: int) -> dict:
    return {
        "pools": [
            {
                "name": POOL,
                "models": [settings.model],
                "engine": "kvpilot",
                "endpoints": [s.url for s in slots],
            }
        ],
        "agent": {"gpus": "emulated"},  # each node's agent has its own file, agent-<node>.yaml
        "gateway": {
            "listen": f"127.0.0.1:{port}",
            "agents": agents,
            "policy": "headroom",
            "stale_after_s": 2.0,
        },
        "controller": {
            "mode": "local",
            "interval_s": settings.controller_interval_s,
            "gateways": [f"http://127.0.0.1:{port}"],  # held requests and request rate
            "local_time_scale": settings.time_scale,
            "pools": {
                POOL: {
                    "min_replicas": settings.min_replicas,
                    "max_replicas": len(slots),  # one replica per slot: 2 CPU cores are enough
                    "queue_target": 2,
                    "batch_target": 8,  # low, so a short demo load is enough to scale up
                    "scale_down_stabilization_s": 30,
                    "stale_after_s": 5,
                    "lead_time_s": 5,  # a local modelserver starts in seconds, not minutes
                }
            },
        },
    }


def agent_config_dict(settings: DemoSettings, node: str, slots: list[Slot], port: int) -> dict:
    return {
        "pools": [
            {
                "name": POOL,
                "models": [settings.model],
                "engine": "kvpilot",
                "endpoints": [s.url for s in slots if s.node == node],
            }
        ],
        "agent": {
            "listen": f"127.0.0.1:{port}",
            "gpus": "emulated",
            "node_name": node,
            "scrape_interval_s": 0.25,
            "stale_after_s": 2.0,
        },
    }


def write_yaml(path: Path, data: dict, comment: str) -> Path:
    path.write_text(f"# {comment}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Replicas: the controller's local actuator, with a GPU per slot and a drain before each stop.


@dataclass
class SlotActuator(LocalActuator):
    """`controller.local.LocalActuator`, but each endpoint runs on its own node's GPU profile.

    LocalActuator gives every replica of a pool the same GPU (`pools[].accelerator`); the demo's
    pool spans an H100 node and an L4 node, so the GPU comes from the slot instead.
    """

    gpu_of: dict[str, str] = field(default_factory=dict)
    started: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    before_stop: Callable[[list[str]], Awaitable[None]] | None = None
    on_scale: Callable[[int, int, str], None] | None = None

    def running(self) -> set[str]:
        return {ep for ep, p in self.started.items() if p.returncode is None}

    async def _start(self, t: PoolTarget, endpoint: str) -> asyncio.subprocess.Process:
        pool = dataclasses.replace(t.pool, accelerator=self.gpu_of[endpoint])
        proc = await super()._start(dataclasses.replace(t, pool=pool), endpoint)
        self.started[endpoint] = proc
        return proc

    async def set_replicas(self, t: PoolTarget, replicas: int, d: Decision | None = None) -> None:
        before = (await self.get_size(t)).replicas
        leaving = [ep for ep in t.pool.endpoints[replicas:] if ep in self.running()]
        if leaving and self.before_stop is not None:
            await self.before_stop(leaving)
        await super().set_replicas(t, replicas, d)
        if self.on_scale is not None:
            self.on_scale(before, replicas, d.reason if d is not None else "")
