"""What one proxy hop costs a lone request: latency with the machine idle between requests.

    .venv/bin/python bench/hop_latency.py [--requests 1000] [--gap-ms 10] [--rounds 2]

One keep-alive connection (`http.client`), one request at a time, against the fixed-answer
backend directly, through the aiohttp floor (bench/aiohttp_floor.py) and through
`kvpilot gateway` (headroom): back to back, then with `--gap-ms` of idle between requests (what a
paced load of a few hundred req/s looks like to each process: it sleeps, then wakes up cold).
Targets alternate round by round. Prints p50/p90/p99 per target and gap. `--compare DIR` also
runs the gateway from another checkout (e.g. a `git worktree` of an earlier commit), side by
side with this one.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy import MODEL, PY, ROOT, free_port, gateway_command, gateway_config, started  # noqa: E402


def body(prompt: str) -> str:
    """A completion request for `prompt` (plain ASCII: nothing to escape)."""
    return f'{{"model": "{MODEL}", "prompt": "{prompt}", "max_tokens": 16}}'


BODY = body("The quick brown fox")


def probe(port: int, n: int, gap_s: float, body: str = BODY) -> list[float]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        out.append((time.perf_counter() - t) * 1e3)
        if r.status != 200:
            raise RuntimeError(f"port {port}: HTTP {r.status}")
        if gap_s:
            time.sleep(gap_s)
    c.close()
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", metavar="DIR", help="also the gateway of this source tree")
    ap.add_argument(
        "--workers", type=int, default=1, help="gateway.workers (the one connection meets one)"
    )
    args = ap.parse_args()
    n = min(args.requests, 5000)
    with tempfile.TemporaryDirectory() as td, contextlib.ExitStack() as stack:
        bport, fport = free_port(), free_port()
        stack.enter_context(started([PY, str(ROOT / "bench" / "fixed_backend.py"),
                                     "--port", str(bport)], bport))  # fmt: skip
        stack.enter_context(started([PY, str(ROOT / "bench" / "aiohttp_floor.py"), "--port",
                                     str(fport), "--upstream", f"http://127.0.0.1:{bport}"], fport))  # fmt: skip
        targets = [("backend (direct)", bport), ("aiohttp floor", fport)]
        trees = [("kvpilot gateway", None)]
        if args.compare:
            tree = Path(args.compare).resolve()
            trees.append((f"kvpilot gateway ({tree.name})", tree))
        for i, (name, cwd) in enumerate(trees):
            port = free_port()
            cfg = Path(td) / f"kvpilot-{i}.yaml"
            gateway_config(cfg, port, bport, args.workers)
            stack.enter_context(started(gateway_command(cfg), port, cwd=cwd))
            targets.append((name, port))
        for _, port in targets:
            probe(port, 200, 0.0)  # warm up
        print(
            "| round | gap ms | target | p50 ms | p90 ms | p99 ms |\n|---:|---:|---|---:|---:|---:|"
        )
        for rnd in range(1, args.rounds + 1):
            for gap in (0.0, args.gap_ms):
                for name, port in targets:
                    lat = probe(port, n, gap / 1000)
                    p50, p90, p99 = (lat[int(q * (n - 1))] for q in (0.5, 0.9, 0.99))
                    print(f"| {rnd} | {gap:g} | {name} | {p50:.2f} | {p90:.2f} | {p99:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
