"""Model-server adapters: each engine's recorded /metrics text read into our fields."""

from __future__ import annotations

import pytest

from agent.adapters import MetricsFormatError, detect_engine, parse_samples, read_metrics
from agent.fakes import fixture_text


@pytest.mark.parametrize(
    ("fixture", "engine", "waiting", "running", "kv"),
    [
        ("vllm", "vllm", 3, 12, 0.41),
        ("vllm-old", "vllm", 3, 12, 0.41),
        ("sglang", "sglang", 2826, 28, 0.28),
        ("tgi", "tgi", 4, 16, 0.0),
        ("trtllm", "trtllm", 1, 9, 0.62),
    ],
)
def test_each_engine_is_detected_and_read(
    fixture: str, engine: str, waiting: int, running: int, kv: float
) -> None:
    r = read_metrics(fixture_text(fixture))
    assert (r.engine, r.waiting, r.running) == (engine, waiting, running)
    assert r.kv_usage == pytest.approx(kv)


def test_vllm_blocks_lora_and_totals() -> None:
    r = read_metrics(fixture_text("vllm"))
    assert (r.kv_blocks_total, r.kv_block_size) == (27000, 16)
    assert r.models == ("meta-llama/Llama-3.1-8B-Instruct",)
    assert r.lora_adapters == ("sql-lora", "chat-lora")
    assert r.preemptions_total == 2
    t = r.totals
    assert (t.prompt_tokens, t.generation_tokens) == (51200, 20480)
    assert (t.ttft_count, t.ttft_sum) == (3, pytest.approx(0.6))
    assert (t.prefix_queries, t.prefix_hits) == (4000, 1000)
    assert t.tpot_count == 1  # the per-request TPOT histogram, preferred over inter-token


def test_older_vllm_names_still_read() -> None:
    r = read_metrics(fixture_text("vllm-old"))
    assert r.prefix_hit_ratio == pytest.approx(0.25)  # vllm:gpu_prefix_cache_hit_rate
    assert r.totals.tpot_sum == pytest.approx(0.02)  # vllm:time_per_output_token_seconds


def test_trtllm_and_sglang_cache_geometry() -> None:
    t = read_metrics(fixture_text("trtllm"))
    assert (t.kv_blocks_total, t.kv_block_size, t.prefix_hit_ratio) == (4096, 32, 0.5)
    s = read_metrics(fixture_text("sglang"))
    assert (s.kv_blocks_total, s.kv_block_size) == (161721, 1)  # token-granular radix cache


def test_tgi_tokens_come_from_histogram_sums() -> None:
    t = read_metrics(fixture_text("tgi")).totals
    assert (t.prompt_tokens, t.generation_tokens) == (60000, 23600)
    assert t.ttft_count is None  # TGI publishes no TTFT


def test_configured_engine_overrides_detection() -> None:
    assert read_metrics(fixture_text("vllm"), "kvpilot").engine == "kvpilot"


def test_our_modelserver_is_detected() -> None:
    text = fixture_text("vllm") + 'kvpilot_modelserver_engine_steps_total{model_name="m"} 3\n'
    assert detect_engine(text) == "kvpilot"


def test_series_are_summed_and_ratios_averaged() -> None:
    text = (
        'vllm:num_requests_waiting{engine="0"} 2\nvllm:num_requests_waiting{engine="1"} 3\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.6\n'
    )
    r = read_metrics(text)
    assert r.waiting == 5
    assert r.kv_usage == pytest.approx(0.4)


@pytest.mark.parametrize(
    "text",
    [
        "<html>502 Bad Gateway</html>",
        "",
        "some_other_exporter_metric 1\n",
        'vllm:num_requests_waiting{model_name="m" 3\n',  # unclosed labels
        "vllm:num_requests_waiting three\n",  # not a number
        "vllm:num_requests_waiting{model_name=m} 3\n",  # unquoted label value
    ],
)
def test_malformed_or_foreign_text_is_a_clear_error(text: str) -> None:
    with pytest.raises(MetricsFormatError):
        read_metrics(text)


def test_parser_agrees_with_prometheus_client_on_the_fixtures() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    # (not TGI: prometheus-client renames its `_total`-less counters; we keep the wire names)
    for name in ("vllm", "vllm-old", "sglang", "trtllm"):
        text = fixture_text(name)
        ours = parse_samples(text)
        theirs: dict[str, list] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                theirs.setdefault(s.name, []).append((s.labels, s.value))
        assert ours == theirs
