"""End to end: the official `openai` client, through the gateway, to three real modelservers.

The modelservers are `kvpilot modelserver` subprocesses on emulated L4s, time-scaled so that a
generation takes milliseconds. The gateway runs in-process with the `headroom` policy and scrapes
the servers' /metrics directly (no agent), as it does when agents are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator

import aiohttp
import openai
import pytest
from prometheus_client import REGISTRY

from gateway.app import run_gateway
from kvpilot.config import parse_config
from tests.modelservers import MODEL, start_modelserver, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def modelservers() -> Iterator[list[tuple[str, subprocess.Popen[str]]]]:
    procs = [start_modelserver() for _ in range(3)]
    try:
        yield [(url, p) for p, url in procs]
    finally:
        for p, _ in procs:
            stop(p)


def gateway_config(urls: list[str], **gw: object) -> object:
    g = {"policy": "headroom", "scrape_interval_s": 0.2}
    g.update(gw)
    return parse_config(
        {
            "pools": [
                {
                    "name": "llama-8b",
                    "models": [MODEL],
                    "endpoints": urls,
                    "accelerator": "nvidia-l4",
                }
            ],
            "gateway": g,
        }
    )


@contextlib.asynccontextmanager
async def client_for(urls: list[str], **gw: object) -> AsyncIterator[openai.AsyncOpenAI]:
    async with run_gateway(gateway_config(urls, **gw), port=0) as base:  # type: ignore[arg-type]
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
        try:
            yield client
        finally:
            await client.close()


def served(replica: str) -> float:
    return sum(
        REGISTRY.get_sample_value(
            "kvpilot_gateway_requests_total",
            {"pool": "llama-8b", "model": MODEL, "replica": replica, "code": "200"},
        )
        or 0.0
        for _ in [0]
    )


async def test_chat_and_completions_streamed_and_not(modelservers: list) -> None:
    urls = [u for u, _ in modelservers]
    before = {u: served(u) for u in urls}
    async with client_for(urls) as client:

        async def one(i: int) -> None:
            kind = i % 4
            if kind == 0:
                r = await client.completions.create(
                    model=MODEL, prompt=f"tell me {i}", max_tokens=8
                )
                assert r.choices[0].text and r.usage and r.usage.completion_tokens == 8
            elif kind == 1:
                c = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=6
                )
                assert c.choices[0].message.content and c.usage and c.usage.completion_tokens == 6
            elif kind == 2:
                texts = [
                    ev.choices[0].text
                    async for ev in await client.completions.create(
                        model=MODEL, prompt=f"stream {i}", max_tokens=5, stream=True
                    )
                    if ev.choices
                ]
                assert len("".join(texts).split()) == 5
            else:
                parts = [
                    ev.choices[0].delta.content or ""
                    async for ev in await client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": f"s {i}"}],
                        max_tokens=4,
                        stream=True,
                    )
                    if ev.choices
                ]
                assert len("".join(parts).split()) == 4

        await asyncio.gather(*(one(i) for i in range(48)))
        models = [m.id for m in (await client.models.list()).data]
        assert models == [MODEL]
    after = {u: served(u) - before[u] for u in urls}
    assert sum(after.values()) == 48
    assert sum(1 for v in after.values() if v > 0) >= 2  # spread, not all on one replica


@pytest.fixture
def victim() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A fresh modelserver the test may kill, next to the three shared ones."""
    proc, url = start_modelserver(20)
    try:
        yield url, proc
    finally:
        stop(proc)


async def test_killing_a_modelserver_loses_no_accepted_request(
    modelservers: list, victim: tuple[str, subprocess.Popen[str]]
) -> None:
    victim_url, proc = victim
    urls = [u for u, _ in modelservers] + [victim_url]
    async with client_for(urls, policy="round-robin") as client:

        async def plain(i: int) -> str:
            r = await client.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=16)
            return r.choices[0].text

        async def streamed(i: int) -> str:
            out = []
            try:
                async for ev in await client.completions.create(
                    model=MODEL, prompt=f"s{i}", max_tokens=16, stream=True
                ):
                    if ev.choices:
                        out.append(ev.choices[0].text)
            except openai.APIError as e:  # a well-formed SSE error event, not a torn stream
                return f"error:{e.message}"
            return "".join(out)

        tasks = [asyncio.create_task(plain(i)) for i in range(40)]
        tasks += [asyncio.create_task(streamed(i)) for i in range(20)]
        await asyncio.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run, no goodbye
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # and the pool keeps serving after it
        after = [await plain(100 + i) for i in range(8)]
    plain_results, stream_results = results[:40], results[40:]
    assert all(isinstance(r, str) and r for r in plain_results), plain_results
    assert all(r for r in after)
    for r in stream_results:
        assert isinstance(r, str), r  # no torn connection surfaced as a transport exception
        assert r and (not r.startswith("error:") or "mid-stream" in r)


async def test_gateway_scrapes_replica_states_without_agents(modelservers: list) -> None:
    urls = [u for u, _ in modelservers]
    async with run_gateway(gateway_config(urls), port=0) as base:  # type: ignore[arg-type]
        root = base.removesuffix("/v1")
        async with aiohttp.ClientSession() as s:
            fleet: dict = {}
            for _ in range(100):  # the first scrapes land within a few intervals
                async with s.get(f"{root}/debug/fleet") as r:
                    fleet = await r.json()
                reps = fleet["pools"]["llama-8b"]
                if all(x["source"] == "scrape" for x in reps):
                    break
                await asyncio.sleep(0.1)
    reps = fleet["pools"]["llama-8b"]
    assert sorted(x["url"] for x in reps) == sorted(urls)
    assert all(x["source"] == "scrape" for x in reps)
    assert all(
        x["state"]["kv_blocks_total"] > 0 and x["state"]["engine"] in ("vllm", "kvpilot")
        for x in reps
    )


async def test_gateway_routes_on_agent_states(modelservers: list) -> None:
    """With an agent reporting the replicas, their states come from its watch stream."""
    from agent.run import agent_config, running_agent

    urls = [u for u, _ in modelservers]
    acfg = agent_config(urls, listen="127.0.0.1:0", pool="llama-8b", scrape_interval_s=0.1)
    async with running_agent(acfg) as agent_url:
        cfg = gateway_config(urls, agents=[agent_url], scrape_fallback=False)
        async with run_gateway(cfg, port=0) as base:  # type: ignore[arg-type]
            root = base.removesuffix("/v1")
            async with aiohttp.ClientSession() as s:
                reps: list = []
                for _ in range(100):
                    async with s.get(f"{root}/debug/fleet") as r:
                        reps = (await r.json())["pools"]["llama-8b"]
                    if all(x["source"] == "agent" for x in reps):
                        break
                    await asyncio.sleep(0.1)
            client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            out = await client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
            await client.close()
    assert sorted(x["url"] for x in reps) == sorted(urls)
    assert all(x["source"] == "agent" for x in reps)
    assert all(x["state"]["kv_blocks_total"] > 0 for x in reps)
    assert out.usage.completion_tokens == 4
