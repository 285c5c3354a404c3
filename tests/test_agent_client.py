"""AgentWatchClient: streams NodeStates and reconnects with backoff when the agent restarts."""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from agent.client import AgentWatchClient
from agent.fakes import FakeGpuSource, fake_gpu
from agent.run import agent_config, running_agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_client_keeps_latest_across_an_agent_restart_and_reconnects() -> None:
    port = free_port()
    cfg = agent_config([], listen=f"127.0.0.1:{port}", node="n1", scrape_interval_s=0.05)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        client = AgentWatchClient(url, session, min_backoff_s=0.05, max_backoff_s=0.2)
        stream = client.states()
        async with running_agent(cfg, gpu_source=FakeGpuSource([fake_gpu(0)])):
            first = await anext(stream)
            assert first.node == "n1" and len(first.gpus) == 1
        # the agent is gone: the stream waits (retrying) and keeps what it had
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)
        assert not pending.done()
        assert client.state == first and not client.connected
        async with running_agent(cfg, gpu_source=FakeGpuSource([fake_gpu(0), fake_gpu(1)])):
            again = await asyncio.wait_for(pending, 10)
            assert len(again.gpus) == 2 and again.observed_at > first.observed_at
            assert client.connects == 2 and client.connected
        await stream.aclose()


async def test_client_skips_blank_lines_and_survives_garbage() -> None:
    from aiohttp import web

    from kvpilot.signals import NodeState, to_json

    calls = 0

    async def watch(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        resp = web.StreamResponse()
        await resp.prepare(request)
        if calls == 1:
            await resp.write(b"{not json\n")  # a broken agent: the client drops and reconnects
        else:
            await resp.write(b"\n" + to_json(NodeState(node="ok", observed_at=2.0))[:10])
            await resp.write(to_json(NodeState(node="ok", observed_at=2.0))[10:] + b"\n")
            await asyncio.sleep(5)
        return resp

    app = web.Application()
    app.router.add_get("/v1/state/watch", watch)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            client = AgentWatchClient(f"http://127.0.0.1:{port}", session, min_backoff_s=0.01)
            async for state in client:
                assert state.node == "ok"  # split across two writes, reassembled
                break
            assert calls == 2
    finally:
        await runner.cleanup()


def test_node_state_decodes_through_the_shared_decoder() -> None:
    from agent.fakes import fake_gpu
    from kvpilot.signals import NodeState, ReplicaState, from_json, to_json

    g = fake_gpu(3)
    state = NodeState(
        node="n",
        observed_at=5.5,
        gpus=(g,),
        replicas=(
            ReplicaState(replica_id="ns/p", address="http://x:8000", pool="p", models=("a", "b"),
                         gpus=(g,), ttft_s=0.2, lora_adapters=("l",), observed_at=5.0),
        ),
    )  # fmt: skip
    raw = to_json(state)
    assert from_json(NodeState, raw) == state
    assert isinstance(from_json(NodeState, raw).replicas[0].gpus, tuple)
    newer = raw.replace(b'"node":"n"', b'"node":"n","zone":"us-central1-a"')
    assert from_json(NodeState, newer) == state  # unknown keys from a newer agent are ignored
