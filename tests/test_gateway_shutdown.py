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

from gateway.app import GATEWAY, start_gateway
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
    # The manifest's pod grace (60 s) holds its preStop sleep (5 s), this, the end (5 s) and
    # aiohttp's last writes (2 x 2 s).
    assert parse_config({}).gateway.shutdown_timeout_s == 45


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1].split("/")[0])


async def _until(cond: Any) -> None:
    for _ in range(200):  # bounded: 2 s at most
        if cond():
            return
        await asyncio.sleep(0.01)


async def test_a_request_whose_body_is_still_arriving_gets_the_grace() -> None:
    """The review's repro: the shutdown begins while a request's body is on its way. Its handler
    is already running (reading the body), so the grace covers it: it is read whole, routed and
    answered, not cut off when the server closes its connections."""
    async with running("hold", "ok") as (hold, ok):
        runner, base = await start_gateway(
            two_pools(hold.url, ok.url, shutdown_timeout_s=30), port=0
        )
        gateway = runner.app[GATEWAY]
        try:
            body = orjson.dumps({"model": MODEL, "prompt": "hi"})
            head = (
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
            writer.write(head + body[:5])
            await writer.drain()
            await _until(lambda: gateway._active)  # its handler is reading the body
            stopping = asyncio.create_task(runner.cleanup())
            await _until(lambda: gateway._idle is not None)  # the shutdown has begun
            writer.write(body[5:])
            await writer.drain()
            await _until(lambda: hold.hits)
            hold.release.set()  # the answer comes well inside the grace
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await asyncio.wait_for(stopping, 20)
        finally:
            await runner.cleanup()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"] == "r0"


async def test_an_idle_keep_alive_connection_is_closed_at_once_on_shutdown() -> None:
    """While requests in progress get their grace, an idle keep-alive connection is closed
    at once (the gateway takes no new requests on it)."""
    async with running("gated", "ok") as (gated, ok):
        runner, base = await start_gateway(two_pools(gated.url, ok.url), port=0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
            body = orjson.dumps({"model": "qwen-7b", "prompt": "hi"})
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)  # answered; the connection stays open, idle
            async with aiohttp.ClientSession() as s:
                stream = await s.post(
                    f"{base}/completions", json={"model": MODEL, "prompt": "hi", "stream": True}
                )
                await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 10)
                stopping = asyncio.create_task(runner.cleanup())
                assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
                assert not stopping.done()  # while the stream still has its grace
                gated.release.set()
                rest = await asyncio.wait_for(stream.read(), 10)
                await asyncio.wait_for(stopping, 20)
            writer.close()
        finally:
            await runner.cleanup()
    assert rest.endswith(b"data: [DONE]\n\n") and b"error" not in rest


@pytest.mark.parametrize("yields", [0, 1, 2])
async def test_a_request_read_but_not_yet_handled_is_answered_with_connection_close(
    yields: int,
) -> None:
    """A keep-alive client's next request can be in the connection's buffer (or its handler
    task not started) when the shutdown begins: that connection is not idle, so it is not cut;
    the request is answered, and the answer says Connection: close."""
    async with running("ok", "ok") as (a, b):
        runner, base = await start_gateway(two_pools(a.url, b.url, shutdown_timeout_s=5), port=0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
            body = orjson.dumps({"model": "qwen-7b", "prompt": "hi"})
            req = (
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            writer.write(req)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(n)
            writer.write(req)  # the next request, sent before the shutdown begins
            await writer.drain()
            for _ in range(yields):
                await asyncio.sleep(0)
            stopping = asyncio.create_task(runner.cleanup())
            answer = await asyncio.wait_for(reader.read(), 10)
            await asyncio.wait_for(stopping, 20)
            writer.close()
        finally:
            await runner.cleanup()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in answer.split(b"\r\n\r\n")[0].lower()
