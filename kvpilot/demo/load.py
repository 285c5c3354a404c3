"""The demo's load: closed-loop streaming chat clients through the gateway, and what they saw."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp

from kvpilot.demo.fleet import DemoSettings


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    throttled: int = 0  # 429 from the gateway: every replica saturated and the queue full
    failed: int = 0
    chunks: int = 0  # streamed content chunks (about one token each)
    # Wall seconds: the gateway's and the client's own time is real, only the engines run
    # `time_scale` x faster, so scaling this up would blow the proxy's share up with it.
    ttft_s: list[float] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0


SYSTEM_PROMPTS = tuple(
    f"You are assistant #{i}. Answer carefully, cite sources, and keep a friendly tone. " * 6
    for i in range(3)
)


def request_body(rng: random.Random, model: str) -> dict[str, object]:
    """A mix: short chats sharing system prompts (prefix-cache hits), long documents, long answers."""
    kind = rng.random()
    if kind < 0.6:
        user = f"Question {rng.randrange(10**6)}: " + "tell me more " * rng.randint(2, 40)
        messages = [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": user},
        ]
        body: dict[str, object] = {
            "messages": messages,
            "max_tokens": rng.choice((32, 64, 128)),
            "min_tokens": 16,
        }
    elif kind < 0.85:
        doc = " ".join(f"para{rng.randrange(10**6)}" for _ in range(rng.randint(100, 400)))
        body = {
            "messages": [{"role": "user", "content": "Summarise: " + doc}],
            "max_tokens": 64,
            "ignore_eos": True,
        }
    else:
        body = {
            # Unique: the emulated engine names a request by its prompt's hash, and concurrent
            # identical prompts can collide there (see the lead's notes on modelserver).
            "messages": [{"role": "user", "content": f"Write essay {rng.randrange(10**9)}."}],
            "max_tokens": 400,
            "ignore_eos": True,
        }
    return {**body, "model": model, "stream": True}


async def one_request(
    http: aiohttp.ClientSession, base: str, body: dict[str, object], st: LoadStats
) -> None:
    st.sent += 1
    t0 = time.monotonic()
    first = None
    try:
        async with http.post(base + "/chat/completions", json=body) as r:
            if r.status == 429:
                st.throttled += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")) / 4)
                return
            if r.status != 200:
                st.failed += 1
                return
            async for line in r.content:
                if line.startswith(b"data: {"):
                    st.chunks += 1
                    if first is None:
                        first = time.monotonic()
                elif line.startswith(b"event: error"):
                    st.failed += 1
                    return
        st.ok += 1
        if first is not None:
            st.ttft_s.append(first - t0)
    except (aiohttp.ClientError, TimeoutError):
        st.failed += 1


async def run_load(base: str, settings: DemoSettings, st: LoadStats, stop: asyncio.Event) -> None:
    """`concurrency` closed-loop streaming chat clients until the duration ends (or a stop)."""
    rng = random.Random(settings.seed)
    deadline = time.monotonic() + settings.duration_s
    st.started_at = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=settings.duration_s + 30)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def client(seed: int) -> None:
            crng = random.Random(seed)
            while time.monotonic() < deadline and not stop.is_set():
                body = request_body(crng, settings.model)
                await one_request(http, base, body, st)

        await asyncio.gather(*(client(rng.randrange(2**32)) for _ in range(settings.concurrency)))
    st.ended_at = time.monotonic()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]
