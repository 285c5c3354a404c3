"""`kvpilot demo` (`make demo`): the system running locally on emulated GPUs.

For now: two model servers (Llama-3.1-8B on an L4 and on an H100, time-scaled), a short bounded load
against them, and a live table of what each one reports through its vLLM-style `/metrics`:
throughput, TTFT, queue and KV-cache usage. Later issues add the agent, gateway and controller as
further components on the same stack: each is an async context manager entered on one
`AsyncExitStack`, so everything stops cleanly, in reverse order, however the demo ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass(frozen=True)
class ServerSpec:
    model: str
    gpu: str
    gpus: int = 1


@dataclass(frozen=True)
class DemoSettings:
    duration_s: float = 15.0  # wall seconds of load
    time_scale: float = 10.0
    concurrency: int = 32  # requests in flight across all servers
    refresh_s: float = 1.0
    seed: int = 0
    servers: tuple[ServerSpec, ...] = (
        ServerSpec("llama-3.1-8b", "l4"),
        ServerSpec("llama-3.1-8b", "h100"),
    )


# ---------------------------------------------------------------------------------------------
# Components


class ModelServerProcess:
    """`kvpilot modelserver` as a subprocess on a free loopback port (it picks; we read its line)."""

    def __init__(self, spec: ServerSpec, time_scale: float) -> None:
        self.spec = spec
        self.time_scale = time_scale
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.ready_line = ""
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._drain: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.spec.model} @ {self.spec.gpus}x {self.spec.gpu}"

    async def __aenter__(self) -> ModelServerProcess:
        args = [
            "--model", self.spec.model, "--gpu", self.spec.gpu, "--gpus", str(self.spec.gpus),
            "--port", "0", "--time-scale", str(self.time_scale), "--max-model-len", "16384",
        ]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvpilot", "modelserver", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        # Keep reading stderr so a chatty server never blocks on a full pipe.
        self._drain = asyncio.create_task(self._keep_tail(self.proc.stderr))
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=30)
        if not line:
            await self.proc.wait()
            await self._drain
            err = "\n".join(self.stderr_tail)
            raise RuntimeError(f"modelserver {self.name} did not start: {err}")
        self.ready_line = line.decode().strip()
        self.url = self.ready_line.split("listening on ")[1].split(",")[0]
        return self

    async def _keep_tail(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            await self._drain


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class ClientStats:
    sent: int = 0
    done: int = 0
    failed: int = 0
    ttft_s: list[float] = field(default_factory=list)  # modelled seconds (wall x time scale)


SYSTEM_PROMPTS = tuple(
    f"You are assistant #{i}. Answer carefully, cite sources, and keep a friendly tone. " * 6
    for i in range(3)
)


def request_body(rng: random.Random) -> dict[str, object]:
    """A mix: short chats sharing system prompts (prefix-cache hits), long documents, long answers."""
    kind = rng.random()
    if kind < 0.6:
        user = f"Question {rng.randrange(10**6)}: " + "tell me more " * rng.randint(2, 40)
        messages = [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": user},
        ]
        return {"messages": messages, "max_tokens": rng.choice((32, 64, 128)), "min_tokens": 16}
    if kind < 0.85:
        doc = " ".join(f"para{rng.randrange(10**6)}" for _ in range(rng.randint(100, 400)))
        return {
            "messages": [{"role": "user", "content": "Summarise: " + doc}],
            "max_tokens": 64,
            "ignore_eos": True,
        }
    return {
        "messages": [{"role": "user", "content": "Write an essay."}],
        "max_tokens": 400,
        "ignore_eos": True,
    }


async def _one_request(
    http: aiohttp.ClientSession,
    server: ModelServerProcess,
    body: dict[str, object],
    stats: ClientStats,
    scale: float,
) -> None:
    stats.sent += 1
    t0 = time.monotonic()
    first = None
    try:
        payload = {**body, "model": server.spec.model, "stream": True}
        async with http.post(server.url + "/v1/chat/completions", json=payload) as r:
            if r.status != 200:
                stats.failed += 1
                return
            async for line in r.content:
                if first is None and line.startswith(b"data: {"):
                    first = time.monotonic()
        stats.done += 1
        if first is not None:
            stats.ttft_s.append((first - t0) * scale)
    except aiohttp.ClientError:
        stats.failed += 1


async def run_load(
    servers: list[ModelServerProcess], settings: DemoSettings, stats: dict[str, ClientStats]
) -> None:
    """`concurrency` closed-loop clients, round-robin over the servers, until the duration ends."""
    rng = random.Random(settings.seed)
    deadline = time.monotonic() + settings.duration_s
    turn = iter(range(10**9))
    timeout = aiohttp.ClientTimeout(total=settings.duration_s + 30)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def client(seed: int) -> None:
            crng = random.Random(seed)
            while time.monotonic() < deadline:
                server = servers[next(turn) % len(servers)]
                await _one_request(
                    http, server, request_body(crng), stats[server.url], settings.time_scale
                )

        await asyncio.gather(*(client(rng.randrange(2**32)) for _ in range(settings.concurrency)))


# ---------------------------------------------------------------------------------------------
# Dashboard


@dataclass
class ServerView:
    """Deltas between two scrapes of one server's /metrics, in modelled time."""

    samples: dict[str, float] = field(default_factory=dict)
    at: float = 0.0
    gen_tok_s: float = 0.0
    prompt_tok_s: float = 0.0
    ttft_s: float | None = None
    hit_ratio: float | None = None


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_bucket") or s.name.endswith("_created"):
                continue
            out[s.name] = out.get(s.name, 0.0) + s.value  # summed over label sets
    return out


async def poll(
    http: aiohttp.ClientSession, server: ModelServerProcess, view: ServerView, scale: float
) -> None:
    async with http.get(server.url + "/metrics") as r:
        now, samples = time.monotonic(), parse_metrics(await r.text())
    if view.samples:
        prev, dt = view.samples, max(1e-6, (now - view.at) * scale)

        def delta(name: str) -> float:
            return samples.get(name, 0.0) - prev.get(name, 0.0)

        view.gen_tok_s = delta("vllm:generation_tokens_total") / dt
        view.prompt_tok_s = delta("vllm:prompt_tokens_total") / dt
        n = delta("vllm:time_to_first_token_seconds_count")
        if n > 0:
            view.ttft_s = delta("vllm:time_to_first_token_seconds_sum") / n
        q = delta("vllm:prefix_cache_queries_total")
        if q > 0:
            view.hit_ratio = delta("vllm:prefix_cache_hits_total") / q
    view.samples, view.at = samples, now


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def render(
    servers: list[ModelServerProcess],
    views: dict[str, ServerView],
    stats: dict[str, ClientStats],
    elapsed: float,
    scale: float,
) -> Table:
    models = ", ".join(sorted({s.spec.model for s in servers}))
    t = Table(
        title=f"kvpilot demo: {models}, {elapsed:4.1f} s, time scale {scale:g}x (modelled time)"
    )
    columns = (
        "GPU",
        "run",
        "wait",
        "KV used",
        "prefix hit",
        "prompt tok/s",
        "gen tok/s",
        "TTFT ms",
        "done",
    )
    for col in columns:
        t.add_column(col, justify="left" if col == "GPU" else "right")
    for s in servers:
        v, c = views[s.url], stats[s.url]
        t.add_row(
            f"{s.spec.gpus}x {s.spec.gpu}",
            f"{v.samples.get('vllm:num_requests_running', 0):.0f}",
            f"{v.samples.get('vllm:num_requests_waiting', 0):.0f}",
            f"{v.samples.get('vllm:kv_cache_usage_perc', 0) * 100:.1f}%",
            "-" if v.hit_ratio is None else f"{v.hit_ratio * 100:.0f}%",
            f"{v.prompt_tok_s:,.0f}",
            f"{v.gen_tok_s:,.0f}",
            _ms(v.ttft_s),
            f"{c.done}",
        )
    return t


def plain_line(
    servers: list[ModelServerProcess], views: dict[str, ServerView], elapsed: float
) -> str:
    parts = []
    for s in servers:
        v = views[s.url]
        parts.append(
            f"{s.spec.gpu}: run {v.samples.get('vllm:num_requests_running', 0):.0f} "
            f"wait {v.samples.get('vllm:num_requests_waiting', 0):.0f} "
            f"KV {v.samples.get('vllm:kv_cache_usage_perc', 0) * 100:.1f}% "
            f"gen {v.gen_tok_s:,.0f} tok/s TTFT {_ms(v.ttft_s)} ms"
        )
    return f"[{elapsed:5.1f}s] " + " | ".join(parts)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


async def watch(
    servers: list[ModelServerProcess], settings: DemoSettings, stats: dict[str, ClientStats],
    show: Callable[[float, dict[str, ServerView]], None], done: asyncio.Event,
) -> dict[str, ServerView]:  # fmt: skip
    views = {s.url: ServerView() for s in servers}
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            for s in servers:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await poll(http, s, views[s.url], settings.time_scale)
            show(time.monotonic() - start, views)
            if done.is_set():
                return views
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=settings.refresh_s)


# ---------------------------------------------------------------------------------------------
# The demo


async def run_demo(settings: DemoSettings, console: Console) -> int:
    async with contextlib.AsyncExitStack() as stack:
        console.print(
            f"starting {len(settings.servers)} model servers (time scale {settings.time_scale:g}x) ..."
        )
        servers = list(
            await asyncio.gather(
                *(
                    stack.enter_async_context(ModelServerProcess(s, settings.time_scale))
                    for s in settings.servers
                )
            )
        )
        for s in servers:
            console.print("  " + s.ready_line)
        # Later issues enter the agent, gateway and controller here, on the same stack.
        stats = {s.url: ClientStats() for s in servers}
        console.print(
            f"load: {settings.concurrency} concurrent streaming chat clients for {settings.duration_s:g} s, "
            "round-robin over the servers"
        )
        done = asyncio.Event()
        live = Live(console=console, refresh_per_second=4) if console.is_terminal else None

        def show(elapsed: float, views: dict[str, ServerView]) -> None:
            if live is not None:
                live.update(render(servers, views, stats, elapsed, settings.time_scale))
            else:
                console.print(plain_line(servers, views, elapsed), highlight=False)

        with live if live is not None else contextlib.nullcontext():
            watcher = asyncio.create_task(watch(servers, settings, stats, show, done))
            try:
                await run_load(servers, settings, stats)
            finally:
                done.set()
                views = await watcher
        console.print("summary (modelled time):", highlight=False)
        for s in servers:
            c, v = stats[s.url], views[s.url]
            total_gen = v.samples.get("vllm:generation_tokens_total", 0.0)
            modelled = max(1e-9, settings.duration_s * settings.time_scale)
            p50, p90 = percentile(c.ttft_s, 0.5), percentile(c.ttft_s, 0.9)
            console.print(
                f"  {s.name}: {c.done} requests ({c.failed} failed), "
                f"{total_gen / modelled:,.0f} gen tok/s average, "
                f"client TTFT p50 {_ms(p50)} ms p90 {_ms(p90)} ms, "
                f"preemptions {v.samples.get('vllm:num_preemptions_total', 0):.0f}",
                highlight=False,
            )
        failed = sum(c.failed for c in stats.values())
    console.print("all servers stopped.")
    return 0 if failed == 0 else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="kvpilot demo", description="Run kvpilot locally on emulated GPUs."
    )
    p.add_argument(
        "--duration", type=float, default=DemoSettings.duration_s, help="seconds of load (wall)"
    )
    p.add_argument("--time-scale", type=float, default=DemoSettings.time_scale)
    p.add_argument("--concurrency", type=int, default=DemoSettings.concurrency)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.duration <= 0 or args.time_scale <= 0 or args.concurrency <= 0:
        p.error("--duration, --time-scale and --concurrency must be > 0")
    settings = DemoSettings(
        duration_s=args.duration,
        time_scale=args.time_scale,
        concurrency=args.concurrency,
        seed=args.seed,
    )
    try:
        return asyncio.run(run_demo(settings, Console(soft_wrap=True)))
    except KeyboardInterrupt:
        return 130
