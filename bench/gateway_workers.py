"""Does routing suffer when the gateway runs as several worker processes?

Each worker keeps its own in-flight account (what it sent each replica since the last observed
state), so with N workers every account sees about 1/N of the traffic between two scrapes. This
replays one seeded open-loop trace through `kvpilot gateway` with `gateway.workers: 1` and then
with `--workers N`, in front of the same skewed fleet of emulated model servers (default one H100
and two L4s, Llama-3.1-8B; replica states from the gateway's own 0.5 s scrapes, or with
`--states agent` pushed by one `kvpilot agent`), and compares the share of requests each
replica got and the TTFT the clients saw. The two are alternated `--repeat` times (1, N, 1, N, ...) so that drift in the machine's load hits both.

    .venv/bin/python bench/gateway_workers.py [--rate 8] [--duration 40] [--workers 2]
        [--fleet h100,l4,l4] [--policy headroom] [--reference round-robin] [--repeat 2]
        [--states scrape|agent] [--peer-sync S] [--prefixes K] [--fail-open]

The workers share their in-flight totals every `gateway.peer_sync_s` (gateway/peers.py);
`--peer-sync 0` shows what routing looks like without that. `--fail-open` sets
`gateway.queue_when_saturated: false`: beyond the fleet's capacity each worker otherwise holds
requests in a saturation queue of its own (what that split costs, against the engines' queues).

Requests: completions with random token-id prompts of 256-2,048 tokens, 32 output tokens
(`ignore_eos`), streamed; Poisson arrivals. Time scale 1 (real time), so TTFT is in engine seconds
and the gateway's own milliseconds are small against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from proxy import free_port, started  # noqa: E402

PY = sys.executable
MODEL = "llama-3.1-8b"
TTFT_TARGET_S, TTFT_PER_TOKEN_S = 1.0, 0.2 / 1000  # kvpilot.config's gateway defaults


def make_trace(
    rate: float, duration_s: float, seed: int, prefixes: int = 0
) -> list[tuple[float, list[int]]]:
    """Poisson arrivals of random prompts of 256-2,048 tokens; with `prefixes` > 0 each prompt is
    one of that many shared 1,024-token prefixes (a system prompt, a document) plus 64-512 tokens
    of its own, so that routing to the replica that holds the prefix pays."""
    rng = random.Random(seed)
    shared = [[rng.randrange(100, 30000) for _ in range(1024)] for _ in range(prefixes)]
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        if shared:
            own = [rng.randrange(100, 30000) for _ in range(rng.randint(64, 512))]
            out.append((t, rng.choice(shared) + own))
        else:
            n = rng.randint(256, 2048)
            out.append((t, [rng.randrange(100, 30000) for _ in range(n)]))


async def reset_prefix_caches(urls: list[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for u in urls:
            async with s.post(f"{u}/reset_prefix_cache") as resp:
                resp.raise_for_status()


async def prefix_hits(urls: list[str]) -> tuple[float, float]:
    """The fleet's prefix-cache (hit, queried) tokens so far, from the servers' vLLM counters."""
    hits = queries = 0.0
    async with aiohttp.ClientSession() as s:
        for u in urls:
            async with s.get(f"{u}/metrics") as resp:
                text = await resp.text()
            for name, value in re.findall(
                r"^vllm:prefix_cache_(hits|queries)_total\{[^}]*\} ([\d.e+]+)", text, re.M
            ):
                if name == "hits":
                    hits += float(value)
                else:
                    queries += float(value)
    return hits, queries


async def one(
    session: aiohttp.ClientSession, url: str, at: float, ids: list[int], t0: float
) -> float | None:
    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
    start = time.monotonic()
    body = {"model": MODEL, "prompt": ids, "max_tokens": 32, "ignore_eos": True, "stream": True}
    try:
        async with session.post(url, data=orjson.dumps(body)) as resp:
            if resp.status != 200:
                await resp.read()
                return None
            first = None
            async for _ in resp.content.iter_any():
                if first is None:
                    first = time.monotonic()
            return (first or time.monotonic()) - start
    except aiohttp.ClientError:
        return None


async def replay(url: str, trace: list[tuple[float, list[int]]]) -> list[float | None]:
    timeout = aiohttp.ClientTimeout(total=300)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout, headers=headers
    ) as s:
        t0 = time.monotonic() + 0.5
        return list(await asyncio.gather(*(one(s, url, at, ids, t0) for at, ids in trace)))


async def spread(metrics_url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(metrics_url) as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for m in re.finditer(
        r'kvpilot_gateway_requests_total\{[^}]*replica="([^"]+)"[^}]*\} ([\d.e+]+)', text
    ):
        if m.group(1):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def slo_met(ttfts: list[float | None], trace: list[tuple[float, list[int]]]) -> float:
    """The share of all requests (failed ones count as missed) whose TTFT met the gateway's
    default target for their prompt (`ttft_target_s` 1.0 + `ttft_per_1k_tokens_s` 0.2 per 1,000
    prompt tokens): what headroom's saturation queue orders its releases for."""
    met = sum(
        1
        for t, (_, ids) in zip(ttfts, trace, strict=True)
        if t is not None and t <= TTFT_TARGET_S + TTFT_PER_TOKEN_S * len(ids)
    )
    return met / max(1, len(trace))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fleet", default="h100,l4,l4")
    ap.add_argument("--policy", default="headroom")
    ap.add_argument("--reference", default="round-robin", help="a policy to run once; '' for none")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each worker count, alternated")
    ap.add_argument(
        "--states",
        choices=("scrape", "agent"),
        default="scrape",
        help="replica states from each worker's own 0.5 s scrapes, or pushed by one kvpilot agent",
    )
    ap.add_argument(
        "--prefixes", type=int, default=0, help="K shared 1,024-token prefixes (0: none)"
    )
    ap.add_argument(
        "--peer-sync",
        type=float,
        default=None,
        help="gateway.peer_sync_s for the workers (default: the config's; 0: no shared totals)",
    )
    ap.add_argument(
        "--fail-open",
        action="store_true",
        help="gateway.queue_when_saturated: false (no holding at the gateway when saturated)",
    )
    args = ap.parse_args()
    duration = min(args.duration, 120.0)
    trace = make_trace(args.rate, duration, args.seed, args.prefixes)
    gpus = args.fleet.split(",")
    runs = [(args.policy, 1), (args.policy, args.workers)] * max(1, args.repeat)
    if args.reference:
        runs.append((args.reference, 1))
    rows = []
    with tempfile.TemporaryDirectory() as td, contextlib.ExitStack() as stack:
        urls = []
        for gpu in gpus:
            port = free_port()
            cmd = [PY, "-m", "kvpilot.cli", "modelserver", "--model", MODEL, "--gpu", gpu]
            stack.enter_context(started([*cmd, "--port", str(port)], port, 40, cwd=ROOT))
            urls.append(f"http://127.0.0.1:{port}")
        names = {u: f"{g}#{i}" for i, (u, g) in enumerate(zip(urls, gpus, strict=True))}
        pools = f"pools:\n  - name: p\n    models: [{MODEL}]\n    endpoints: [{', '.join(urls)}]\n"
        states = ""
        if args.states == "agent":  # one agent for the whole fleet, as on one node
            aport = free_port()
            acfg = Path(td) / "agent.yaml"
            acfg.write_text(pools + f"agent:\n  listen: 127.0.0.1:{aport}\n  gpus: emulated\n")
            cmd = [PY, "-m", "kvpilot.cli", "agent", "--config", str(acfg)]
            stack.enter_context(started([*cmd, "--log-level", "WARNING"], aport, 40, cwd=ROOT))
            states = f"  agents: [http://127.0.0.1:{aport}]\n  scrape_fallback: false\n"
        if args.peer_sync is not None:
            states += f"  peer_sync_s: {args.peer_sync}\n"
        if args.fail_open:
            states += "  queue_when_saturated: false\n"
        for policy, workers in runs:
            gport = free_port()
            cfg = Path(td) / f"gw-{policy}-{workers}.yaml"
            cfg.write_text(
                pools + f"gateway:\n  listen: 127.0.0.1:{gport}\n  policy: {policy}\n"
                f"  workers: {workers}\n" + states
            )
            cmd = [PY, "-m", "kvpilot.cli", "gateway", "--config", str(cfg)]
            with started([*cmd, "--log-level", "WARNING"], gport, 40, cwd=ROOT):
                time.sleep(2.0)  # first scrapes
                base = f"http://127.0.0.1:{gport}"
                asyncio.run(reset_prefix_caches(urls))  # every run starts cold
                h0, q0 = asyncio.run(prefix_hits(urls))
                ttfts = asyncio.run(replay(f"{base}/v1/completions", trace))
                share = asyncio.run(spread(f"{base}/metrics"))
                h1, q1 = asyncio.run(prefix_hits(urls))
            ok = [t for t in ttfts if t is not None]
            total = sum(share.values()) or 1.0
            hit = (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0
            met = slo_met(ttfts, trace)
            rows.append((policy, workers, ok, len(ttfts) - len(ok), share, total, hit, met))
            time.sleep(3.0)  # let the fleet drain between runs

    print(
        f"{len(trace)} requests, Poisson {args.rate} req/s over {duration:.0f} s, prompts 256-2048 "
        f"tokens, 32 out; fleet {args.fleet} ({MODEL}, emulated, real time); states by "
        f"{args.states}; peer_sync_s {'default' if args.peer_sync is None else args.peer_sync}; "
        f"{args.prefixes} shared prefixes"
        + ("; fail open (no gateway queue)" if args.fail_open else "")
        + "\n"
    )
    head = " | ".join(names[u] for u in urls)
    print(
        "| policy | workers | TTFT p50 s | TTFT p90 s | TTFT p99 s | mean s | TTFT SLO met | failed | "
        f"prefix-cache hits | {head} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(urls))
    for policy, workers, ok, failed, share, total, hit, met in rows:
        shares = " | ".join(f"{100 * share.get(u, 0.0) / total:.0f} %" for u in urls)
        print(
            f"| {policy} | {workers} | {pct(ok, 0.5):.3f} | {pct(ok, 0.9):.3f} | "
            f"{pct(ok, 0.99):.3f} | {statistics.fmean(ok):.3f} | {100 * met:.0f} % | {failed} | {100 * hit:.0f} % | "
            f"{shares} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
