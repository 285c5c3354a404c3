"""`kvpilot demo`: start everything on one exit stack, run the load, show it, stop it all."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.live import Live

from agent.run import running_agent
from controller.demand import GatewayDemand
from controller.loop import Controller
from gateway.app import apply_config, start_gateway
from kvpilot.config import Config, load_config
from kvpilot.demo.board import AgentStates, Board, print_summary, read_gateway_metrics
from kvpilot.demo.fleet import (
    POOL,
    DemoSettings,
    Slot,
    SlotActuator,
    agent_config_dict,
    free_ports,
    main_config,
    write_yaml,
)
from kvpilot.demo.load import run_load
from kvpilot.signals import ReplicaState
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger("kvpilot.demo")


class DemoError(RuntimeError):
    """Something the user can fix (a busy port): one line, exit 1."""


async def run_demo(settings: DemoSettings, console: Console, stop: asyncio.Event) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="kvpilot-demo-"))
    log_path = workdir / "kvpilot-demo.log"
    logging.basicConfig(
        filename=log_path,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    ports = free_ports(sum(n.slots for n in settings.nodes) + len(settings.nodes))
    slots = [
        Slot(n.name, n.gpu, f"http://127.0.0.1:{ports.pop(0)}")
        for n in settings.nodes
        for _ in range(n.slots)
    ]
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        )
        # 1. One agent per emulated node, each from its own config file.
        agent_urls = []
        for n in settings.nodes:
            path = write_yaml(
                workdir / f"agent-{n.name}.yaml",
                agent_config_dict(settings, n.name, slots, ports.pop(0)),
                f"kvpilot demo: the agent on {n.name} (kvpilot agent --config this-file)",
            )
            url = await stack.enter_async_context(running_agent(load_config(path)))
            agent_urls.append(url)
            console.print(f"agent for {n.name} on {url} ({path.name})", highlight=False)
        agents = AgentStates(agent_urls, http)
        stack.push_async_callback(agents.close)

        # 2. The replicas: the controller's actuator owns the modelserver processes.
        actuator = SlotActuator(
            gpu=settings.nodes[0].gpu,
            time_scale=settings.time_scale,
            gpu_of={s.url: s.gpu for s in slots},
        )
        stack.push_async_callback(actuator.close)

        # 3. The gateway, from kvpilot.yaml; at first it routes to no replica (none runs yet).
        port = settings.port or free_ports(1)[0]
        cfg_path = write_yaml(
            workdir / "kvpilot.yaml",
            main_config(settings, slots, agent_urls, port),
            "kvpilot demo: gateway and controller (kvpilot gateway|controller --config this-file)\n"
            "# The demo runs the controller in-process so that each endpoint gets its own node's GPU\n"
            f"# ({', '.join(s.gpu for s in slots)}); `kvpilot controller` would start every "
            "replica on local_gpu.",
        )
        cfg = load_config(cfg_path)
        console.print(f"config: {cfg_path}  (log: {log_path})", highlight=False)
        try:
            runner, gateway_url = await start_gateway(with_endpoints(cfg, ()), port=port)
        except OSError as e:
            raise DemoError(
                f"cannot serve the gateway on 127.0.0.1:{port}: {e.strerror}; try --port 0"
            ) from None
        stack.push_async_callback(runner.cleanup)
        board = Board(settings, slots, gateway_url, actuator, agents)
        sync = EndpointSync(board, runner.app, cfg, http)
        actuator.before_stop = sync.drain

        def on_scale(before: int, after: int, reason: str) -> None:
            line = f"{time.monotonic() - board.t0:5.1f}s: {before} -> {after} replicas ({reason})"
            board.scale_events.append(line)
            if not console.is_terminal:
                console.print(f"controller: {line}", highlight=False)

        actuator.on_scale = on_scale

        # 4. The controller, on the agents' states; it starts the first replicas at once.
        # Agents list every slot of their node, also those with no process (healthy: false,
        # never observed); the controller would count those as not-ready pods, which holds back
        # a scale-up. In Kubernetes a pod that does not exist is not reported at all: do the same.
        def running_states() -> list[ReplicaState]:
            running = actuator.running()
            return [s for s in agents.replicas() if s.address.rstrip("/") in running]

        # And on the gateway's held requests and request rate (`controller.gateways`).
        demand = GatewayDemand(cfg.controller.gateways, http)
        controller = Controller(cfg, actuator, running_states, demand=demand)
        stack.push_async_callback(cancel_and_wait, asyncio.create_task(controller.run(stop)))
        stack.push_async_callback(cancel_and_wait, asyncio.create_task(sync.run()))
        console.print(
            f"gateway {gateway_url} (policy headroom); controller (local mode) starting "
            f"{settings.min_replicas} of {len(slots)} replicas ...",
            highlight=False,
        )
        await sync.wait_ready(settings.min_replicas, timeout_s=60, stop=stop)
        for s in slots:
            if s.url in board.ready:
                console.print(f"  {s.node}: {s.gpu} replica serving on {s.url}", highlight=False)

        # 5. The load, through the gateway, with the live table.
        console.print(
            f"load: {settings.concurrency} streaming chat clients for {settings.duration_s:g} s "
            f"through {gateway_url}",
            highlight=False,
        )
        live = Live(console=console, refresh_per_second=4) if console.is_terminal else None

        async def refresh() -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(gateway_url.removesuffix("/v1") + "/metrics") as r:
                    board.gw = read_gateway_metrics(await r.text())
            board.observe()
            d = controller.last.get(POOL)
            if d is not None:
                board.controller_line = (
                    f"controller: {d.current} -> {d.desired} replicas wanted ({d.reason})"
                )

        async def show_until(done: asyncio.Event, every: float) -> None:
            while True:
                await refresh()
                if live is not None:
                    live.update(board.table())
                else:
                    console.print(board.plain(), highlight=False)
                if done.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout=every)

        load_done = asyncio.Event()
        with live if live is not None else contextlib.nullcontext():
            shower = asyncio.create_task(show_until(load_done, settings.refresh_s))
            try:
                await run_load(gateway_url, settings, board.load, stop)
            finally:
                load_done.set()
                await shower
        print_summary(console, board)

        # 6. Serve on, for any OpenAI client, until Ctrl-C (only for a person at a terminal).
        if settings.serve and sys.stdin.isatty() and not stop.is_set():
            console.print(
                f"\nserving {gateway_url} until Ctrl-C; try:\n"
                f'  OPENAI_BASE_URL={gateway_url} OPENAI_API_KEY=none python -c "import openai; '
                f"print(openai.OpenAI().chat.completions.create(model='{settings.model}', "
                f"messages=[{{'role':'user','content':'Hello'}}]).choices[0].message.content)\"",
                highlight=False,
                soft_wrap=True,
            )
            with live if live is not None else contextlib.nullcontext():
                await show_until(stop, 2.0)
        console.print("stopping ...", highlight=False)
    console.print(f"all stopped. config and log kept in {workdir}", highlight=False)
    return 0 if board.load.failed == 0 and board.load.ok > 0 else 1


def with_endpoints(cfg: Config, endpoints: tuple[str, ...]) -> Config:
    pools = tuple(dataclasses.replace(p, endpoints=endpoints) for p in cfg.pools)
    return dataclasses.replace(cfg, pools=pools)


class EndpointSync:
    """The gateway's replica list = replicas running *and* reported healthy by their agent.

    In Kubernetes the gateway learns this from EndpointSlices (readiness); with static endpoints
    the demo does that job, through the gateway's own `apply_config`.
    """

    def __init__(self, board: Board, app: Any, cfg: Config, http: aiohttp.ClientSession) -> None:
        self.board = board
        self.app = app
        self.cfg = cfg
        self.http = http
        self.leaving: set[str] = set()
        self.changed = asyncio.Event()

    def wanted(self) -> tuple[str, ...]:
        running = self.board.actuator.running()
        states = self.board.agents.by_url()
        return tuple(
            s.url
            for s in self.board.slots
            if s.url in running
            and s.url not in self.leaving
            and (st := states.get(s.url)) is not None
            and st.healthy
            and st.observed_at > 0
        )

    async def apply(self) -> None:
        wanted = self.wanted()
        if wanted != self.board.ready:
            await apply_config(self.app, with_endpoints(self.cfg, wanted))
            self.board.ready = wanted
            log.info("gateway routes to %s", ", ".join(wanted) or "no replica")
            self.changed.set()

    async def run(self) -> None:
        while True:
            await self.apply()
            await asyncio.sleep(0.25)

    async def wait_ready(self, n: int, *, timeout_s: float, stop: asyncio.Event) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.board.ready) < n and not stop.is_set():
            if time.monotonic() > deadline:
                raise DemoError(f"only {len(self.board.ready)} of {n} replicas became ready")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=0.5)

    async def drain(self, urls: list[str], timeout_s: float = 10.0) -> None:
        """Take replicas out of the gateway, then wait (bounded) until they have no work left."""
        self.leaving.update(urls)
        await self.apply()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.board.agents.by_url()
            busy = [u for u in urls if (s := states.get(u)) and (s.running or s.waiting)]
            if not busy:
                break
            await asyncio.sleep(0.25)
        self.leaving.difference_update(urls)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="kvpilot demo",
        description="Run the whole of kvpilot locally on emulated GPUs: model servers, agents, "
        "gateway and controller, with a bounded load and a live table.",
    )
    p.add_argument(
        "--duration", type=float, default=DemoSettings.duration_s, help="seconds of load (wall)"
    )
    p.add_argument("--time-scale", type=float, default=DemoSettings.time_scale)
    p.add_argument("--concurrency", type=int, default=DemoSettings.concurrency)
    p.add_argument(
        "--port", type=int, default=DemoSettings.port, help="gateway port (0 picks a free one)"
    )
    p.add_argument(
        "--no-serve", action="store_true", help="exit after the load instead of serving on"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.duration <= 0 or args.time_scale <= 0 or args.concurrency <= 0:
        p.error("--duration, --time-scale and --concurrency must be > 0")
    if not 0 <= args.port < 65536:
        p.error("--port must be 0-65535")
    settings = DemoSettings(
        duration_s=args.duration,
        time_scale=args.time_scale,
        concurrency=args.concurrency,
        seed=args.seed,
        port=args.port,
        serve=not args.no_serve,
    )
    console = Console(soft_wrap=True)
    try:
        return asyncio.run(_main(settings, console))
    except DemoError as e:
        console.print(f"kvpilot demo: {e}", highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130


async def _main(settings: DemoSettings, console: Console) -> int:
    """The first Ctrl-C or SIGTERM ends the load or the serving, cleanly; a second one cancels."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    return await run_demo(settings, console, stop)
