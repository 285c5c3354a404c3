"""What the gateway answers besides proxying: unknown routes and methods, one model's object,
API keys, hop-by-hop headers, bounded metric labels, the series a dashboard needs, and the retry
budget running out."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from gateway.app import run_gateway
from gateway.headers import downstream_headers, upstream_headers
from tests.test_gateway_proxy import MODEL, Upstream, config, running, sample


@pytest.fixture
async def up() -> Any:
    async with running("ok") as (u,):
        yield u


async def test_unknown_routes_and_methods_get_openai_errors(up: Upstream) -> None:
    async with run_gateway(config([up.url]), port=0) as base, aiohttp.ClientSession() as s:
        root = base.removesuffix("/v1")
        for method, path, status in (
            ("POST", "/v1/embeddings", 404),
            ("GET", "/nothing/here", 404),
            ("GET", "/v1/completions", 405),
            ("PUT", "/v1/chat/completions", 405),
            ("POST", "/v1/models", 405),
        ):
            async with s.request(method, root + path) as r:
                assert r.status == status, (method, path)
                assert r.headers["Content-Type"].startswith("application/json")
                err = (await r.json())["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]
                if status == 405:
                    assert r.headers["Allow"] and err["code"] == "method_not_allowed"
    assert up.hits == 0


async def test_models_retrieve_one_model_or_404(up: Upstream) -> None:
    cfg = config([up.url])
    cfg = dataclasses.replace(
        cfg, pools=(dataclasses.replace(cfg.pools[0], models=(MODEL, "org/m")), *cfg.pools[1:])
    )
    async with run_gateway(cfg, port=0) as base:
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
        m = await client.models.retrieve(MODEL)
        assert (m.id, m.object) == (MODEL, "model")
        assert (await client.models.retrieve("org/m")).id == "org/m"  # names with a slash
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("nope")
        assert info.value.code == "model_not_found"
        await client.close()


async def test_an_empty_bearer_token_never_authenticates(up: Upstream) -> None:
    # The config refuses blank keys (tests/test_gateway_config.py); even if one got through,
    # an empty token must not match it.
    cfg = config([up.url], api_keys=["k1"])
    cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, api_keys=("k1", "")))
    async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "hi"}
        for auth in ("Bearer ", "Bearer", "Bearer    ", ""):
            async with s.post(
                f"{base}/completions", json=body, headers={"Authorization": auth}
            ) as r:
                assert r.status == 401, auth
        async with s.post(
            f"{base}/completions", json=body, headers={"Authorization": "Bearer k1"}
        ) as r:
            assert r.status == 200
    assert up.hits == 1


async def test_headers_the_connection_header_names_are_not_forwarded(up: Upstream) -> None:
    async with run_gateway(config([up.url]), port=0) as base, aiohttp.ClientSession() as s:
        hdrs = {"Connection": "keep-alive, X-Hop", "X-Hop": "secret", "X-Keep": "yes"}
        async with s.post(
            f"{base}/completions", json={"model": MODEL, "prompt": "hi"}, headers=hdrs
        ) as r:
            assert r.status == 200
    seen = {k.lower() for k in up.headers[0]}
    assert "x-hop" not in seen and "x-keep" in seen
    # The same rule on the way back (a replica behind a proxy that names its own hop headers).
    resp = SimpleNamespace(
        headers=CIMultiDict({"Connection": "x-up", "X-Up": "1", "Content-Type": "text/plain"})
    )
    assert downstream_headers(resp, "rid") == {"Content-Type": "text/plain", "x-request-id": "rid"}  # type: ignore[arg-type]
    plain = upstream_headers(CIMultiDict({"Accept": "*/*"}), "rid", strip_auth=False)
    assert plain == [("Accept", "*/*"), ("x-request-id", "rid")]


async def test_every_connection_header_names_hop_by_hop_headers() -> None:
    """A message may carry several Connection headers (RFC 9110 5.3: one list); the headers
    a later one names are hop-by-hop too, on the way to the replica and back."""
    async with (
        running("hop") as (hop,),
        run_gateway(config([hop.url]), port=0) as base,
        aiohttp.ClientSession() as s,
    ):
        hdrs = CIMultiDict(
            [("Connection", "keep-alive"), ("Connection", "X-Hop"), ("X-Hop", "secret")]
        )
        hdrs["X-Keep"] = "yes"
        body = {"model": MODEL, "prompt": "hi"}
        async with s.post(f"{base}/completions", json=body, headers=hdrs) as r:
            assert r.status == 200
            back = {k.lower() for k in r.headers}
    seen = {k.lower() for k in hop.headers[0]}
    assert "x-hop" not in seen and "x-keep" in seen
    assert "x-hop-down" not in back and "x-keep-down" in back


async def test_unknown_models_are_counted_without_their_names(up: Upstream) -> None:
    before = sample("kvpilot_gateway_requests_total", pool="", model="", replica="", code="404")
    async with run_gateway(config([up.url]), port=0) as base, aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(
                f"{base}/completions", json={"model": f"nope-{i}", "prompt": "x"}
            ) as r:
                assert r.status == 404
                assert "nope-" in (await r.json())["error"]["message"]
        async with s.get(base.removesuffix("/v1") + "/metrics") as r:
            text = await r.text()
    assert "nope-" not in text
    after = sample("kvpilot_gateway_requests_total", pool="", model="", replica="", code="404")
    assert after == before + 5


async def test_latency_and_queue_series_are_exposed_after_traffic() -> None:
    async with (
        running("ok", "ok") as ups,
        run_gateway(config([u.url for u in ups]), port=0) as base,
    ):
        client = openai.AsyncOpenAI(base_url=base, api_key="none")
        for _ in range(3):
            async for _ev in await client.completions.create(model=MODEL, prompt="x", stream=True):
                pass
        await client.close()
        async with aiohttp.ClientSession() as s, s.get(base.removesuffix("/v1") + "/metrics") as r:
            text = await r.text()
    lines = text.splitlines()
    for series in (
        'kvpilot_gateway_ttft_seconds_count{model="llama-3.1-8b",pool="llama"}',
        'kvpilot_gateway_tpot_seconds_count{model="llama-3.1-8b",pool="llama"}',
        'kvpilot_gateway_queue_length{pool="llama"}',
        'kvpilot_gateway_queue_length{pool="other"}',
    ):
        assert any(ln.startswith(series) for ln in lines), series
    assert sample("kvpilot_gateway_queue_length", pool="llama") == 0


async def test_a_spent_retry_budget_answers_502_without_retrying() -> None:
    """No refill (ratio 0, 0 per second): the budget's initial 10 retries, then none."""
    async with running("503", "ok") as ups:
        cfg = config(
            [u.url for u in ups],
            retry_budget_ratio=0,
            retry_budget_min_per_s=0,
            eject_after_failures=1000,
        )
        spent = sample("kvpilot_gateway_retry_budget_exhausted_total", pool="llama")
        retries = sample("kvpilot_gateway_retries_total", pool="llama", reason="status_503")
        async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
            codes = []
            for i in range(30):  # round-robin: many start on the 503 replica
                async with s.post(
                    f"{base}/completions", json={"model": MODEL, "prompt": f"{i}"}
                ) as r:
                    codes.append(r.status)
                    if r.status == 502:
                        assert "retry budget" in (await r.json())["error"]["message"]
        retried = sample("kvpilot_gateway_retries_total", pool="llama", reason="status_503")
    assert retried == retries + 10  # the budget's initial tokens, then no more retries
    assert codes.count(502) >= 2 and codes.count(200) + codes.count(502) == len(codes)
    exhausted = sample("kvpilot_gateway_retry_budget_exhausted_total", pool="llama")
    assert exhausted == spent + codes.count(502)
