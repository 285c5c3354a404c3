"""Assembles one agent: discovery, GPU source, owner resolution, scrape loop, HTTP app.

`build_app(config)` returns an aiohttp Application whose cleanup context starts and stops
everything; tests and the demo pass their own GPU source or Kubernetes client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.collector import Collector
from agent.discovery import PoolPodWatch, Target, static_targets
from agent.errors import ErrorLog
from agent.gpus import EmulatedGpuSource, GpuSource
from agent.hub import StateHub
from agent.metrics import StateCollector
from agent.owners import OwnerResolver
from agent.server import routes
from kvpilot.config import Config
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger("kvpilot.agent")

AGENT_KEY: web.AppKey[Agent] = web.AppKey("kvpilot_agent")


def node_name(cfg: Config) -> str:
    return cfg.agent.node_name or os.environ.get("NODE_NAME") or socket.gethostname()


class Agent:
    def __init__(
        self,
        cfg: Config,
        *,
        gpu_source: GpuSource | None = None,
        kube_api: Any = None,  # kubernetes_asyncio CoreV1Api; built from the environment if None
    ) -> None:
        self.cfg = cfg
        self.node = node_name(cfg)
        self.registry = CollectorRegistry()
        self.errors = ErrorLog(self.registry)
        self.hub = StateHub()
        self._gpu_source = gpu_source
        self._kube_api = kube_api
        self.watches: list[PoolPodWatch] = []
        self.collector: Collector | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.registry.register(
            StateCollector(
                self.hub,
                lambda: self.collector.owners if self.collector else {},
                cfg.agent.dcgm_compatible_metrics,
            )
        )

    def targets(self) -> dict[str, Target]:
        if not self.cfg.agent.kubernetes:
            return self._static
        out: dict[str, Target] = {}
        for w in self.watches:
            out.update(w.targets)
        return out

    @property
    def ready(self) -> bool:
        synced = all(w.synced.is_set() for w in self.watches)
        return synced and self.hub.version > 0

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _kube(self) -> tuple[Any, Any]:
        """A CoreV1Api from the pod's service account, else the local kubeconfig."""
        from kubernetes_asyncio import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            await config.load_kube_config()
        api_client = client.ApiClient()
        return client.CoreV1Api(api_client), api_client

    def _make_gpu_source(self, session: aiohttp.ClientSession) -> GpuSource:
        if self.cfg.agent.gpus == "emulated":
            return EmulatedGpuSource(session, self.errors, self.cfg.agent.scrape_timeout_s)
        from agent.nvml import NvmlGpuSource

        return NvmlGpuSource(self.errors)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        a = self.cfg.agent
        self._static = static_targets(self.cfg)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector)
        gpu_source = self._gpu_source or self._make_gpu_source(session)
        api_client = None
        if a.kubernetes:
            api = self._kube_api
            if api is None:
                api, api_client = await self._kube()
            self.watches = [
                PoolPodWatch(pool, self.node, api, self.errors) for pool in self.cfg.pools
            ]
            self._tasks = [asyncio.create_task(w.run()) for w in self.watches]
        resolver = OwnerResolver(
            self.errors,
            pod_resources_socket=a.pod_resources_socket,
            use_pod_resources=a.kubernetes,
            refresh_s=a.pod_resources_refresh_s,
            gpu_map=a.gpu_map,
        )
        self.collector = Collector(
            a, self.node, session, gpu_source, resolver, self.errors, self.hub, self.targets
        )
        self._task = asyncio.create_task(self.collector.run())
        log.info(
            "agent on node %s: %s GPUs, %s, scraping every %.3gs",
            self.node,
            a.gpus,
            "Pods on this node" if a.kubernetes else f"{len(self._static)} static endpoints",
            a.scrape_interval_s,
        )
        try:
            yield
        finally:
            self.hub.close()
            await cancel_and_wait(self._task, *self._tasks)
            await gpu_source.close()
            await session.close()
            if api_client is not None:
                await api_client.close()


def build_app(
    cfg: Config, *, gpu_source: GpuSource | None = None, kube_api: Any = None
) -> web.Application:
    agent = Agent(cfg, gpu_source=gpu_source, kube_api=kube_api)
    app = web.Application()
    app[AGENT_KEY] = agent
    app.cleanup_ctx.append(agent.lifecycle)

    async def _close_streams(app: web.Application) -> None:
        agent.hub.close()  # watch streams end before the runner waits for handlers

    app.on_shutdown.append(_close_streams)
    app.add_routes(
        routes(
            lambda r: r.app[AGENT_KEY].hub,
            lambda r: r.app[AGENT_KEY].ready,
            lambda r: r.app[AGENT_KEY].alive,
            lambda r: r.app[AGENT_KEY].registry,
        )
    )
    return app
