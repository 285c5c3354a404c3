"""GPU, model and weight-format profiles, and the roofline performance model over them."""

from __future__ import annotations

import pytest

from modelserver.perf import PerfModel
from modelserver.profiles import (
    GPUS,
    MODELS,
    WEIGHT_FORMATS,
    resolve_gpu,
    resolve_model,
)

GKE_LABELS = {
    "l4": "nvidia-l4",
    "a100-40gb": "nvidia-tesla-a100",
    "a100-80gb": "nvidia-a100-80gb",
    "h100": "nvidia-h100-80gb",
    "h200": "nvidia-h200-141gb",
}


def test_llama_8b_kv_bytes_per_token_bf16() -> None:
    # 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes
    assert resolve_model("llama-3.1-8b").kv_bytes_per_token() == 131072
    assert resolve_model("llama-3.1-8b").kv_bytes_per_token(1) == 65536


def test_llama_70b_bf16_weights_are_about_141_gb() -> None:
    m = resolve_model("llama-3.1-70b")
    assert m.weight_bytes("bf16") == pytest.approx(141e9, rel=0.01)
    assert m.kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_counts_agree_with_the_config_shapes(name: str) -> None:
    m = MODELS[name]
    # The published count (safetensors) and the one recomputed from config.json agree.
    assert m.params_from_config() == pytest.approx(m.params, rel=0.001)
    assert m.weight_bytes("fp8") < m.weight_bytes("bf16") < m.weight_bytes("fp32")
    assert m.weight_bytes("int4") < m.weight_bytes("int8")
    # Quantized formats keep embeddings in bf16, so they never reach the naive bytes x params.
    assert m.weight_bytes("int4") > m.params * WEIGHT_FORMATS["int4"]


def test_required_models_are_present() -> None:
    required = {
        "llama-3.1-8b",
        "llama-3.1-70b",
        "mistral-7b",
        "gemma-2-9b",
        "gemma-2-27b",
        "qwen2.5-7b",
        "qwen2.5-32b",
    }
    assert required <= set(MODELS)
    assert WEIGHT_FORMATS == {"fp32": 4, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


@pytest.mark.parametrize("alias,label", sorted(GKE_LABELS.items()))
def test_gpus_resolve_by_alias_and_gke_label(alias: str, label: str) -> None:
    gpu = GPUS[alias]
    assert gpu.label == label
    assert resolve_gpu(alias) is gpu
    assert resolve_gpu(label.upper()) is gpu
    assert gpu.memory_bytes > 20 * 2**30
    assert gpu.hbm_bandwidth_bytes_s > 0 and gpu.bf16_tflops > 0


def test_gpu_ordering_matches_the_datasheets() -> None:
    l4, a100, h100, h200 = (GPUS[a] for a in ("l4", "a100-80gb", "h100", "h200"))
    assert l4.hbm_bandwidth_bytes_s < a100.hbm_bandwidth_bytes_s < h100.hbm_bandwidth_bytes_s
    assert h100.hbm_bandwidth_bytes_s < h200.hbm_bandwidth_bytes_s
    assert h100.memory_bytes < h200.memory_bytes
    assert a100.fp8_tflops is None and h100.fp8_tflops == 2 * h100.bf16_tflops
    # No fp8 tensor cores on Ampere: fp8 weights run at the bf16 rate there.
    assert a100.peak_flops("fp8") == a100.peak_flops("bf16")
    assert h100.peak_flops("fp8") == 2 * h100.peak_flops("bf16")
    assert h100.peak_flops("int4") == h100.peak_flops("bf16")


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match="h100"):
        resolve_gpu("tpu-v5")
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        resolve_model("gpt-5")
    assert resolve_model("LLAMA-3.1-8B").name == "llama-3.1-8b"
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"


# ----------------------------------------------------------------------------- perf model
def perf(model: str = "llama-3.1-8b", gpu: str = "h100", **kw: object) -> PerfModel:
    return PerfModel(resolve_model(model), resolve_gpu(gpu), **kw)  # type: ignore[arg-type]


def test_kv_cache_is_memory_less_weights_and_overhead() -> None:
    p = perf()
    expected = GPUS["h100"].memory_bytes * 0.9 - p.weight_bytes - p.activation_overhead_bytes
    assert p.kv_cache_bytes(0.9) == pytest.approx(expected, abs=1)
    assert p.kv_cache_bytes(0.5) < p.kv_cache_bytes(0.9)
    assert p.kv_bytes_per_block(16) == 16 * 131072
    # Tensor parallel: each GPU holds a share of the weights, so the KV room grows faster than 2x.
    assert perf(num_gpus=2).kv_cache_bytes() > 2 * p.kv_cache_bytes()


def test_validate_refuses_weights_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"141\.1 GB"):
        perf("llama-3.1-70b").validate()
    perf("llama-3.1-70b", num_gpus=4).validate()
    perf("llama-3.1-70b", dtype="int4").validate()
    with pytest.raises(ValueError, match="weight format"):
        perf(dtype="fp4")
    with pytest.raises(ValueError, match="mfu"):
        perf(mfu=1.5)
    with pytest.raises(ValueError, match="divide"):
        perf(num_gpus=3)


def test_decode_is_memory_bound_and_grows_with_context() -> None:
    p = perf()
    short = p.step_time(0, 0, 1, 100)
    long = p.step_time(0, 0, 1, 100_000)
    # One token: weights over HBM at the calibrated efficiency, plus the fixed overhead.
    floor = p.weight_bytes / (GPUS["h100"].hbm_bandwidth_bytes_s * p.hbm_efficiency)
    assert short == pytest.approx(floor + p.step_overhead_s, rel=0.01)
    assert long > short + 100_000 * 131072 / (3.35e12 * p.hbm_efficiency) * 0.99
    compute, memory = p.utilisation(0, 0, 8, 8000)
    assert memory > 0.5 > compute
    assert p.step_time(0, 0, 0, 0) == 0.0


def test_prefill_is_compute_bound_and_fp8_halves_it() -> None:
    p = perf()
    t = p.step_time(8192, 8192 * 8193 // 2, 0, 0) - p.step_overhead_s
    flops = 2 * (p.model.params - p.model.embedding_params) * 8192
    assert t > flops / (GPUS["h100"].bf16_tflops * 1e12 * p.mfu)
    compute, memory = p.utilisation(8192, 8192 * 8193 // 2, 0, 0)
    assert compute > memory
    t8 = perf(dtype="fp8").step_time(8192, 0, 0, 0) - p.step_overhead_s
    assert t8 < 0.6 * p.step_time(8192, 0, 0, 0)


def test_tensor_parallel_speeds_up_less_than_linearly() -> None:
    one = perf().step_time(2048, 2048 * 2049 // 2, 64, 64 * 1000)
    two = perf(num_gpus=2).step_time(2048, 2048 * 2049 // 2, 64, 64 * 1000)
    assert one / 2 < two < one
    # Over PCIe (L4) the all-reduce costs far more than over NVLink.
    l4 = perf(gpu="l4", num_gpus=2)
    assert l4._parts(2048, 0, 0, 0)[4] > 10 * perf(num_gpus=2)._parts(2048, 0, 0, 0)[4]
