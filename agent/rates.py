"""Rates and recent means from cumulative counters and histograms: pure arithmetic, no I/O.

Model servers publish running totals (tokens, TTFT sum and count, prefix-cache hits). What the
gateway and controller want is *recent* behaviour: tokens per second and mean TTFT/TPOT over the
last few seconds. `RateWindow` keeps the last few cumulative readings of one replica and derives
those from the first and last reading inside the window. A total that goes down means the server
restarted: the new total is then the whole delta since the restart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Totals:
    """The cumulative values of one replica at one instant (None where the engine has none)."""

    at: float
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    ttft_sum: float | None = None
    ttft_count: float | None = None
    tpot_sum: float | None = None
    tpot_count: float | None = None
    prefix_queries: float | None = None
    prefix_hits: float | None = None


@dataclass(frozen=True)
class Recent:
    """What a window of totals says about the recent past."""

    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    prefix_cache_hit_ratio: float | None = None


def counter_delta(prev: float | None, cur: float | None) -> float | None:
    """Increase of a counter; after a reset (the value went down) the new value is the increase."""
    if prev is None or cur is None:
        return None
    return cur - prev if cur >= prev else cur


def counter_rate(prev: float | None, cur: float | None, dt: float) -> float | None:
    delta = counter_delta(prev, cur)
    if delta is None or dt <= 0:
        return None
    return delta / dt


def histogram_mean(
    prev_sum: float | None, prev_count: float | None, cur_sum: float | None, cur_count: float | None
) -> float | None:
    """Mean of the observations made between two readings of a histogram; None if there were none."""
    if None in (prev_sum, prev_count, cur_sum, cur_count):
        return None
    assert prev_count is not None and cur_count is not None
    assert prev_sum is not None and cur_sum is not None
    if cur_count < prev_count:  # restarted: everything since the restart is new
        prev_sum, prev_count = 0.0, 0.0
    n = cur_count - prev_count
    if n <= 0:
        return None
    return max(0.0, (cur_sum - prev_sum) / n)


def hit_ratio(
    prev_queries: float | None,
    prev_hits: float | None,
    cur_queries: float | None,
    cur_hits: float | None,
) -> float | None:
    queries = counter_delta(prev_queries, cur_queries)
    hits = counter_delta(prev_hits, cur_hits)
    if queries is None or hits is None or queries <= 0:
        return None
    return min(1.0, max(0.0, hits / queries))


def recent(first: Totals, last: Totals) -> Recent:
    """Everything `Recent` holds, from two readings of the same replica."""
    dt = last.at - first.at
    return Recent(
        prompt_tokens_per_s=counter_rate(first.prompt_tokens, last.prompt_tokens, dt) or 0.0,
        generation_tokens_per_s=counter_rate(first.generation_tokens, last.generation_tokens, dt)
        or 0.0,
        ttft_s=histogram_mean(first.ttft_sum, first.ttft_count, last.ttft_sum, last.ttft_count),
        tpot_s=histogram_mean(first.tpot_sum, first.tpot_count, last.tpot_sum, last.tpot_count),
        prefix_cache_hit_ratio=hit_ratio(
            first.prefix_queries, first.prefix_hits, last.prefix_queries, last.prefix_hits
        ),
    )


class RateWindow:
    """The readings of one replica over the last `window_s` seconds.

    Latency means carry over: when no request finished inside the window, the last known mean
    stands (an idle replica keeps the TTFT it last showed rather than forgetting it).
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._readings: deque[Totals] = deque()
        self._last_ttft: float | None = None
        self._last_tpot: float | None = None
        self._last_hit: float | None = None

    def add(self, totals: Totals) -> Recent:
        readings = self._readings
        if readings and totals.at <= readings[-1].at:
            readings.clear()  # the clock went back; start over rather than divide by <= 0
        readings.append(totals)
        # Keep one reading at or before the window's start so the window spans window_s fully.
        while len(readings) > 2 and readings[1].at <= totals.at - self.window_s:
            readings.popleft()
        if len(readings) < 2:
            return Recent(ttft_s=self._last_ttft, tpot_s=self._last_tpot)
        r = recent(readings[0], readings[-1])
        self._last_ttft = r.ttft_s if r.ttft_s is not None else self._last_ttft
        self._last_tpot = r.tpot_s if r.tpot_s is not None else self._last_tpot
        self._last_hit = (
            r.prefix_cache_hit_ratio if r.prefix_cache_hit_ratio is not None else self._last_hit
        )
        return Recent(
            prompt_tokens_per_s=r.prompt_tokens_per_s,
            generation_tokens_per_s=r.generation_tokens_per_s,
            ttft_s=self._last_ttft,
            tpot_s=self._last_tpot,
            prefix_cache_hit_ratio=self._last_hit,
        )
