"""Replica discovery from EndpointSlices, against kmock's KubernetesEmulator over real HTTP.

Slices are created, patched and deleted through the emulator's API (so its watch streams carry
the events); the gateway's watch must follow: ready endpoints are routed to, terminating ones get
no new requests, other Services' slices are ignored, deleted slices take their replicas along.
The emulator counts the lists it serves, so a change that only arrives by re-listing fails the
test; a config reload (a new Discovery on the old one's client) keeps watching; a watch that
keeps failing backs off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import attrs
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kmock import KubernetesEmulator, Server
from kubernetes_asyncio import client as k8s

from gateway import discovery
from gateway.app import DISCOVERY, apply_config, run_gateway, start_gateway
from gateway.discovery import (
    HEALTHY_WATCH_S,
    MAX_BACKOFF_S,
    MIN_BACKOFF_S,
    Discovery,
    EndpointSliceWatch,
    retry_backoff,
    slice_endpoints,
)
from gateway.fleet import Fleet
from kvpilot.config import parse_config
from kvpilot.tasks import cancel_and_wait

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


@attrs.define(kw_only=True)
class Cluster(KubernetesEmulator):
    """kmock's emulator with the API server's reading of `watch`, counting the lists it serves.

    `go_bools=False` keeps kmock's own reading, under which every watch of kubernetes-asyncio
    fails (answered with a list)."""

    go_bools: bool = True
    lists: int = 0

    async def __call__(self, raw_request: Any) -> Any:
        # kubernetes-asyncio sends watch=True; the API server parses booleans like Go's
        # strconv.ParseBool (True, true, 1), kmock only knows "true" and would answer a list.
        if self.go_bools and raw_request.query.get("watch") in ("True", "1"):
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.update_query(watch="true"))
        return await super().__call__(raw_request)

    async def _serve_list(self, request: Any) -> Any:
        self.lists += 1
        return await super()._serve_list(request)


@dataclass(frozen=True)
class Kube:
    http: aiohttp.ClientSession  # writes slices through the emulator's API
    api: k8s.ApiClient  # the client the code under test is given
    emu: Cluster
    url: str


@contextlib.asynccontextmanager
async def serving(emu: Cluster) -> AsyncIterator[Kube]:
    async with emu, Server(emu) as srv:
        emu.resources["discovery.k8s.io/v1/endpointslices"] = {
            "kind": "EndpointSlice",
            "namespaced": True,
            "verbs": ["list", "watch", "get", "create", "patch", "delete"],
        }
        url = str(srv.url).rstrip("/")
        api = k8s.ApiClient(k8s.Configuration(host=url))
        async with aiohttp.ClientSession(str(srv.url)) as http:
            yield Kube(http, api, emu, url)
        await api.close()


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    async with serving(Cluster()) as k:
        yield k


@pytest.fixture
def own_clients(kube: Kube, monkeypatch: pytest.MonkeyPatch) -> list[k8s.ApiClient]:
    """A Discovery given no client makes its own (in-cluster config in production): here one
    for the emulator. Returns the clients made, in order."""
    made: list[k8s.ApiClient] = []

    async def make() -> k8s.ApiClient:
        made.append(k8s.ApiClient(k8s.Configuration(host=kube.url)))
        return made[-1]

    monkeypatch.setattr(discovery, "_default_api_client", make)
    return made


async def create(kube: Kube, obj: dict) -> None:
    async with kube.http.post(SLICES, json=obj) as r:
        assert r.status < 300, await r.text()


LLAMA = parse_config(
    {"pools": [{"name": "llama", "models": ["m"], "namespace": "serving", "port": 8000}]}
).pools


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


async def test_watch_follows_create_patch_delete(kube: Kube) -> None:
    http, api = kube.http, kube.api
    fleet = Fleet()
    disc = Discovery(LLAMA, fleet, kubernetes=True, api_client=api)
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
        assert kube.emu.lists == 1  # every change came through the watch, none by re-listing
    finally:
        await disc.stop()


@pytest.mark.parametrize("own", [True, False], ids=["own-client", "given-client"])
async def test_a_new_discovery_on_the_old_ones_client_keeps_watching(
    kube: Kube, own_clients: list[k8s.ApiClient], own: bool
) -> None:
    """What a config reload does (gateway.app.apply_config): stop the old Discovery, then start
    a new one on `old.api_client`. In a cluster the old one made (and closed) that client."""
    fleet = Fleet()
    await create(kube, eps("llama-a", "llama", 8000, [("p1", "10.0.0.1", True, False)]))
    old = Discovery(LLAMA, fleet, kubernetes=True, api_client=None if own else kube.api)
    await old.start()
    try:
        await until(lambda: "serving/p1" in fleet.pools.get("llama", {}), "first slice listed")
    finally:
        await old.stop()
    new = Discovery(LLAMA, fleet, kubernetes=True, api_client=old.api_client)
    await new.start()
    try:
        await create(kube, eps("llama-b", "llama", 8000, [("p2", "10.0.0.2", True, False)]))
        await until(lambda: "serving/p2" in fleet.pools["llama"], "new slice seen after reload")
        assert kube.emu.lists == 2  # one each; p2 came through the new one's watch
    finally:
        await new.stop()
    assert len(own_clients) == (2 if own else 0)  # a closed client is never handed on
    # A client the caller gave is the caller's to close: still usable after both stopped.
    got = await k8s.DiscoveryV1Api(kube.api).list_namespaced_endpoint_slice("serving")
    assert len(got.items) == 2


async def test_config_reload_keeps_discovering(
    kube: Kube, own_clients: list[k8s.ApiClient]
) -> None:
    """The gateway in a cluster (no client given) after `apply_config`: the reloaded config's
    Discovery still follows the EndpointSlices."""

    def cfg(models: list[str]) -> Any:
        return parse_config(
            {
                "pools": [{"name": "llama", "models": models, "namespace": "serving"}],
                "gateway": {"kubernetes": True, "scrape_fallback": False},
            }
        )

    await create(kube, eps("llama-a", "llama", 8000, [("p1", "10.0.0.1", True, False)]))
    runner, _ = await start_gateway(cfg(["m"]), host="127.0.0.1", port=0)
    app = runner.app
    try:
        fleet = app[DISCOVERY].fleet
        await until(lambda: "serving/p1" in fleet.pools.get("llama", {}), "first slice listed")
        await apply_config(app, cfg(["m", "m2"]))
        await create(kube, eps("llama-b", "llama", 8000, [("p2", "10.0.0.2", True, False)]))
        await until(lambda: "serving/p2" in fleet.pools["llama"], "new slice seen after reload")
        assert kube.emu.lists == 2
    finally:
        await runner.cleanup()


def test_backoff_resets_only_after_the_watch_worked() -> None:
    # A list that succeeds and a watch that fails at once, over and over: doubling, capped.
    waits, backoff = [], MIN_BACKOFF_S
    for _ in range(12):
        wait, backoff = retry_backoff(backoff, events=0, watched_s=0.01)
        waits.append(wait)
    assert waits[:4] == [MIN_BACKOFF_S, 2 * MIN_BACKOFF_S, 4 * MIN_BACKOFF_S, 8 * MIN_BACKOFF_S]
    assert max(waits) == waits[-1] == MAX_BACKOFF_S
    # A watch that delivered an event, or stayed open (quiet) a while, starts over.
    assert retry_backoff(MAX_BACKOFF_S, events=1, watched_s=0.0)[0] == MIN_BACKOFF_S
    assert retry_backoff(MAX_BACKOFF_S, events=0, watched_s=HEALTHY_WATCH_S)[0] == MIN_BACKOFF_S


async def test_a_failing_watch_backs_off_instead_of_relisting() -> None:
    """Plain kmock answers kubernetes-asyncio's `watch=True` with a list: every watch fails
    right after a successful list. The lists still feed the fleet; the re-lists slow down."""
    async with serving(Cluster(go_bools=False)) as kube:
        await create(kube, eps("llama-a", "llama", 8000, [("p1", "10.0.0.1", True, False)]))
        fleet = Fleet()
        w = EndpointSliceWatch(kube.api, LLAMA[0], "llama", fleet)
        task = asyncio.create_task(w.run())
        try:
            await until(lambda: w.lists >= 3, "three lists")  # kmock counts the watches too
            assert set(fleet.pools["llama"]) == {"serving/p1"}
            # Two failed rounds at least: 0.2 s, then 0.4 s, next 0.8 s (reset after each list,
            # it would stay at 0.4 s: about five lists a second for good).
            assert w.backoff >= 4 * MIN_BACKOFF_S
        finally:
            await cancel_and_wait(task)


async def test_gateway_routes_to_discovered_replicas_only(kube: Kube) -> None:
    http, api = kube.http, kube.api
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
