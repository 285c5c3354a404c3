"""Model-server overhead: can one process keep >= 500 concurrent streams at --time-scale 1?

Starts one `kvpilot modelserver` (Llama-3.1-8B on one emulated H100, real time) and holds `--streams`
concurrent streaming completions against it from this process (closed loop: a finished stream is
replaced at once) for a bounded time. Over a measurement window after the ramp it reads the server's
own counters from /metrics:

- scheduler CPU per step: `time.thread_time()` around `Engine.step()` in the server
  (`kvpilot_modelserver_engine_step_cpu_seconds_total`), against the GPU time those steps model
  (`kvpilot_modelserver_engine_step_modelled_seconds_total`). Target: below 10 %.
- whether the process kept real time: modelled seconds run per wall second (1.0 = kept pace),
  resyncs (times it fell > 0.1 s behind), and the whole server process's CPU (HTTP, SSE, metrics
  included) from /proc.

Usage: .venv/bin/python bench/modelserver_overhead.py [--streams 500] [--duration 40] [--window 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

MODEL = "llama-3.1-8b"


def _metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass
class Load:
    tokens: int = 0
    finished: int = 0
    failed: int = 0
    open: int = 0


async def stream_forever(
    http: aiohttp.ClientSession, url: str, rng: random.Random, load: Load, stop_at: float
) -> None:
    while time.monotonic() < stop_at:
        body = {
            "model": MODEL,
            "prompt": "x" * rng.randint(200, 800),
            "max_tokens": rng.randint(200, 400),
            "ignore_eos": True,
            "stream": True,
            "seed": rng.randrange(2**31),
        }
        load.open += 1
        try:
            async with http.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    load.failed += 1
                    continue
                async for chunk in r.content.iter_any():
                    load.tokens += chunk.count(b"data: {")
                    if time.monotonic() > stop_at:
                        break
            load.finished += 1
        except (aiohttp.ClientError, TimeoutError):
            load.failed += 1
        finally:
            load.open -= 1


async def main_async(args: argparse.Namespace) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvpilot", "modelserver", "--model", MODEL, "--gpu", "h100",
        "--port", "0", "--time-scale", "1", "--max-num-seqs", str(max(1024, args.streams)),
        "--max-model-len", "8192",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
    url = line.split("listening on ")[1].split(",")[0]
    print(line.strip())
    load = Load()
    rng = random.Random(0)
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=args.duration + 30)
        ) as http:
            clients = [
                asyncio.create_task(
                    stream_forever(http, url, random.Random(rng.random()), load, stop_at)
                )
                for _ in range(args.streams)
            ]

            async def snapshot() -> tuple[float, dict[str, float], float, int]:
                async with http.get(url + "/metrics") as r:
                    m = _metrics(await r.text())
                return time.monotonic(), m, _proc_cpu_s(proc.pid), load.tokens

            ramp = args.duration - args.window - 5.0
            await asyncio.sleep(ramp)
            w0, m0, cpu0, tok0 = await snapshot()
            window_end = min(w0 + args.window, stop_at - 3.0)  # clients stop at stop_at
            running_min, running_max, open_min = 10**9, 0, load.open
            while time.monotonic() < window_end:
                await asyncio.sleep(min(1.0, max(0.0, window_end - time.monotonic())))
                open_min = min(open_min, load.open)
                _, m, _, _ = await snapshot()
                running = int(m["vllm:num_requests_running"])
                running_min, running_max = min(running_min, running), max(running_max, running)
            w1, m1, cpu1, tok1 = await snapshot()
            await asyncio.gather(*clients)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=20)

    def d(name: str) -> float:
        return m1[name] - m0[name]

    wall = w1 - w0
    steps = d("kvpilot_modelserver_engine_steps_total")
    cpu = d("kvpilot_modelserver_engine_step_cpu_seconds_total")
    modelled = d("kvpilot_modelserver_engine_step_modelled_seconds_total")
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    )
    print(
        f"streams held: {args.streams} (open at least {open_min}); engine running {running_min}-{running_max}"
    )
    print(f"window: {wall:.1f} s wall, {steps:.0f} steps, {d('vllm:generation_tokens_total'):.0f} tokens generated, "
          f"{(tok1 - tok0) / wall:,.0f} tokens/s received by clients")  # fmt: skip
    print(
        f"modelled step: {modelled / steps * 1e3:.2f} ms mean; scheduler CPU per step: {cpu / steps * 1e3:.3f} ms"
    )
    print(f"scheduler CPU / modelled step time: {cpu / modelled * 100:.2f} %  (target < 10 %)")
    print(
        f"real-time factor (modelled s per wall s): {modelled / wall:.3f}; resyncs: {d('kvpilot_modelserver_engine_resyncs_total'):.0f}"
    )
    print(
        f"server process CPU: {(cpu1 - cpu0) / wall * 100:.0f} % of one core (HTTP + SSE + engine)"
    )
    print(f"client failures: {load.failed}")
    ok = cpu / modelled < 0.10 and open_min >= 500 and load.failed == 0
    return 0 if ok else 1


def engine_alone(streams: int, steps: int = 400) -> tuple[float, float, int]:
    """The same load shape on the engine alone, in virtual time, no HTTP: a quiet reference.

    Returns (scheduler CPU per step, modelled step time, requests running at the end)."""
    from modelserver import profiles
    from modelserver.scheduler import Engine, EngineConfig

    engine = Engine(
        EngineConfig(
            profiles.resolve_model(MODEL),
            profiles.resolve_gpu("h100"),
            max_num_seqs=max(1024, streams),
            max_model_len=8192,
        )
    )
    rng = random.Random(0)
    count = 0

    def add() -> None:
        nonlocal count
        count += 1
        prompt = [120] * rng.randint(200, 800)
        engine.add_request(str(count), prompt, rng.randint(200, 400), ignore_eos=True)

    for _ in range(streams):
        add()
    now = cpu = modelled = 0.0
    for i in range(2 * steps):  # the first half ramps up (prefill of the initial burst)
        c0 = time.thread_time()
        out = engine.step(now)
        c1 = time.thread_time()
        now += out.duration_s
        if i >= steps:
            cpu, modelled = cpu + c1 - c0, modelled + out.duration_s
        for tok in out.outputs:
            if tok.finish_reason is not None:
                add()
    return cpu / steps, modelled / steps, engine.stats().num_running


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--duration", type=float, default=40.0, help="total wall seconds (<= 60)")
    p.add_argument("--window", type=float, default=20.0, help="measured seconds at the end")
    args = p.parse_args()
    if not 0 < args.window <= args.duration - 10 or args.duration > 60:
        p.error("need 0 < window <= duration - 10 and duration <= 60")
    cpu, step, running = engine_alone(args.streams)
    print(
        f"engine alone (virtual time, {running} running): scheduler CPU {cpu * 1e3:.3f} ms per "
        f"{step * 1e3:.2f} ms modelled step = {cpu / step * 100:.2f} %"
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
