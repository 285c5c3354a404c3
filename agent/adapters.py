"""Model-server adapters: one small table per engine from its metric names to our fields.

Each engine publishes the same few facts under its own names (queue depth, running batch, KV-cache
usage, token counters, latency histograms). An `Adapter` lists, per fact, the names to look for,
newest first, so one table reads both current and older releases (vLLM renamed its KV gauge from
`vllm:gpu_cache_usage_perc` to `vllm:kv_cache_usage_perc`). `read_metrics` keeps only the lines an
adapter needs (cheap string work; label sets through prometheus-client's parser), and returns
an `EngineReading`: gauges as they are and counters as totals for `agent.rates` to difference.

Where an engine spreads a fact over several series (one per model or per data-parallel engine),
counts and totals are summed and ratios averaged.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import parse_labels

from agent.rates import Totals
from kvpilot.signals import ReplicaState

Series = list[tuple[dict[str, str], float]]


class MetricsFormatError(ValueError):
    """The text is not Prometheus exposition format, or carries none of the engine's metrics."""


@dataclass(frozen=True)
class Adapter:
    engine: str
    waiting: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    kv_usage: tuple[str, ...] = ()  # gauges, 0-1
    prompt_tokens: tuple[str, ...] = ()  # counter samples (or a histogram's _sum)
    generation_tokens: tuple[str, ...] = ()
    ttft: tuple[str, ...] = ()  # histogram base names
    tpot: tuple[str, ...] = ()
    prefix_queries: tuple[str, ...] = ()  # counters
    prefix_hits: tuple[str, ...] = ()
    prefix_hit_ratio: tuple[str, ...] = ()  # gauges, for engines that publish the ratio itself
    preemptions: tuple[str, ...] = ()
    kv_blocks: tuple[str, ...] = ()  # gauge: blocks (or token slots) in the KV cache
    kv_block_size: tuple[str, ...] = ()  # gauge: tokens per block
    cache_info: str = ""  # info gauge with labels block_size and num_gpu_blocks (vLLM)
    lora_info: str = ""  # info gauge with running/waiting adapter labels (vLLM)

    def wanted(self) -> frozenset[str]:
        """Every sample name this adapter reads: the line filter keeps only these."""
        names: set[str] = set()
        for f in (
            self.waiting,
            self.running,
            self.kv_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_queries,
            self.prefix_hits,
            self.prefix_hit_ratio,
            self.preemptions,
            self.kv_blocks,
            self.kv_block_size,
        ):
            names.update(f)
        for h in self.ttft + self.tpot:
            names.update((f"{h}_sum", f"{h}_count"))
        names.update(n for n in (self.cache_info, self.lora_info) if n)
        return frozenset(names)


VLLM = Adapter(
    engine="vllm",
    waiting=("vllm:num_requests_waiting",),
    running=("vllm:num_requests_running",),
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    prompt_tokens=("vllm:prompt_tokens_total",),
    generation_tokens=("vllm:generation_tokens_total",),
    ttft=("vllm:time_to_first_token_seconds",),
    tpot=(
        "vllm:request_time_per_output_token_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:inter_token_latency_seconds",
    ),
    prefix_queries=("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    prefix_hits=("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    prefix_hit_ratio=("vllm:gpu_prefix_cache_hit_rate",),
    preemptions=("vllm:num_preemptions_total",),
    cache_info="vllm:cache_config_info",
    lora_info="vllm:lora_requests_info",
)

SGLANG = Adapter(
    engine="sglang",
    waiting=("sglang:num_queue_reqs",),
    running=("sglang:num_running_reqs",),
    kv_usage=("sglang:token_usage",),
    prompt_tokens=("sglang:prompt_tokens_total",),
    generation_tokens=("sglang:generation_tokens_total",),
    ttft=("sglang:time_to_first_token_seconds",),
    tpot=("sglang:time_per_output_token_seconds", "sglang:inter_token_latency_seconds"),
    prefix_hit_ratio=("sglang:cache_hit_rate",),
    preemptions=("sglang:num_retracted_reqs",),
    kv_blocks=("sglang:max_total_num_tokens",),  # the radix cache is token-granular: block = 1
)

TGI = Adapter(
    engine="tgi",
    waiting=("tgi_queue_size",),
    running=("tgi_batch_current_size",),
    # TGI publishes no KV-cache gauge and no TTFT; token totals are histogram sums.
    prompt_tokens=("tgi_request_input_length_sum",),
    generation_tokens=("tgi_request_generated_tokens_sum",),
    tpot=("tgi_request_mean_time_per_token_duration",),
)

TRTLLM = Adapter(
    engine="trtllm",
    waiting=("trtllm_num_requests_waiting",),
    running=("trtllm_num_requests_running",),
    kv_usage=("trtllm_kv_cache_utilization",),
    prompt_tokens=("trtllm_prompt_tokens_total",),
    generation_tokens=("trtllm_generation_tokens_total",),
    ttft=("trtllm_time_to_first_token_seconds",),
    tpot=("trtllm_time_per_output_token_seconds",),
    prefix_hit_ratio=("trtllm_kv_cache_hit_rate",),
    kv_blocks=("trtllm_kv_cache_max_blocks",),
    kv_block_size=("trtllm_kv_cache_tokens_per_block",),
)

# Our own modelserver speaks vLLM's names; it differs only in also serving /v1/engine/state.
KVPILOT = Adapter(**{**VLLM.__dict__, "engine": "kvpilot"})

ADAPTERS: dict[str, Adapter] = {a.engine: a for a in (VLLM, SGLANG, TGI, TRTLLM, KVPILOT)}
_WANTED = {name: a.wanted() for name, a in ADAPTERS.items()}


@dataclass(frozen=True)
class EngineReading:
    """One scrape of one model server, in our terms."""

    engine: str
    models: tuple[str, ...]
    waiting: int
    running: int
    kv_usage: float
    kv_blocks_total: int
    kv_block_size: int | None
    prefix_hit_ratio: float | None  # published directly by the engine, when it does
    preemptions_total: int
    lora_adapters: tuple[str, ...]
    totals: Totals

    def onto(self, state: ReplicaState) -> ReplicaState:
        """`state` with what this scrape says about the engine (the scrape's own fields only)."""
        return dataclasses.replace(
            state,
            models=tuple(dict.fromkeys(state.models + self.models)),
            engine=self.engine,
            waiting=self.waiting,
            running=self.running,
            kv_usage=self.kv_usage,
            kv_blocks_total=self.kv_blocks_total,
            kv_block_size=self.kv_block_size or state.kv_block_size,
            prefix_cache_hit_ratio=self.prefix_hit_ratio or 0.0,
            preemptions_total=self.preemptions_total,
            lora_adapters=self.lora_adapters,
        )


def detect_engine(text: str) -> str | None:
    """Which engine wrote this metrics text, from its name prefixes."""
    if "vllm:" in text:
        # our modelserver speaks vLLM's names and adds its own engine series
        return "kvpilot" if "kvpilot_modelserver_" in text else "vllm"
    if "sglang:" in text:
        return "sglang"
    if "trtllm_" in text:
        return "trtllm"
    if "tgi_" in text:
        return "tgi"
    return None


def parse_samples(text: str, wanted: frozenset[str] | None = None) -> dict[str, Series]:
    """Sample name -> [(labels, value)] for the wanted names (all names when `wanted` is None).

    Engines publish hundreds of lines (every histogram bucket, process and GC metrics) and a
    4 Hz scrape of 16 servers must stay cheap, so this reads only the lines it needs: the name
    and value of a sample line are cut out with string methods, and label sets go through
    prometheus-client's own label parser. Comments, HELP and TYPE lines are skipped.
    Raises MetricsFormatError on a line that is not a sample.
    """
    samples: dict[str, Series] = defaultdict(list)
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line[0] == "#" or line.isspace():
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            if wanted is not None and name not in wanted:
                continue
            close = line.rfind("}")
            if close < brace:
                raise MetricsFormatError(f"line {n}: unclosed label set: {line[:80]!r}")
            raw_labels, rest = line[brace + 1 : close], line[close + 1 :]
        else:
            name = line[:space] if space >= 0 else line
            if wanted is not None and name not in wanted:
                continue
            raw_labels, rest = "", line[space:] if space >= 0 else ""
        parts = rest.split()
        if not parts or len(parts) > 2 or not _NAME.fullmatch(name):
            raise MetricsFormatError(f"line {n}: not a sample line: {line[:80]!r}")
        try:
            value = float(parts[0])
            labels = _labels(raw_labels) if raw_labels else _NO_LABELS
        except ValueError as e:
            raise MetricsFormatError(f"line {n}: {e}: {line[:80]!r}") from e
        samples[name].append((labels, value))
    return samples


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NO_LABELS: dict[str, str] = {}


@functools.lru_cache(maxsize=4096)
def _labels(raw: str) -> dict[str, str]:
    """Label sets repeat scrape after scrape: parse each distinct one once (treat as read-only)."""
    return parse_labels(raw)


def read_metrics(text: str, engine: str = "auto") -> EngineReading:
    """Turn one /metrics text into an EngineReading; `engine` "auto" detects it from the names.

    Raises MetricsFormatError on malformed text or when none of the engine's metrics are there.
    """
    name = detect_engine(text) if engine in ("auto", "", "unknown") else engine
    if name is None or name not in ADAPTERS:
        raise MetricsFormatError("no metrics of a known engine (vllm, sglang, tgi, trtllm)")
    adapter = ADAPTERS[name]
    samples = parse_samples(text, _WANTED[name])
    if not samples:
        raise MetricsFormatError(f"none of {name}'s metrics are in the text")
    return _reading(adapter, samples)


def _first(samples: dict[str, Series], names: tuple[str, ...]) -> Series | None:
    for n in names:
        series = samples.get(n)
        if series:
            return series
    return None


def _sum(samples: dict[str, Series], names: tuple[str, ...]) -> float | None:
    series = _first(samples, names)
    return None if series is None else sum(v for _, v in series)


def _mean(samples: dict[str, Series], names: tuple[str, ...]) -> float | None:
    series = _first(samples, names)
    return None if series is None else sum(v for _, v in series) / len(series)


def _hist(samples: dict[str, Series], bases: tuple[str, ...]) -> tuple[float | None, float | None]:
    for b in bases:
        if samples.get(f"{b}_count"):
            return _sum(samples, (f"{b}_sum",)), _sum(samples, (f"{b}_count",))
    return None, None


def _clip01(x: float | None) -> float:
    return 0.0 if x is None or x != x else min(1.0, max(0.0, x))


def _reading(a: Adapter, samples: dict[str, Series]) -> EngineReading:
    models: list[str] = []
    for series in (_first(samples, a.waiting) or [], _first(samples, a.running) or []):
        for labels, _ in series:
            m = labels.get("model_name") or labels.get("name")
            if m and m not in models:
                models.append(m)

    blocks = _sum(samples, a.kv_blocks)
    block_size = _mean(samples, a.kv_block_size)
    if a.cache_info and samples.get(a.cache_info):
        labels = samples[a.cache_info][0][0]
        blocks = _int_or_none(labels.get("num_gpu_blocks")) or blocks
        block_size = _int_or_none(labels.get("block_size")) or block_size
    if a.engine == "sglang" and blocks is not None:
        block_size = 1

    lora: list[str] = []
    if a.lora_info and samples.get(a.lora_info):
        labels, _ = max(samples[a.lora_info], key=lambda s: s[1])  # value = when it was set
        for key in ("running_lora_adapters", "waiting_lora_adapters"):
            lora += [x for x in labels.get(key, "").split(",") if x and x not in lora]

    ttft_sum, ttft_count = _hist(samples, a.ttft)
    tpot_sum, tpot_count = _hist(samples, a.tpot)
    hit_ratio = _mean(samples, a.prefix_hit_ratio)
    return EngineReading(
        engine=a.engine,
        models=tuple(models),
        waiting=int(_sum(samples, a.waiting) or 0),
        running=int(_sum(samples, a.running) or 0),
        kv_usage=_clip01(_mean(samples, a.kv_usage)),
        kv_blocks_total=int(blocks or 0),
        kv_block_size=int(block_size) if block_size else None,
        prefix_hit_ratio=None if hit_ratio is None else _clip01(hit_ratio),
        preemptions_total=int(_sum(samples, a.preemptions) or 0),
        lora_adapters=tuple(lora),
        totals=Totals(
            at=0.0,
            prompt_tokens=_sum(samples, a.prompt_tokens),
            generation_tokens=_sum(samples, a.generation_tokens),
            ttft_sum=ttft_sum,
            ttft_count=ttft_count,
            tpot_sum=tpot_sum,
            tpot_count=tpot_count,
            prefix_queries=_sum(samples, a.prefix_queries),
            prefix_hits=_sum(samples, a.prefix_hits),
        ),
    )


def _int_or_none(s: str | None) -> int | None:
    try:
        return int(float(s)) if s not in (None, "", "None") else None
    except ValueError:
        return None
