"""The routing comparison: policies x loads x seeds on one workload and fleet, and capacity at SLO.

Each run is independent (its own trace, engines, gateway), so runs fan out over processes; load
calibration happens once in the parent first so every worker reads the same load 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from statistics import mean
from typing import Any

from sim.calibrate import fleet_saturation_rate
from sim.fleets import FleetSpec
from sim.metrics import summarise
from sim.parallel import run_parallel
from sim.simulator import EarlyStop, SimConfig, Simulation
from sim.slo import Slo
from sim.traces import make_trace


@dataclass(frozen=True)
class Scenario:
    workload: str
    fleet: FleetSpec
    slo: Slo
    duration_s: float = 300.0
    warmup_s: float | None = None  # default: 10 % of the run, at most 60 s
    trace_file: str | None = None
    config: SimConfig = field(default_factory=SimConfig)
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, 0.1 * self.duration_s)

    def saturation_rps(self) -> float:
        return fleet_saturation_rate(
            self.fleet,
            self.workload,
            trace_file=self.trace_file,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
        )


def run_one(
    scenario: Scenario,
    policy: str,
    load: float,
    seed: int,
    stop_below: float | None = None,
) -> dict[str, Any]:
    """One simulation; a flat row of its metrics.

    With `stop_below`, a capacity probe: the run stops as soon as its goodput is certain to be
    under that bound (`stopped_early` in the row; its `goodput_ratio` is then the upper bound
    reached, and the other metrics cover the part that ran)."""
    from gateway.picker import make_policy

    rate = load * scenario.saturation_rps()
    trace = make_trace(
        scenario.workload, rate, scenario.duration_s, seed, trace_file=scenario.trace_file
    )
    pol = make_policy(policy, seed=seed, **policy_options(scenario, policy))
    sim = Simulation(scenario.fleet.replicas, pol, replace(scenario.config, seed=seed))
    stop = None
    if stop_below is not None:
        stop = EarlyStop(scenario.slo, stop_below, scenario.warmup)
    records = sim.run(trace, stop=stop)
    m = summarise(sim, records, scenario.slo, scenario.warmup)
    row = {
        "kind": "load",
        "workload": scenario.workload,
        "fleet": scenario.fleet.name,
        "policy": policy,
        "load": round(load, 4),
        "seed": seed,
        "rate_rps": rate,
        **m.as_dict(),
        "stopped_early": sim.stopped_early,
    }
    if sim.stopped_early:
        n = sim._measured
        row["goodput_ratio"] = (n - len(sim._missed)) / n
        row["sim_end_s"] = sim.now
    return row


def seed_stop_bound(threshold: float, seeds: int) -> float:
    """The per-seed goodput under which a probe fails whatever the other seeds give.

    Capacity compares the mean goodput over `seeds` runs with `threshold`: one run under
    threshold x seeds - (seeds - 1) fails the mean even if every other run is perfect, so stopping
    it there changes no outcome."""
    return threshold * seeds - (seeds - 1)


def policy_options(scenario: Scenario, policy: str) -> dict[str, Any]:
    """Settings a deployment would give the policy: headroom is told the SLO it routes for
    (the baselines have no such setting and keep their published defaults)."""
    opts: dict[str, Any] = {}
    if policy == "headroom":
        slo = scenario.slo
        opts = {
            # the gateway's default (gateway.queue_when_saturated): hold rather than fail open
            "queue_when_saturated": True,
            "slo_ttft_s": slo.ttft_s,
            "slo_ttft_per_token_s": slo.ttft_per_1k_s / 1000.0,
            "slo_tpot_s": slo.tpot_s,
        }
    opts.update(scenario.policy_options.get(policy, {}))
    return opts


Job = tuple  # (scenario, policy, load, seed[, stop_below])


def _run_job(job: Job) -> dict[str, Any]:
    return run_one(*job)


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int = 1,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (scenario, policy, load, seed); rows in the order of `jobs`."""
    for sc in {id(j[0]): j[0] for j in jobs}.values():
        sc.saturation_rps()  # calibrate once, before any fork
    return run_parallel(_run_job, jobs, workers=workers, on_done=on_done)


AVERAGED_KEYS = (
    "rate_rps",
    "requests",
    "completed",
    "failed",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "e2e_p99_s",
    "queue_p99_s",
    "throughput_tok_s",
    "goodput_ratio",
    "preemptions",
    "kv_usage_mean",
    "kv_usage_max",
    "prefix_hit_ratio",
)


def mean_over_seeds(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, fleet, policy, load): the mean of each metric over its seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["fleet"], r["policy"], r["load"]), []).append(r)
    out = []
    for (workload, fleet, policy, load), rs in groups.items():
        row: dict[str, Any] = {
            "kind": "load",
            "workload": workload,
            "fleet": fleet,
            "policy": policy,
            "load": load,
            "seeds": sorted(r["seed"] for r in rs),
        }
        for k in AVERAGED_KEYS:
            vals = [float(r[k]) for r in rs if r.get(k) is not None and not math.isnan(float(r[k]))]
            row[k] = mean(vals) if vals else math.nan
        row["slo_miss_ratio"] = 1.0 - row["goodput_ratio"]
        row["stopped_early"] = sum(1 for r in rs if r.get("stopped_early"))
        out.append(row)
    return out


@dataclass
class _Search:
    lo: float = 0.0  # highest load known to meet the SLO
    hi: float | None = None  # lowest load known to miss it
    done: bool = False


def find_capacity(
    policies: Sequence[str],
    goodput: Callable[[list[tuple[str, float]]], dict[tuple[str, float], float]],
    *,
    threshold: float = 0.9,
    start: float = 0.5,
    max_load: float = 4.0,
    tolerance: float = 0.03,
    on_round: Callable[[int], None] | None = None,
    brackets: dict[str, tuple[float, float | None]] | None = None,
) -> dict[str, float]:
    """Highest load meeting `threshold` per policy: grow by doubling until a miss, then bisect.

    All policies advance in lock step, so each round's probes (`goodput` gets them as one batch)
    can run in parallel. Returns the highest load seen to meet the threshold (0.0 if none).
    `brackets`, when given, is kept up to date with each policy's (lo, hi) after every round, so
    a caller that stops the search (a wall-clock guard) still knows where each stood.
    """
    state = {p: _Search() for p in policies}
    rounds = 0
    while True:
        probes: list[tuple[str, float]] = []
        for p, s in state.items():
            if s.done:
                continue
            if s.hi is None:
                probe = start if s.lo == 0 else s.lo * 2
                if probe > max_load:
                    s.done = True
                    continue
            elif s.hi - s.lo <= tolerance * max(s.hi, 0.3):
                s.done = True
                continue
            else:
                probe = (s.lo + s.hi) / 2
            probes.append((p, round(probe, 4)))
        if not probes:
            return {p: s.lo for p, s in state.items()}
        rounds += 1
        if on_round:
            on_round(rounds)
        results = goodput(probes)
        for p, load in probes:
            s = state[p]
            if results[(p, load)] >= threshold:
                s.lo = load
            else:
                s.hi = load
            if brackets is not None:
                brackets[p] = (s.lo, s.hi)
