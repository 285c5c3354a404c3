"""Stopping the gateway: requests in progress get `gateway.shutdown_timeout_s` to finish; what
still runs then ends well-formed (a stream with an SSE error event, an unanswered request with a
503), not cut off.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.app import start_gateway
from kvpilot.config import ConfigError, parse_config
from tests.test_gateway_proxy import MODEL, running


def two_pools(stream_url: str, plain_url: str, **gateway: Any) -> Any:
    return parse_config(
        {
            "pools": [
                {"name": "s", "models": [MODEL], "endpoints": [stream_url]},
                {"name": "n", "models": ["qwen-7b"], "endpoints": [plain_url]},
            ],
            "gateway": {"policy": "round-robin", "scrape_fallback": False, **gateway},
        }
    )


async def test_what_outlives_the_grace_ends_with_an_sse_error_or_a_503() -> None:
    async with running("gated", "hold") as (gated, hold):
        runner, base = await start_gateway(
            two_pools(gated.url, hold.url, shutdown_timeout_s=0.3), port=0
        )
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": MODEL, "prompt": "hi", "stream": True}
                stream = await s.post(f"{base}/completions", json=body)
                first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 10)
                plain = asyncio.create_task(
                    s.post(f"{base}/completions", json={"model": "qwen-7b", "prompt": "hi"})
                )
                for _ in range(200):  # bounded: until the plain request is upstream
                    if hold.hits:
                        break
                    await asyncio.sleep(0.01)
                stopping = asyncio.create_task(runner.cleanup())
                rest = await asyncio.wait_for(stream.read(), 10)
                answer = await asyncio.wait_for(plain, 10)
                assert answer.status == 503
                assert (await answer.json())["error"]["code"] == "gateway_shutting_down"
                await asyncio.wait_for(stopping, 20)
        finally:
            await runner.cleanup()
    assert b"r0-0" in first
    events = [e for e in rest.split(b"\n\n") if e]
    err = orjson.loads(events[0].removeprefix(b"data: "))
    assert err["error"]["code"] == "gateway_shutting_down"
    assert events[-1] == b"data: [DONE]"


async def test_a_stream_that_ends_within_the_grace_is_not_cut() -> None:
    async with running("gated", "ok") as (gated, ok):
        runner, base = await start_gateway(two_pools(gated.url, ok.url), port=0)
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": MODEL, "prompt": "hi", "stream": True}
                stream = await s.post(f"{base}/completions", json=body)
                await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 10)
                stopping = asyncio.create_task(runner.cleanup())
                await asyncio.sleep(0.2)  # the server is stopping; the stream goes on
                gated.release.set()
                rest = await asyncio.wait_for(stream.read(), 10)
                await asyncio.wait_for(stopping, 20)
        finally:
            await runner.cleanup()
    assert rest.endswith(b"data: [DONE]\n\n") and b"error" not in rest


@pytest.mark.parametrize("bad", [-1, 3601])
def test_shutdown_timeout_is_checked(bad: float) -> None:
    with pytest.raises(ConfigError, match="gateway.shutdown_timeout_s"):
        two_pools("http://127.0.0.1:1", "http://127.0.0.1:2", shutdown_timeout_s=bad)
    assert parse_config({}).gateway.shutdown_timeout_s == 50  # under the manifest's 60 s grace
