"""`/metrics` moves under load exactly as vLLM's names say.

Every figure is read through the Prometheus exposition the way a scraper would; in-process servers
on loopback ports, the real engine, time-scaled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelserver import profiles
from modelserver.scheduler import EngineConfig
from modelserver.server import ServerConfig, start_server

MODEL = "llama-3.1-8b"
LABEL = {"model_name": MODEL}


def _config(time_scale: float = 100.0, **engine_kw: Any) -> ServerConfig:
    engine = EngineConfig(
        model=profiles.resolve_model(MODEL),
        gpu=profiles.resolve_gpu("h100"),
        max_model_len=8192,
        **engine_kw,
    )
    return ServerConfig(engine=engine, time_scale=time_scale, port=0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({**LABEL, **labels}.items()))]


async def wait_for(
    http: aiohttp.ClientSession, url: str, cond: Callable[[Samples], bool], tries: int = 500
) -> Samples:
    """Scrape until cond holds; bounded in count, and the failure shows the last scrape."""
    samples: Samples = {}
    for _ in range(tries):
        samples = await scrape(http, url)
        if cond(samples):
            return samples
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition never held; last scrape: {samples}")


async def complete(http: aiohttp.ClientSession, url: str, **body: Any) -> dict[str, Any]:
    async with http.post(url + "/v1/completions", json={"model": MODEL, **body}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_exposition_names_and_cache_config(http: aiohttp.ClientSession) -> None:
    srv = await start_server(_config())
    try:
        s = await scrape(http, srv.url)
        names = {name for name, _ in s}
        for gauge in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
        ):
            assert value(s, gauge) == 0.0
        for counter in (
            "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
            "vllm:generation_tokens", "vllm:num_preemptions",
        ):  # fmt: skip
            assert value(s, counter + "_total") == 0.0  # exposed with _total, as vLLM does
        for hist in (
            "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
        ):  # fmt: skip
            assert hist + "_bucket" in names and value(s, hist + "_count") == 0.0
        assert value(s, "vllm:time_to_first_token_seconds_bucket", le="2560.0") == 0.0
        (info,) = [dict(labels) for name, labels in s if name == "vllm:cache_config_info"]
        assert info["model_name"] == MODEL
        assert int(info["block_size"]) == 16
        assert int(info["num_gpu_blocks"]) == srv.engine.num_gpu_blocks > 0
    finally:
        await srv.stop()


async def test_burst_fills_running_then_waiting_then_drains(http: aiohttp.ClientSession) -> None:
    """max_num_seqs=4 and 12 requests at once: 4 run, 8 wait, KV is in use; then all drain."""
    srv = await start_server(_config(time_scale=3.0, max_num_seqs=4))
    try:
        body = {"prompt": "burst " * 50, "max_tokens": 500, "ignore_eos": True}
        tasks = [
            asyncio.create_task(complete(http, srv.url, **{**body, "seed": i})) for i in range(12)
        ]
        s = await wait_for(http, srv.url, lambda s: value(s, "vllm:num_requests_waiting") == 8.0)
        assert value(s, "vllm:num_requests_running") == 4.0
        assert 0.0 < value(s, "vllm:kv_cache_usage_perc") <= 1.0
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert all(r["usage"]["completion_tokens"] == 500 for r in results)
        s = await scrape(http, srv.url)
        assert value(s, "vllm:num_requests_running") == 0.0
        assert value(s, "vllm:num_requests_waiting") == 0.0
        assert value(s, "vllm:kv_cache_usage_perc") == 0.0
        # The later waves queued behind the first: queue time shows it.
        assert value(s, "vllm:request_queue_time_seconds_count") == 12
        assert value(s, "vllm:request_queue_time_seconds_sum") > 0.0
    finally:
        await srv.stop()


async def test_counters_equal_the_usage_reported(http: aiohttp.ClientSession) -> None:
    srv = await start_server(_config())
    try:
        shapes = [(40, 7), (900, 33), (3000, 1), (150, 120), (10, 64)]
        results = await asyncio.gather(
            *(
                complete(http, srv.url, prompt=f"{i} " + "z" * n, max_tokens=m, min_tokens=m // 2)
                for i, (n, m) in enumerate(shapes)
            )
        )
        prompt = sum(r["usage"]["prompt_tokens"] for r in results)
        generated = sum(r["usage"]["completion_tokens"] for r in results)
        s = await scrape(http, srv.url)
        assert value(s, "vllm:prompt_tokens_total") == prompt
        assert value(s, "vllm:generation_tokens_total") == generated
        assert value(s, "vllm:time_to_first_token_seconds_count") == len(shapes)
        assert value(s, "vllm:e2e_request_latency_seconds_count") == len(shapes)
        assert value(s, "vllm:inter_token_latency_seconds_count") == generated - len(shapes)
        assert value(s, "vllm:request_prompt_tokens_sum") == prompt
        assert value(s, "vllm:request_generation_tokens_sum") == generated
        finished = sum(v for (name, _), v in s.items() if name == "vllm:request_success_total")
        assert finished == len(shapes)
        # One clock for all latencies: each request's e2e is its TTFT plus its inter-token gaps.
        e2e = value(s, "vllm:e2e_request_latency_seconds_sum")
        ttft = value(s, "vllm:time_to_first_token_seconds_sum")
        itl = value(s, "vllm:inter_token_latency_seconds_sum")
        assert ttft > 0.0 and itl > 0.0
        assert e2e == pytest.approx(ttft + itl, rel=1e-9)
        # ... in modelled seconds: the steps the engine ran add up to at least the longest request.
        assert value(s, "kvpilot_modelserver_engine_step_modelled_seconds_total") >= e2e / len(
            shapes
        )
        assert value(s, "kvpilot_modelserver_engine_steps_total") >= max(m for _, m in shapes)
    finally:
        await srv.stop()


async def test_prefix_cache_hits_on_a_repeated_prompt(http: aiohttp.ClientSession) -> None:
    srv = await start_server(_config())
    try:
        prompt = "A long shared system prompt about caching. " * 40  # 1760 tokens, 110 blocks
        first = await complete(http, srv.url, prompt=prompt, max_tokens=2, ignore_eos=True)
        s1 = await scrape(http, srv.url)
        assert value(s1, "vllm:prefix_cache_queries_total") >= len(prompt)
        hits1 = value(s1, "vllm:prefix_cache_hits_total")
        second = await complete(http, srv.url, prompt=prompt, max_tokens=2, ignore_eos=True)
        s2 = await scrape(http, srv.url)
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert cached >= len(prompt) - 2 * 16  # all full blocks but the last are reused
        assert value(s2, "vllm:prefix_cache_hits_total") - hits1 == cached
        assert value(s2, "vllm:prefix_cache_hits_total") <= value(
            s2, "vllm:prefix_cache_queries_total"
        )
    finally:
        await srv.stop()


async def test_reset_prefix_cache_forgets_what_was_cached(http: aiohttp.ClientSession) -> None:
    srv = await start_server(_config())
    try:
        prompt = "A prompt the cache will forget. " * 40
        await complete(http, srv.url, prompt=prompt, max_tokens=2, ignore_eos=True)
        again = await complete(http, srv.url, prompt=prompt, max_tokens=2, ignore_eos=True)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        async with http.post(srv.url + "/reset_prefix_cache") as r:
            assert r.status == 200
        after = await complete(http, srv.url, prompt=prompt, max_tokens=2, ignore_eos=True)
        assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        await srv.stop()


async def test_prefix_caching_off_never_hits(http: aiohttp.ClientSession) -> None:
    srv = await start_server(_config(enable_prefix_caching=False))
    try:
        prompt = "Same prompt twice. " * 30
        for _ in range(2):
            r = await complete(http, srv.url, prompt=prompt, max_tokens=2, ignore_eos=True)
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        s = await scrape(http, srv.url)
        assert value(s, "vllm:prefix_cache_hits_total") == 0.0
    finally:
        await srv.stop()


async def test_preemption_when_blocks_run_out(http: aiohttp.ClientSession) -> None:
    """A cache of 48 blocks (768 tokens) cannot hold 6 requests growing to 300 tokens each."""
    srv = await start_server(_config(num_gpu_blocks_override=48))
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    complete(
                        http,
                        srv.url,
                        prompt=f"{i} preempt me " * 8,
                        max_tokens=200,
                        ignore_eos=True,
                    )
                    for i in range(6)
                )
            ),
            timeout=60,
        )
        assert all(r["usage"]["completion_tokens"] == 200 for r in results)
        s = await scrape(http, srv.url)
        assert value(s, "vllm:num_preemptions_total") > 0
        assert value(s, "vllm:kv_cache_usage_perc") == 0.0
        assert value(s, "vllm:generation_tokens_total") == 6 * 200
    finally:
        await srv.stop()


async def test_client_disconnect_aborts_and_frees_blocks(http: aiohttp.ClientSession) -> None:
    srv = await start_server(_config(time_scale=20.0))
    try:
        body = {
            "model": MODEL,
            "prompt": "q" * 3000,
            "max_tokens": 5000,
            "ignore_eos": True,
            "stream": True,
        }
        resp = await http.post(srv.url + "/v1/completions", json=body)
        assert resp.status == 200
        for _ in range(10):  # a few tokens in: the request is running and holds its blocks
            await resp.content.readline()
        s = await scrape(http, srv.url)
        assert value(s, "vllm:num_requests_running") == 1.0
        assert value(s, "vllm:kv_cache_usage_perc") > 0.0
        resp.close()  # drop the connection mid-stream
        s = await wait_for(
            http,
            srv.url,
            lambda s: (
                value(s, "vllm:num_requests_running") == 0.0
                and value(s, "vllm:kv_cache_usage_perc") == 0.0
            ),
        )
        assert srv.engine.stats().num_used_blocks == 0
        assert not srv.engine.has_unfinished()
        assert value(s, "vllm:generation_tokens_total") < 5000  # it stopped early
        assert value(s, "vllm:e2e_request_latency_seconds_count") == 0.0  # never finished
    finally:
        await srv.stop()


async def test_non_streaming_disconnect_aborts_too(http: aiohttp.ClientSession) -> None:
    srv = await start_server(_config(time_scale=20.0))
    try:
        body = {"model": MODEL, "prompt": "w" * 500, "max_tokens": 5000, "ignore_eos": True}
        task = asyncio.create_task(http.post(srv.url + "/v1/completions", json=body))
        await wait_for(http, srv.url, lambda s: value(s, "vllm:num_requests_running") == 1.0)
        task.cancel()  # the client gives up: its connection closes
        await asyncio.gather(task, return_exceptions=True)
        await wait_for(
            http,
            srv.url,
            lambda s: (
                value(s, "vllm:num_requests_running") == 0.0
                and value(s, "vllm:kv_cache_usage_perc") == 0.0
            ),
        )
        assert not srv.engine.has_unfinished()
    finally:
        await srv.stop()


async def test_servers_in_one_process_keep_their_own_metrics(http: aiohttp.ClientSession) -> None:
    a = await start_server(_config())
    b = await start_server(_config())
    try:
        await complete(http, a.url, prompt="only a", max_tokens=3, ignore_eos=True)
        sa, sb = await scrape(http, a.url), await scrape(http, b.url)
        assert value(sa, "vllm:generation_tokens_total") == 3
        assert value(sb, "vllm:generation_tokens_total") == 0
    finally:
        await a.stop()
        await b.stop()
