"""The gateway's proxy behaviour against small in-process upstreams whose faults we control.

Real HTTP on 127.0.0.1 throughout: the gateway runs in this event loop (`run_gateway`) in front of
aiohttp upstreams that answer normally, refuse, fail with 503, break a stream after its first
chunk, or stream slowly so that a client can leave mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from controller.kube import api_client
from gateway.app import GATEWAY, run_gateway, start_gateway
from kvpilot.config import parse_config
from kvpilot.signals import ReplicaState

MODEL = "llama-3.1-8b"


class Upstream:
    """A fake OpenAI-compatible replica; `mode` picks its behaviour."""

    def __init__(self, name: str, mode: str = "ok") -> None:
        self.name = name
        self.mode = mode
        self.hits = 0
        self.headers: list[dict[str, str]] = []
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()  # "gated" streams wait on this after their first chunk
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.answer)
        app.router.add_post("/v1/chat/completions", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.headers.append(dict(request.headers))
        body = orjson.loads(await request.read())
        chat = request.path.endswith("chat/completions")
        if self.mode == "503":
            return web.json_response({"error": {"message": "busy"}}, status=503)
        if self.mode == "reset":  # accept, then drop the connection before any byte
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0.1)
            return web.Response()
        if self.mode == "stall":  # never answers: no headers, no byte
            await asyncio.sleep(3600)
        if self.mode == "hold":  # answers only once `release` is set (a long generation)
            await self.release.wait()
        if not body.get("stream"):
            if self.mode == "hop":  # names a hop-by-hop header in a second Connection header
                resp = web.json_response(_completion(self.name, chat))
                resp.headers.add("Connection", "keep-alive")
                resp.headers.add("Connection", "X-Hop-Down")
                resp.headers["X-Hop-Down"] = "secret"
                resp.headers["X-Keep-Down"] = "yes"
                return resp
            if self.mode == "redirect":  # a replica (or something in front of it) redirects
                raise web.HTTPTemporaryRedirect(request.headers.get("x-redirect-to", "/"))
            if self.mode == "cookie":  # a replica (or something in front of it) sets a cookie
                resp = web.json_response(_completion(self.name, chat))
                resp.set_cookie("session", f"of-{request.headers.get('x-user', '')}")
                return resp
            if self.mode == "stall-body":  # headers and half the body, then nothing
                data = orjson.dumps(_completion(self.name, chat))
                head = web.StreamResponse(
                    headers={"Content-Type": "application/json", "Content-Length": str(len(data))}
                )
                await head.prepare(request)
                await head.write(data[:10])
                await asyncio.sleep(3600)
            return web.json_response(_completion(self.name, chat))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(_chunk(self.name, 0, chat))
            if self.mode == "break":
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return resp
            if self.mode == "gated":
                await self.release.wait()
            if self.mode == "stall-stream":  # the first chunk, then silence
                await asyncio.sleep(3600)
            if self.mode == "flood":  # as fast as the socket takes it (bounded: 256 MB)
                blob = b"data: " + b"x" * 65536 + b"\n\n"
                for _ in range(4096):
                    await resp.write(blob)
            n = 200 if self.mode == "slow" else 5
            for i in range(1, n):
                if self.mode == "slow":
                    await asyncio.sleep(0.05)
                await resp.write(_chunk(self.name, i, chat))
            await resp.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await resp.write_eof()
        return resp


def _completion(name: str, chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    if chat:
        return {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": name},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    return {
        "id": "c1",
        "object": "text_completion",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "text": name, "finish_reason": "stop", "logprobs": None}],
        "usage": usage,
    }


def _chunk(name: str, i: int, chat: bool) -> bytes:
    if chat:
        c = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f"{name}-{i} "}, "finish_reason": None}],
        }
    else:
        c = {
            "id": "c1",
            "object": "text_completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "text": f"{name}-{i} ", "finish_reason": None}],
        }
    return b"data: " + orjson.dumps(c) + b"\n\n"


@contextlib.asynccontextmanager
async def running(*modes: str) -> AsyncIterator[list[Upstream]]:
    """One upstream per mode (named r0, r1, ...), all closed on the way out."""
    ups: list[Upstream] = []
    try:
        for i, mode in enumerate(modes):
            u = Upstream(f"r{i}", mode)
            u.server = TestServer(u.app(), handler_cancellation=True)
            await u.server.start_server()
            ups.append(u)
        yield ups
    finally:
        for u in ups:
            assert u.server is not None
            await u.server.close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


def config(urls: list[str], **gateway: Any) -> Any:
    gw = {"policy": "round-robin", "scrape_fallback": False}
    gw.update(gateway)
    return parse_config(
        {
            "pools": [
                {"name": "llama", "models": [MODEL], "endpoints": urls},
                {"name": "other", "models": ["qwen-7b", "qwen-7b-instruct"], "endpoints": urls[:1]},
            ],
            "gateway": gw,
        }
    )


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Upstream]]:
    async with running("ok", "ok", "ok") as ups:
        yield ups


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- the happy path ------------------------------------------------------------------------


async def test_openai_client_non_streaming_spreads_over_replicas(upstreams: list[Upstream]) -> None:
    async with run_gateway(config([u.url for u in upstreams]), port=0) as base:
        client = openai.AsyncOpenAI(base_url=base, api_key="none")
        for _ in range(6):
            r = await client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
            assert r.choices[0].text in {"r0", "r1", "r2"}
        c = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert c.choices[0].message.content in {"r0", "r1", "r2"}
        await client.close()
    assert [u.hits for u in upstreams] == [3, 2, 2] or sorted(u.hits for u in upstreams) == [
        2,
        2,
        3,
    ]


async def test_stream_is_relayed_chunk_by_chunk_not_buffered() -> None:
    async with (
        running("gated") as (up,),
        run_gateway(config([up.url]), port=0) as base,
        aiohttp.ClientSession() as s,
    ):
        body = {"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 8}
        async with s.post(f"{base}/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            # The upstream holds the rest back until we have seen the first chunk: a
            # buffering proxy would deadlock here (and the test would time out).
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            assert b"r0-0" in first
            up.release.set()
            rest = await resp.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert rest.count(b"data: ") == 5  # chunks 1..4 and [DONE]


async def test_openai_client_streams_chat_and_completions(upstreams: list[Upstream]) -> None:
    async with run_gateway(config([u.url for u in upstreams]), port=0) as base:
        client = openai.AsyncOpenAI(base_url=base, api_key="none")
        parts = []
        async for ev in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            parts.append(ev.choices[0].delta.content)
        assert len(parts) == 5 and parts[0].endswith("-0 ")
        texts = [
            ev.choices[0].text
            async for ev in await client.completions.create(model=MODEL, prompt="x", stream=True)
        ]
        assert len(texts) == 5
        await client.close()


async def test_request_id_kept_or_made_and_hop_by_hop_stripped(upstreams: list[Upstream]) -> None:
    cfg = config([upstreams[0].url])
    async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "hi"}
        hdrs = {"x-request-id": "abc-123", "Proxy-Authorization": "secret", "TE": "trailers"}
        async with s.post(f"{base}/completions", json=body, headers=hdrs) as resp:
            assert resp.status == 200
            assert resp.headers["x-request-id"] == "abc-123"
        async with s.post(f"{base}/completions", json=body) as resp:
            made = resp.headers["x-request-id"]
            assert len(made) >= 16
    seen = {k.lower(): v for k, v in upstreams[0].headers[0].items()}
    assert seen["x-request-id"] == "abc-123"
    assert "proxy-authorization" not in seen and "te" not in seen
    assert {k.lower(): v for k, v in upstreams[0].headers[1].items()}["x-request-id"] == made


async def test_a_cookie_one_client_got_is_never_sent_upstream_for_another() -> None:
    """The gateway's one upstream session serves every client: it must keep no cookie jar, or a
    Set-Cookie answered to one user would ride along on the next user's requests. (A jar takes
    no cookies from IP addresses: a replica named by a hostname shows it.)"""
    async with running("cookie") as ups:
        url = ups[0].url.replace("127.0.0.1", "localhost")
        async with run_gateway(config([url]), port=0) as base, aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hi"}
            for user in ("alice", "bob"):
                async with s.post(
                    f"{base}/completions", json=body, headers={"x-user": user}
                ) as resp:
                    assert resp.status == 200
                    # the client gets the replica's Set-Cookie as sent (it is end to end)
                    assert resp.headers["Set-Cookie"].startswith(f"session=of-{user}")
                s.cookie_jar.clear()  # the client keeps none of its own either
    assert [h.get("Cookie") for h in ups[0].headers] == [None, None]


async def test_a_clients_expect_100_continue_is_answered_here_not_forwarded(
    upstreams: list[Upstream],
) -> None:
    """curl sends `Expect: 100-continue` with bodies over 1 KiB. The gateway answers it and has
    the whole body before it picks: passed on, it would make the replica round-trip a 100
    Continue before the gateway may send a body it already holds."""
    cfg = config([upstreams[0].url])
    async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "x" * 4096}
        async with s.post(f"{base}/completions", json=body, expect100=True) as resp:
            assert resp.status == 200
    assert upstreams[0].hits == 1
    assert "expect" not in {k.lower() for k in upstreams[0].headers[0]}


async def test_a_redirect_from_a_replica_goes_back_to_the_client_not_followed() -> None:
    """A reverse proxy passes a 3xx on: following it would send the user's prompt wherever a
    replica (or whatever answers at its address) points, outside the pool."""
    async with running("redirect", "ok") as ups:
        elsewhere = f"{ups[1].url}/v1/completions"
        body = {"model": MODEL, "prompt": "a secret"}
        async with (
            run_gateway(config([ups[0].url]), port=0) as base,
            aiohttp.ClientSession() as s,
            s.post(
                f"{base}/completions",
                json=body,
                headers={"x-redirect-to": elsewhere},
                allow_redirects=False,
            ) as resp,
        ):
            assert resp.status == 307
            assert resp.headers["Location"] == elsewhere
    assert ups[0].hits == 1 and ups[1].hits == 0


async def test_models_health_ready_metrics(upstreams: list[Upstream]) -> None:
    async with run_gateway(config([u.url for u in upstreams]), port=0) as base:
        client = openai.AsyncOpenAI(base_url=base, api_key="none")
        models = sorted(m.id for m in (await client.models.list()).data)
        assert models == sorted([MODEL, "qwen-7b", "qwen-7b-instruct"])
        await client.completions.create(model=MODEL, prompt="hello")
        await client.close()
        root = base.removesuffix("/v1")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{root}/healthz") as r:
                assert r.status == 200
            async with s.get(f"{root}/readyz") as r:
                assert r.status == 200
                assert (await r.json())["replicas"]["llama"] == 3
            async with s.get(f"{root}/metrics") as r:
                text = await r.text()
    for name in (
        "kvpilot_gateway_requests_total",
        "kvpilot_gateway_pick_seconds_bucket",
        "kvpilot_gateway_e2e_seconds_bucket",
        "kvpilot_gateway_decisions_total",
        "kvpilot_gateway_inflight_requests",
    ):
        assert name in text


async def test_readyz_waits_for_discovery_not_for_replicas() -> None:
    # A pool at zero replicas is served (requests are held for it): ready.
    empty = parse_config(
        {"pools": [{"name": "empty", "models": [MODEL]}], "gateway": {"scrape_fallback": False}}
    )
    async with (
        run_gateway(empty, port=0) as base,
        aiohttp.ClientSession() as s,
        s.get(base.removesuffix("/v1") + "/readyz") as r,
    ):
        assert r.status == 200
        assert await r.json() == {"ready": True, "unsynced": [], "replicas": {"empty": 0}}
    # Discovery that has not listed the pool's EndpointSlices yet (no API server answers): not.
    kube = parse_config(
        {
            "pools": [{"name": "k", "models": [MODEL], "namespace": "ml"}],
            "gateway": {"kubernetes": True, "scrape_fallback": False},
        }
    )
    api = api_client("http://127.0.0.1:9")  # nothing listens there
    try:
        async with (
            run_gateway(kube, port=0, kube_api_client=api) as base,
            aiohttp.ClientSession() as s,
            s.get(base.removesuffix("/v1") + "/readyz") as r,
        ):
            assert r.status == 503
            assert (await r.json())["unsynced"] == ["k"]
    finally:
        await api.close()


async def test_api_keys_required_and_not_forwarded(upstreams: list[Upstream]) -> None:
    cfg = config([upstreams[0].url], api_keys=["k1", "k2"])
    async with run_gateway(cfg, port=0) as base:
        bad = openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.completions.create(model=MODEL, prompt="hi")
        good = openai.AsyncOpenAI(base_url=base, api_key="k2")
        r = await good.completions.create(model=MODEL, prompt="hi")
        assert r.choices[0].text == "r0"
        await bad.close()
        await good.close()
        # /debug/fleet names the replicas' addresses: behind the keys too.
        root = base.removesuffix("/v1")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{root}/debug/fleet") as r:
                assert r.status == 401
            hdr = {"Authorization": "Bearer k1"}
            async with s.get(f"{root}/debug/fleet", headers=hdr) as r:
                assert r.status == 200
    assert upstreams[0].hits == 1
    assert "authorization" not in {k.lower() for k in upstreams[0].headers[0]}


# ---- failures ------------------------------------------------------------------------------


async def test_refused_and_503_replicas_are_retried_elsewhere() -> None:
    async with running("ok", "503") as ups:
        urls = [closed_port_url(), ups[0].url, ups[1].url]
        before = sample("kvpilot_gateway_retries_total", pool="llama", reason="connect")
        cfg = config(urls, eject_after_failures=100)
        async with run_gateway(cfg, port=0) as base:
            client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            for i in range(9):
                r = await client.completions.create(model=MODEL, prompt="hi", stream=False)
                assert r.choices[0].text == "r0"
                parts = [
                    ev.choices[0].text
                    async for ev in await client.completions.create(
                        model=MODEL, prompt=f"s{i}", stream=True
                    )
                ]
                assert parts[0] == "r0-0 "
            await client.close()
    assert ups[1].hits > 0  # the 503 replica was tried, and its requests went elsewhere
    assert sample("kvpilot_gateway_retries_total", pool="llama", reason="connect") > before


async def test_consecutive_failures_eject_a_replica() -> None:
    async with running("ok", "503") as ups:
        cfg = config([ups[0].url, ups[1].url], eject_after_failures=2, eject_for_s=60)
        async with run_gateway(cfg, port=0) as base:
            client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            for _ in range(12):
                r = await client.completions.create(model=MODEL, prompt="hi")
                assert r.choices[0].text == "r0"
            await client.close()
    assert ups[1].hits == 2  # two failures, then out of rotation for the rest


async def test_all_replicas_failing_answers_502_json() -> None:
    cfg = config([closed_port_url(), closed_port_url()])
    async with (
        run_gateway(cfg, port=0) as base,
        aiohttp.ClientSession() as s,
        s.post(f"{base}/completions", json={"model": MODEL, "prompt": "hi"}) as r,
    ):
        assert r.status == 502
        err = (await r.json())["error"]
        assert err["type"] == "upstream_error" and err["message"]


async def test_stream_broken_after_first_byte_ends_with_sse_error() -> None:
    async with running("break") as (up,), run_gateway(config([up.url]), port=0) as base:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hi", "stream": True}
            async with s.post(f"{base}/completions", json=body) as resp:
                assert resp.status == 200
                raw = await resp.read()
        events = [e for e in raw.split(b"\n\n") if e]
        assert b"r0-0" in events[0]
        err = orjson.loads(events[1].removeprefix(b"data: "))
        assert err["error"]["code"] == "upstream_failed"
        assert events[-1] == b"data: [DONE]"
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
        with pytest.raises(openai.APIError):
            async for _ in await client.completions.create(model=MODEL, prompt="x", stream=True):
                pass
        await client.close()


async def test_first_byte_timeout_retries_a_stream_elsewhere() -> None:
    async with running("stall", "ok") as ups:
        before = sample("kvpilot_gateway_retries_total", pool="llama", reason="timeout")
        cfg = config([u.url for u in ups], first_byte_timeout_s=0.6, eject_after_failures=100)
        async with run_gateway(cfg, port=0) as base:
            client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            for i in range(4):  # round-robin: two of these start on the stalled replica
                parts = [
                    ev.choices[0].text
                    async for ev in await client.completions.create(
                        model=MODEL, prompt=f"s{i}", stream=True
                    )
                ]
                assert parts[0] == "r1-0 "
            await client.close()
    assert ups[0].hits >= 2
    assert sample("kvpilot_gateway_retries_total", pool="llama", reason="timeout") >= before + 2


async def test_a_slow_non_streaming_answer_is_504_not_a_replica_failure() -> None:
    """vLLM sends a non-streamed answer's headers only when it is complete: a long generation
    past first_byte_timeout_s is slow, not failed. It is answered 504, not run again on the other
    replicas, and ejects nobody (the audit's repro ejected all three and answered 502)."""
    async with running("stall", "stall", "stall") as ups:
        retries = sample("kvpilot_gateway_retries_total", pool="llama", reason="timeout")
        cfg = config([u.url for u in ups], first_byte_timeout_s=0.3, eject_after_failures=1)
        async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "write a long story", "max_tokens": 2000}
            for _ in range(2):
                async with s.post(f"{base}/completions", json=body) as r:
                    assert r.status == 504
                    err = (await r.json())["error"]
                    assert err["code"] == "upstream_timeout" and err["type"] == "upstream_error"
            async with s.get(base.removesuffix("/v1") + "/debug/fleet") as r:
                fleet = (await r.json())["pools"]["llama"]
    assert sum(u.hits for u in ups) == 2  # each request went to one replica, once
    assert not any(rep["ejected"] for rep in fleet)
    assert sample("kvpilot_gateway_retries_total", pool="llama", reason="timeout") == retries


async def test_a_504_counts_against_a_replica_whose_state_went_stale_too() -> None:
    """A node that died silently looks like a slow generation: no answer in time. When the
    replica's state has stopped coming as well (its agent or the scrape no longer hears from
    it), the 504 counts toward its ejection; a replica whose state is fresh is only slow. Neither
    request is retried."""
    async with running("stall", "stall") as ups:
        urls = [u.url for u in ups]
        cfg = config(urls, first_byte_timeout_s=0.3, eject_after_failures=1)
        runner, base = await start_gateway(cfg, port=0)
        try:
            fleet = runner.app[GATEWAY].fleet
            for u, age in ((ups[0], 60.0), (ups[1], 0.0)):  # r0's last state is a minute old
                state = ReplicaState(
                    replica_id=u.url, address=u.url, pool="llama", observed_at=time.time() - age
                )
                assert fleet.observe_state(state)
            async with aiohttp.ClientSession() as s:
                body = {"model": MODEL, "prompt": "write a long story", "max_tokens": 2000}
                for _ in range(2):  # round-robin: one to each
                    async with s.post(f"{base}/completions", json=body) as r:
                        assert r.status == 504
                async with s.get(base.removesuffix("/v1") + "/debug/fleet") as r:
                    pool = (await r.json())["pools"]["llama"]
        finally:
            await runner.cleanup()
    assert [u.hits for u in ups] == [1, 1]
    assert {rep["url"]: rep["ejected"] for rep in pool} == {urls[0]: True, urls[1]: False}


async def test_body_stalled_after_headers_is_an_idle_timeout() -> None:
    async with running("stall-body", "ok") as ups:
        before = sample("kvpilot_gateway_retries_total", pool="llama", reason="idle_timeout")
        # A long first-byte limit: only the idle timer (after the headers) can end the wait.
        cfg = config(
            [u.url for u in ups],
            first_byte_timeout_s=30,
            idle_timeout_s=0.6,
            eject_after_failures=100,
        )
        async with run_gateway(cfg, port=0) as base:
            client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            for i in range(2):
                r = await asyncio.wait_for(
                    client.completions.create(model=MODEL, prompt=f"hi {i}"), 10
                )
                assert r.choices[0].text == "r1"
            await client.close()
    after = sample("kvpilot_gateway_retries_total", pool="llama", reason="idle_timeout")
    assert ups[0].hits >= 1 and after == before + ups[0].hits  # each stalled body timed out


async def test_stream_stalled_after_first_byte_ends_with_sse_error() -> None:
    async with running("stall-stream") as (up,):
        cfg = config([up.url], first_byte_timeout_s=30, idle_timeout_s=0.6)
        async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hi", "stream": True}
            async with s.post(f"{base}/completions", json=body) as resp:
                assert resp.status == 200
                raw = await asyncio.wait_for(resp.read(), 10)
        events = [e for e in raw.split(b"\n\n") if e]
        assert b"r0-0" in events[0]
        err = orjson.loads(events[1].removeprefix(b"data: "))
        assert (
            err["error"]["code"] == "upstream_failed" and "TimeoutError" in err["error"]["message"]
        )
        assert events[-1] == b"data: [DONE]"


async def test_a_client_that_stops_reading_is_closed_without_blaming_the_replica() -> None:
    async with (
        running("flood") as (up,),
        run_gateway(config([up.url], idle_timeout_s=0.6), port=0) as base,
        aiohttp.ClientSession() as s,
    ):
        failed = sample("kvpilot_gateway_stream_errors_total", pool="llama")
        body = {"model": MODEL, "prompt": "hi", "stream": True}
        resp = await s.post(f"{base}/completions", json=body)
        await resp.content.readuntil(b"\n\n")  # the first chunk, then nothing more is read
        # The gateway's writes back up, its idle timer fires on the client: it closes the
        # connection, which ends the upstream request too.
        await asyncio.wait_for(up.cancelled.wait(), 30)
        resp.close()
        assert sample("kvpilot_gateway_stream_errors_total", pool="llama") == failed
        # The replica was not held responsible: it still serves.
        r = await s.post(f"{base}/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status == 200


async def test_client_leaving_cancels_upstream() -> None:
    async with running("slow") as (up,), run_gateway(config([up.url]), port=0) as base:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hi", "stream": True}
            resp = await s.post(f"{base}/completions", json=body)
            await resp.content.readuntil(b"\n\n")
            resp.close()  # the client goes away mid-stream
        await asyncio.wait_for(up.cancelled.wait(), 10)
        root = base.removesuffix("/v1")
        async with aiohttp.ClientSession() as s, s.get(f"{root}/metrics") as r:
            text = await r.text()
        inflight = [
            ln
            for ln in text.splitlines()
            if ln.startswith("kvpilot_gateway_inflight_requests") and up.url in ln
        ]
        assert inflight and inflight[0].endswith(" 0.0")


async def test_requests_sharing_a_client_request_id_are_accounted_apart() -> None:
    """Clients reuse x-request-id (a retry while the first try still runs, a fixed header): the
    in-flight account must count each request, and drop each when it ends."""
    async with (
        running("gated") as (up,),
        run_gateway(config([up.url]), port=0) as base,
        aiohttp.ClientSession() as s,
    ):
        root = base.removesuffix("/v1")

        async def inflight() -> float:
            async with s.get(f"{root}/metrics") as r:
                text = await r.text()
            return sum(
                float(ln.rsplit(" ", 1)[1])
                for ln in text.splitlines()
                if ln.startswith("kvpilot_gateway_inflight_requests") and up.url in ln
            )

        async def one() -> bytes:
            body = {"model": MODEL, "prompt": "hi", "stream": True}
            async with s.post(
                f"{base}/completions", json=body, headers={"x-request-id": "same"}
            ) as r:
                assert r.headers["x-request-id"] == "same"
                return await r.read()

        tasks = [asyncio.create_task(one()) for _ in range(2)]
        for _ in range(100):  # bounded: until both are in flight upstream
            if up.hits == 2:
                break
            await asyncio.sleep(0.02)
        assert await inflight() == 2
        up.release.set()
        for out in await asyncio.gather(*tasks):
            assert out.endswith(b"data: [DONE]\n\n")
        assert await inflight() == 0


async def test_a_whole_answer_reaches_the_client_before_the_accounting() -> None:
    """The gateway sends a non-streamed answer before it accounts, learns and counts: that
    bookkeeping is off the hop's latency. Here it blocks the event loop until the client (in a
    thread) has read the whole answer, which it can only do if the answer was sent first."""
    got = threading.Event()

    def fetch(port: int) -> bytes:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = orjson.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4})
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        data = c.getresponse().read()
        got.set()
        c.close()
        return data

    async with running("ok") as (up,):
        runner, base = await start_gateway(config([up.url]), port=0)
        try:
            fleet = runner.app[GATEWAY].fleet
            succeeded = fleet.succeeded
            seen: list[bool] = []

            def held(replica_id: str, pool: str) -> None:
                seen.append(got.wait(5))  # blocks the gateway's loop, as slow accounting would
                succeeded(replica_id, pool)

            fleet.succeeded = held  # type: ignore[method-assign]
            port = int(base.removesuffix("/v1").rsplit(":", 1)[1])
            data = await asyncio.to_thread(fetch, port)
        finally:
            await runner.cleanup()
    assert b"r0" in data
    assert seen == [True]


async def test_the_usage_of_a_whole_answer_calibrates_the_estimator() -> None:
    """Read after the answer went out: the upstream's usage (5 prompt tokens) teaches the
    gateway how many characters make a token for this model."""
    async with running("ok") as (up,):
        runner, base = await start_gateway(config([up.url]), port=0)
        try:
            estimator = runner.app[GATEWAY].estimator
            prior = estimator.tokens_per_char(MODEL)
            client = openai.AsyncOpenAI(base_url=base, api_key="none")
            for _ in range(3):
                await client.completions.create(model=MODEL, prompt="x" * 40, max_tokens=4)
            await client.close()
        finally:
            await runner.cleanup()
    assert prior != pytest.approx(5 / 40)
    assert estimator.tokens_per_char(MODEL) == pytest.approx(5 / 40)


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("completions", b"{not json", 400, None),
        ("completions", b"[1, 2]", 400, None),
        ("completions", b"", 400, None),
        ("completions", b'{"prompt": "hi"}', 400, "model"),
        ("completions", b'{"model": 7, "prompt": "hi"}', 400, "model"),
        ("completions", b'{"model": "nope", "prompt": "hi"}', 404, "model"),
        ("completions", b'{"model": "llama-3.1-8b"}', 400, "prompt"),
        ("completions", b'{"model": "llama-3.1-8b", "prompt": {"a": 1}}', 400, "prompt"),
        (
            "completions",
            b'{"model": "llama-3.1-8b", "prompt": "x", "max_tokens": "9"}',
            400,
            "max_tokens",
        ),
        (
            "completions",
            b'{"model": "llama-3.1-8b", "prompt": "x", "max_tokens": 0}',
            400,
            "max_tokens",
        ),
        (
            "completions",
            b'{"model": "llama-3.1-8b", "prompt": "x", "stream": "yes"}',
            400,
            "stream",
        ),
        ("chat/completions", b'{"model": "llama-3.1-8b"}', 400, "messages"),
        ("chat/completions", b'{"model": "llama-3.1-8b", "messages": "hi"}', 400, "messages"),
        ("chat/completions", b'{"model": "llama-3.1-8b", "messages": []}', 400, "messages"),
    ],
)
async def test_bad_input_gets_openai_errors(
    upstreams: list[Upstream], path: str, body: bytes, status: int, param: str | None
) -> None:
    async with (
        run_gateway(config([upstreams[0].url]), port=0) as base,
        aiohttp.ClientSession() as s,
    ):
        hdrs = {"Content-Type": "application/json"}
        async with s.post(f"{base}/{path}", data=body, headers=hdrs) as r:
            assert r.status == status
            err = (await r.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert upstreams[0].hits == 0


async def test_oversize_body_and_bad_priority(upstreams: list[Upstream]) -> None:
    cfg = config([upstreams[0].url], max_body_bytes=1000)
    async with run_gateway(cfg, port=0) as base, aiohttp.ClientSession() as s:
        big = {"model": MODEL, "prompt": "x" * 5000}
        async with s.post(f"{base}/completions", json=big) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the read itself must stop
            for _ in range(10):
                yield b" " * 500

        async with s.post(f"{base}/completions", data=chunks()) as r:
            assert r.status == 413
        hdrs = {"x-kvpilot-priority": "high"}
        async with s.post(
            f"{base}/completions", json={"model": MODEL, "prompt": "x"}, headers=hdrs
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "x-kvpilot-priority"
    assert upstreams[0].hits == 0


# ---- saturation: the queue over HTTP -------------------------------------------------------


async def test_no_pickable_replica_waits_then_429_with_retry_after() -> None:
    cfg = parse_config(
        {
            "pools": [{"name": "empty", "models": [MODEL]}],
            "gateway": {"queue_timeout_s": 0.3, "scrape_fallback": False},
        }
    )
    before = sample("kvpilot_gateway_shed_total", pool="empty", reason="queue_timeout")
    async with run_gateway(cfg, port=0) as base:
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            await client.completions.create(model=MODEL, prompt="hi")
        assert int(info.value.response.headers["Retry-After"]) >= 1
        assert info.value.response.json()["error"]["type"] == "rate_limit_error"
        await client.close()
    assert sample("kvpilot_gateway_shed_total", pool="empty", reason="queue_timeout") == before + 1
