"""`kvpilot plan --model NAME ...`: a ranked table (or JSON rows) of GPU type x count x dtype."""

from __future__ import annotations

import argparse
import sys

from controller.planner import (
    COUNTS,
    DTYPES,
    MACHINE_TYPES,
    PRICES_DATE,
    Workload,
    load_prices,
    plan,
    quantization_advice,
    rows_json,
)
from modelserver.profiles import resolve_gpu


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvpilot plan",
        description="Rank GPU type x count (tensor parallel) x weight format for a model: "
        "whether it fits, the largest batch at the context, tokens/s and cost per million "
        "output tokens on GKE.",
    )
    p.add_argument("--model", required=True, help="model name, e.g. llama-3.1-70b")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight format (default: all)")
    p.add_argument("--context", type=int, default=4096, help="tokens per request, prompt + output")
    p.add_argument("--output-tokens", type=int, default=None, help="default min(512, context/4)")
    p.add_argument("--ttft-target", type=float, default=None, metavar="S")
    p.add_argument("--tpot-target", type=float, default=None, metavar="S")
    p.add_argument("--gpu", action="append", default=None, help="limit to these GPUs (repeat)")
    p.add_argument("--count", type=int, action="append", default=None, choices=COUNTS)
    p.add_argument(
        "--prices", default=None, metavar="FILE", help="YAML/JSON: machine type -> USD/h"
    )
    p.add_argument("--all", action="store_true", help="also show configurations that do not fit")
    p.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.context < 2:
        print("kvpilot plan: --context must be >= 2", file=sys.stderr)
        return 2
    try:
        prices = load_prices(args.prices)
        work = Workload(
            context=args.context,
            output_tokens=args.output_tokens,
            ttft_target_s=args.ttft_target,
            tpot_target_s=args.tpot_target,
        )
        dtypes = (args.dtype,) if args.dtype else DTYPES
        kwargs = {}
        if args.gpu:
            kwargs["gpus"] = args.gpu
        rows = plan(
            args.model,
            dtypes=dtypes,
            counts=tuple(args.count or COUNTS),
            work=work,
            prices=prices,
            **kwargs,
        )
        advice = quantization_advice(args.model, args.dtype or "bf16", work, prices)
    except (ValueError, OSError) as e:
        print(f"kvpilot plan: {e}", file=sys.stderr)
        return 2
    if not rows:  # e.g. --gpu h200 --count 1: say why rather than print nothing
        offered = {
            g: " or ".join(str(n) for a, n in sorted(MACHINE_TYPES) if a == g)
            for g, _ in MACHINE_TYPES
        }
        wanted = sorted({resolve_gpu(g).alias for g in args.gpu or ()})
        asked = ", ".join(f"--count {n}" for n in args.count or COUNTS)
        comes = "; ".join(f"{g} comes as {offered[g]} GPUs" for g in wanted)
        print(f"kvpilot plan: no GKE machine type for {asked}: {comes}", file=sys.stderr)
        return 2
    if args.json:
        print(rows_json(rows, advice))
        return 0
    shown = rows if args.all else [r for r in rows if r.fits]
    _table(args.model, shown, work, advice.text if advice else None, hidden=len(rows) - len(shown))
    return 0


def _table(model: str, rows: list, work: Workload, advice: str | None, hidden: int) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    t = Table(
        title=f"{model}: {work.prompt} prompt + {work.output} output tokens per request",
        caption=f"GKE on-demand list prices, us-central1, {PRICES_DATE} (override with --prices)",
    )
    for col in ("#", "GPU", "n", "dtype", "fits", "weights GB", "KV GB", "max batch", "batch",
                "TTFT s", "TPOT ms", "out tok/s", "$/h", "$/M out", "machine", "note"):  # fmt: skip
        t.add_column(
            col, justify="right" if col not in ("GPU", "dtype", "machine", "note") else "left"
        )
    for i, r in enumerate(rows, 1):
        ok = r.fits and r.meets_targets
        t.add_row(
            str(i),
            r.gpu,
            str(r.count),
            r.dtype,
            "yes" if r.fits else "no",
            f(r.weight_gb, ".1f"),
            f(r.kv_cache_gb, ".1f"),
            str(r.max_batch),
            str(r.batch),
            f(r.ttft_s, ".3f"),
            f(r.tpot_s * 1000 if r.tpot_s else None, ".1f"),
            f(r.output_tok_s, ".0f"),
            f(r.usd_per_hour, ".2f"),
            f(r.usd_per_million_output_tokens, ".2f"),
            r.machine_type or "-",
            r.note if ok or not r.fits else "misses targets",
            style=None if ok else "dim",
        )
    c = Console(width=None if sys.stdout.isatty() else 200)
    c.print(t)
    if hidden:
        c.print(f"{hidden} configurations do not fit (--all shows them).")
    if advice:
        c.print(f"[bold]Quantization:[/bold] {advice}")
