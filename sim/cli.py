"""`kvpilot sim routing ...`: compare routing policies on a simulated fleet.

    kvpilot sim routing --workload sharegpt --fleet 6xl4+2xh100 --policies headroom,gie,round-robin \
        --load 0.5,0.8,0.95 --find-capacity --seeds 1,2,3 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from gateway.picker import POLICY_NAMES as POLICIES
from sim.args import floats, ints, names_from
from sim.traces import WORKLOADS


def routing_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvpilot sim routing", description="Compare routing policies on a simulated fleet."
    )
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--trace", help="CSV in the Azure LLM inference trace format (workload azure)")
    p.add_argument(
        "--fleet", default="8xl4", help="e.g. 8xl4, 6xl4+2xh100, 2xh100*2, or a YAML fleet file"
    )
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--policies", type=names_from(POLICIES), default=list(POLICIES))
    p.add_argument(
        "--load",
        type=floats,
        default=None,
        help="loads to run (1.0 = fleet saturation); default 0.5,0.8,0.95",
    )
    p.add_argument(
        "--find-capacity", action="store_true", help="bisect each policy's capacity at SLO"
    )
    p.add_argument("--seeds", type=ints, default=[1])
    p.add_argument(
        "--duration", type=float, default=300.0, help="virtual seconds of arrivals per run"
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="requests arriving earlier are not measured"
    )
    p.add_argument(
        "--slo", help="YAML with per-workload targets (ttft_s, ttft_per_1k_s, tpot_s, min_ratio)"
    )
    p.add_argument("--scrape-interval", type=float, default=0.25)
    p.add_argument("--signal-delay", type=float, default=0.05)
    p.add_argument("--net-latency", type=float, default=0.0005)
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (0 = all cores)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--plot")
    p.add_argument("--markdown", help="also write the tables to this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-early-stop",
        action="store_true",
        help="run every capacity probe to the end (the outcome is the same, only slower)",
    )
    return p


def _progress(disabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=disabled,
        transient=False,
        console=None,
    )


def run_routing(argv: list[str]) -> int:
    args = routing_parser().parse_args(argv)
    from sim.fleets import parse_fleet
    from sim.report import capacity_table, markdown_table, plot, write_json
    from sim.routing import (
        Scenario,
        find_capacity,
        mean_over_seeds,
        run_jobs,
        seed_stop_bound,
    )
    from sim.simulator import SimConfig
    from sim.slo import load_slos, slo_for

    if args.workload == "azure" and not args.trace:
        print("kvpilot sim routing: --workload azure needs --trace FILE.csv", file=sys.stderr)
        return 2
    try:
        fleet = parse_fleet(args.fleet, args.model)
        slo = slo_for(args.workload, load_slos(args.slo) if args.slo else None)
    except (ValueError, OSError) as e:
        print(f"kvpilot sim routing: {e}", file=sys.stderr)
        return 2
    loads = args.load if args.load is not None else ([] if args.find_capacity else [0.5, 0.8, 0.95])
    workers = args.jobs if args.jobs > 0 else (os.cpu_count() or 1)
    config = SimConfig(
        scrape_interval_s=args.scrape_interval,
        signal_delay_s=args.signal_delay,
        net_latency_s=args.net_latency,
    )
    sc = Scenario(args.workload, fleet, slo, args.duration, args.warmup, args.trace, config)
    started = time.time()
    sat = sc.saturation_rps()
    print(
        f"workload {args.workload} on fleet {fleet.name} ({len(fleet.replicas)} replicas, {args.model})"
    )
    print(f"SLO: {slo.describe()}")
    print(f"load 1.0 = {sat:.3f} req/s (closed-loop saturation of the fleet)")

    rows: list[dict[str, Any]] = []
    cap_rows: list[dict[str, Any]] = []
    with _progress(
        args.no_progress or not sys.stderr.isatty() and "KVPILOT_PROGRESS" not in os.environ
    ) as prog:
        if loads:
            jobs = [(sc, p, ld, s) for ld in loads for p in args.policies for s in args.seeds]
            task = prog.add_task("routing runs", total=len(jobs))
            raw = run_jobs(jobs, workers=workers, on_done=lambda _: prog.advance(task))
            rows = mean_over_seeds(raw)
        if args.find_capacity:
            task = prog.add_task("capacity search", total=None)
            seen: dict[tuple[str, float], dict[str, Any]] = {}
            # a probe run stops once it is certain to fail the mean over the seeds
            bound = None if args.no_early_stop else seed_stop_bound(slo.min_ratio, len(args.seeds))

            def goodput(probes: list[tuple[str, float]]) -> dict[tuple[str, float], float]:
                todo = [(p, ld) for p, ld in probes if (p, ld) not in seen]
                jobs = [(sc, p, ld, s, bound) for p, ld in todo for s in args.seeds]
                prog.update(task, total=(prog.tasks[task].total or 0) + len(jobs))
                for r in mean_over_seeds(
                    run_jobs(jobs, workers=workers, on_done=lambda _: prog.advance(task))
                ):
                    seen[(r["policy"], r["load"])] = r
                return {k: seen[k]["goodput_ratio"] for k in probes}

            caps = find_capacity(args.policies, goodput, threshold=slo.min_ratio)
            for p in args.policies:
                cap_rows.append(
                    {
                        "kind": "capacity",
                        "workload": args.workload,
                        "fleet": fleet.name,
                        "policy": p,
                        "capacity_load": caps[p],
                        "capacity_rps": caps[p] * sat,
                        "seeds": list(args.seeds),
                    }
                )
    out = []
    if rows:
        out.append(markdown_table(rows))
    if cap_rows:
        out.append(capacity_table(cap_rows))
    text = "\n\n".join(out)
    print(text)
    elapsed = time.time() - started
    print(f"({elapsed:.0f} s, seeds {','.join(map(str, args.seeds))}, {workers} worker(s))")
    meta = {
        "workload": args.workload,
        "fleet": fleet.name,
        "model": args.model,
        "replicas": [r.kind for r in fleet.replicas],
        "saturation_rps": sat,
        "slo": {**slo.__dict__, "describe": slo.describe()},
        "duration_s": args.duration,
        "warmup_s": sc.warmup,
        "seeds": list(args.seeds),
        "scrape_interval_s": config.scrape_interval_s,
        "signal_delay_s": config.signal_delay_s,
        "net_latency_s": config.net_latency_s,
        "elapsed_s": elapsed,
    }
    if args.json_out:
        write_json(args.json_out, meta, rows + cap_rows)
    if args.plot and rows:
        plot(args.plot, rows, f"{args.workload} on {fleet.name} — SLO: {slo.describe()}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"SLO: {slo.describe()}; load 1.0 = {sat:.3f} req/s\n\n{text}\n")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: kvpilot sim routing|autoscale [ARGS...]\n\n"
            "  routing     compare routing policies on a simulated fleet\n"
            "  autoscale   compare autoscaling policies on a simulated day"
        )
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "routing":
        return run_routing(rest)
    if cmd == "autoscale":
        from sim.autoscale import main as run_autoscale

        return run_autoscale(rest)
    print(
        f"kvpilot sim: unknown subcommand {cmd!r}; expected routing or autoscale", file=sys.stderr
    )
    return 2
