"""Which GPU, how many, and which weight format a model should get: pure code.

For each GPU type x count (tensor parallel) it asks the modelserver's own roofline `PerfModel`
(the one place step times and memory come from) whether weights, activations and a KV cache fit,
how large a batch the KV cache holds at the given context, and what prefill and decode rates that
gives; then it prices the GKE machine that carries those GPUs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from modelserver.perf import PerfModel
from modelserver.profiles import GPUS, ModelProfile, resolve_gpu, resolve_model

COUNTS = (1, 2, 4, 8)
DTYPES = ("bf16", "fp8", "int8", "int4")

# GKE machine type carrying `count` GPUs of each type. H200 (A3 Ultra) only comes as 8 GPUs.
MACHINE_TYPES: dict[tuple[str, int], str] = {
    ("l4", 1): "g2-standard-8",
    ("l4", 2): "g2-standard-24",
    ("l4", 4): "g2-standard-48",
    ("l4", 8): "g2-standard-96",
    ("a100-40gb", 1): "a2-highgpu-1g",
    ("a100-40gb", 2): "a2-highgpu-2g",
    ("a100-40gb", 4): "a2-highgpu-4g",
    ("a100-40gb", 8): "a2-highgpu-8g",
    ("a100-80gb", 1): "a2-ultragpu-1g",
    ("a100-80gb", 2): "a2-ultragpu-2g",
    ("a100-80gb", 4): "a2-ultragpu-4g",
    ("a100-80gb", 8): "a2-ultragpu-8g",
    ("h100", 1): "a3-highgpu-1g",
    ("h100", 2): "a3-highgpu-2g",
    ("h100", 4): "a3-highgpu-4g",
    ("h100", 8): "a3-highgpu-8g",
    ("h200", 8): "a3-ultragpu-8g",
}

# On-demand USD per hour per machine (GPUs included), us-central1, from the Compute Engine
# "GPU / accelerator-optimized machine" price lists
# (https://cloud.google.com/compute/vm-instance-pricing#accelerator-optimized and
#  https://cloud.google.com/compute/gpus-pricing), as of 2025-06. List prices change and differ by
# region: pass --prices FILE (YAML or JSON, machine type -> USD/hour) for your own.
DEFAULT_PRICES_USD_PER_HOUR: dict[str, float] = {
    "g2-standard-8": 0.8536,
    "g2-standard-24": 2.0019,
    "g2-standard-48": 4.0039,
    "g2-standard-96": 8.0077,
    "a2-highgpu-1g": 3.6731,
    "a2-highgpu-2g": 7.3461,
    "a2-highgpu-4g": 14.6923,
    "a2-highgpu-8g": 29.3846,
    "a2-ultragpu-1g": 5.0688,
    "a2-ultragpu-2g": 10.1376,
    "a2-ultragpu-4g": 20.2752,
    "a2-ultragpu-8g": 40.5504,
    "a3-highgpu-1g": 11.0613,
    "a3-highgpu-2g": 22.1226,
    "a3-highgpu-4g": 44.2452,
    "a3-highgpu-8g": 88.4904,
    "a3-ultragpu-8g": 84.8064,
}
PRICES_DATE = "2025-06"

MAX_NUM_SEQS = 256  # vLLM's default cap on the running batch


@dataclass(frozen=True)
class PlanRow:
    gpu: str  # alias, e.g. "h100"
    accelerator: str  # GKE accelerator label
    count: int
    dtype: str
    fits: bool
    weight_gb: float  # whole model
    kv_cache_gb: float  # all GPUs together
    max_batch: int  # sequences of `context` tokens the KV cache holds (capped at 256)
    batch: int  # the batch used for the figures below (largest meeting the TPOT target)
    ttft_s: float | None  # prefill of one prompt on an idle replica
    tpot_s: float | None  # decode step at `batch`
    prefill_tok_s: float
    output_tok_s: float
    meets_targets: bool
    machine_type: str
    usd_per_hour: float | None
    usd_per_million_output_tokens: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    context: int = 4096  # tokens per request, prompt + output
    output_tokens: int | None = None  # defaults to min(512, context // 4)
    ttft_target_s: float | None = None
    tpot_target_s: float | None = None
    gpu_memory_utilization: float = 0.9

    @property
    def output(self) -> int:
        return self.output_tokens or max(1, min(512, self.context // 4))

    @property
    def prompt(self) -> int:
        return max(1, self.context - self.output)


def load_prices(path: str | Path | None) -> dict[str, float]:
    prices = dict(DEFAULT_PRICES_USD_PER_HOUR)
    if path:
        data = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
        if not isinstance(data, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in data.values()
        ):
            raise ValueError(f"{path}: expected a mapping of machine type to USD per hour")
        prices.update({str(k): float(v) for k, v in data.items()})
    return prices


def plan_one(
    model: ModelProfile,
    gpu_alias: str,
    count: int,
    dtype: str,
    work: Workload,
    prices: Mapping[str, float],
) -> PlanRow:
    gpu = resolve_gpu(gpu_alias)
    perf = PerfModel(model=model, gpu=gpu, num_gpus=count, dtype=dtype)
    kv_bytes = perf.kv_cache_bytes(work.gpu_memory_utilization)
    per_seq = perf.kv_bytes_per_token() * work.context
    max_batch = min(MAX_NUM_SEQS, int(kv_bytes // per_seq)) if per_seq > 0 else 0
    machine = MACHINE_TYPES.get((gpu.alias, count), "")
    price = prices.get(machine) if machine else None
    base = dict(
        gpu=gpu.alias,
        accelerator=gpu.label,
        count=count,
        dtype=dtype,
        weight_gb=round(perf.weight_bytes / 1e9, 2),
        kv_cache_gb=round(kv_bytes / 1e9, 2),
        max_batch=max_batch,
        machine_type=machine,
        usd_per_hour=price,
    )
    if max_batch < 1:
        note = "weights leave no KV cache" if kv_bytes <= 0 else "KV cache < one full context"
        return PlanRow(
            **base,  # type: ignore[arg-type]
            fits=False,
            batch=0,
            ttft_s=None,
            tpot_s=None,
            prefill_tok_s=0.0,
            output_tok_s=0.0,
            meets_targets=False,
            usd_per_million_output_tokens=None,
            note=note,
        )
    prompt, output = work.prompt, work.output
    ttft = perf.step_time(prompt, prompt * (prompt + 1) // 2, 0, 0)
    mean_ctx = prompt + output // 2

    def tpot(b: int) -> float:
        return perf.step_time(0, 0, b, b * mean_ctx)

    batch = max_batch
    if work.tpot_target_s is not None:
        while batch > 1 and tpot(batch) > work.tpot_target_s:
            batch = max(1, int(batch * 0.9))
    step = tpot(batch)
    # Steady state with prompts prefilled one after another and decodes batched:
    # `batch` requests take batch x TTFT of prefill plus `output` decode steps.
    output_tok_s = batch * output / (batch * ttft + output * step)
    meets = (work.ttft_target_s is None or ttft <= work.ttft_target_s) and (
        work.tpot_target_s is None or step <= work.tpot_target_s
    )
    usd_m = price / (output_tok_s * 3600) * 1e6 if price and output_tok_s > 0 else None
    note = "" if machine else "no GKE machine type with this count"
    if count > 1 and gpu.alias == "l4":
        note = note or "tensor parallel over PCIe"
    return PlanRow(
        **base,  # type: ignore[arg-type]
        fits=True,
        batch=batch,
        ttft_s=round(ttft, 4),
        tpot_s=round(step, 5),
        prefill_tok_s=round(prompt / ttft, 1),
        output_tok_s=round(output_tok_s, 1),
        meets_targets=meets,
        usd_per_million_output_tokens=round(usd_m, 4) if usd_m is not None else None,
        note=note,
    )


def rank_key(r: PlanRow) -> tuple[Any, ...]:
    cost = r.usd_per_million_output_tokens
    return (not r.fits, not r.meets_targets, not r.machine_type, cost is None, cost or 0.0, r.count)


def plan(
    model: str | ModelProfile,
    *,
    dtypes: Sequence[str] = ("bf16",),
    gpus: Iterable[str] = tuple(GPUS),
    counts: Sequence[int] = COUNTS,
    work: Workload | None = None,
    prices: Mapping[str, float] | None = None,
) -> list[PlanRow]:
    """Every GPU x count x dtype, ranked: fitting, meeting targets, cheapest per output token."""
    m = resolve_model(model) if isinstance(model, str) else model
    work = work or Workload()
    prices = DEFAULT_PRICES_USD_PER_HOUR if prices is None else prices
    # Aliases first (`H200`, `nvidia-h200-141gb` -> `h200`): an unknown name is an error that
    # lists the valid ones, and the machine-type check below sees the canonical alias.
    aliases = list(dict.fromkeys(resolve_gpu(g).alias for g in gpus))
    rows = [
        plan_one(m, g, n, d, work, prices)
        for d in dtypes
        for g in aliases
        for n in counts
        if (g, n) in MACHINE_TYPES or g != "h200"  # H200 only comes as 8 GPUs
    ]
    return sorted(rows, key=rank_key)


def best(rows: Sequence[PlanRow]) -> PlanRow | None:
    ok = [r for r in rows if r.fits and r.meets_targets and r.usd_per_million_output_tokens]
    return min(ok, key=rank_key) if ok else None


def smallest_fit(rows: Sequence[PlanRow]) -> PlanRow | None:
    """The cheapest machine per hour the model fits on (and meets the targets on): the GPU it needs."""
    ok = [r for r in rows if r.fits and r.meets_targets and r.usd_per_hour is not None]
    return min(ok, key=lambda r: (r.usd_per_hour, r.count)) if ok else None


@dataclass(frozen=True)
class QuantizationAdvice:
    """A smaller weight format that changes the GPU a model needs."""

    text: str
    dtype: str  # the format asked about
    need: PlanRow | None  # what the model needs at `dtype` (None: it fits nowhere)
    alt: PlanRow  # what it needs at the recommended format (alt.dtype)


def recommend_quantization(
    model: str | ModelProfile,
    dtype: str = "bf16",
    work: Workload | None = None,
    prices: Mapping[str, float] | None = None,
) -> str | None:
    """A sentence when a smaller weight format changes the GPU the model needs."""
    advice = quantization_advice(model, dtype, work, prices)
    return advice.text if advice else None


def quantization_advice(
    model: str | ModelProfile,
    dtype: str = "bf16",
    work: Workload | None = None,
    prices: Mapping[str, float] | None = None,
) -> QuantizationAdvice | None:
    """`recommend_quantization` with the rows it compares."""
    need = smallest_fit(plan(model, dtypes=(dtype,), work=work, prices=prices))
    found: tuple[str, PlanRow] | None = None
    for q in DTYPES[DTYPES.index(dtype) + 1 :] if dtype in DTYPES else ():
        alt = smallest_fit(plan(model, dtypes=(q,), work=work, prices=prices))
        # Keep the highest precision among equally cheap machines: only strictly cheaper wins.
        if alt and (found is None or (alt.usd_per_hour or 0) < (found[1].usd_per_hour or 0)):
            found = (q, alt)
    if found is None:
        return None
    q, alt = found
    if need is None:
        text = f"at {dtype} it fits nowhere; at {q} it fits on {alt.count} x {alt.gpu} ({alt.machine_type})"
        return QuantizationAdvice(text, dtype, None, alt)
    if (alt.usd_per_hour or math.inf) >= (need.usd_per_hour or math.inf):
        return None
    text = (
        f"at {q} it fits on {alt.count} x {alt.gpu} ({alt.machine_type}, "
        f"${alt.usd_per_hour:.2f}/h) instead of {need.count} x {need.gpu} "
        f"({need.machine_type}, ${need.usd_per_hour:.2f}/h) at {dtype}; "
        f"check output quality at {q} first"
    )
    return QuantizationAdvice(text, dtype, need, alt)


def cheapest_accelerator(
    model: str | ModelProfile,
    accelerators: Sequence[str],
    gpus_per_replica: int,
    *,
    dtype: str = "bf16",
    work: Workload | None = None,
    prices: Mapping[str, float] | None = None,
) -> str | None:
    """For a pool that may run on several accelerators: the GKE label with the cheapest output
    tokens at `gpus_per_replica` GPUs, among those where the model fits."""
    rows = plan(
        model,
        dtypes=(dtype,),
        gpus=[resolve_gpu(a).alias for a in accelerators],
        counts=(gpus_per_replica,),
        work=work,
        prices=prices,
    )
    b = best(rows) or next((r for r in rows if r.fits), None)
    return b.accelerator if b else None


def rows_json(rows: Sequence[PlanRow], advice: QuantizationAdvice | None = None) -> str:
    """JSON rows (a list, as before), each with `recommended` (the row the quantization advice
    points to) and `advice` (its sentence, on that row and on every row at the format it is
    about; "" elsewhere), so `--json` carries what the table prints below itself."""

    def key(r: PlanRow | None) -> tuple[str, int, str] | None:
        return (r.gpu, r.count, r.dtype) if r is not None else None

    out = []
    for r in rows:
        recommended = advice is not None and key(r) == key(advice.alt)
        about = recommended or (advice is not None and r.dtype == advice.dtype)
        out.append(
            {**r.to_dict(), "recommended": recommended, "advice": advice.text if about else ""}
        )
    return json.dumps(out, indent=2)
