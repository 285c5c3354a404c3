"""Simulator speed: one hour of 10 req/s (ShareGPT-like) on 16 L4 replicas, on one core.

Target: under 60 s of wall time. Prints the wall time, simulated requests and engine steps.

    .venv/bin/python bench/sim_speed.py [--duration 3600] [--rate 10] [--fleet 16xl4] [--policy headroom]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.picker import make_policy  # noqa: E402
from sim.fleets import parse_fleet  # noqa: E402
from sim.metrics import summarise  # noqa: E402
from sim.simulator import SimConfig, Simulation  # noqa: E402
from sim.slo import slo_for  # noqa: E402
from sim.traces import make_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--fleet", default="16xl4")
    ap.add_argument("--workload", default="sharegpt")
    ap.add_argument("--policy", default="headroom")
    ap.add_argument("--target-s", type=float, default=60.0)
    args = ap.parse_args()
    fleet = parse_fleet(args.fleet)
    t0 = time.perf_counter()
    trace = make_trace(args.workload, args.rate, args.duration, 1)
    sim = Simulation(fleet.replicas, make_policy(args.policy, seed=1), SimConfig(seed=1))
    records = sim.run(trace)
    wall = time.perf_counter() - t0
    m = summarise(sim, records, slo_for(args.workload))
    steps = sum(r.steps for r in sim.all_replicas())
    print(
        f"{args.duration:.0f} s of {args.rate:g} req/s {args.workload} on {args.fleet} ({args.policy}): "
        f"{len(trace)} requests, {steps} engine steps, simulated in {wall:.1f} s wall "
        f"({args.duration / wall:.0f}x real time; target < {args.target_s:.0f} s) "
        f"[goodput {m.goodput_ratio:.3f}, {m.throughput_tok_s:.0f} tok/s]"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    return 0 if wall < args.target_s else 1


if __name__ == "__main__":
    raise SystemExit(main())
