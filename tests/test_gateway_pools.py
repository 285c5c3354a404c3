"""Several pools: a model only a later pool serves, a model several pools list (spill-over), a
model server two pools share, and requests no replica of a pool can ever hold.

Real HTTP on 127.0.0.1 against the small upstreams of tests/test_gateway_proxy.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from gateway.app import GATEWAY, run_gateway, start_gateway
from gateway.estimate import Estimator
from gateway.fleet import Endpoint, Fleet
from gateway.proxy import Gateway, RoutedError
from kvpilot.config import parse_config
from kvpilot.signals import ReplicaState
from tests.test_gateway_proxy import MODEL, closed_port_url, running, sample

NOW = 1_000.0


def pools_config(pools: list[dict[str, Any]], **gateway: Any) -> Any:
    gw = {"policy": "round-robin", "scrape_fallback": False}
    gw.update(gateway)
    return parse_config({"pools": pools, "gateway": gw})


async def fleet_view(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(base.removesuffix("/v1") + "/debug/fleet") as r:
        return await r.json()  # type: ignore[no-any-return]


async def test_a_model_of_the_second_pool_goes_to_its_replicas() -> None:
    async with running("ok", "ok") as ups:
        cfg = pools_config(
            [
                {"name": "llama", "models": [MODEL], "endpoints": [ups[0].url]},
                {"name": "qwen", "models": ["qwen-7b"], "endpoints": [ups[1].url]},
            ]
        )
        before = sample(
            "kvpilot_gateway_requests_total",
            pool="qwen", model="qwen-7b", replica=ups[1].url, code="200",
        )  # fmt: skip
        async with run_gateway(cfg, port=0) as base:
            client = openai.AsyncOpenAI(base_url=base, api_key="none")
            for _ in range(3):
                r = await client.completions.create(model="qwen-7b", prompt="hi")
                assert r.choices[0].text == "r1"
            await client.close()
        after = sample(
            "kvpilot_gateway_requests_total",
            pool="qwen", model="qwen-7b", replica=ups[1].url, code="200",
        )  # fmt: skip
    assert [u.hits for u in ups] == [0, 3]
    assert after == before + 3


async def test_a_model_two_pools_list_spills_over_when_the_first_is_saturated() -> None:
    """Pool a (headroom) is busy with a long prompt's prefill: the next request goes to pool b
    at once rather than waiting; once a has room again it is the first choice again."""
    async with running("hold", "ok") as ups:
        cfg = pools_config(
            [
                {"name": "a", "models": [MODEL], "endpoints": [ups[0].url], "policy": "headroom"},
                {"name": "b", "models": [MODEL], "endpoints": [ups[1].url]},
            ]
        )
        async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
            long = {"model": MODEL, "prompt": "word " * 40_000, "max_tokens": 8}
            holder = asyncio.create_task(s.post(f"{base}/completions", json=long))
            for _ in range(200):  # bounded: until pool a's replica has it
                if ups[0].hits:
                    break
                await asyncio.sleep(0.01)
            small = {"model": MODEL, "prompt": "hi", "max_tokens": 8}
            async with s.post(f"{base}/completions", json=small) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["text"] == "r1"  # pool b's replica
            ups[0].release.set()
            async with await holder as r:
                assert (await r.json())["choices"][0]["text"] == "r0"
            async with s.post(f"{base}/completions", json=small) as r:
                assert (await r.json())["choices"][0]["text"] == "r0"  # a first again
    assert ups[0].hits == 2 and ups[1].hits == 1


async def test_when_every_pool_is_saturated_the_request_waits_in_the_first() -> None:
    cfg = pools_config(
        [{"name": "a", "models": [MODEL]}, {"name": "b", "models": [MODEL]}],
        queue_timeout_s=0.2,
    )
    shed = {p: sample("kvpilot_gateway_shed_total", pool=p, reason="queue_timeout") for p in "ab"}
    body = {"model": MODEL, "prompt": "hi"}
    async with (
        run_gateway(cfg, port=0) as base,
        aiohttp.ClientSession() as s,
        s.post(f"{base}/completions", json=body) as r,
    ):
        assert r.status == 429
    assert sample("kvpilot_gateway_shed_total", pool="a", reason="queue_timeout") == shed["a"] + 1
    assert sample("kvpilot_gateway_shed_total", pool="b", reason="queue_timeout") == shed["b"]


async def test_a_replica_two_pools_share_fails_and_is_ejected_in_its_own_pool() -> None:
    """Streams that break after their first byte count against the replica (they were reset
    by the success bookkeeping before), and only in the pool whose requests failed."""
    async with running("break", "ok") as ups:
        cfg = pools_config(
            [
                {"name": "llama", "models": [MODEL], "endpoints": [ups[0].url, ups[1].url]},
                {"name": "other", "models": ["qwen-7b"], "endpoints": [ups[0].url]},
            ],
            eject_after_failures=2,
            eject_for_s=60,
        )
        async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
            for _ in range(8):
                body = {"model": MODEL, "prompt": "hi", "stream": True}
                async with s.post(f"{base}/completions", json=body) as r:
                    await r.read()
            pools = (await fleet_view(base))["pools"]
        urls = [u.url for u in ups]
    ejected = {p: {x["url"]: x["ejected"] for x in reps} for p, reps in pools.items()}
    assert ejected["llama"] == {urls[0]: True, urls[1]: False}
    assert ejected["other"] == {urls[0]: False}
    assert ups[0].hits == 2  # two broken streams, then out of pool llama's rotation


# ---- requests no replica can ever hold --------------------------------------------------------

HUGE = "word " * 40_000  # ~50k tokens: more than an L4's whole KV cache for llama-3.1-8b (~27k)


async def test_a_prompt_larger_than_every_replicas_cache_is_400_context_length_exceeded() -> None:
    async with running("ok") as (up,):
        cfg = pools_config(
            [{"name": "l4", "models": [MODEL], "endpoints": [up.url], "accelerator": "nvidia-l4"}],
            policy="headroom",
        )
        async with run_gateway(cfg, port=0) as base:
            client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(model=MODEL, prompt=HUGE, max_tokens=16)
            assert info.value.code == "context_length_exceeded"
            r = await client.completions.create(model=MODEL, prompt="hi", max_tokens=16)
            assert r.choices[0].text == "r0"
            await client.close()
    assert up.hits == 1


async def test_a_prompt_too_large_for_the_first_pool_goes_to_one_that_holds_it() -> None:
    async with running("ok", "ok") as ups:
        cfg = pools_config(
            [
                {"name": "l4", "models": [MODEL], "endpoints": [ups[0].url],
                 "accelerator": "nvidia-l4"},
                {"name": "h100", "models": [MODEL], "endpoints": [ups[1].url],
                 "accelerator": "nvidia-h100-80gb"},
            ],
            policy="headroom",
        )  # fmt: skip
        async with run_gateway(cfg, port=0) as base:
            client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            r = await client.completions.create(model=MODEL, prompt=HUGE, max_tokens=16)
            assert r.choices[0].text == "r1"
            await client.close()
    assert [u.hits for u in ups] == [0, 1]


def test_a_replica_leaving_is_forgotten_by_its_pools_policy() -> None:
    cfg = pools_config(
        [{"name": "p", "models": ["m"], "endpoints": ["http://10.0.0.1:8000"]}],
        policy="headroom",
    )
    fleet = Fleet()
    g = Gateway(cfg, fleet)
    fleet.set_endpoints("p", [Endpoint("r0", "http://10.0.0.0:8000")])
    req = Estimator().features("q1", "m", "A long shared document. " * 40, 16)
    d = g._pick(g.pools["p"], req, frozenset())
    assert d.replica_id == "r0"
    index = g.pools["p"].policy.index
    assert index is not None and index.match(req.prefix_hashes) != {}
    assert fleet.ledger.replicas() == ["r0"]
    fleet.set_endpoints("p", [Endpoint("r1", "http://10.0.0.1:8000")])
    assert index.match(req.prefix_hashes) == {}  # headroom's prefix index dropped it
    assert fleet.ledger.replicas() == []


def test_a_pool_mixing_gpu_types_seeds_each_replica_from_the_gpu_its_state_reports() -> None:
    """The demo's pool: one H100 and two L4s, no single `accelerator`. Each replica's speed seed
    comes from the GPU its agent reports, the same object for the same GPU (views compare by
    identity), and a pool that names its accelerator keeps that seed."""
    cfg = parse_config(
        {
            "pools": [
                {"name": "mixed", "models": [MODEL], "endpoints": ["http://a:1", "http://b:1"]},
                {"name": "l4s", "models": ["qwen-7b"], "accelerator": "nvidia-l4",
                 "endpoints": ["http://c:1"]},
            ]
        }
    )  # fmt: skip
    fleet = Fleet()
    gw = Gateway(cfg, fleet)
    fleet.set_endpoints("mixed", [Endpoint("a", "http://a:1"), Endpoint("b", "http://b:1")])
    fleet.set_endpoints("l4s", [Endpoint("c", "http://c:1")])
    for rid, url, pool, gpu in [
        ("a", "http://a:1", "mixed", "nvidia-h100-80gb"),
        ("b", "http://b:1", "mixed", "nvidia-l4"),
        ("c", "http://c:1", "l4s", "nvidia-l4"),
    ]:
        fleet.observe_state(
            ReplicaState(replica_id=rid, address=url, pool=pool, accelerator=gpu, observed_at=NOW)
        )
    views = {v.replica_id: v for v in fleet.views("mixed", NOW)}
    h100, l4 = views["a"].profile, views["b"].profile
    assert h100 is not None and l4 is not None
    assert h100.prefill_tokens_per_s > 2 * l4.prefill_tokens_per_s  # an H100 prefills faster
    assert gw._seed_for("mixed", "nvidia-l4") is l4  # cached: one object per pool and GPU
    (c,) = fleet.views("l4s", NOW)
    assert c.profile is fleet.profiles["l4s"]  # the pool's own accelerator: its seed stands


def kv_state(url: str, blocks: int, pool: str = "p", **fields: Any) -> ReplicaState:
    """A fresh state of the replica at `url` with a KV cache of `blocks` x 16 tokens."""
    return ReplicaState(
        replica_id=url, address=url, pool=pool, kv_blocks_total=blocks, kv_block_size=16,
        observed_at=time.time(), **fields,
    )  # fmt: skip


async def test_a_request_only_a_failed_replica_can_hold_is_502_not_400() -> None:
    """The review's repro: the one replica big enough for the request refuses connections; the
    retry finds only a smaller one. That is the replica's failure (502), not the request's: a
    400 context_length_exceeded would tell the client never to send it again."""
    async with running("ok") as (small,):
        big = closed_port_url()
        cfg = pools_config(
            [{"name": "p", "models": [MODEL], "endpoints": [big, small.url]}], policy="headroom"
        )
        runner, base = await start_gateway(cfg, port=0)
        try:
            fleet = runner.app[GATEWAY].fleet
            for url, blocks in ((big, 8000), (small.url, 2000)):  # 128k and 32k tokens
                assert fleet.observe_state(kv_state(url, blocks))
            body = {"model": MODEL, "prompt": HUGE, "max_tokens": 16}
            async with aiohttp.ClientSession() as s, s.post(f"{base}/completions", json=body) as r:
                assert r.status == 502
                assert (await r.json())["error"]["code"] == "upstream_failed"
        finally:
            await runner.cleanup()
    assert small.hits == 0


async def test_a_request_only_an_ejected_replica_can_hold_waits_for_it() -> None:
    """The review's other repro: the big replica is out for a while (one 503 ejected it). Its
    ejection is transient: the request waits for it instead of being refused as too long."""
    async with running("ok", "ok") as (big, small):
        cfg = pools_config(
            [{"name": "p", "models": [MODEL], "endpoints": [big.url, small.url]}],
            policy="headroom",
            eject_after_failures=1,
            eject_for_s=0.3,
        )
        runner, base = await start_gateway(cfg, port=0)
        try:
            fleet = runner.app[GATEWAY].fleet
            for url, blocks in ((big.url, 8000), (small.url, 2000)):
                assert fleet.observe_state(kv_state(url, blocks))
            assert fleet.failed(big.url, time.time(), "p")  # ejected
            body = {"model": MODEL, "prompt": HUGE, "max_tokens": 16}
            async with aiohttp.ClientSession() as s, s.post(f"{base}/completions", json=body) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["text"] == "r0"
        finally:
            await runner.cleanup()
    assert (big.hits, small.hits) == (1, 0)


async def test_a_refusal_is_counted_under_the_pool_the_spilled_request_waited_in() -> None:
    """Too large for pool a (one L4), so it waits in pool b (no replica yet) and times out
    there: the 429 is pool b's, not the first pool's."""
    async with running("ok") as (up,):
        cfg = pools_config(
            [
                {"name": "a", "models": [MODEL], "endpoints": [up.url], "accelerator": "nvidia-l4"},
                {"name": "b", "models": [MODEL]},
            ],
            policy="headroom",
            queue_timeout_s=0.2,
        )
        labels = {"model": MODEL, "replica": "", "code": "429"}
        before = {p: sample("kvpilot_gateway_requests_total", pool=p, **labels) for p in "ab"}
        async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": HUGE, "max_tokens": 16}
            async with s.post(f"{base}/completions", json=body) as r:
                assert r.status == 429
                assert "pool 'b'" in (await r.json())["error"]["message"]
        after = {p: sample("kvpilot_gateway_requests_total", pool=p, **labels) for p in "ab"}
    assert (after["a"] - before["a"], after["b"] - before["b"]) == (0, 1)
    assert up.hits == 0


async def test_a_spilled_request_is_picked_once_in_each_saturated_pool() -> None:
    """Each pool's policy is asked once per request: the decision counters and pick times
    count picks, and a second pick in the same instant can only say the same."""
    cfg = pools_config(
        [
            {"name": "a", "models": [MODEL], "endpoints": ["http://10.0.0.1:8000"]},
            {"name": "b", "models": [MODEL], "endpoints": ["http://10.0.0.2:8000"]},
        ],
        policy="headroom",
        queue_timeout_s=0.05,
    )
    fleet = Fleet()
    g = Gateway(cfg, fleet)
    for pool, url in (("a", "http://10.0.0.1:8000"), ("b", "http://10.0.0.2:8000")):
        fleet.set_endpoints(pool, [Endpoint(url, url)])
        # a long queue on each: no replica meets the TTFT target, headroom holds the request
        fleet.observe_state(kv_state(url, 2000, pool, waiting=1000, running=64))
    labels = {"policy": "headroom", "reason": "saturated"}
    before = {p: sample("kvpilot_gateway_decisions_total", pool=p, **labels) for p in "ab"}
    req = Estimator().features("q1", MODEL, "hello", 16)
    with pytest.raises(RoutedError) as e:
        await g._spill(g.model_pools[MODEL], req)
    assert (e.value.pool, e.value.error.status) == ("a", 429)
    after = {p: sample("kvpilot_gateway_decisions_total", pool=p, **labels) for p in "ab"}
    assert (after["a"] - before["a"], after["b"] - before["b"]) == (1, 1)
