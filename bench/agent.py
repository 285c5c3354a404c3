"""Agent cost and freshness: one agent, 8 GPUs (fake source), 16 replicas, 4 scrapes a second.

    .venv/bin/python bench/agent.py [--seconds 30] [--replicas 16] [--gpus 8] [--interval 0.25]

Three processes, so that each one's CPU is its own: the replicas (16 light aiohttp servers in one
process, each answering /metrics with a recorded vLLM text whose counters move), the agent
(the real agent app with a fake GPU source of 8 GPUs), and this process, which follows the agent
with AgentWatchClient. Reported:
- agent CPU: its process CPU time (user + system, /proc/PID/stat) over a fixed window, as a
  percentage of one core; target <= 3 %.
- scrape -> watch-client latency: for every NodeState received, receive time minus the newest
  replica's `observed_at` (the moment its metrics response was read); p50/p99/max; target
  p99 <= 50 ms. All on one host clock.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from agent.client import AgentWatchClient  # noqa: E402
from agent.fakes import FakeGpuSource, MetricsServer, fake_gpu, fixture_text  # noqa: E402


def vllm_render(i: int):  # type: ignore[no-untyped-def]
    """A recorded vLLM /metrics text with moving counters and gauges (realistic parse work)."""
    base = fixture_text("vllm")
    n = itertools.count()

    def render() -> str:
        k = next(n)
        return (
            base.replace("20480.0", f"{20480 + 37 * k}.0")
            .replace("51200.0", f"{51200 + 410 * k}.0")
            .replace(" 0.41\n", f" {(k % 90) / 100:.2f}\n")
        )

    return render


async def serve_replicas(count: int, ports_file: str) -> None:
    servers = [MetricsServer(vllm_render(i)) for i in range(count)]
    urls = [await s.start() for s in servers]
    await asyncio.to_thread(Path(ports_file).write_text, json.dumps(urls))
    await asyncio.Event().wait()


async def serve_agent(urls: list[str], gpus: int, interval: float, listen: str) -> None:
    import dataclasses

    from agent.run import agent_config, running_agent

    cfg = agent_config(urls, listen=listen, engine="vllm", gpus="emulated", node="bench-node",
                       scrape_interval_s=interval)  # fmt: skip
    gpu_map = {u: (i,) for i, u in enumerate(urls[:gpus])}
    cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, gpu_map=gpu_map))
    source = FakeGpuSource([fake_gpu(i) for i in range(gpus)])
    async with running_agent(cfg, gpu_source=source):
        await asyncio.Event().wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def follow(args: argparse.Namespace, listen: str, agent_pid: int) -> dict:
    """Follow the agent's stream; measure its CPU and each state's latency over the window."""
    lat_scrape: list[float] = []
    lat_state: list[float] = []
    async with aiohttp.ClientSession() as session:
        client = AgentWatchClient(f"http://{listen}", session, min_backoff_s=0.05)
        warm_until = time.monotonic() + args.warmup
        cpu0 = t0 = None
        async for state in client:
            now = time.time()
            if len(state.replicas) < args.replicas or not all(r.healthy for r in state.replicas):
                continue
            if time.monotonic() < warm_until:
                continue
            if cpu0 is None:
                cpu0, t0 = cpu_seconds(agent_pid), time.monotonic()
                continue
            lat_scrape.append(now - max(r.observed_at for r in state.replicas))
            lat_state.append(now - state.observed_at)
            if time.monotonic() - t0 >= args.seconds:  # type: ignore[operator]
                break
        cpu = cpu_seconds(agent_pid) - cpu0  # type: ignore[operator]
        wall = time.monotonic() - t0  # type: ignore[operator]
    return {
        "replicas": args.replicas,
        "gpus": args.gpus,
        "interval_s": args.interval,
        "window_s": round(wall, 1),
        "states": len(lat_scrape),
        "agent_cpu_pct_of_one_core": round(100 * cpu / wall, 2),
        "scrape_to_client_ms": {
            "p50": round(1000 * pct(lat_scrape, 50), 2),
            "p99": round(1000 * pct(lat_scrape, 99), 2),
            "max": round(1000 * max(lat_scrape), 2),
        },
        "state_to_client_ms": {
            "p50": round(1000 * pct(lat_state, 50), 2),
            "p99": round(1000 * pct(lat_state, 99), 2),
        },
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
    }


def run_bench(args: argparse.Namespace) -> dict:
    ports_file = Path(f"/tmp/kvpilot-bench-agent-{os.getpid()}.json")
    me = [sys.executable, str(Path(__file__).resolve())]
    procs = [
        subprocess.Popen([*me, "--role", "replicas", "--replicas", str(args.replicas),
                          "--ports-file", str(ports_file)])
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (ports_file.exists() and ports_file.read_text()):
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not start")
            time.sleep(0.05)
        urls = json.loads(ports_file.read_text())
        listen = f"127.0.0.1:{args.port}"
        procs.append(
            subprocess.Popen([*me, "--role", "agent", "--urls", ",".join(urls), "--gpus",
                              str(args.gpus), "--interval", str(args.interval), "--listen", listen])
        )  # fmt: skip
        return asyncio.run(asyncio.wait_for(follow(args, listen, procs[1].pid), args.seconds + 60))
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        ports_file.unlink(missing_ok=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--role", choices=["bench", "replicas", "agent"], default="bench")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--port", type=int, default=19107)
    p.add_argument("--ports-file", default="")
    p.add_argument("--urls", default="")
    p.add_argument("--listen", default="")
    args = p.parse_args()
    if args.role == "replicas":
        asyncio.run(serve_replicas(args.replicas, args.ports_file))
    elif args.role == "agent":
        asyncio.run(serve_agent(args.urls.split(","), args.gpus, args.interval, args.listen))
    else:
        result = run_bench(args)
        print(json.dumps(result, indent=2))
        ok = (
            result["agent_cpu_pct_of_one_core"] <= 3.0
            and result["scrape_to_client_ms"]["p99"] <= 50
        )
        print("targets (cpu <= 3 %, p99 <= 50 ms):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
