"""Planner against hand-computed memory figures."""

from __future__ import annotations

import pytest

from controller.planner import (
    MACHINE_TYPES,
    Workload,
    cheapest_accelerator,
    load_prices,
    plan,
    plan_one,
    recommend_quantization,
)
from modelserver.profiles import resolve_model

PRICES = load_prices(None)
W = Workload(context=4096)


def row(model: str, gpu: str, count: int, dtype: str = "bf16", work: Workload = W):  # type: ignore[no-untyped-def]
    return plan_one(resolve_model(model), gpu, count, dtype, work, PRICES)


def test_llama_70b_bf16_weights_are_about_141_gb() -> None:
    # 70.6 B parameters x 2 bytes.
    r = row("llama-3.1-70b", "h100", 4)
    assert r.weight_gb == pytest.approx(141, abs=1.5)


def test_llama_70b_bf16_not_on_one_h100_barely_on_two_comfortably_on_four() -> None:
    one, two, four = (row("llama-3.1-70b", "h100", n) for n in (1, 2, 4))
    assert not one.fits and one.max_batch == 0
    # Two H100s: 2 x (80 GiB x 0.9) - 141 GB - activations leaves under 10 GB of KV cache;
    # KV per token = 2 x 80 layers x 8 KV heads x 128 x 2 bytes = 327,680 B, 1.34 GB per 4k context.
    assert two.fits and 0 < two.kv_cache_gb < 12 and two.max_batch <= 8
    assert four.fits and four.kv_cache_gb > 100 and four.max_batch >= 64
    assert four.output_tok_s > 3 * two.output_tok_s


def test_max_batch_is_kv_cache_over_bytes_per_context() -> None:
    r = row("llama-3.1-8b", "l4", 1)
    # 8B: 2 x 32 layers x 8 KV heads x 128 x 2 B = 131,072 B per token.
    expected = int(r.kv_cache_gb * 1e9 // (131072 * 4096))
    assert abs(r.max_batch - expected) <= 1
    assert r.machine_type == "g2-standard-8"


def test_quantization_changes_the_gpu_needed() -> None:
    # Gemma-2-27B: 54 GB at bf16 needs more than one L4; 4-bit weights (~14 GB) fit on one.
    assert not row("gemma-2-27b", "l4", 1).fits
    assert row("gemma-2-27b", "l4", 1, "int4").fits
    advice = recommend_quantization("gemma-2-27b", "bf16", W, PRICES)
    assert advice is not None and "1 x l4" in advice and "int4" in advice
    # The 8B already fits on one L4 at bf16: nothing to recommend.
    assert recommend_quantization("llama-3.1-8b", "bf16", W, PRICES) is None


def test_ranking_puts_fitting_cheapest_first_and_tpot_target_shrinks_the_batch() -> None:
    rows = plan("llama-3.1-70b", dtypes=("bf16",), work=W, prices=PRICES)
    fits = [r for r in rows if r.fits]
    assert rows[: len(fits)] == fits
    costs = [r.usd_per_million_output_tokens for r in fits if r.meets_targets]
    assert costs == sorted(costs)
    loose = row("llama-3.1-70b", "h100", 4)
    tight = row("llama-3.1-70b", "h100", 4, work=Workload(context=4096, tpot_target_s=0.02))
    assert tight.batch < loose.batch and tight.tpot_s is not None and tight.tpot_s <= 0.02
    assert all((r.gpu, r.count) in MACHINE_TYPES for r in rows)  # no H200 x 1/2/4 rows


def test_prices_file_overrides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "p.yaml"
    f.write_text("a3-highgpu-4g: 1.0\n")
    prices = load_prices(f)
    r = plan_one(resolve_model("llama-3.1-70b"), "h100", 4, "bf16", W, prices)
    assert r.usd_per_hour == 1.0
    assert r.usd_per_million_output_tokens == pytest.approx(1e6 / (r.output_tok_s * 3600), rel=1e-3)
    f.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="machine type"):
        load_prices(f)


def test_cheapest_accelerator_for_a_pool_with_several() -> None:
    acc = cheapest_accelerator("llama-3.1-8b", ["nvidia-l4", "nvidia-h100-80gb"], 1, work=W)
    assert acc in ("nvidia-l4", "nvidia-h100-80gb")
    # With one-GPU replicas the 70B fits on neither.
    assert cheapest_accelerator("llama-3.1-70b", ["nvidia-l4", "nvidia-h100-80gb"], 1) is None


@pytest.mark.parametrize("name", ["h200", "H200", "nvidia-h200-141gb", " NVIDIA-H200-141GB "])
def test_gpu_aliases_and_labels_are_resolved_before_filtering(name: str) -> None:
    rows = plan("llama-3.1-8b", gpus=[name], work=W)
    assert [(r.gpu, r.count) for r in rows] == [("h200", 8)]
    # One GPU named twice is planned once.
    rows = plan("llama-3.1-8b", gpus=["h100", "nvidia-h100-80gb", "H100"], counts=(1,), work=W)
    assert [(r.gpu, r.count) for r in rows] == [("h100", 1)]


def test_an_unknown_gpu_is_an_error_listing_the_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown GPU 'b200'.*l4.*nvidia-h200-141gb"):
        plan("llama-3.1-8b", gpus=["h100", "b200"], work=W)
