"""`kvpilot demo` (`make demo`): the whole system running locally on emulated GPUs.

Two emulated nodes, one pool of `llama-3.1-8b` replicas (`kvpilot modelserver`, time-scaled):
"h100-node" with one H100 slot and "l4-node" with two L4 slots. Every part is the real one:

- the controller (`controller.loop.Controller`, `controller.mode: local`) starts the replicas and
  scales the pool between `min_replicas` and one replica per slot on the agents' signals;
- one agent per node (`agent.gpus: emulated`) reads each replica's GPU and engine state;
- the gateway (policy `headroom`) serves http://127.0.0.1:8080/v1 for any OpenAI client, fed by
  the agents' watch streams; the demo's own load goes through it.

The generated configuration (kvpilot.yaml, one agent-<node>.yaml per node) and the components' log
are written to a fresh temporary directory whose path is printed. Outside Kubernetes the gateway's
replica list is static, so the demo plays the part EndpointSlices play in a cluster: it hands the
gateway the replicas that are running and reported healthy by their agent, and takes a replica out
before the controller stops it.

Everything is entered on one `AsyncExitStack`, so it all stops, in reverse order, however the demo
ends (load done, Ctrl-C, SIGTERM, an error); no process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.client import AgentWatchClient
from agent.run import running_agent
from controller.demand import GatewayDemand
from controller.local import LocalActuator
from controller.loop import Controller, PoolTarget
from controller.replicas import Decision
from gateway.app import apply_config, start_gateway
from kvpilot.config import Config, load_config
from kvpilot.signals import GpuStats, NodeState, ReplicaState

GiB = 1024**3
POOL = "llama-8b"
log = logging.getLogger("kvpilot.demo")


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
        before = await self.get_replicas(t)
        leaving = [ep for ep in t.pool.endpoints[replicas:] if ep in self.running()]
        if leaving and self.before_stop is not None:
            await self.before_stop(leaving)
        await super().set_replicas(t, replicas, d)
        if self.on_scale is not None:
            self.on_scale(before, replicas, d.reason if d is not None else "")


# ---------------------------------------------------------------------------------------------
# What the demo watches: the agents' states, the gateway's counters, its own clients.


class AgentStates:
    """Follows every agent's watch stream; the controller and the table read `latest`."""

    def __init__(self, urls: list[str], session: aiohttp.ClientSession) -> None:
        self.clients = [AgentWatchClient(u, session, max_backoff_s=1.0) for u in urls]
        self.tasks = [asyncio.create_task(c.run()) for c in self.clients]

    def replicas(self) -> list[ReplicaState]:
        return [s for c in self.clients for s in c.latest.values()]

    def nodes(self) -> list[NodeState]:
        return [c.state for c in self.clients if c.state is not None]

    def by_url(self) -> dict[str, ReplicaState]:
        return {s.address.rstrip("/"): s for s in self.replicas()}

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


@dataclass
class GatewayView:
    sent: dict[str, float] = field(default_factory=dict)  # replica -> requests answered
    decisions: dict[str, float] = field(default_factory=dict)  # headroom reason -> picks
    shed: float = 0.0
    queued: float = 0.0  # requests held in the gateway's saturation queue right now
    inflight: dict[str, float] = field(default_factory=dict)  # replica -> sent, not finished


def read_gateway_metrics(text: str) -> GatewayView:
    v = GatewayView()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kvpilot_gateway_requests_total" and s.labels.get("replica"):
                r = s.labels["replica"]
                v.sent[r] = v.sent.get(r, 0.0) + s.value
            elif s.name == "kvpilot_gateway_decisions_total":
                v.decisions[s.labels["reason"]] = v.decisions.get(s.labels["reason"], 0) + s.value
            elif s.name == "kvpilot_gateway_shed_total":
                v.shed += s.value
            elif s.name == "kvpilot_gateway_queue_length":
                v.queued += s.value
            elif s.name == "kvpilot_gateway_inflight_requests":
                v.inflight[s.labels["replica"]] = s.value
    return v


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    throttled: int = 0  # 429 from the gateway: every replica saturated and the queue full
    failed: int = 0
    chunks: int = 0  # streamed content chunks (about one token each)
    # Wall seconds: the gateway's and the client's own time is real, only the engines run
    # `time_scale` x faster, so scaling this up would blow the proxy's share up with it.
    ttft_s: list[float] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0


@dataclass
class Peak:
    """Per replica, the most it showed during the run (the summary reports these)."""

    hbm_used: int = 0
    hbm_total: int = 0
    util: float = 0.0
    kv: float = 0.0
    running: int = 0


SYSTEM_PROMPTS = tuple(
    f"You are assistant #{i}. Answer carefully, cite sources, and keep a friendly tone. " * 6
    for i in range(3)
)


def request_body(rng: random.Random, model: str) -> dict[str, object]:
    """A mix: short chats sharing system prompts (prefix-cache hits), long documents, long answers."""
    kind = rng.random()
    if kind < 0.6:
        user = f"Question {rng.randrange(10**6)}: " + "tell me more " * rng.randint(2, 40)
        messages = [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": user},
        ]
        body: dict[str, object] = {
            "messages": messages,
            "max_tokens": rng.choice((32, 64, 128)),
            "min_tokens": 16,
        }
    elif kind < 0.85:
        doc = " ".join(f"para{rng.randrange(10**6)}" for _ in range(rng.randint(100, 400)))
        body = {
            "messages": [{"role": "user", "content": "Summarise: " + doc}],
            "max_tokens": 64,
            "ignore_eos": True,
        }
    else:
        body = {
            # Unique: the emulated engine names a request by its prompt's hash, and concurrent
            # identical prompts can collide there (see the lead's notes on modelserver).
            "messages": [{"role": "user", "content": f"Write essay {rng.randrange(10**9)}."}],
            "max_tokens": 400,
            "ignore_eos": True,
        }
    return {**body, "model": model, "stream": True}


async def one_request(
    http: aiohttp.ClientSession, base: str, body: dict[str, object], st: LoadStats
) -> None:
    st.sent += 1
    t0 = time.monotonic()
    first = None
    try:
        async with http.post(base + "/chat/completions", json=body) as r:
            if r.status == 429:
                st.throttled += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")) / 4)
                return
            if r.status != 200:
                st.failed += 1
                return
            async for line in r.content:
                if line.startswith(b"data: {"):
                    st.chunks += 1
                    if first is None:
                        first = time.monotonic()
                elif line.startswith(b"event: error"):
                    st.failed += 1
                    return
        st.ok += 1
        if first is not None:
            st.ttft_s.append(first - t0)
    except (aiohttp.ClientError, TimeoutError):
        st.failed += 1


async def run_load(base: str, settings: DemoSettings, st: LoadStats, stop: asyncio.Event) -> None:
    """`concurrency` closed-loop streaming chat clients until the duration ends (or a stop)."""
    rng = random.Random(settings.seed)
    deadline = time.monotonic() + settings.duration_s
    st.started_at = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=settings.duration_s + 30)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def client(seed: int) -> None:
            crng = random.Random(seed)
            while time.monotonic() < deadline and not stop.is_set():
                body = request_body(crng, settings.model)
                await one_request(http, base, body, st)

        await asyncio.gather(*(client(rng.randrange(2**32)) for _ in range(settings.concurrency)))
    st.ended_at = time.monotonic()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:,.0f}"


def replica_gpus(state: ReplicaState | None, nodes: list[NodeState]) -> tuple[GpuStats, ...]:
    """The replica's GPUs: from its state (the agent's GPU -> replica map), else its node's."""
    if state is None:
        return ()
    if state.gpus:
        return state.gpus
    node = next((n for n in nodes if n.node == state.node), None)
    return node.gpus if node is not None and len(node.replicas) == 1 else ()


@dataclass
class Board:
    """Everything the table and the summary show, refreshed once per `refresh_s`."""

    settings: DemoSettings
    slots: list[Slot]
    gateway_url: str
    actuator: SlotActuator
    agents: AgentStates
    load: LoadStats = field(default_factory=LoadStats)
    gw: GatewayView = field(default_factory=GatewayView)
    ready: tuple[str, ...] = ()  # endpoints the gateway is routing to
    controller_line: str = "controller: starting"
    scale_events: list[str] = field(default_factory=list)
    peaks: dict[str, Peak] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def status(self, slot: Slot, state: ReplicaState | None) -> str:
        if slot.url not in self.actuator.running():
            return "stopped"
        if slot.url in self.ready:
            return "serving"
        return "starting" if state is None or not state.healthy else "ready"

    def observe(self) -> None:
        states = self.agents.by_url()
        nodes = self.agents.nodes()
        for slot in self.slots:
            st = states.get(slot.url)
            gpus = replica_gpus(st, nodes)
            if st is None or not st.healthy or not gpus:
                continue
            p = self.peaks.setdefault(slot.url, Peak())
            p.hbm_used = max(p.hbm_used, sum(g.hbm_used_bytes for g in gpus))
            p.hbm_total = sum(g.hbm_total_bytes for g in gpus)
            p.util = max(p.util, max(g.util for g in gpus))
            p.kv = max(p.kv, st.kv_usage)
            p.running = max(p.running, st.running)

    def rows(self) -> list[dict[str, str]]:
        states = self.agents.by_url()
        nodes = self.agents.nodes()
        scale = self.settings.time_scale
        out = []
        for slot in self.slots:
            st = states.get(slot.url)
            gpus = replica_gpus(st, nodes)
            live = st is not None and st.healthy
            used = sum(g.hbm_used_bytes for g in gpus)
            total = sum(g.hbm_total_bytes for g in gpus)
            out.append(
                {
                    "node": slot.node,
                    "replica": f":{slot.port}",
                    "status": self.status(slot, st),
                    "GPU": gpus[0].name if gpus else slot.gpu.upper(),
                    "HBM GiB": f"{used / GiB:.1f}/{total / GiB:.0f}" if live and total else "-",
                    "util": f"{max(g.util for g in gpus) * 100:.0f}%" if live and gpus else "-",
                    "wait": f"{st.waiting}" if live and st else "-",
                    "run": f"{st.running}" if live and st else "-",
                    "KV": f"{st.kv_usage * 100:.0f}%" if live and st else "-",
                    "TTFT ms": _ms(st.ttft_s) if live and st else "-",
                    # The agent's rates are per wall second; the engine runs `scale` x faster.
                    "tok/s": f"{st.generation_tokens_per_s / scale:,.0f}" if live and st else "-",
                    "in flight": f"{self.gw.inflight.get(slot.url, 0):.0f}",
                    "sent": f"{self.gw.sent.get(slot.url, 0):.0f}",
                }
            )
        return out

    def totals_line(self) -> str:
        ld = self.load
        end = ld.ended_at or time.monotonic()
        wall = max(1e-9, end - ld.started_at) if ld.started_at else 0.0
        rps = ld.ok / wall if wall else 0.0
        tok = ld.chunks / (wall * self.settings.time_scale) if wall else 0.0
        return (
            f"gateway {self.gateway_url}: {ld.ok} requests answered, {rps:.1f} req/s wall, "
            f"~{tok:,.0f} tok/s modelled; client TTFT p50 {_ms(percentile(ld.ttft_s, 0.5))} "
            f"ms p99 {_ms(percentile(ld.ttft_s, 0.99))} ms (wall); queued at the gateway "
            f"{self.gw.queued:.0f}; 429s {ld.throttled}; "
            f"errors {ld.failed}"
        )

    def table(self) -> Group:
        elapsed = time.monotonic() - self.t0
        t = Table(
            title=f"kvpilot demo: {self.settings.model}, pool {POOL}, policy headroom, "
            f"{elapsed:4.1f} s, time scale {self.settings.time_scale:g}x",
            caption="agent columns: GPU to KV; engine TTFT and tok/s in modelled time; "
            "in flight and sent: the gateway's",
            box=box.SIMPLE_HEAD,
        )
        rows = self.rows()
        for col in rows[0]:
            t.add_column(
                col,
                justify="left" if col in ("node", "replica", "status", "GPU") else "right",
                no_wrap=True,
            )
        for r in rows:
            # "NVIDIA H100 80GB HBM3" -> "H100": the table has to fit a terminal.
            r["GPU"] = r["GPU"].removeprefix("NVIDIA ").split(" ")[0]
            t.add_row(*r.values())
        return Group(t, Text(self.controller_line), Text(self.totals_line()))

    def plain(self) -> str:
        parts = []
        for r in self.rows():
            parts.append(
                f"{r['node']}{r['replica']} {r['status']} {r['GPU']} HBM {r['HBM GiB']} GiB "
                f"util {r['util']} wait {r['wait']} run {r['run']} KV {r['KV']} "
                f"TTFT {r['TTFT ms']} ms in flight {r['in flight']} sent {r['sent']}"
            )
        return (
            f"[{time.monotonic() - self.t0:5.1f}s] "
            + " | ".join(parts)
            + f" | gateway queue {self.gw.queued:.0f}"
        )


# ---------------------------------------------------------------------------------------------
# The demo


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
        stack.push_async_callback(stop_task, asyncio.create_task(controller.run(stop)))
        stack.push_async_callback(stop_task, asyncio.create_task(sync.run()))
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


async def stop_task(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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


def print_summary(console: Console, board: Board) -> None:
    s = board.settings
    console.print(
        f"summary ({s.duration_s:g} s of load, time scale {s.time_scale:g}x; engine figures in "
        "modelled time, the client's in wall time):",
        highlight=False,
    )
    console.print("  " + board.totals_line(), highlight=False)
    for slot in board.slots:
        p = board.peaks.get(slot.url)
        seen = (
            "never ran"
            if p is None
            else f"peak HBM {p.hbm_used / GiB:.1f}/{p.hbm_total / GiB:.0f} GiB, "
            f"util {p.util * 100:.0f}%, KV {p.kv * 100:.0f}%, running {p.running}"
        )
        console.print(
            f"  replica {slot.url} on {slot.node} ({slot.gpu}): gateway sent "
            f"{board.gw.sent.get(slot.url, 0):.0f} requests; {seen}",
            highlight=False,
        )
    reasons = ", ".join(f"{k} {v:.0f}" for k, v in sorted(board.gw.decisions.items()))
    console.print(f"  headroom decisions: {reasons or 'none'}", highlight=False)
    console.print(f"  {board.controller_line}", highlight=False)
    for line in board.scale_events:
        console.print(f"  scaled at {line}", highlight=False)


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
