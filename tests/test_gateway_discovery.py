"""Replica discovery from EndpointSlices, against kmock's KubernetesEmulator over real HTTP.

Slices are created, patched and deleted through the emulator's API (so its watch streams carry
the events); the gateway's watch must follow: ready endpoints are routed to, terminating ones get
no new requests, other Services' slices are ignored, deleted slices take their replicas along.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kmock import KubernetesEmulator, Server
from kubernetes_asyncio import client as k8s

from gateway.app import run_gateway
from gateway.discovery import Discovery, slice_endpoints
from gateway.fleet import Fleet
from kvpilot.config import parse_config

SLICES = "/apis/discovery.k8s.io/v1/namespaces/serving/endpointslices"


def eps(name: str, service: str, port: int, endpoints: list[tuple[str, str, bool, bool]]) -> dict:
    """An EndpointSlice; endpoints are (pod, ip, ready, terminating)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "serving",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready or term, "terminating": term},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "serving"},
            }
            for pod, ip, ready, term in endpoints
        ],
    }


@pytest.fixture
async def kube() -> AsyncIterator[tuple[aiohttp.ClientSession, k8s.ApiClient]]:
    async with KubernetesEmulator() as emu, Server(emu) as srv:
        emu.resources["discovery.k8s.io/v1/endpointslices"] = {
            "kind": "EndpointSlice",
            "namespaced": True,
            "verbs": ["list", "watch", "get", "create", "patch", "delete"],
        }
        conf = k8s.Configuration(host=str(srv.url).rstrip("/"))
        api = k8s.ApiClient(conf)
        async with aiohttp.ClientSession(str(srv.url)) as http:
            yield http, api
        await api.close()


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


def test_slice_endpoints_reads_conditions_ports_and_pods() -> None:
    obj = eps(
        "s",
        "llama",
        8000,
        [
            ("a", "10.0.0.1", True, False),
            ("b", "10.0.0.2", False, True),
            ("c", "10.0.0.3", False, False),
        ],
    )
    got = slice_endpoints(obj, 9999)
    assert [(e.replica_id, e.url, e.terminating) for e in got] == [
        ("serving/a", "http://10.0.0.1:8000", False),
        ("serving/b", "http://10.0.0.2:8000", True),
    ]  # c is neither ready nor terminating: not a replica yet


async def test_watch_follows_create_patch_delete(kube: Any) -> None:
    http, api = kube
    pool_cfg = parse_config(
        {"pools": [{"name": "llama", "models": ["m"], "namespace": "serving", "port": 8000}]}
    ).pools
    fleet = Fleet()
    disc = Discovery(pool_cfg, fleet, kubernetes=True, api_client=api)
    a = eps(
        "llama-a", "llama", 8000, [("p1", "10.0.0.1", True, False), ("p2", "10.0.0.2", True, False)]
    )
    async with http.post(SLICES, json=a) as r:
        assert r.status < 300, await r.text()
    await disc.start()
    try:
        await until(lambda: len(fleet.pools.get("llama", {})) == 2, "initial slice listed")
        # A second slice of the same Service, and a slice of another Service (ignored).
        b = eps("llama-b", "llama", 8000, [("p3", "10.0.0.3", True, False)])
        other = eps("qwen-a", "qwen", 8000, [("q1", "10.0.9.1", True, False)])
        for obj in (b, other):
            async with http.post(SLICES, json=obj) as r:
                assert r.status < 300
        await until(lambda: len(fleet.pools["llama"]) == 3, "second slice watched")
        assert set(fleet.pools["llama"]) == {"serving/p1", "serving/p2", "serving/p3"}
        # p2 starts terminating: still known (in-flight accounting), never picked.
        patch = {
            "endpoints": a["endpoints"][:1]
            + [
                {
                    "addresses": ["10.0.0.2"],
                    "conditions": {"ready": False, "serving": True, "terminating": True},
                    "targetRef": {"kind": "Pod", "name": "p2", "namespace": "serving"},
                }
            ]
        }
        hdrs = {"Content-Type": "application/merge-patch+json"}
        async with http.patch(f"{SLICES}/llama-a", json=patch, headers=hdrs) as r:
            assert r.status < 300, await r.text()
        await until(lambda: fleet.pools["llama"]["serving/p2"].terminating, "terminating seen")
        picked = {v.replica_id for v in fleet.views("llama", 0.0)}
        assert picked == {"serving/p1", "serving/p3"}
        async with http.delete(f"{SLICES}/llama-b") as r:
            assert r.status < 300
        await until(lambda: "serving/p3" not in fleet.pools["llama"], "deleted slice dropped")
        assert fleet.pools["llama"]["serving/p1"].url == "http://10.0.0.1:8000"
    finally:
        await disc.stop()


async def test_gateway_routes_to_discovered_replicas_only(kube: Any) -> None:
    http, api = kube
    hits: dict[str, int] = {"live": 0, "term": 0}

    def upstream(name: str) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            hits[name] += 1
            return web.json_response(
                {
                    "id": "x",
                    "object": "text_completion",
                    "created": 1,
                    "model": "m",
                    "choices": [
                        {"index": 0, "text": name, "finish_reason": "stop", "logprobs": None}
                    ],
                }
            )

        app = web.Application()
        app.router.add_post("/v1/completions", answer)
        return app

    live, term = TestServer(upstream("live")), TestServer(upstream("term"))
    await live.start_server()
    await term.start_server()
    try:
        # Two slices on different ports (one pod each): the terminating pod must get nothing.
        s1 = eps("m-a", "m-svc", live.port, [("live", "127.0.0.1", True, False)])
        s2 = eps("m-b", "m-svc", term.port, [("term", "127.0.0.1", False, True)])
        for obj in (s1, s2):
            async with http.post(SLICES, json=obj) as r:
                assert r.status < 300
        cfg = parse_config(
            {
                "pools": [{"name": "m", "models": ["m"], "namespace": "serving"}],
                "gateway": {
                    "kubernetes": True,
                    "services": {"m": "m-svc"},
                    "scrape_fallback": False,
                    "policy": "round-robin",
                },
            }
        )
        async with run_gateway(cfg, port=0, kube_api_client=api) as base:
            async with aiohttp.ClientSession() as s:
                for _ in range(100):
                    async with s.get(base.removesuffix("/v1") + "/readyz") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.025)
            c = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
            for _ in range(6):
                r = await c.completions.create(model="m", prompt="hi")
                assert r.choices[0].text == "live"
            await c.close()
        assert hits == {"live": 6, "term": 0}
    finally:
        await live.close()
        await term.close()
