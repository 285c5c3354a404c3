"""`kvpilot sim autoscale ...`: replica autoscaling policies over a compressed day.

    kvpilot sim autoscale --duration 3600 --seeds 1,2,3 --policies hpa-queue,kpa,kvpilot \
        --json out.json --plot out.png --markdown out.md

A seeded 24-hour diurnal demand curve with bursts, compressed into `--duration` virtual seconds
and scaled so that the pool needs about 2 replicas at night and 10 in the afternoon (more in a
burst), runs through the routing simulator (real engines, the real gateway picker). Each policy
sees the replicas' metrics and asks for a replica count every sync period; sim/provisioning.py
turns that into pods and GPU nodes with real-world delays (node 5-10 min, model load 60-180 s),
graceful drains and node removal. Every run reports its SLO attainment (share of requests that
meet the workload's TTFT and TPOT targets), GPU-hours (node creation to removal) and scale
actions (changes of the replica count). Baselines are swept over their main target; kvpilot runs
at its defaults.
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import random
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from statistics import mean
from typing import Any

from kvpilot.config import ConfigError
from sim.args import ints, names_from
from sim.autoscale_policies import (
    DEFAULT_SWEEP,
    POLICY_NAMES,
    FleetObservation,
    Limits,
    ReplicaMetrics,
    Sample,
    make_policy,
    setting_label,
)
from sim.fleets import DEFAULT_MODEL, ReplicaSpec
from sim.parallel import run_parallel
from sim.provisioning import Cluster, Pod, ProvisioningConfig
from sim.simulator import SimConfig, Simulation
from sim.slo import slo_for
from sim.traces import SIZERS, SegmentKeys, SimRequest

DAY_S = 86400.0

# ---- the day ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayShape:
    low_replicas: float = 2.0  # replicas' worth of demand at the night trough
    high_replicas: float = 10.0  # ... and at the afternoon peak
    trough_hour: float = 4.0
    burst_gap_s: float = 900.0  # virtual seconds between bursts (mean); bursts are not compressed
    burst_min_s: float = 60.0
    burst_max_s: float = 300.0
    burst_min_x: float = 1.3  # rate multiplier during a burst
    burst_max_x: float = 1.8
    utilization: float = 0.75  # one replica's worth = this share of its saturation rate


def demand_curve(
    duration_s: float, seed: int | str, shape: DayShape = DayShape()
) -> Callable[[float], float]:
    """Replicas' worth of demand at virtual time t: the day compressed into `duration_s`, times
    bursts that keep their real length."""
    rng = random.Random(f"day-bursts-{seed}")
    bursts: list[tuple[float, float, float]] = []
    t = rng.expovariate(1 / shape.burst_gap_s)
    while t < duration_s:
        length = rng.uniform(shape.burst_min_s, shape.burst_max_s)
        bursts.append((t, t + length, rng.uniform(shape.burst_min_x, shape.burst_max_x)))
        t += length + rng.expovariate(1 / shape.burst_gap_s)
    starts = [b[0] for b in bursts]

    def f(x: float) -> float:
        hour = 24.0 * x / duration_s
        day = 0.5 - 0.5 * math.cos(2 * math.pi * (hour - shape.trough_hour) / 24.0)
        base = shape.low_replicas + (shape.high_replicas - shape.low_replicas) * day
        i = bisect.bisect_right(starts, x) - 1
        if i >= 0 and x < bursts[i][1]:
            base *= bursts[i][2]
        return base

    return f


def make_day_trace(
    workload: str,
    duration_s: float,
    seed: int,
    replica_rps: float,
    shape: DayShape = DayShape(),
    preroll_s: float = 0.0,
    warmup_days: int = 0,
) -> list[SimRequest]:
    """Requests of `workload` (a size mix from sim/traces.py) arriving as a non-homogeneous
    Poisson process with rate demand(t) x replica_rps (thinning).

    With `warmup_days` = 0 demand stays at midnight's level for `preroll_s`, then the measured
    day runs. Otherwise `warmup_days` whole days, each with its own bursts, replace the pre-roll,
    so that every policy starts the measured day from the state its previous day left it in (a
    policy that only scales up would otherwise carry the bill for its overnight replicas into a
    day nobody measures, and a policy that learns the day has seen one). The measured day starts
    at `warmup_days x duration_s` then; its requests are the same whatever `warmup_days` is,
    only shifted."""
    if workload not in SIZERS:
        raise ValueError(f"autoscale workload must be one of {sorted(SIZERS)}, not {workload!r}")
    if warmup_days < 0:
        raise ValueError(f"warmup_days must be >= 0, not {warmup_days}")
    key = SegmentKeys()
    day = demand_curve(duration_s, seed, shape)
    # the pre-roll and the measured day, as they always were
    measured = _arrivals(
        workload,
        lambda x: day(max(0.0, x - preroll_s)),
        0.0,
        duration_s + preroll_s,
        seed,
        replica_rps,
        shape,
        key,
    )
    if warmup_days == 0:
        return [replace(r, request_id=f"r{i}") for i, r in enumerate(measured)]
    shift = warmup_days * duration_s - preroll_s  # the pre-roll's end to the day's start
    out: list[SimRequest] = []
    for k in range(warmup_days):
        start = k * duration_s
        warm = demand_curve(duration_s, f"{seed}-warmup{k}", shape)
        out += _arrivals(
            workload,
            lambda x, w=warm, s=start: w(x - s),  # type: ignore[misc]
            start,
            start + duration_s,
            f"{seed}-warmup{k}",
            replica_rps,
            shape,
            key,
        )
    out += [replace(r, arrival_s=r.arrival_s + shift) for r in measured if r.arrival_s >= preroll_s]
    return [replace(r, request_id=f"r{i}") for i, r in enumerate(out)]


def _arrivals(
    workload: str,
    curve: Callable[[float], float],
    t0: float,
    t1: float,
    stream: int | str,
    replica_rps: float,
    shape: DayShape,
    key: SegmentKeys,
) -> list[SimRequest]:
    """Arrivals in [t0, t1) at rate curve(t) x replica_rps, thinned from the peak rate."""
    sizer = SIZERS[workload]
    peak = shape.high_replicas * shape.burst_max_x * replica_rps * 1.01
    times = random.Random(f"day-times-{stream}")
    sizes = random.Random(f"day-sizes-{stream}")
    out: list[SimRequest] = []
    t = t0
    while True:
        t += times.expovariate(peak)
        if t >= t1:
            return out
        if times.random() * peak > curve(t) * replica_rps:
            continue
        s = sizer(sizes, key)  # type: ignore[arg-type]
        out.append(SimRequest("", t, s.segments, s.output_tokens, s.max_tokens, s.kind))


# ---- the simulation ---------------------------------------------------------------------------


class AutoscaleSimulation(Simulation):
    """The routing simulation with a controller on its scrape clock: every scrape it advances
    the cluster (nodes, model loads, drains) and samples each serving replica's metrics; every
    `policy.sync_s` it asks the policy for a replica count and applies it."""

    def __init__(
        self,
        spec: ReplicaSpec,
        router: object,
        config: SimConfig,
        autoscaler: object,
        cluster: Cluster,
        *,
        initial_replicas: int,
        history_s: float = 60.0,
        count_from_s: float = 0.0,
        count_until_s: float = math.inf,
        settle_s: float = 60.0,
        log_decisions: bool = False,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__([], router, config, on_progress=on_progress)
        self.spec = spec
        self.autoscaler = autoscaler
        self.cluster = cluster
        self.history_s = history_s
        self.count_from_s = count_from_s  # scale actions before this are the pre-roll's
        self.count_until_s = count_until_s  # ... and after this, the drain after the day's end
        self.log: list[tuple[float, int, int, str]] | None = [] if log_decisions else None
        self.scale_actions = 0
        self.preemptions_before: int | None = None  # engine preemptions when the day started
        self.decisions = 0
        self.timeline: list[tuple[float, int, int, int, int]] = []  # t, spec, ready, nodes, ph
        self._samples: dict[str, deque[Sample]] = {}
        self._busy: dict[str, tuple[float, float]] = {}
        self._draining: list[Pod] = []
        # The first decision waits one minute: replicas that have just started report no load.
        self._next_decision = settle_s
        for pod in cluster.seed_ready(initial_replicas, 0.0):
            self.join(spec, 0.0, pod.pod_id)

    def _scrape(self, t: float) -> None:
        super()._scrape(t)
        self._control(t)

    def _control(self, t: float) -> None:
        if self.preemptions_before is None and t >= self.count_from_s:
            self.preemptions_before = self.preemptions
        cl = self.cluster
        for pod in list(self._draining):
            if pod.pod_id not in self.replicas:
                self._draining.remove(pod)
                self._samples.pop(pod.pod_id, None)
                cl.drained(pod, t)
        for pod in cl.advance(t):
            self.join(self.spec, t, pod.pod_id)
        self._sample(t)
        observe = getattr(self.autoscaler, "observe", None)
        if observe is not None:
            # a controller fed by the agents' watch streams sees every scrape, not only the last
            observe(tuple(s for rid, s in self.states.items() if rid in self._samples), t)
        if t + 1e-9 < self._next_decision:
            return
        self._next_decision = t + self.autoscaler.sync_s  # type: ignore[attr-defined]
        obs = self._observe(t)
        scale = self.autoscaler.decide(obs, t)  # type: ignore[attr-defined]
        self.decisions += 1
        changed = scale.replicas != obs.spec_replicas or scale.placeholders != len(
            cl.placeholders()
        )  # placeholder pods asked for or given back are scaling actions too
        if changed and self.count_from_s <= t < self.count_until_s:
            self.scale_actions += 1
        if self.log is not None:
            self.log.append((t, obs.spec_replicas, scale.replicas, scale.reason))
        for pod in cl.scale(scale.replicas, scale.placeholders, t):
            self._draining.append(pod)
            self.leave(pod.pod_id, t)
        self.timeline.append(
            (t, cl.spec_replicas(), len(obs.ready), len(cl.live_nodes()), scale.placeholders)
        )

    def _sample(self, t: float) -> None:
        for rid, r in self.replicas.items():
            if r.leaving:
                continue
            s = r.engine.stats()  # type: ignore[attr-defined]
            prev_t, prev_busy = self._busy.get(rid, (r.joined_s, 0.0))
            dt = t - prev_t
            duty = min(1.0, (r.busy_s - prev_busy) / dt) if dt > 0 else 0.0
            self._busy[rid] = (t, r.busy_s)
            q = self._samples.setdefault(rid, deque())
            q.append(Sample(t, s.num_waiting, s.num_running, s.kv_usage, len(r.live), duty))
            while q and q[0].t <= t - self.history_s:
                q.popleft()

    def _observe(self, t: float) -> FleetObservation:
        ready = tuple(
            ReplicaMetrics(rid, tuple(self._samples[rid]))
            for rid, r in self.replicas.items()
            if not r.leaving and self._samples.get(rid)
        )
        states = tuple(self.states[m.replica_id] for m in ready if m.replica_id in self.states)
        cl = self.cluster
        # replicas the cluster calls ready whose join is still on the heap count as starting
        starting = cl.count("loading") + max(0, cl.count("ready") - len(ready))
        return FleetObservation(
            spec_replicas=cl.spec_replicas(),
            ready=ready,
            starting=starting,
            pending=cl.count("pending"),
            states=states,
            spare=sum(1 for p in cl.placeholders() if p.state == "ready"),  # bound to a node
        )


# ---- one run, and the sweep -------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    duration_s: float = 3600.0
    workload: str = "sharegpt"
    gpu: str = "l4"
    model: str = DEFAULT_MODEL
    router: str = "headroom"
    shape: DayShape = field(default_factory=DayShape)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    limits: Limits = field(default_factory=lambda: Limits(1, 20))
    sim: SimConfig = field(default_factory=lambda: SimConfig(scrape_interval_s=1.0))
    # The controllers run this long at midnight's demand before the day (and the measurement)
    # starts, so no policy is judged on its first decisions from an empty history.
    preroll_s: float = 600.0
    # Whole days run before the measured one (their own bursts; they replace the pre-roll), so
    # each policy starts it from its previous day's end state: GPU-hours are a day's bill in
    # steady state, not the first day's of a policy that only ever scales up. Two: after one,
    # a policy that learns the day (kvpilot) ran its warm-up day without a day learned, and
    # the measured day starts from that first day's end state, not from its own regime's.
    warmup_days: int = 2
    # kvpilot's scaling settings off their defaults, (key, value) pairs (`--kvpilot key=value`):
    # for trying settings; the benchmark's verdict is about kvpilot at its defaults.
    kvpilot_scaling: tuple[tuple[str, Any], ...] = ()

    @property
    def day_start_s(self) -> float:
        """Where the measured day starts on the simulation's clock."""
        return self.warmup_days * self.duration_s if self.warmup_days else self.preroll_s

    @property
    def spec(self) -> ReplicaSpec:
        return ReplicaSpec(self.gpu, self.model)

    def replica_rps(self) -> float:
        from sim.calibrate import replica_saturation_rate

        sat = replica_saturation_rate(
            self.spec, self.workload, gpu_memory_utilization=self.sim.gpu_memory_utilization
        )
        return sat * self.shape.utilization


def run_one(
    scenario: Scenario,
    policy: str,
    setting: float,
    seed: int,
    *,
    replica_rps: float | None = None,
    on_progress: Callable[[float], None] | None = None,
    log_decisions: bool = False,
) -> dict[str, Any]:
    """One simulated day under one policy setting: a flat row (with `log_decisions`, plus the
    run's timeline and decision log under "_timeline" and "_log")."""
    from gateway.picker import make_policy as make_router
    from sim.metrics import summarise

    rps = replica_rps if replica_rps is not None else scenario.replica_rps()
    trace = make_day_trace(
        scenario.workload,
        scenario.duration_s,
        seed,
        rps,
        scenario.shape,
        preroll_s=scenario.preroll_s,
        warmup_days=scenario.warmup_days,
    )
    pre = scenario.day_start_s
    slo = slo_for(scenario.workload)
    opts: dict[str, Any] = {}
    if scenario.router == "headroom":
        opts = {
            "slo_ttft_s": slo.ttft_s,
            "slo_ttft_per_token_s": slo.ttft_per_1k_s / 1000.0,
            "slo_tpot_s": slo.tpot_s,
        }
    router = make_router(scenario.router, seed=seed, **opts)
    overrides = dict(scenario.kvpilot_scaling)
    # kvpilot's daily profile has the compressed day as its period, once there is a warm-up day
    # to learn it from; measured alone, the day is a first day: the trend alone (a profile
    # completed in the day's last hours from the pre-roll's flat demand would say nothing).
    day_s = scenario.duration_s if scenario.warmup_days else 0.0
    autoscaler = make_policy(policy, setting, scenario.limits, overrides, day_s)
    cluster = Cluster(scenario.provisioning, seed)
    initial = max(
        scenario.limits.min_replicas,
        math.ceil(demand_curve(scenario.duration_s, seed, scenario.shape)(0.0)),
    )
    sim = AutoscaleSimulation(
        scenario.spec,
        router,
        replace(scenario.sim, seed=seed),
        autoscaler,
        cluster,
        initial_replicas=initial,
        count_from_s=pre,
        count_until_s=pre + scenario.duration_s,
        log_decisions=log_decisions,
        on_progress=on_progress,
    )
    records = sim.run(trace)
    m = summarise(sim, records, slo, warmup_s=pre)
    good = round(m.goodput_ratio * m.requests)
    end = pre + scenario.duration_s
    spec_series = [x[1] for x in sim.timeline if pre <= x[0] < end]
    row: dict[str, Any] = {
        "policy": policy,
        "setting": setting,
        "setting_label": setting_label(policy, setting, overrides),
        "seed": seed,
        "duration_s": scenario.duration_s,
        "warmup_days": scenario.warmup_days,
        "workload": scenario.workload,
        "gpu": scenario.gpu,
        "requests": m.requests,
        "failed": m.failed,
        "slo_attainment": m.goodput_ratio,
        "goodput_rps": good / scenario.duration_s,
        "gpu_hours": cluster.gpu_hours(end, since=pre),
        "scale_actions": sim.scale_actions,
        "nodes_created": sum(1 for n in cluster.nodes if n.created_s >= pre),
        "replicas_mean": mean(spec_series) if spec_series else float(initial),
        "replicas_max": max(spec_series, default=initial),
        "ttft_p50_s": m.ttft_p50_s,
        "ttft_p99_s": m.ttft_p99_s,
        "tpot_p99_s": m.tpot_p99_s,
        "preemptions": m.preemptions - (sim.preemptions_before or 0),  # the day's only
    }
    if log_decisions:
        row["_timeline"] = sim.timeline
        row["_log"] = sim.log
    return row


def sweep_jobs(
    policies: Sequence[str], seeds: Sequence[int], sweep: dict[str, Sequence[float]] | None = None
) -> list[tuple[str, float, int]]:
    sweep = sweep or DEFAULT_SWEEP
    return [(p, s, seed) for p in policies for s in sweep[p] for seed in seeds]


def _job(args: tuple[Scenario, str, float, int, float]) -> dict[str, Any]:
    scenario, policy, setting, seed, rps = args
    return run_one(scenario, policy, setting, seed, replica_rps=rps)


# CPU seconds one run takes per virtual second of day, measured on an x86_64 core at ~10
# replicas (a 3600 s day: 45-70 s); the slowest runs (deep queues, 20 replicas) take ~1.5x.
RUN_CPU_PER_VIRTUAL_S = 0.017


def estimate_wall_s(jobs: int, workers: int, duration_s: float, warmup_days: int = 0) -> float:
    """Rough wall time of a sweep: rounds of `workers` parallel runs, the last round's slowest."""
    per_run = RUN_CPU_PER_VIRTUAL_S * duration_s * (1 + warmup_days)
    return math.ceil(jobs / max(1, workers)) * per_run * 1.2


def run_sweep(
    scenario: Scenario,
    jobs: Sequence[tuple[str, float, int]],
    *,
    workers: int = 1,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    rps = scenario.replica_rps()  # calibrate once, before any fork
    args = [(scenario, p, s, seed, rps) for p, s, seed in jobs]
    # Slowest first (kvpilot, then the queue-based runs that build deep queues), so the last
    # round is not one long run alone.
    slow = {"kvpilot": 0, "hpa-queue": 1, "kpa": 2}
    return run_parallel(
        _job, args, workers=workers, on_done=on_done, start_order=lambda a: slow.get(a[1], 3)
    )


MEAN_KEYS = (
    "requests",
    "failed",
    "slo_attainment",
    "goodput_rps",
    "gpu_hours",
    "scale_actions",
    "nodes_created",
    "replicas_mean",
    "replicas_max",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p99_s",
    "preemptions",
)


def mean_over_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["setting"]), []).append(r)
    out = []
    for (policy, setting), rs in groups.items():
        row: dict[str, Any] = {
            "policy": policy,
            "setting": setting,
            "setting_label": rs[0]["setting_label"],
            "seeds": sorted(r["seed"] for r in rs),
        }
        for k in MEAN_KEYS:
            vals = [float(r[k]) for r in rs if r.get(k) is not None and not math.isnan(r[k])]
            row[k] = mean(vals) if vals else math.nan
        out.append(row)
    order = {p: i for i, p in enumerate(POLICY_NAMES)}
    out.sort(key=lambda r: (order.get(r["policy"], 99), r["setting"]))
    return out


def verdict(summary: Sequence[dict[str, Any]], slo: float = 0.99) -> dict[str, Any]:
    """The issue's target: kvpilot >= 99 % SLO attainment with <= 0.8x the GPU-hours of the
    cheapest baseline setting that also reaches 99 %, and no more scale actions than it."""
    base = [r for r in summary if r["policy"] != "kvpilot" and r["slo_attainment"] >= slo]
    kv = next((r for r in summary if r["policy"] == "kvpilot"), None)
    cheapest = min(base, key=lambda r: r["gpu_hours"]) if base else None
    out: dict[str, Any] = {"slo_target": slo, "cheapest_baseline": None, "kvpilot": None}
    if cheapest:
        out["cheapest_baseline"] = {
            k: cheapest[k]
            for k in ("policy", "setting_label", "slo_attainment", "gpu_hours", "scale_actions")
        }
    if kv:
        out["kvpilot"] = {k: kv[k] for k in ("slo_attainment", "gpu_hours", "scale_actions")}
    if kv and cheapest:
        ratio = kv["gpu_hours"] / cheapest["gpu_hours"]
        out["gpu_hours_ratio"] = ratio
        out["met"] = bool(
            kv["slo_attainment"] >= slo
            and ratio <= 0.8
            and kv["scale_actions"] <= cheapest["scale_actions"]
        )
    elif kv is None or all(r["policy"] == "kvpilot" for r in summary):
        out["met"] = None  # nothing to compare with
    else:  # baselines ran and none reached the SLO
        out["met"] = bool(kv["slo_attainment"] >= slo)
    return out


# ---- output -----------------------------------------------------------------------------------


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    cols = (
        ("policy", "policy"),
        ("setting_label", "setting"),
        ("slo_attainment", "SLO attainment"),
        ("gpu_hours", "GPU-hours"),
        ("scale_actions", "scale actions"),
        ("nodes_created", "nodes created"),
        ("replicas_mean", "mean replicas"),
        ("ttft_p99_s", "TTFT p99 s"),
        ("tpot_p99_s", "TPOT p99 s"),
        ("goodput_rps", "goodput req/s"),
    )
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            if k == "slo_attainment":
                cells.append(f"{100 * v:.2f} %")
            elif isinstance(v, float):
                cells.append("-" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer GPU-hours and higher attainment."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(path: str, summary: Sequence[dict[str, Any]], title: str) -> None:
    """SLO attainment against GPU-hours, a line through each policy's frontier; the right panel
    zooms in on 95-100 %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax in axes:
        for policy in POLICY_NAMES:
            rs = [r for r in summary if r["policy"] == policy]
            if not rs:
                continue
            pts = [(r["gpu_hours"], 100 * r["slo_attainment"]) for r in rs]
            marker = "*" if policy == "kvpilot" else "o"
            size = 14 if policy == "kvpilot" else 5
            front = pareto(pts)
            (line,) = ax.plot(*zip(*front, strict=True), marker=marker, ms=size, label=policy)
            ax.plot(
                *zip(*pts, strict=True), ls="none", marker=marker, ms=size, color=line.get_color()
            )
            for r in rs:
                if policy not in ("kvpilot", "llmd"):
                    ax.annotate(
                        f"{r['setting']:g}",
                        (r["gpu_hours"], 100 * r["slo_attainment"]),
                        fontsize=6,
                        xytext=(3, 2),
                        textcoords="offset points",
                    )
        ax.axhline(99, color="grey", ls=":", lw=1)
        ax.set_xlabel("GPU-hours")
        ax.set_ylabel("SLO attainment (%)")
        ax.grid(True, alpha=0.3)
    axes[1].set_ylim(95, 100.2)
    axes[1].set_title("zoom: 95-100 %", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(
    path: str, meta: dict[str, Any], rows: Sequence[dict], summary: Sequence[dict]
) -> None:
    import json

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    doc = {
        "meta": meta,
        "rows": [{k: clean(v) for k, v in r.items()} for r in rows],
        "summary": [{k: clean(v) for k, v in r.items()} for r in summary],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


# ---- command line -----------------------------------------------------------------------------


def _sweep(s: str) -> tuple[str, tuple[float, ...]]:
    name, _, vals = s.partition("=")
    if name not in DEFAULT_SWEEP or not vals:
        raise argparse.ArgumentTypeError(f"{s!r}: expected POLICY=V1,V2,... e.g. kpa=10,20")
    try:
        return name, tuple(float(v) for v in vals.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: settings must be numbers") from None


def _setting(s: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{s!r}: expected KEY=VALUE, e.g. target_utilization=0.7")
    try:
        return key, yaml.safe_load(value)  # a number, true/false or a string, as in kvpilot.yaml
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{s!r}: the value is not a YAML scalar") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvpilot sim autoscale",
        description="Compare replica autoscaling policies over a compressed, bursty day.",
    )
    p.add_argument("--duration", type=float, default=3600.0, help="virtual seconds for 24 h")
    p.add_argument(
        "--warmup-days",
        type=int,
        default=Scenario.warmup_days,
        help="whole days run before the measured one, so each policy starts it from its "
        "previous day's end state (default 2; 0: the day alone, after a pre-roll at midnight's "
        "demand)",
    )
    p.add_argument("--seeds", type=ints, default=[1])
    p.add_argument("--policies", type=names_from(POLICY_NAMES), default=list(POLICY_NAMES))
    p.add_argument(
        "--sweep",
        type=_sweep,
        action="append",
        default=[],
        help="override a baseline's swept targets, e.g. --sweep hpa-queue=1,2,4",
    )
    p.add_argument(
        "--kvpilot",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run kvpilot with one of its scaling settings (controller.pools.<pool>) changed",
    )
    p.add_argument("--workload", default="sharegpt", choices=sorted(SIZERS))
    p.add_argument("--gpu", default="l4")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--router", default="headroom", help="the gateway's routing policy")
    p.add_argument("--low", type=float, default=2.0, help="replicas' worth of demand at night")
    p.add_argument("--high", type=float, default=10.0, help="... and at the afternoon peak")
    p.add_argument("--max-replicas", type=int, default=20)
    p.add_argument("--node-unneeded", type=float, default=600.0, help="s before an empty node goes")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (default: CPUs)"
    )
    p.add_argument("--json", dest="json_path")
    p.add_argument("--plot", dest="plot_path")
    p.add_argument("--markdown", dest="markdown_path")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(stderr=True)
    scenario = Scenario(
        duration_s=args.duration,
        workload=args.workload,
        gpu=args.gpu,
        model=args.model,
        router=args.router,
        shape=DayShape(low_replicas=args.low, high_replicas=args.high),
        provisioning=ProvisioningConfig(unneeded_s=args.node_unneeded),
        limits=Limits(1, args.max_replicas),
        warmup_days=args.warmup_days,
        kvpilot_scaling=tuple(args.kvpilot),
    )
    try:  # a bad key or value stops here, before any run, with the key named
        make_policy("kvpilot", 0, scenario.limits, dict(args.kvpilot))
    except ConfigError as e:
        print(f"kvpilot sim autoscale: {e}", file=sys.stderr)
        return 2
    sweep = dict(DEFAULT_SWEEP)
    sweep.update(dict(args.sweep))
    jobs = sweep_jobs(args.policies, args.seeds, sweep)
    try:
        scenario.replica_rps()
    except (KeyError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(
        f"{len(jobs)} runs on {args.workers} worker(s); estimate "
        f"{estimate_wall_s(len(jobs), args.workers, args.duration, args.warmup_days) / 60:.1f} min"
    )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("autoscale runs", total=len(jobs))

        def done(row: dict[str, Any]) -> None:
            progress.update(
                task,
                advance=1,
                description=f"{row['policy']} {row['setting_label']} seed {row['seed']}",
            )

        rows = run_sweep(scenario, jobs, workers=args.workers, on_done=done)
    summary = mean_over_seeds(rows)
    v = verdict(summary)
    table = markdown_table(summary)
    print(table)
    print()
    if v.get("cheapest_baseline"):
        c = v["cheapest_baseline"]
        print(
            f"cheapest baseline at >= 99 %: {c['policy']} {c['setting_label']}: "
            f"{c['gpu_hours']:.2f} GPU-h, {c['scale_actions']:.0f} scale actions"
        )
    elif any(r["policy"] != "kvpilot" for r in summary):
        print("no baseline setting reached 99 % SLO attainment")
    else:
        print("no baseline ran: nothing to compare kvpilot with")
    if v.get("kvpilot"):
        k = v["kvpilot"]
        ratio = f", {v['gpu_hours_ratio']:.2f}x its GPU-hours" if "gpu_hours_ratio" in v else ""
        print(
            f"kvpilot: {100 * k['slo_attainment']:.2f} % SLO, {k['gpu_hours']:.2f} GPU-h, "
            f"{k['scale_actions']:.0f} scale actions{ratio}; target met: {v['met']}"
            + ("" if not args.kvpilot else " (NOT at its defaults: the target is at defaults)")
        )
    meta = {
        "duration_s": args.duration,
        "warmup_days": args.warmup_days,
        "seeds": args.seeds,
        "workload": args.workload,
        "gpu": args.gpu,
        "model": args.model,
        "router": args.router,
        "demand_replicas": [args.low, args.high],
        "max_replicas": args.max_replicas,
        "slo": slo_for(args.workload).describe(),
        "provisioning": scenario.provisioning.__dict__,
        "kvpilot_scaling": dict(args.kvpilot),  # empty: kvpilot at its defaults
        "verdict": v,
    }
    if args.json_path:
        write_json(args.json_path, meta, rows, summary)
    if args.markdown_path:
        with open(args.markdown_path, "w") as f:
            f.write(table + "\n")
    if args.plot_path:
        title = (
            f"{args.workload} on {args.gpu}, 24 h in {args.duration:.0f} s, "
            f"seeds {','.join(map(str, args.seeds))}"
        )
        plot(args.plot_path, summary, title)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
