"""What the demo watches and shows: the agents' states, the gateway's counters, the live table
and the summary.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from agent.client import AgentWatchClient
from kvpilot.demo.fleet import POOL, DemoSettings, GiB, Slot, SlotActuator
from kvpilot.demo.load import LoadStats, percentile
from kvpilot.signals import GpuStats, NodeState, ReplicaState
from kvpilot.tasks import cancel_and_wait


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
        await cancel_and_wait(*self.tasks)


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
class Peak:
    """Per replica, the most it showed during the run (the summary reports these)."""

    hbm_used: int = 0
    hbm_total: int = 0
    util: float = 0.0
    kv: float = 0.0
    running: int = 0


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
