"""Autoscaling benchmark: every policy over a compressed, bursty day; the issue's target checked.

Runs `kvpilot sim autoscale` with the documented settings (24 h in 3600 virtual seconds after
two warm-up days, L4 + Llama-3.1-8B, ShareGPT-like requests, demand of 2-10 replicas plus bursts;
each baseline swept over its main target, kvpilot at its defaults), and writes JSON, a plot and a
markdown table to out/ (git-ignored). Prints the machine it ran on for docs/benchmarks.md.

    .venv/bin/python bench/autoscale.py [--seeds 1,2,3] [--duration 3600] [--workers 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.autoscale import main as autoscale_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--duration", default="3600")
    ap.add_argument("--workers", default=str(os.cpu_count() or 1))
    ap.add_argument("--out", default="out")
    args, rest = ap.parse_known_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    rc = autoscale_main(
        [
            "--duration", args.duration,
            "--seeds", args.seeds,
            "--workers", args.workers,
            "--json", str(out / "autoscale.json"),
            "--plot", str(out / "autoscale.png"),
            "--markdown", str(out / "autoscale.md"),
            *rest,
        ]
    )  # fmt: skip
    wall = time.perf_counter() - t0
    print(
        f"\nwall {wall:.0f} s on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, workers {args.workers}"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
