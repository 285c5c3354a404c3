"""`kvpilot controller --config kvpilot.yaml`: the replica and node-pool autoscaler."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.loop import Controller, planned_accelerator
from kvpilot.config import Config, ConfigError, load_or_exit, parse_listen, watch_config
from kvpilot.signals import ReplicaState
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger("kvpilot.controller")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvpilot controller", description=__doc__)
    p.add_argument("--config", required=True, help="kvpilot.yaml")
    p.add_argument("--dry-run", action="store_true", help="decide and export, never act")
    p.add_argument("--once", action="store_true", help="one tick, print decisions as JSON, exit")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_or_exit(args.config)
    if args.dry_run:
        cfg = dataclasses.replace(cfg, controller=dataclasses.replace(cfg.controller, dry_run=True))
    asyncio.run(serve(args.config, cfg, once=args.once, dry_run=args.dry_run))
    return 0


class AgentStates:
    """Replica states from every agent (agent.client.AgentSet), read each tick."""

    def __init__(self, urls: Iterable[str], session: aiohttp.ClientSession) -> None:
        from agent.client import AgentSet

        self.agents = AgentSet(list(urls), session)
        self.task = asyncio.ensure_future(self.agents.run())

    def __call__(self) -> list[ReplicaState]:
        return self.agents.replicas()

    async def close(self) -> None:
        await cancel_and_wait(self.task)


async def serve(path: str, cfg: Config, *, once: bool = False, dry_run: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with aiohttp.ClientSession() as session, _stack(cfg, session) as (controller, closers):
        if once:
            await asyncio.sleep(min(2.0, cfg.controller.interval_s))  # let the watches connect
            await _await_lease(controller, cfg)
            ds = await controller.tick()
            print(json.dumps({k: dataclasses.asdict(v) for k, v in ds.items()}, indent=2))
            return
        runner = await _metrics_server(cfg)
        task = asyncio.ensure_future(controller.run(stop))
        watch = asyncio.ensure_future(_reload(path, cfg, controller, dry_run))
        await stop.wait()
        watch.cancel()
        await task
        await runner.cleanup()


async def _await_lease(controller: Controller, cfg: Config) -> None:
    """--once: a lease another process held counts as live until this one has watched it for a
    lease duration (client-go's rule), so wait that long for it rather than print nothing."""
    if controller.leader is None or await controller.leader():
        return
    c = cfg.controller
    log.info("--once: waiting up to %.0f s for the lease %s/%s", c.lease_duration_s + 5,
             c.lease_namespace, c.lease_name)  # fmt: skip
    deadline = time.monotonic() + c.lease_duration_s + 5
    while time.monotonic() < deadline:
        if await controller.leader():
            return
        await asyncio.sleep(0.5)
    log.warning("--once: another controller holds the lease; deciding nothing")


@contextlib.asynccontextmanager
async def _stack(
    cfg: Config, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[Controller, list]]:
    from controller.demand import GatewayDemand

    agents = cfg.controller.agents or cfg.gateway.agents
    states = AgentStates(agents, session)
    closers: list = [states.close]
    c = cfg.controller
    demand = GatewayDemand(c.gateways, session) if c.gateways else None
    try:
        if c.mode == "local":
            from controller.local import LocalActuator

            actuator = LocalActuator(gpu=c.local_gpu, time_scale=c.local_time_scale)
            closers.append(actuator.close)
            yield Controller(cfg, actuator, states, demand=demand), closers
            return
        from controller.actuators import GkeNodes, KubeActuator, PlaceholderNodes
        from controller.gke import GkeNodePools
        from controller.kube import (
            KubeScaler,
            LeaderElector,
            Placeholders,
            StateConfigMap,
            load_api_client,
        )

        api = await load_api_client()
        closers.append(api.close)
        nodes = None
        if c.node_actuator == "placeholders":
            nodes = PlaceholderNodes(
                Placeholders(
                    api, c.placeholder_namespace, c.placeholder_priority_class, c.placeholder_image
                )
            )
        elif c.node_actuator == "gke":
            nodes = GkeNodes(
                GkeNodePools(
                    session,
                    c.gke_project,
                    c.gke_location,
                    c.gke_cluster,
                    api_url=c.gke_api_url,
                    metadata_url=c.gke_metadata_url,
                ),  # fmt: skip
                api=api,  # reads GPU nodes and Pending pods
            )
        leader = lease_left = None
        if c.leader_election:
            identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
            elector = LeaderElector(
                api, c.lease_namespace, c.lease_name, identity, lease_duration_s=c.lease_duration_s
            )
            leader, lease_left = elector.leader, elector.remaining
            # One try before the first tick, so a lone controller acts at once (and --once
            # does not race the renewer); then the renewer keeps the lease in the background.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(elector.renew_deadline_s):
                    await elector.try_acquire()
            renewing = asyncio.ensure_future(elector.run(asyncio.Event()))

            async def stop_elector() -> None:
                await cancel_and_wait(renewing)  # an in-flight try must not outlast the pod
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(3):
                        await elector.release()

            closers.append(stop_elector)

        yield (
            Controller(
                cfg,
                KubeActuator(KubeScaler(api)),
                states,
                nodes=nodes,
                leader=leader,
                lease_left=lease_left,
                accelerator_for=planned_accelerator,
                demand=demand,
                store=(
                    StateConfigMap(api, c.lease_namespace, c.state_configmap)
                    if c.state_configmap
                    else None
                ),
            ),
            closers,
        )
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()


async def _metrics_server(cfg: Config) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = parse_listen(cfg.controller.listen)
    await web.TCPSite(runner, host, port).start()
    log.info("controller metrics on http://%s:%d/metrics", host, port)
    return runner


# What a running controller takes on reload; everything else in `controller:` is read once at
# start (clients, actuators, the lease, the listen address), so a change there needs a restart.
LIVE_KEYS = frozenset({"interval_s", "dry_run", "pools"})


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the controller settings that need a restart put back to `old`'s (so what runs
    is what the config says it runs), and the keys that differed."""
    kept = {
        f.name: getattr(old.controller, f.name)
        for f in dataclasses.fields(old.controller)
        if f.name not in LIVE_KEYS
        and getattr(old.controller, f.name) != getattr(new.controller, f.name)
    }
    keys = [f"controller.{k}" for k in kept]
    agents = (
        old.controller.agents or old.gateway.agents,
        new.controller.agents or new.gateway.agents,
    )
    if "agents" not in kept and agents[0] != agents[1]:
        keys.append("gateway.agents (the controller's agents)")
    merged = dataclasses.replace(new, controller=dataclasses.replace(new.controller, **kept))
    return merged, keys


async def _reload(path: str, cfg: Config, controller: Controller, dry_run: bool) -> None:
    def rejected(e: ConfigError) -> None:
        log.error("keeping the old controller config: %s", e)

    async for new in watch_config(path, cfg, on_error=rejected):
        new, restart = keep_restart_only(controller.cfg, new)
        for key in restart:
            log.error("%s changed: restart the controller to apply it; keeping the old value", key)
        if dry_run:
            new = dataclasses.replace(
                new, controller=dataclasses.replace(new.controller, dry_run=True)
            )
        controller.apply_config(new)
        log.info("controller config reloaded")
