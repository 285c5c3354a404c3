"""Results out: a markdown table, a JSON document, and PNG plots of p99 TTFT and goodput vs load."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [
        ("policy", "policy", 0),
        ("load", "load", 3),
        ("rate_rps", "req/s", 3),
        ("ttft_p50_s", "TTFT p50 s", 3),
        ("ttft_p90_s", "TTFT p90 s", 3),
        ("ttft_p99_s", "TTFT p99 s", 3),
        ("tpot_p50_s", "TPOT p50 s", 3),
        ("tpot_p99_s", "TPOT p99 s", 3),
        ("e2e_p99_s", "e2e p99 s", 3),
        ("throughput_tok_s", "tok/s", 4),
        ("goodput_ratio", "goodput", 3),
        ("preemptions", "preempt", 3),
        ("kv_usage_mean", "KV mean", 2),
        ("prefix_hit_ratio", "prefix hit", 2),
    ]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["load"], r["policy"])):
        lines.append(
            "| " + " | ".join(_fmt(r.get(k), d) if d else str(r.get(k)) for k, _, d in cols) + " |"
        )
    return "\n".join(lines)


def capacity_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| policy | capacity at SLO (load) | req/s |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["capacity_load"]):
        lines.append(f"| {r['policy']} | {r['capacity_load']:.3f} | {r['capacity_rps']:.3g} |")
    return "\n".join(lines)


def write_json(path: str | Path, meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    doc = {"meta": meta, "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}
    Path(path).write_text(json.dumps(doc, indent=1))


def plot(path: str | Path, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Two panels over load, one line per policy: p99 TTFT (log scale) and goodput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in sorted({r["policy"] for r in rows}):
        pts = sorted(
            (r["load"], r["ttft_p99_s"], r["goodput_ratio"]) for r in rows if r["policy"] == policy
        )
        loads = [p[0] for p in pts]
        style = {"linewidth": 2.5} if policy == "headroom" else {"linewidth": 1.2}
        ax1.plot(loads, [p[1] for p in pts], marker="o", label=policy, **style)
        ax2.plot(loads, [p[2] for p in pts], marker="o", label=policy, **style)
    ax1.set_yscale("log")
    ax1.set_xlabel("load (1.0 = fleet saturation)")
    ax1.set_ylabel("TTFT p99 (s)")
    ax2.set_xlabel("load (1.0 = fleet saturation)")
    ax2.set_ylabel("goodput (share meeting SLO)")
    ax2.set_ylim(0, 1.02)
    ax2.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
