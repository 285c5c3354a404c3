"""The agent against real `kvpilot modelserver` processes (time-scaled), over real HTTP.

Static endpoints and the emulated GPU source: what `make demo` runs on each emulated node.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from agent.client import AgentWatchClient
from agent.run import agent_config, running_agent
from kvpilot.config import AgentConfig, Config
from kvpilot.signals import NodeState, ReplicaState, from_json
from tests.modelservers import MODEL, start_modelserver, stop


@pytest.fixture(scope="module")
def modelservers() -> Iterator[list[str]]:
    procs = [start_modelserver() for _ in range(2)]
    try:
        yield [url for _, url in procs]
    finally:
        for p, _ in procs:
            stop(p)


def with_agent(cfg: Config, **agent: object) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **agent))


async def wait_for(
    fetch: Callable[[], object], ok: Callable[[NodeState], bool], within: float = 20.0
) -> NodeState:
    deadline = time.monotonic() + within
    state = None
    while time.monotonic() < deadline:
        state = await fetch()  # type: ignore[misc]
        if state is not None and ok(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {within}s; last state: {state}")


@contextlib.asynccontextmanager
async def agent_at(cfg: Config) -> AsyncIterator[tuple[str, aiohttp.ClientSession, Callable]]:
    async with running_agent(cfg) as url, aiohttp.ClientSession() as session:

        async def fetch() -> NodeState | None:
            async with session.get(f"{url}/v1/state") as r:
                return from_json(NodeState, await r.read()) if r.status == 200 else None

        yield url, session, fetch


def by_address(state: NodeState) -> dict[str, ReplicaState]:
    return {r.address: r for r in state.replicas}


async def test_state_fuses_engine_metrics_and_its_gpus(modelservers: list[str]) -> None:
    cfg = agent_config(modelservers, node="node-a", engine="auto")
    async with agent_at(cfg) as (url, session, fetch):
        state = await wait_for(fetch, lambda s: all(r.healthy for r in s.replicas))
        assert state.node == "node-a"
        reps = by_address(state)
        assert set(reps) == set(modelservers)
        gpu_uuids = {g.uuid for g in state.gpus}
        assert len(gpu_uuids) == 2  # one L4 per modelserver, distinct on the node
        assert sorted(g.index for g in state.gpus) == [0, 1]
        for r in reps.values():
            assert r.engine == "kvpilot"  # detected from the metric names
            assert r.accelerator == "nvidia-l4"
            assert r.kv_blocks_total > 0 and r.kv_block_size == 16
            assert MODEL in r.models
            assert len(r.gpus) == 1 and r.gpus[0].uuid in gpu_uuids
            assert r.gpus[0].hbm_used_bytes > 0  # the weights
            assert r.observed_at > 0
        assert reps[modelservers[0]].gpus[0].uuid != reps[modelservers[1]].gpus[0].uuid
        async with session.get(f"{url}/readyz") as r:
            assert r.status == 200


async def test_load_shows_up_as_queue_rates_and_latency(modelservers: list[str]) -> None:
    target = modelservers[0]
    cfg = with_agent(agent_config([target]), rate_window_s=2.0)
    async with agent_at(cfg) as (url, session, fetch):
        await wait_for(fetch, lambda s: s.replicas[0].healthy)
        body = {"model": MODEL, "prompt": "hello " * 400, "max_tokens": 200, "ignore_eos": True}

        async def one() -> None:
            async with session.post(f"{target}/v1/completions", json=body) as r:
                assert r.status == 200
                await r.read()

        load = [asyncio.create_task(one()) for _ in range(24)]
        busy = await wait_for(fetch, lambda s: s.replicas[0].running + s.replicas[0].waiting > 0)
        assert busy.replicas[0].kv_usage > 0
        done = await wait_for(fetch, lambda s: s.replicas[0].generation_tokens_per_s > 0)
        r = done.replicas[0]
        assert r.prompt_tokens_per_s > 0
        await asyncio.gather(*load)
        final = await wait_for(fetch, lambda s: s.replicas[0].ttft_s is not None)
        assert final.replicas[0].ttft_s > 0
        assert final.replicas[0].tpot_s is not None and final.replicas[0].tpot_s > 0
        assert final.replicas[0].gpus[0].util >= 0


async def test_watch_client_streams_each_new_state(modelservers: list[str]) -> None:
    cfg = with_agent(agent_config(modelservers), scrape_interval_s=0.05)
    async with agent_at(cfg) as (url, session, _):
        client = AgentWatchClient(url, session)
        seen: list[NodeState] = []
        async for state in client:
            seen.append(state)
            if len(seen) == 5:
                break
        stamps = [s.observed_at for s in seen]
        assert stamps == sorted(stamps) and len(set(stamps)) == 5
        assert set(client.latest) == set(modelservers)
        assert client.connects == 1


async def test_metrics_publish_kvpilot_and_dcgm_families(modelservers: list[str]) -> None:
    cfg = with_agent(agent_config(modelservers, node="node-m"), dcgm_compatible_metrics=True)
    async with agent_at(cfg) as (url, session, fetch):
        state = await wait_for(fetch, lambda s: len(s.gpus) == 2)
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        g = state.gpus[0]
        assert f'uuid="{g.uuid}"' in text
        assert "kvpilot_replica_kv_cache_usage_ratio{" in text
        assert 'kvpilot_agent_errors_total{kind="timeout"} 0.0' in text
        line = next(
            x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_FB_USED{") and g.uuid in x
        )
        assert 'Hostname="node-m"' in line and 'modelName="NVIDIA L4"' in line
        assert float(line.rsplit(" ", 1)[1]) == pytest.approx(g.hbm_used_bytes / 2**20, rel=0.01)


async def test_a_server_that_dies_goes_stale_but_stays_until_it_leaves_the_pool() -> None:
    proc, url_dead = start_modelserver()
    try:
        cfg = with_agent(agent_config([url_dead]), stale_after_s=0.5)
        async with agent_at(cfg) as (url, session, fetch):
            await wait_for(fetch, lambda s: s.replicas[0].healthy)
            stop(proc)
            state = await wait_for(fetch, lambda s: not s.replicas[0].healthy)
            r = state.replicas[0]
            assert r.address == url_dead  # still listed: it has not left its pool
            assert state.observed_at - r.observed_at > 0.5
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
            errors = re.search(r'kvpilot_agent_errors_total\{kind="scrape"\} (\S+)', text)
            assert errors and float(errors.group(1)) >= 1
    finally:
        stop(proc)


def test_agent_config_helper_is_valid() -> None:
    from kvpilot.config import parse_config

    cfg = agent_config(["http://127.0.0.1:9001"], listen="127.0.0.1:9100")
    assert isinstance(cfg.agent, AgentConfig)
    again = parse_config(
        {
            "pools": [
                {"name": "default", "models": [MODEL], "endpoints": ["http://127.0.0.1:9001"]}
            ],
            "agent": {"listen": "127.0.0.1:9100", "gpus": "emulated"},
        }
    )
    assert again.pools[0].endpoints == cfg.pools[0].endpoints
