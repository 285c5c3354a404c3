"""The scrape loop: every interval, read the GPUs and every model server, fuse, publish.

Each cycle starts a scrape for every replica that has none in flight, plus a GPU read, then waits
at most most of one interval for them. Whatever has answered by then goes into this cycle's
`NodeState`; a server that hangs keeps its own scrape in flight (bounded by
`scrape_timeout_s`) and never delays the others or the cycle. Every replica carries the time its
metrics were read (`observed_at`); one that has not answered for `stale_after_s` is published with
`healthy: false`, and it disappears only when discovery says it left its pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from agent.adapters import EngineReading, MetricsFormatError, read_metrics
from agent.discovery import Target
from agent.errors import ErrorLog
from agent.gpus import GpuReading, GpuSource
from agent.hub import StateHub
from agent.owners import Owner, OwnerResolver
from agent.rates import RateWindow, Recent
from kvpilot.config import AgentConfig
from kvpilot.signals import GpuStats, NodeState, ReplicaState
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger("kvpilot.agent")


@dataclass
class _Replica:
    """Mutable bookkeeping for one scraped target (never leaves this module)."""

    target: Target
    window: RateWindow
    reading: EngineReading | None = None
    recent: Recent = field(default_factory=Recent)
    observed_at: float = 0.0  # unix time of the last successful scrape
    task: asyncio.Task[None] | None = None


class Collector:
    def __init__(
        self,
        cfg: AgentConfig,
        node: str,
        session: aiohttp.ClientSession,
        gpu_source: GpuSource,
        resolver: OwnerResolver,
        errors: ErrorLog,
        hub: StateHub,
        targets: Callable[[], dict[str, Target]],
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.session = session
        self.gpu_source = gpu_source
        self.resolver = resolver
        self.errors = errors
        self.hub = hub
        self.targets = targets
        self.replicas: dict[str, _Replica] = {}
        self.gpu_reading = GpuReading()
        self.owners: dict[str, Owner] = {}
        self._gpu_task: asyncio.Task[GpuReading] | None = None
        self._gpu_started = -float("inf")  # monotonic time the last GPU read began
        self.cycles = 0

    async def run(self) -> None:
        interval = self.cfg.scrape_interval_s
        next_at = time.monotonic()
        try:
            while True:
                await self.cycle()
                next_at += interval
                delay = next_at - time.monotonic()
                if delay < 0:  # overran (a slow machine): skip missed ticks, never burst
                    next_at = time.monotonic()
                    delay = 0
                await asyncio.sleep(delay)
        finally:
            await self.stop()

    async def stop(self) -> None:
        await cancel_and_wait(*(r.task for r in self.replicas.values()), self._gpu_task)

    def _sync_targets(self) -> None:
        current = self.targets()
        for rid in list(self.replicas):
            if rid not in current:  # left its pool: now, and only now, it goes
                r = self.replicas.pop(rid)
                if r.task and not r.task.done():
                    r.task.cancel()
        for rid, t in current.items():
            r = self.replicas.get(rid)
            if r is None:
                self.replicas[rid] = _Replica(t, RateWindow(self.cfg.rate_window_s))
            elif r.target != t:
                r.target = t

    async def cycle(self) -> NodeState:
        self._sync_targets()
        started: list[asyncio.Task] = []
        for r in self.replicas.values():
            if r.task is None or r.task.done():
                r.task = asyncio.create_task(self._scrape(r))
            started.append(r.task)
        gpu_due = time.monotonic() - self._gpu_started >= self.cfg.gpu_interval_s
        if self._gpu_task is None and gpu_due:
            self._gpu_started = time.monotonic()
            addresses = [r.target.address for r in self.replicas.values()]
            self._gpu_task = asyncio.create_task(self.gpu_source.read(addresses))
        if self._gpu_task is not None:
            started.append(self._gpu_task)
        if started:
            await asyncio.wait(started, timeout=self.cfg.scrape_interval_s * 0.8)
        if self._gpu_task is not None and self._gpu_task.done():
            try:
                self.gpu_reading = self._gpu_task.result()
            except Exception as e:  # a source bug or a broken driver: keep the last reading
                self.errors.report("gpu", "gpu-source", f"{type(e).__name__}: {e}")
            self._gpu_task = None
        targets = [r.target for r in self.replicas.values()]
        self.owners = await self.resolver.resolve(self.gpu_reading, targets)
        state = self.fuse(time.time())
        self.hub.publish(state)
        self.cycles += 1
        return state

    async def _scrape(self, r: _Replica) -> None:
        url = f"{r.target.address}/metrics"
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.cfg.scrape_timeout_s)
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=resp.reason or ""
                    )
            at = time.time()
            reading = read_metrics(body.decode("utf-8", "replace"), r.target.engine)
        except TimeoutError:
            self.errors.report("timeout", url, f"no answer in {self.cfg.scrape_timeout_s}s")
            return
        except MetricsFormatError as e:
            self.errors.report("parse", url, str(e))
            return
        except (aiohttp.ClientError, OSError, ValueError) as e:
            self.errors.report("scrape", url, f"{type(e).__name__}: {e}")
            return
        self.errors.clear(url)
        r.reading = reading
        r.observed_at = at
        r.recent = r.window.add(dataclasses.replace(reading.totals, at=at))

    def fuse(self, now: float) -> NodeState:
        """This instant's NodeState from the latest reading of everything (pure, no I/O)."""
        owned: dict[str, list[GpuStats]] = {}
        for g in self.gpu_reading.gpus:
            o = self.owners.get(g.uuid)
            if o is not None:
                owned.setdefault(o.replica_id, []).append(g)
        replicas = [
            self._replica_state(r, owned.get(rid, ()), now)
            for rid, r in sorted(self.replicas.items())
        ]
        return NodeState(
            node=self.node, observed_at=now, gpus=self.gpu_reading.gpus, replicas=tuple(replicas)
        )

    def _replica_state(self, r: _Replica, gpus: object, now: float) -> ReplicaState:
        t, m, rec = r.target, r.reading, r.recent
        healthy = r.observed_at > 0 and now - r.observed_at <= self.cfg.stale_after_s
        accelerator = (
            t.accelerator
            or self.gpu_reading.accelerators.get(t.address, "")
            or self.cfg.accelerator
        )
        base = ReplicaState(
            replica_id=t.replica_id,
            address=t.address,
            pool=t.pool,
            models=t.models,
            engine=t.engine if t.engine != "auto" else "unknown",
            node=self.node,
            accelerator=accelerator,
            role=t.role,
            gpus=tuple(gpus),  # type: ignore[arg-type]
            observed_at=r.observed_at,
            healthy=healthy,
        )
        if m is None:
            return base
        state = m.onto(base)
        return dataclasses.replace(
            state,
            # the window's hit ratio (from counters) beats the engine's own gauge, when there is one
            prefix_cache_hit_ratio=rec.prefix_cache_hit_ratio
            if rec.prefix_cache_hit_ratio is not None
            else state.prefix_cache_hit_ratio,
            prompt_tokens_per_s=rec.prompt_tokens_per_s,
            generation_tokens_per_s=rec.generation_tokens_per_s,
            ttft_s=rec.ttft_s,
            tpot_s=rec.tpot_s,
        )
