"""Seeded workload traces: who asks what, and when.

A request's prompt is a list of *segments* (key, length). A segment's token ids are a pure function
of its key (see sim/tokens.py), so two prompts that share leading segments share exactly the same
leading token ids: the engine's prefix cache and the gateway's prefix hashes both see the sharing.

Request *sizes* come from a generator seeded by `seed` alone and arrival *times* from another, so a
trace at a different rate has the same requests, only closer together. That keeps "load 0.8" and
"load 0.9" comparable, and lets the load calibration's closed loop draw from the same sizes.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

WORKLOADS = ("sharegpt", "prefill-heavy", "decode-heavy", "shared-prefix", "mixed-bursty", "azure")

# Segment keys: shared system prompts live below UNIQUE_BASE, everything else above it.
UNIQUE_BASE = 1_000_000


@dataclass(frozen=True, slots=True)
class SimRequest:
    request_id: str
    arrival_s: float
    segments: tuple[tuple[int, int], ...]  # (segment key, tokens) in prompt order
    output_tokens: int  # what the model will actually generate (the engine runs with ignore_eos)
    max_tokens: int | None  # what the client sends: an upper bound, or nothing
    kind: str  # the request's class, for break-downs: "chat", "prefill", "decode", "shared"

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.segments)


@dataclass(frozen=True)
class _Size:
    segments: tuple[tuple[int, int], ...]
    output_tokens: int
    max_tokens: int | None
    kind: str


def _clip(x: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(x))))


class SegmentKeys:
    """Hands out unique segment keys (no sharing between requests)."""

    def __init__(self) -> None:
        self.next = UNIQUE_BASE

    def __call__(self) -> int:
        self.next += 1
        return self.next


def _chat(rng: random.Random, key: SegmentKeys) -> _Size:
    # ShareGPT as vLLM's benchmark sees it: prompts median ~250 tokens, outputs median ~180, long tails.
    p = _clip(rng.lognormvariate(math.log(250), 1.0), 4, 4096)
    o = _clip(rng.lognormvariate(math.log(180), 0.9), 1, 2048)
    return _Size(((key(), p),), o, None, "chat")


def _prefill(rng: random.Random, key: SegmentKeys) -> _Size:
    # Summarisation: long documents (log-uniform 1k-8k tokens), short answers capped at 128.
    p = _clip(math.exp(rng.uniform(math.log(1024), math.log(8192))), 1024, 8192)
    o = rng.randint(16, 128)
    return _Size(((key(), p),), o, 128, "prefill")


def _decode(rng: random.Random, key: SegmentKeys) -> _Size:
    # Generation: short instructions, long answers (500-2000 tokens), client cap 2048.
    p = rng.randint(32, 256)
    o = rng.randint(500, 2000)
    return _Size(((key(), p),), o, 2048, "decode")


SIZERS: dict[str, Callable[[random.Random, SegmentKeys], _Size]] = {
    "sharegpt": _chat,
    "prefill-heavy": _prefill,
    "decode-heavy": _decode,
}


def _poisson_times(rng: random.Random, rate: float, duration_s: float) -> Iterator[float]:
    t = 0.0
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return
        yield t


def _simple(
    sizer: Callable[[random.Random, SegmentKeys], _Size], rate: float, duration_s: float, seed: int
) -> list[SimRequest]:
    times = random.Random(f"times-{seed}")
    sizes = random.Random(f"sizes-{seed}")
    key = SegmentKeys()
    out = []
    for i, t in enumerate(_poisson_times(times, rate, duration_s)):
        s = sizer(sizes, key)
        out.append(SimRequest(f"r{i}", t, s.segments, s.output_tokens, s.max_tokens, s.kind))
    return out


@dataclass(frozen=True)
class SharedPrefixShape:
    groups: int = 64  # distinct system prompts: 64 x ~4k tokens, far more than one L4's KV cache
    system_min: int = 2048
    system_max: int = 6144
    zipf_s: float = 0.8  # group popularity
    mean_turns: float = 4.0
    think_s: float = 10.0  # mean gap between a session's turns
    user_min: int = 32
    user_max: int = 320
    answer_min: int = 64
    answer_max: int = 400


def _shared_prefix(
    rate: float, duration_s: float, seed: int, shape: SharedPrefixShape = SharedPrefixShape()
) -> list[SimRequest]:
    sizes = random.Random(f"sizes-{seed}")
    times = random.Random(f"times-{seed}")
    system = [sizes.randint(shape.system_min, shape.system_max) for _ in range(shape.groups)]
    weights = [1.0 / (g + 1) ** shape.zipf_s for g in range(shape.groups)]
    cum = [sum(weights[: g + 1]) for g in range(shape.groups)]
    key = SegmentKeys()
    reqs: list[tuple[float, tuple[tuple[int, int], ...], int, str]] = []
    session_rate = rate / shape.mean_turns
    for start in _poisson_times(times, session_rate, duration_s):
        g = bisect.bisect_left(cum, sizes.random() * cum[-1])
        turns = 1 + int(math.log(1 - sizes.random()) / math.log(1 - 1 / shape.mean_turns))
        segs: list[tuple[int, int]] = [(g, system[g])]
        t = start
        for _ in range(turns):
            if t >= duration_s:
                break
            segs.append((key(), sizes.randint(shape.user_min, shape.user_max)))
            answer = sizes.randint(shape.answer_min, shape.answer_max)
            reqs.append((t, tuple(segs), answer, "shared"))
            # The next turn carries this answer in its history (the engine's own generated ids
            # differ, so the answer itself is a cache miss next turn; the history before it hits).
            segs.append((key(), answer))
            t += times.expovariate(1 / shape.think_s)
    reqs.sort(key=lambda r: r[0])
    return [SimRequest(f"r{i}", t, s, o, None, k) for i, (t, s, o, k) in enumerate(reqs)]


@dataclass(frozen=True)
class BurstShape:
    mix: tuple[tuple[str, float], ...] = (
        ("sharegpt", 0.5),
        ("prefill-heavy", 0.25),
        ("decode-heavy", 0.25),
    )
    diurnal_amplitude: float = 0.4  # one compressed "day" over the run, starting at the trough
    burst_on_s: float = 20.0  # mean length of a burst
    burst_off_s: float = 40.0  # mean gap between bursts
    burst_high: float = 2.0  # rate multiplier during a burst
    burst_low: float = 0.5  # and between bursts (mean over time ~1.0)


def rate_curve(
    duration_s: float, seed: int, shape: BurstShape = BurstShape()
) -> Callable[[float], float]:
    """The mixed-bursty rate multiplier over time, normalised to mean 1 over the run."""
    rng = random.Random(f"bursts-{seed}")
    edges: list[float] = [0.0]
    levels: list[float] = []
    on = False
    t = 0.0
    while t < duration_s:
        t += rng.expovariate(1 / (shape.burst_on_s if on else shape.burst_off_s))
        levels.append(shape.burst_high if on else shape.burst_low)
        edges.append(t)
        on = not on

    def raw(x: float) -> float:
        day = 1 - shape.diurnal_amplitude * math.cos(2 * math.pi * x / duration_s)
        return day * levels[min(len(levels) - 1, bisect.bisect_right(edges, x) - 1)]

    n = 2000
    mean = sum(raw((i + 0.5) * duration_s / n) for i in range(n)) / n
    return lambda x: raw(x) / mean


def _mixed_bursty(
    rate: float, duration_s: float, seed: int, shape: BurstShape = BurstShape()
) -> list[SimRequest]:
    curve = rate_curve(duration_s, seed, shape)
    peak = max(curve(i * duration_s / 4000) for i in range(4000)) * 1.05
    times = random.Random(f"times-{seed}")
    sizes = random.Random(f"sizes-{seed}")
    names = [n for n, _ in shape.mix]
    cum = [sum(w for _, w in shape.mix[: i + 1]) for i in range(len(shape.mix))]
    key = SegmentKeys()
    out = []
    for t in _poisson_times(times, rate * peak, duration_s):
        if times.random() * peak > curve(t):  # thinning: a non-homogeneous Poisson process
            continue
        name = names[bisect.bisect_left(cum, sizes.random() * cum[-1])]
        s = SIZERS[name](sizes, key)
        out.append(SimRequest(f"r{len(out)}", t, s.segments, s.output_tokens, s.max_tokens, s.kind))
    return out


# ---- Azure LLM inference trace replay -------------------------------------------------------


@dataclass(frozen=True)
class AzureRow:
    t: float  # seconds since the trace's first row
    context_tokens: int
    generated_tokens: int


def _parse_time(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    head, _, frac = s.partition(".")
    base = datetime.fromisoformat(head.replace("T", " "))
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: str | Path, max_context: int = 16384) -> list[AzureRow]:
    """Rows of an Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    rows = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            try:
                t = _parse_time(rec["TIMESTAMP"])
                ctx = int(float(rec["ContextTokens"]))
                gen = int(float(rec["GeneratedTokens"]))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: not an Azure LLM trace row ({e}): {rec}") from None
            rows.append((t, max(1, min(ctx, max_context)), max(1, gen)))
    if not rows:
        raise ValueError(f"{path}: no rows")
    rows.sort()
    t0 = rows[0][0]
    return [AzureRow(t - t0, c, g) for t, c, g in rows]


def azure_native_rate(rows: list[AzureRow]) -> float:
    span = rows[-1].t - rows[0].t
    return (len(rows) - 1) / span if span > 0 else float(len(rows))


def _azure(rows: list[AzureRow], rate: float, duration_s: float) -> list[SimRequest]:
    """Replay with the trace's own inter-arrival pattern, time-scaled to `rate`, looped to fill `duration_s`."""
    scale = azure_native_rate(rows) / rate if rate > 0 else 1.0
    period = (rows[-1].t + (rows[-1].t - rows[0].t) / max(1, len(rows) - 1)) * scale
    key = SegmentKeys()
    out: list[SimRequest] = []
    lap = 0
    while rate > 0 and period > 0:
        for r in rows:
            t = lap * period + r.t * scale
            if t >= duration_s:
                return out
            out.append(
                SimRequest(
                    f"r{len(out)}",
                    t,
                    ((key(), r.context_tokens),),
                    r.generated_tokens,
                    None,
                    "azure",
                )
            )
        lap += 1
    return out


def make_trace(
    workload: str,
    rate: float,
    duration_s: float,
    seed: int,
    *,
    trace_file: str | Path | None = None,
) -> list[SimRequest]:
    """The requests of `workload` arriving at mean `rate` per second over `duration_s`, sorted by time."""
    if workload in SIZERS:
        return _simple(SIZERS[workload], rate, duration_s, seed)
    if workload == "shared-prefix":
        return _shared_prefix(rate, duration_s, seed)
    if workload == "mixed-bursty":
        return _mixed_bursty(rate, duration_s, seed)
    if workload == "azure":
        if trace_file is None:
            raise ValueError("workload 'azure' needs a trace file (--trace FILE.csv)")
        return _azure(load_azure_csv(trace_file), rate, duration_s)
    raise ValueError(f"unknown workload {workload!r}; expected one of {list(WORKLOADS)}")


def write_azure_sample(path: str | Path, n: int = 200, seed: int = 0) -> None:
    """A small synthetic file in the Azure trace format (for tests and examples)."""
    rng = random.Random(seed)
    t = datetime(2023, 11, 16, 18, 0, 0).timestamp()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for _ in range(n):
            t += rng.expovariate(2.0) * (3.0 if rng.random() < 0.1 else 1.0)
            stamp = datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f") + "0"
            ctx = _clip(rng.lognormvariate(math.log(1200), 0.9), 8, 8000)
            gen = _clip(rng.lognormvariate(math.log(120), 1.0), 1, 1500)
            w.writerow([stamp, ctx, gen])
