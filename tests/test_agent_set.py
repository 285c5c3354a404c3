"""AgentSet: every agent behind one URL (a headless Service), followed as agents come and go."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

from agent.client import AgentSet, resolve_addresses
from agent.run import agent_config, running_agent


async def wait_for(cond, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def two_agents_on_one_port():
    """Agents on 127.0.0.1 and 127.0.0.2 sharing a port, as pods behind one Service do."""
    cfg_a = agent_config(["http://127.0.0.1:9"], listen="127.0.0.1:0", node="node-a")
    async with running_agent(cfg_a) as url_a:
        port = int(url_a.rsplit(":", 1)[1])
        cfg_b = agent_config(["http://127.0.0.1:9"], listen=f"127.0.0.2:{port}", node="node-b")
        cfg_b = cfg_b.__class__(pools=(cfg_b.pools[0].__class__(
            name="default", models=("llama-3.1-8b",), endpoints=("http://127.0.0.2:9",),
            engine="kvpilot"),), agent=cfg_b.agent)  # fmt: skip
        async with running_agent(cfg_b):
            yield port


async def test_a_service_name_expands_to_every_agent_and_follows_changes() -> None:
    answer = ["127.0.0.1", "127.0.0.2"]

    async def resolver(host: str, port: int) -> list[str]:
        assert host == "kvpilot-agent.kvpilot.svc"
        return list(answer)

    seen_nodes: set[str] = set()
    async with two_agents_on_one_port() as port, aiohttp.ClientSession() as session:
        agents = AgentSet(
            [f"http://kvpilot-agent.kvpilot.svc:{port}"],
            session,
            on_state=lambda n: seen_nodes.add(n.node),
            resolve_every_s=3600,
            resolver=resolver,
        )
        await agents.refresh()
        assert sorted(agents.clients) == [f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"]
        await wait_for(lambda: seen_nodes == {"node-a", "node-b"})
        await wait_for(lambda: len(agents.replicas()) == 2)
        assert {r.address for r in agents.replicas()} == {
            "http://127.0.0.1:9",
            "http://127.0.0.2:9",
        }

        answer.remove("127.0.0.1")  # node-a's agent left the Service
        await agents.refresh()
        assert list(agents.clients) == [f"http://127.0.0.2:{port}"]
        assert [r.address for r in agents.replicas()] == ["http://127.0.0.2:9"]

        answer.clear()  # DNS trouble: keep what we have rather than go blind
        await agents.refresh()
        assert list(agents.clients) == [f"http://127.0.0.2:{port}"]
        await agents.close()


async def test_real_resolution_of_a_host_name_and_of_literals() -> None:
    assert await resolve_addresses("localhost", 80) == ["127.0.0.1"]
    assert await resolve_addresses("127.0.0.5", 80) == ["127.0.0.5"]
    assert await resolve_addresses("::1", 80) == ["::1"]
    assert await resolve_addresses("no-such-host.invalid", 80) == []
