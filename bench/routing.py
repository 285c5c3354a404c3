"""The whole issue-5 routing comparison in one command: capacity at SLO and the targeted runs.

    .venv/bin/python bench/routing.py OUTDIR [--jobs 16] [--seeds 1,2,3] [--quick] [--budget-s 480]

Runs, over one shared pool of worker processes:
- capacity at SLO (bisected, lock step over policies; probes stop as soon as they are certain to
  fail, see sim.routing.seed_stop_bound) for every workload x fleet x the 7 policies;
- mixed-bursty on 8xl4 at load 0.8 and ShareGPT on 6xl4+2xh100 at load 0.6, every policy;
and writes OUTDIR/routing.json, OUTDIR/routing.md (each issue-5 target met or missed) and PNG
plots. It prints a time estimate first. `--budget-s` is a wall-clock guard: once spent, capacity
searches stop bisecting and report the bracket they reached (marked `unfinished`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.picker import POLICY_NAMES  # noqa: E402
from sim.calibrate import fleet_saturation_rate, replica_saturation_rate, store_rate  # noqa: E402
from sim.fleets import FleetSpec, parse_fleet  # noqa: E402
from sim.routing import (  # noqa: E402
    Scenario,
    find_capacity,
    mean_over_seeds,
    run_one,
    seed_stop_bound,
)
from sim.slo import slo_for  # noqa: E402

WORKLOADS = ("sharegpt", "prefill-heavy", "decode-heavy", "shared-prefix", "mixed-bursty")
FLEETS = ("8xl4", "6xl4+2xh100")
POLICIES = (
    "headroom",
    "gie",
    "round-robin",
    "least-request",
    "power-of-two",
    "cache-aware",
    "random",
)

# Virtual seconds of arrivals per capacity probe, per (workload, fleet): long enough for several
# turnovers of each replica's batch (decode-heavy requests live ~1 min on an L4) and, for
# mixed-bursty, several bursts; the mixed fleet runs ~6x the requests per second (its H100s), so
# its probes are shorter to fit the 9-minute budget.
CAPACITY_S = {
    ("sharegpt", "8xl4"): 90.0,
    ("sharegpt", "6xl4+2xh100"): 45.0,
    ("prefill-heavy", "8xl4"): 90.0,
    ("prefill-heavy", "6xl4+2xh100"): 60.0,
    ("decode-heavy", "8xl4"): 300.0,
    ("decode-heavy", "6xl4+2xh100"): 90.0,
    ("shared-prefix", "8xl4"): 120.0,
    ("shared-prefix", "6xl4+2xh100"): 60.0,
    ("mixed-bursty", "8xl4"): 240.0,
    ("mixed-bursty", "6xl4+2xh100"): 120.0,
}
TARGETED = (  # (name, workload, fleet, load, duration)
    ("mixed-bursty-8xl4-0.8", "mixed-bursty", "8xl4", 0.8, 300.0),
    ("sharegpt-6xl4+2xh100-0.6", "sharegpt", "6xl4+2xh100", 0.6, 120.0),
)
# Wall seconds per virtual second of one run at load 0.9, measured on the development box (2
# shared cores, x86_64, Python 3.11; headroom, early stop on): only for the printed estimate.
COST_PER_S = {
    ("sharegpt", "8xl4"): 0.013,
    ("sharegpt", "6xl4+2xh100"): 0.087,
    ("prefill-heavy", "8xl4"): 0.010,
    ("prefill-heavy", "6xl4+2xh100"): 0.024,
    ("decode-heavy", "8xl4"): 0.009,
    ("decode-heavy", "6xl4+2xh100"): 0.081,
    ("shared-prefix", "8xl4"): 0.005,
    ("shared-prefix", "6xl4+2xh100"): 0.041,
    ("mixed-bursty", "8xl4"): 0.013,
    ("mixed-bursty", "6xl4+2xh100"): 0.08,
}
ROUNDS = 8  # bisection rounds per capacity search (0.5, 1, 2, then halving to 3 %)


@dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    capacity: tuple[tuple[str, str, float], ...]  # (workload, fleet, probe duration)
    targeted: tuple[tuple[str, str, str, float, float], ...]
    policies: tuple[str, ...]


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(
            seeds=(1,),
            capacity=(("sharegpt", "4xl4", 30.0),),
            targeted=(
                ("mixed-bursty-8xl4-0.8", "mixed-bursty", "8xl4", 0.8, 60.0),
                ("sharegpt-6xl4+2xh100-0.6", "sharegpt", "6xl4+2xh100", 0.6, 20.0),
            ),
            policies=("headroom", "gie", "round-robin"),
        )
    k = args.duration_scale
    return Plan(
        tuple(args.seeds),
        tuple(
            (w, f, CAPACITY_S[(w, f)] * k)
            for w in args.workloads
            for f in args.fleets
            if (w, f) in CAPACITY_S
        ),
        TARGETED if args.targeted else (),
        tuple(args.policies),
    )


def _est_run(workload: str, fleet: str, load: float, duration: float) -> float:
    """Rough wall seconds of one run (for the estimate printed before starting)."""
    per_s = COST_PER_S.get((workload, fleet), 0.01 * len(parse_fleet(fleet).replicas) / 8)
    return per_s * duration * max(0.3, min(load, 1.2)) / 0.9


def _calibrate(job: tuple[Any, str]) -> tuple[Any, str, float]:
    spec, workload = job
    return spec, workload, replica_saturation_rate(spec, workload, warmup=100)


def calibrate_all(plan: Plan, pool: ProcessPoolExecutor) -> None:
    """Load 1.0 for every replica kind x workload, in parallel, into the cache."""
    need: dict[tuple[str, str], Any] = {}
    pairs = {(w, f) for w, f, _ in plan.capacity} | {(t[1], t[2]) for t in plan.targeted}
    for w, f in pairs:
        for spec in parse_fleet(f).replicas:
            need.setdefault((spec.kind, w), spec)
    todo = []
    for (_, w), spec in need.items():
        try:
            fleet_saturation_rate(FleetSpec("one", (spec,)), w, use_cache=True, dry=True)
        except LookupError:
            todo.append((spec, w))
    for spec, w, rate in pool.map(_calibrate, todo):
        store_rate(spec, w, rate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    ap.add_argument("--quick", action="store_true", help="a small smoke run (< 1 min on 2 cores)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock guard (seconds)")
    ap.add_argument("--estimate-only", action="store_true")
    # a part of the comparison (local runs); the defaults are the whole of it
    ap.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    ap.add_argument("--fleets", type=lambda s: s.split(","), default=list(FLEETS))
    ap.add_argument(
        "--duration-scale", type=float, default=1.0, help="x every capacity probe's duration"
    )
    ap.add_argument("--no-targeted", dest="targeted", action="store_false")
    args = ap.parse_args()
    bad = [p for p in args.policies if p not in POLICY_NAMES]
    if bad:
        ap.error(f"unknown policy {bad[0]!r}")
    plan = make_plan(args)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import multiprocessing as mp

    ctx = mp.get_context("fork") if hasattr(os, "fork") else None
    pool = ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx)
    try:
        calibrate_all(plan, pool)
        t_cal = time.time() - t0
        return _run(plan, args, out, pool, t0, t_cal)
    finally:
        pool.shutdown(cancel_futures=True)


def _scenarios(plan: Plan) -> dict[tuple[str, str], Scenario]:
    return {(w, f): Scenario(w, parse_fleet(f), slo_for(w), d) for w, f, d in plan.capacity}


def _run(
    plan: Plan,
    args: argparse.Namespace,
    out: Path,
    pool: ProcessPoolExecutor,
    t0: float,
    t_cal: float,
) -> int:
    scenarios = _scenarios(plan)
    targeted = {
        name: (Scenario(w, parse_fleet(f), slo_for(w), dur), load)
        for name, w, f, load, dur in plan.targeted
    }
    # the estimate: targeted runs + ~7 capacity rounds per search, probes around load 0.5-1.2
    est = 0.0
    n_runs = 0
    for sc, load in targeted.values():
        one = _est_run(sc.workload, sc.fleet.name, load, sc.duration_s)
        est += one * len(plan.policies) * len(plan.seeds)
        n_runs += len(plan.policies) * len(plan.seeds)
    for sc in scenarios.values():
        # probes spread over loads ~0.5-2; overloaded ones stop early: ~load 0.9 on average
        one = _est_run(sc.workload, sc.fleet.name, 0.9, sc.duration_s)
        est += one * ROUNDS * len(plan.policies) * len(plan.seeds)
        n_runs += ROUNDS * len(plan.policies) * len(plan.seeds)
    wall = est / max(1, args.jobs) * 1.3  # stragglers: the last bisection rounds run few probes
    print(
        f"plan: {len(plan.capacity)} workload x fleet capacity searches, "
        f"{len(plan.targeted)} targeted comparisons, {len(plan.policies)} policies, "
        f"seeds {','.join(map(str, plan.seeds))}: ~{n_runs} runs, ~{est:.0f} core-s; "
        f"estimate ~{wall + t_cal:.0f} s wall on {args.jobs} worker(s) "
        f"(calibration took {t_cal:.0f} s; guard {args.budget_s:.0f} s)",
        flush=True,
    )
    if args.estimate_only:
        return 0
    deadline = t0 + args.budget_s
    bound = seed_stop_bound(0.9, len(plan.seeds))

    # targeted comparisons: submitted first, they are the explicit targets
    tfuts: dict[str, list[Future]] = {
        name: [pool.submit(run_one, sc, p, load, s) for p in plan.policies for s in plan.seeds]
        for name, (sc, load) in targeted.items()
    }

    caps: dict[tuple[str, str], dict[str, Any]] = {}
    probes_log: list[dict[str, Any]] = []
    lock = threading.Lock()

    def search(key: tuple[str, str]) -> None:
        sc = scenarios[key]
        seen: dict[tuple[str, float], float] = {}
        brackets: dict[str, tuple[float, float | None]] = {}

        def goodput(probes: list[tuple[str, float]]) -> dict[tuple[str, float], float]:
            if time.time() > deadline:
                raise TimeoutError
            todo = [pl for pl in probes if pl not in seen]
            futs = {
                pl: [pool.submit(run_one, sc, pl[0], pl[1], s, bound) for s in plan.seeds]
                for pl in todo
            }
            for pl, fs in futs.items():
                rows = [f.result() for f in fs]
                m = mean_over_seeds(rows)[0]
                seen[pl] = m["goodput_ratio"]
                with lock:
                    probes_log.append(m)
            return {pl: seen[pl] for pl in probes}

        unfinished = False
        try:
            res = find_capacity(
                plan.policies, goodput, threshold=sc.slo.min_ratio, brackets=brackets
            )
        except TimeoutError:
            unfinished = True
            res = {p: brackets.get(p, (0.0, None))[0] for p in plan.policies}
        caps[key] = {
            "capacity": res,
            "brackets": {p: brackets.get(p) for p in plan.policies},
            "unfinished": unfinished,
            "saturation_rps": sc.saturation_rps(),
        }

    threads = [threading.Thread(target=search, args=(k,), daemon=True) for k in scenarios]
    for th in threads:
        th.start()
    done = 0
    total_targeted = sum(len(v) for v in tfuts.values())
    while any(th.is_alive() for th in threads):
        time.sleep(2.0)
        n = sum(1 for v in tfuts.values() for f in v if f.done())
        if n != done or int(time.time() - t0) % 30 < 2:
            done = n
            print(
                f"  {time.time() - t0:5.0f} s: targeted {n}/{total_targeted}, capacity searches "
                f"done {len(caps)}/{len(scenarios)}, probes {len(probes_log)}",
                flush=True,
            )
    targeted_rows = {name: mean_over_seeds([f.result() for f in fs]) for name, fs in tfuts.items()}
    elapsed = time.time() - t0
    doc = _document(plan, args, scenarios, targeted, targeted_rows, caps, probes_log, elapsed)
    (out / "routing.json").write_text(json.dumps(doc, indent=1, default=_clean))
    md = _markdown(doc)
    (out / "routing.md").write_text(md)
    _plots(doc, out)
    print(md)
    print(f"wrote {out}/routing.json, routing.md, *.png in {elapsed:.0f} s")
    return 0


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else str(v)


def _document(
    plan: Plan,
    args: argparse.Namespace,
    scenarios: dict[tuple[str, str], Scenario],
    targeted: dict[str, tuple[Scenario, float]],
    targeted_rows: dict[str, list[dict[str, Any]]],
    caps: dict[tuple[str, str], dict[str, Any]],
    probes: list[dict[str, Any]],
    elapsed: float,
) -> dict[str, Any]:
    cap_rows = []
    for (w, f), c in sorted(caps.items()):
        for p in plan.policies:
            br = c["brackets"].get(p)
            cap_rows.append(
                {
                    "kind": "capacity",
                    "workload": w,
                    "fleet": f,
                    "policy": p,
                    "capacity_load": c["capacity"][p],
                    "capacity_rps": c["capacity"][p] * c["saturation_rps"],
                    "bracket": list(br) if br else None,
                    "unfinished": c["unfinished"],
                    "slo": scenarios[(w, f)].slo.describe(),
                    "duration_s": scenarios[(w, f)].duration_s,
                    "seeds": list(plan.seeds),
                }
            )
    trows = []
    for name, rows in targeted_rows.items():
        sc, _ = targeted[name]
        for r in rows:
            trows.append({**r, "kind": "targeted", "comparison": name,
                          "slo": sc.slo.describe(), "duration_s": sc.duration_s})  # fmt: skip
    return {
        "meta": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}",
            "jobs": args.jobs,
            "seeds": list(plan.seeds),
            "elapsed_s": elapsed,
            "quick": bool(args.quick),
            "saturation_rps": {f"{w}@{f}": sc.saturation_rps() for (w, f), sc in scenarios.items()},
        },
        "rows": trows + cap_rows,
        "probes": [{**p, "kind": "probe"} for p in probes],
        "targets": _targets(plan, trows, cap_rows),
    }


def _get(rows: list[dict[str, Any]], comparison: str, policy: str, key: str) -> float:
    for r in rows:
        if r["comparison"] == comparison and r["policy"] == policy:
            return float(r[key])
    return math.nan


def _targets(
    plan: Plan, trows: list[dict[str, Any]], cap_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each issue-5 target: the measured ratio, the limit, met or missed."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, higher_is_better: bool = False) -> None:
        ok = (value >= limit) if higher_is_better else (value <= limit)
        out.append({"target": name, "value": value, "limit": limit,
                    "met": bool(ok) if not math.isnan(value) else None})  # fmt: skip

    if len(plan.targeted) >= 2:
        mb = plan.targeted[0][0]
        sg = plan.targeted[1][0]
        h_miss = _get(trows, mb, "headroom", "slo_miss_ratio")
        add(
            f"{mb}: SLO misses headroom / gie <= 0.5",
            h_miss / _get(trows, mb, "gie", "slo_miss_ratio"),
            0.5,
        )
        h99 = _get(trows, mb, "headroom", "ttft_p99_s")
        add(
            f"{mb}: p99 TTFT headroom / gie <= 0.7",
            h99 / _get(trows, mb, "gie", "ttft_p99_s"),
            0.7,
        )
        add(
            f"{mb}: p99 TTFT headroom / round-robin <= 0.5",
            h99 / _get(trows, mb, "round-robin", "ttft_p99_s"),
            0.5,
        )
        add(
            f"{sg}: p99 TTFT headroom / gie <= 0.5",
            _get(trows, sg, "headroom", "ttft_p99_s") / _get(trows, sg, "gie", "ttft_p99_s"),
            0.5,
        )
    groups: dict[tuple[str, str], dict[str, float]] = {}
    for r in cap_rows:
        groups.setdefault((r["workload"], r["fleet"]), {})[r["policy"]] = r["capacity_load"]
    for (w, f), c in sorted(groups.items()):
        if "headroom" not in c:
            continue
        others = max((v for p, v in c.items() if p != "headroom"), default=0.0)
        add(f"capacity {w} on {f}: headroom >= best other", c["headroom"] - others, 0.0, True)
    for (w, f), c in sorted(groups.items()):
        if "+" in f and "headroom" in c and c.get("round-robin"):
            out.append({"target": f"headline: capacity {w} on {f}, headroom / round-robin",
                        "value": c["headroom"] / c["round-robin"], "limit": None, "met": None})  # fmt: skip
    return out


def _markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"# Routing comparison ({meta['machine']}, --jobs {meta['jobs']}, seeds "
        f"{','.join(map(str, meta['seeds']))}, {meta['elapsed_s']:.0f} s)",
        "",
        "## Targets",
        "",
        "| target | value | limit | met |",
        "|---|---|---|---|",
    ]
    for t in doc["targets"]:
        met = "-" if t["met"] is None else ("met" if t["met"] else "**missed**")
        lim = "-" if t["limit"] is None else f"{t['limit']:g}"
        lines.append(f"| {t['target']} | {t['value']:.3g} | {lim} | {met} |")
    comps = sorted({r["comparison"] for r in doc["rows"] if r["kind"] == "targeted"})
    for c in comps:
        rows = [r for r in doc["rows"] if r["kind"] == "targeted" and r["comparison"] == c]
        lines += [
            "",
            f"## {c} ({rows[0]['duration_s']:g} s; SLO: {rows[0]['slo']})",
            "",
            "| policy | TTFT p50 s | TTFT p99 s | TPOT p99 s | tok/s | goodput | SLO misses | preempt |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: -r["goodput_ratio"]):
            lines.append(
                f"| {r['policy']} | {r['ttft_p50_s']:.3g} | {r['ttft_p99_s']:.3g} | "
                f"{r['tpot_p99_s']:.3g} | {r['throughput_tok_s']:.0f} | "
                f"{r['goodput_ratio']:.3f} | {r['slo_miss_ratio']:.1%} | {r['preemptions']:.0f} |"
            )
    caps = [r for r in doc["rows"] if r["kind"] == "capacity"]
    if caps:
        policies = list(dict.fromkeys(r["policy"] for r in caps))
        lines += [
            "",
            "## Capacity at SLO (load; 1.0 = closed-loop fleet saturation)",
            "",
            "| workload | fleet | " + " | ".join(policies) + " |",
            "|---|---|" + "---|" * len(policies),
        ]
        keys = sorted({(r["workload"], r["fleet"]) for r in caps})
        for w, f in keys:
            vals = {r["policy"]: r for r in caps if r["workload"] == w and r["fleet"] == f}
            best = max(v["capacity_load"] for v in vals.values())
            cells = []
            for p in policies:
                v = vals[p]["capacity_load"]
                s = f"{v:.2f}" + ("*" if vals[p]["unfinished"] else "")
                cells.append(f"**{s}**" if v == best else s)
            lines.append(f"| {w} | {f} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("(* the wall-clock guard stopped the bisection: the bracket's lower end)")
    return "\n".join(lines) + "\n"


def _plots(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = [r for r in doc["rows"] if r["kind"] == "capacity"]
    if caps:
        keys = sorted({(r["workload"], r["fleet"]) for r in caps})
        policies = list(dict.fromkeys(r["policy"] for r in caps))
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(keys)), 4.5))
        width = 0.8 / len(policies)
        for i, p in enumerate(policies):
            ys = [
                next(
                    (r["capacity_load"] for r in caps
                     if (r["workload"], r["fleet"]) == k and r["policy"] == p),
                    0.0,
                )
                for k in keys
            ]  # fmt: skip
            ax.bar([j + i * width for j in range(len(keys))], ys, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{w}\n{f}" for w, f in keys], fontsize=7)
        ax.set_ylabel("capacity at SLO (load)")
        ax.legend(fontsize=7, ncol=4)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "capacity.png", dpi=110)
        plt.close(fig)
    trows = [r for r in doc["rows"] if r["kind"] == "targeted"]
    for c in sorted({r["comparison"] for r in trows}):
        rows = [r for r in trows if r["comparison"] == c]
        names = [r["policy"] for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        a1.bar(names, [r["ttft_p99_s"] for r in rows])
        a1.set_ylabel("TTFT p99 (s)")
        a1.set_yscale("log")
        a2.bar(names, [r["goodput_ratio"] for r in rows])
        a2.set_ylabel("goodput")
        a2.set_ylim(0, 1.02)
        for a in (a1, a2):
            a.tick_params(axis="x", labelrotation=45, labelsize=7)
            a.grid(True, axis="y", alpha=0.3)
        fig.suptitle(c, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{c}.png", dpi=110)
        plt.close(fig)
    probes = doc["probes"]
    if probes:
        keys = sorted({(r["workload"], r["fleet"]) for r in probes})
        n = len(keys)
        cols = min(5, n)
        fig, axes = plt.subplots(
            (n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.8 * ((n + cols - 1) // cols)),
            squeeze=False,
        )  # fmt: skip
        for ax, k in zip(axes.flat, keys, strict=False):
            for p in sorted({r["policy"] for r in probes}):
                pts = sorted(
                    (r["load"], r["goodput_ratio"]) for r in probes
                    if (r["workload"], r["fleet"]) == k and r["policy"] == p
                )  # fmt: skip
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=p,
                        linewidth=2.2 if p == "headroom" else 1.0)  # fmt: skip
            ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{k[0]} / {k[1]}", fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.tick_params(labelsize=7)
        axes.flat[0].legend(fontsize=6)
        fig.supxlabel("load (early-stopped probes: goodput upper bound)", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "goodput-vs-load.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
