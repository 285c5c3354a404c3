"""Where an autoscaling policy's GPU-hours go: one simulated day, hour by hour.

    .venv/bin/python bench/autoscale_timeline.py [--policy kvpilot] [--setting 0] [--seed 1]

Runs one day of `kvpilot sim autoscale` (sim/autoscale.py, default scenario) and prints, at each
day-hour, the demand in replicas' worth against the replicas asked for, those serving, the GPU
nodes that exist (the bill) and the placeholder pods, then the run's SLO attainment and GPU-hours.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.autoscale import Scenario, demand_curve, run_one  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--policy", default="kvpilot")
    ap.add_argument("--setting", type=float, default=0.0, help="the policy's swept target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup-days", type=int, default=Scenario.warmup_days)
    args = ap.parse_args()
    sc = Scenario(warmup_days=args.warmup_days)
    row = run_one(sc, args.policy, args.setting, args.seed, log_decisions=True)
    timeline = row["_timeline"]  # (t, replicas asked for, serving, nodes, placeholders)
    times = [x[0] for x in timeline]
    demand = demand_curve(sc.duration_s, args.seed, sc.shape)
    print(f"{row['setting_label']}, seed {args.seed}: SLO {100 * row['slo_attainment']:.2f} %, "
          f"{row['gpu_hours']:.2f} GPU-h, {row['scale_actions']} scale actions\n")  # fmt: skip
    print("| hour | demand (replicas' worth) | asked for | serving | nodes | placeholders |")
    print("|---|---:|---:|---:|---:|---:|")
    for hour in range(24):
        t = sc.day_start_s + hour * sc.duration_s / 24
        _, spec, ready, nodes, ph = timeline[max(0, bisect.bisect_right(times, t) - 1)]
        d = demand(t - sc.day_start_s)
        print(f"| {hour:02d}:00 | {d:.2f} | {spec} | {ready} | {nodes} | {ph} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
