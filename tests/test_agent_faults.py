"""Faults and bad input: each is counted and logged, and everything else keeps working."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from agent.client import AgentWatchClient
from agent.errors import ErrorLog
from agent.fakes import FakeGpuSource, MetricsServer, fake_gpu, fixture_text
from agent.gpus import GpuReading
from agent.owners import OwnerResolver
from agent.run import agent_config, running_agent
from kvpilot.config import Config
from kvpilot.signals import NodeState


def cfg_for(endpoints: list[str], **agent: object) -> Config:
    cfg = agent_config(endpoints, engine="auto")
    return dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **agent))


async def errors_of(session: aiohttp.ClientSession, url: str, kind: str) -> float:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    m = re.search(rf'kvpilot_agent_errors_total\{{kind="{kind}"\}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


async def eventually(check, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def counting_vllm() -> object:
    """Recorded vLLM text whose generation counter grows on every scrape."""
    base = fixture_text("vllm")
    n = itertools.count()

    def render() -> str:
        return base.replace(
            'vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 20480.0',
            f'vllm:generation_tokens_total{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} {20480 + 100 * next(n)}.0',
        )

    return render


async def test_a_hanging_server_never_delays_the_others(caplog: pytest.LogCaptureFixture) -> None:
    fast = MetricsServer(counting_vllm())  # type: ignore[arg-type]
    slow = MetricsServer(lambda: fixture_text("vllm"), delay_s=30)
    async with fast as fast_url, slow as slow_url:
        cfg = cfg_for([fast_url, slow_url], scrape_interval_s=0.1, scrape_timeout_s=0.6)
        caplog.set_level(logging.INFO, "kvpilot.agent")
        async with (
            running_agent(cfg, gpu_source=FakeGpuSource([])) as url,
            aiohttp.ClientSession() as session,
        ):
            stamps = []
            async for state in AgentWatchClient(url, session):
                reps = {r.address: r for r in state.replicas}
                stamps.append(reps[fast_url].observed_at)
                assert reps[slow_url].observed_at == 0.0 and not reps[slow_url].healthy
                if len(set(stamps) - {0.0}) >= 6:
                    break
            assert reps[fast_url].generation_tokens_per_s > 0
            await eventually(lambda: _at_least(session, url, "timeout", 2))
        timeouts = [
            r for r in caplog.records if "timeout" in r.getMessage() and slow_url in r.getMessage()
        ]
        assert len(timeouts) == 1  # counted every time, logged once


async def _at_least(session: aiohttp.ClientSession, url: str, kind: str, n: float) -> bool:
    return await errors_of(session, url, kind) >= n


@pytest.mark.parametrize("body", ["<html>oops</html>", 'vllm:num_requests_waiting{x="1" 3\n'])
async def test_malformed_metrics_are_counted_and_the_replica_goes_stale(body: str) -> None:
    server = MetricsServer(lambda: fixture_text("vllm"))
    async with server as ms_url, aiohttp.ClientSession() as session:
        cfg = cfg_for([ms_url], scrape_interval_s=0.05, stale_after_s=0.3)
        async with running_agent(cfg, gpu_source=FakeGpuSource([])) as url:
            client = AgentWatchClient(url, session)
            async for state in client:
                if state.replicas[0].healthy:
                    break
            server.render = lambda: body
            async for state in client:
                if not state.replicas[0].healthy:
                    break
            r = state.replicas[0]
            assert r.waiting == 3  # the last good reading is kept, marked stale
            assert await errors_of(session, url, "parse") >= 1


async def test_http_errors_from_a_server_are_scrape_errors() -> None:
    async with MetricsServer(lambda: "no", status=503) as ms_url, aiohttp.ClientSession() as s:
        cfg = cfg_for([ms_url], scrape_interval_s=0.05)
        async with running_agent(cfg, gpu_source=FakeGpuSource([])) as url:
            await eventually(lambda: _at_least(s, url, "scrape", 1))


async def test_an_unhealthy_gpu_is_published_as_such_and_the_rest_keep_reporting() -> None:
    gpus = [fake_gpu(i) for i in range(4)]
    source = FakeGpuSource(gpus)
    cfg = cfg_for([], scrape_interval_s=0.05)
    async with running_agent(cfg, gpu_source=source) as url, aiohttp.ClientSession() as session:
        client = AgentWatchClient(url, session)
        await anext(client.states())
        source.fail(gpus[2].uuid, "GPU is lost")
        source.set(gpus[0].uuid, util=0.75, hbm_used_bytes=10 * 2**30)
        async for state in client:
            if not state.gpus[2].healthy:
                break
        assert state.gpus[2].error == "GPU is lost"
        assert [g.healthy for g in state.gpus] == [True, True, False, True]
        assert state.gpus[0].util == 0.75 and state.gpus[0].hbm_used_bytes == 10 * 2**30
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        assert (
            f'kvpilot_gpu_healthy{{gpu="2",mig_instance="",model_name="NVIDIA H100 80GB HBM3",namespace="",node="node-0",pod="",uuid="{gpus[2].uuid}"}} 0.0'
            in text
        )


class BrokenSource:
    async def read(self, endpoints: object) -> GpuReading:
        raise RuntimeError("driver went away")

    async def close(self) -> None:
        return None


async def test_a_failing_gpu_source_does_not_stop_replica_scrapes() -> None:
    async with (
        MetricsServer(lambda: fixture_text("sglang")) as ms_url,
        aiohttp.ClientSession() as s,
    ):
        cfg = cfg_for([ms_url], scrape_interval_s=0.05)
        async with running_agent(cfg, gpu_source=BrokenSource()) as url:  # type: ignore[arg-type]
            async for state in AgentWatchClient(url, s):
                if state.replicas[0].healthy:
                    break
            assert state.replicas[0].engine == "sglang" and state.replicas[0].waiting == 2826
            assert await errors_of(s, url, "gpu") >= 1
            async with s.get(f"{url}/healthz") as r:
                assert r.status == 200


async def test_a_missing_pod_resources_socket_is_one_error_and_mapping_falls_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    errors = ErrorLog(CollectorRegistry())
    resolver = OwnerResolver(
        errors,
        pod_resources_socket=str(tmp_path / "kubelet.sock"),
        use_pod_resources=True,
        gpu_map={"http://127.0.0.1:9001": (1,)},
    )
    from agent.discovery import Target

    target = Target("http://127.0.0.1:9001", "http://127.0.0.1:9001", "p", ("m",))
    gpus = (fake_gpu(0), fake_gpu(1))
    owners = await resolver.resolve(GpuReading(gpus=gpus), [target])
    assert errors.count("pod_resources") == 1
    assert {u: o.replica_id for u, o in owners.items()} == {gpus[1].uuid: target.replica_id}


async def test_state_endpoint_is_503_until_the_first_cycle() -> None:
    from aiohttp import web

    from agent.hub import StateHub
    from agent.server import routes

    hub = StateHub()
    app = web.Application()
    app.add_routes(
        routes(lambda r: hub, lambda r: False, lambda r: True, lambda r: CollectorRegistry())
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/v1/state") as r:
                assert r.status == 503
            async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
            hub.publish(NodeState(node="n", observed_at=1.0))
            async with s.get(f"http://127.0.0.1:{port}/v1/state") as r:
                assert (await r.json())["node"] == "n"
    finally:
        await runner.cleanup()


async def test_gpus_are_read_on_their_own_slower_cadence() -> None:
    """Model servers every scrape interval, GPUs every gpu_interval_s: NVML reads cost ms each."""
    server = MetricsServer(counting_vllm())  # type: ignore[arg-type]
    gpus = FakeGpuSource([fake_gpu(0)])
    async with server as ms_url, aiohttp.ClientSession() as session:
        cfg = cfg_for([ms_url], scrape_interval_s=0.05, gpu_interval_s=0.5)
        async with running_agent(cfg, gpu_source=gpus) as url:
            stamps: set[float] = set()
            start = time.monotonic()
            async for state in AgentWatchClient(url, session):
                stamps.add(state.replicas[0].observed_at)
                if len(stamps - {0.0}) >= 12:
                    break
            elapsed = time.monotonic() - start
            assert state.gpus and state.gpus[0].uuid == fake_gpu(0).uuid
    # 12 fresh scrapes at 50 ms took >= 0.55 s: the GPUs were read once per 0.5 s, not per scrape.
    assert gpus.reads <= 1 + elapsed / 0.5 + 1
    assert gpus.reads < len(stamps)
