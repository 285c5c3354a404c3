"""From per-request records to the numbers a routing comparison reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sim.simulator import RequestRecord, Simulation
from sim.slo import Slo


@dataclass(frozen=True)
class RunMetrics:
    requests: int  # measured requests (arrived after the warm-up)
    completed: int
    failed: int  # rejected by the engine (too long) or never answered before the run ended
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    e2e_p99_s: float
    queue_p99_s: float  # time waiting at the gateway (policy said "saturated")
    throughput_tok_s: float  # generated tokens per second over the run
    goodput_ratio: float  # share of measured requests meeting both TTFT and TPOT targets
    preemptions: int
    kv_usage_mean: float  # mean over replicas and scrapes
    kv_usage_max: float
    prefix_hit_ratio: float  # prompt tokens served from prefix caches

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    pos = (n - 1) * q
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarise(
    sim: Simulation, records: Sequence[RequestRecord], slo: Slo, warmup_s: float = 0.0
) -> RunMetrics:
    end = sim.end_s
    records = [r for r in records if not r.direct]  # traffic the gateway did not route
    measured = [r for r in records if r.req.arrival_s >= warmup_s]
    ttft: list[float] = []
    tpot: list[float] = []
    e2e: list[float] = []
    queue: list[float] = []
    good = failed = completed = 0
    tokens = 0
    prompt = cached = 0
    first_arrival = min((r.req.arrival_s for r in records), default=0.0)
    last_finish = first_arrival
    for r in records:
        if r.finish_s is not None and r.error is None:
            tokens += r.generated
            last_finish = max(last_finish, r.finish_s)
    for r in measured:
        arrival = r.req.arrival_s
        queue.append((r.dispatched_s if r.dispatched_s is not None else end) - arrival)
        if r.error is not None or r.finish_s is None:
            failed += 1
            # never answered: censored at the end of the run (a lower bound on the real wait)
            ttft.append((r.first_token_s if r.first_token_s is not None else end) - arrival)
            e2e.append(end - arrival)
            continue
        completed += 1
        t1 = r.first_token_s - arrival  # type: ignore[operator]
        t2 = r.tpot_s or 0.0
        ttft.append(t1)
        e2e.append(r.finish_s - arrival)
        if r.generated > 1:
            tpot.append(t2)
        prompt += r.req.prompt_tokens
        cached += r.cached_tokens
        if t1 <= slo.ttft_target(r.req.prompt_tokens) and t2 <= slo.tpot_s:
            good += 1
    for xs in (ttft, tpot, e2e, queue):
        xs.sort()
    reps = sim.all_replicas()
    samples = sum(r.kv_samples for r in reps)
    return RunMetrics(
        requests=len(measured),
        completed=completed,
        failed=failed,
        ttft_p50_s=percentile(ttft, 0.5),
        ttft_p90_s=percentile(ttft, 0.9),
        ttft_p99_s=percentile(ttft, 0.99),
        tpot_p50_s=percentile(tpot, 0.5),
        tpot_p99_s=percentile(tpot, 0.99),
        e2e_p99_s=percentile(e2e, 0.99),
        queue_p99_s=percentile(queue, 0.99),
        throughput_tok_s=tokens / (last_finish - first_arrival)
        if last_finish > first_arrival
        else 0.0,
        goodput_ratio=good / len(measured) if measured else 0.0,
        preemptions=sim.preemptions,
        kv_usage_mean=sum(r.kv_sum for r in reps) / samples if samples else 0.0,
        kv_usage_max=max((r.kv_max for r in reps), default=0.0),
        prefix_hit_ratio=cached / prompt if prompt else 0.0,
    )
