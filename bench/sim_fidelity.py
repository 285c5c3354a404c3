"""Keep the simulator honest: the same trace through real (time-scaled) model servers and through
the simulator should give the same TTFT and throughput, within +-15 %.

Starts N `kvpilot modelserver --time-scale X` processes on 127.0.0.1 and, with `--via gateway`
(the default), a `kvpilot gateway` in front of them with the same policy; `--via direct` routes
from this process with the same picker code instead. Replays a seeded trace (prompts as token ids,
`ignore_eos` so lengths match), measures TTFT and generated tokens per second in engine time (wall
x time scale), runs the simulator on the same trace, fleet and policy, and compares.
Round-robin is the default policy: its picks do not depend on timing, so both sides send each
request to the same replica and any gap is the engine-vs-simulator gap itself.

    .venv/bin/python bench/sim_fidelity.py [--replicas 2] [--gpu l4] [--workload sharegpt]
        [--rate 2] [--duration 60] [--time-scale 2] [--via gateway|direct] [--policy round-robin]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from gateway.estimate import Estimator  # noqa: E402
from gateway.inflight import InFlightLedger  # noqa: E402
from gateway.picker import ReplicaView, make_policy  # noqa: E402
from sim.fleets import parse_fleet  # noqa: E402
from sim.simulator import SimConfig, Simulation  # noqa: E402
from sim.tokens import BLOCK_TOKENS, prefix_hashes, prompt_token_ids  # noqa: E402
from sim.traces import SimRequest, make_trace  # noqa: E402

KVPILOT = [sys.executable, "-m", "kvpilot"]
MODEL = "llama-3.1-8b"


def _start(
    args: list[str], pattern: str, timeout: float = 30.0
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    deadline = time.time() + timeout
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(args)} exited: {proc.returncode}")
            continue
        m = re.search(pattern, line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError(f"{' '.join(args)} did not report ready in {timeout} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    req: SimRequest,
    ids: list[int],
    t0: float,
    scale: float,
) -> tuple[float, float, int]:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s / scale - time.monotonic()))
    start = time.monotonic()
    body = {
        "model": MODEL,
        "prompt": ids,
        "max_tokens": req.output_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    first = None
    n = 0
    async with session.post(
        f"{url}/v1/completions",
        data=orjson.dumps(body),
        headers={"content-type": "application/json"},
    ) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            if first is None:
                first = time.monotonic()
            n += 1
    end = time.monotonic()
    return ((first or end) - start) * scale, (end - t0) * scale, n


async def replay(
    urls: list[str], trace: list[SimRequest], scale: float, policy_name: str | None
) -> tuple[list[float], float, int]:
    """Send every request at its (scaled) arrival time; picks by `policy_name` over `urls`
    (or all to urls[0], a gateway, when None). TTFTs and the makespan in engine seconds."""
    est, ledger = Estimator(), InFlightLedger()
    policy = make_policy(policy_name, seed=1) if policy_name else None
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        t0 = time.monotonic() + 0.2
        tasks = []
        for req in trace:
            ids = prompt_token_ids(req)
            url = urls[0]
            if policy is not None:
                await asyncio.sleep(max(0.0, t0 + req.arrival_s / scale - time.monotonic()))
                feats = est.features_from_tokens(
                    req.request_id,
                    MODEL,
                    len(ids),
                    prefix_hashes(ids),
                    req.max_tokens,
                    block_tokens=BLOCK_TOKENS,
                )
                views = [ReplicaView(u, None, ledger.get(u)) for u in urls]
                url = policy.pick(feats, views, time.monotonic()).replica_id or urls[0]
                ledger.start(url, feats, time.monotonic())
            tasks.append(asyncio.create_task(_one(session, url, req, ids, t0, scale)))
        results = await asyncio.gather(*tasks)
    ttfts = [r[0] for r in results]
    makespan = max(r[1] for r in results)
    return ttfts, makespan, sum(r[2] for r in results)


def simulate(fleet: str, trace: list[SimRequest], policy: str) -> tuple[list[float], float, int]:
    sim = Simulation(
        parse_fleet(fleet).replicas, make_policy(policy, seed=1), SimConfig(net_latency_s=0.0)
    )
    recs = sim.run(trace)
    ttfts = [r.ttft_s for r in recs if r.ttft_s is not None]
    makespan = max(r.finish_s for r in recs if r.finish_s is not None)
    return ttfts, makespan, sum(r.generated for r in recs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--gpu", default="l4")
    ap.add_argument("--workload", default="sharegpt")
    ap.add_argument("--rate", type=float, default=2.0, help="requests per engine-second")
    ap.add_argument("--duration", type=float, default=60.0, help="engine-seconds of arrivals")
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--via", choices=("gateway", "direct"), default="gateway")
    ap.add_argument("--policy", default="round-robin")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.15)
    args = ap.parse_args()
    fleet = f"{args.replicas}x{args.gpu}"
    trace = make_trace(args.workload, args.rate, args.duration, args.seed)
    procs: list[subprocess.Popen[str]] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        urls = []
        for _ in range(args.replicas):
            p, url = _start(
                KVPILOT
                + [
                    "modelserver",
                    "--model",
                    MODEL,
                    "--gpu",
                    args.gpu,
                    "--port",
                    "0",
                    "--time-scale",
                    str(args.time_scale),
                ],
                r"listening on (http://\S+?),?\s",
            )
            procs.append(p)
            urls.append(url.rstrip(","))
        via = args.via
        targets, picker = urls, args.policy
        if via == "gateway":
            port = _free_port()
            cfg = Path(tmp.name) / "kvpilot.yaml"
            eps = ", ".join(urls)
            cfg.write_text(
                f"pools:\n  - name: sim\n    models: [{MODEL}]\n    endpoints: [{eps}]\n"
                f"gateway:\n  listen: 127.0.0.1:{port}\n  policy: {args.policy}\n"
            )
            try:
                gw = subprocess.Popen(
                    KVPILOT + ["gateway", "--config", str(cfg)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=ROOT,
                )
                procs.append(gw)
                gw_url = f"http://127.0.0.1:{port}"
                asyncio.run(_wait_ready(gw_url))
                targets, picker = [gw_url], None
            except Exception as e:  # the gateway is optional here: fall back and say so
                print(f"gateway not usable ({e}); routing directly with the same picker")
                via = "direct"
        real_ttft, real_span, real_tok = asyncio.run(
            replay(targets, trace, args.time_scale, picker)
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            if p.poll() is None:
                p.kill()
        tmp.cleanup()
    sim_ttft, sim_span, sim_tok = simulate(fleet, trace, args.policy)
    rows = [
        ("TTFT mean s", statistics.mean(real_ttft), statistics.mean(sim_ttft)),
        ("TTFT p50 s", statistics.median(real_ttft), statistics.median(sim_ttft)),
        ("throughput tok/s", real_tok / real_span, sim_tok / sim_span),
    ]
    ok = True
    print(
        f"{len(trace)} requests of {args.workload} at {args.rate} req/s on {fleet}, {args.policy}, via {via}, time scale {args.time_scale:g}"
    )
    print("| metric | real servers | simulator | sim/real |\n|---|---|---|---|")
    for name, real, simv in rows:
        ratio = simv / real if real else float("nan")
        ok &= abs(ratio - 1) <= args.tolerance
        print(f"| {name} | {real:.4g} | {simv:.4g} | {ratio:.3f} |")
    print(
        f"machine: {os.cpu_count()} cores; within +-{args.tolerance:.0%}: {'yes' if ok else 'NO'}"
    )
    return 0 if ok else 1


async def _wait_ready(url: str, wait_s: float = 20.0) -> None:
    deadline = time.monotonic() + wait_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"{url}/v1/models") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"no answer from {url} in {wait_s} s")


if __name__ == "__main__":
    raise SystemExit(main())
