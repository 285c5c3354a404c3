"""The gateway's aiohttp application and its lifecycle.

`build_app(cfg)` wires the parts: one shared upstream aiohttp ClientSession (keep-alive pools) for
the request path and the state feeds (agents, direct scrape), discovery, the periodic tick, all
created and torn down in
`cleanup_ctx`. `run_gateway(cfg)` serves it in-process (tests, the demo); `kvpilot gateway
--config F` serves it from the command line and applies config changes as the file changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)

from gateway import errors, metrics
from gateway.discovery import Discovery
from gateway.fleet import Fleet, StateFeeds
from gateway.peers import ENV_DIR as PEERS_ENV_DIR
from gateway.peers import PeerAccounts
from gateway.proxy import Gateway
from kvpilot.config import Config, parse_listen
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger(__name__)

UPSTREAM_CONNECTIONS_PER_REPLICA = 1024

GATEWAY = web.AppKey("gateway", Gateway)
DISCOVERY = web.AppKey("discovery", Discovery)
TICK_S = 0.5  # ejections run out and stale states age between events: look again this often
# After gateway.shutdown_timeout_s the gateway ends what still runs itself (gateway.drain); what
# aiohttp then waits for (twice, per connection) is only the last writes of those answers.
AIOHTTP_SHUTDOWN_S = 2.0


def build_app(cfg: Config, *, kube_api_client: Any = None, worker: int = -1) -> web.Application:
    """The gateway as an aiohttp app. `kube_api_client` overrides the in-cluster/kubeconfig client;
    `worker` >= 0: one of `gateway.workers` processes (shares in-flight totals with the others)."""
    gw_cfg = cfg.gateway
    gateway_box: dict[str, Gateway] = {}

    def on_change(pool: str) -> None:
        g = gateway_box.get("g")
        if g is not None:
            g.wake(pool)

    fleet = Fleet(
        eject_after=gw_cfg.eject_after_failures,
        eject_for_s=gw_cfg.eject_for_s,
        stale_after_s=gw_cfg.stale_after_s,
        on_change=on_change,
    )
    gateway = Gateway(cfg, fleet)
    gateway_box["g"] = gateway
    # Slack over the limit so that an oversize body is refused by our check with an OpenAI error.
    app = web.Application(client_max_size=gw_cfg.max_body_bytes + 1)
    app[GATEWAY] = gateway

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=0,  # no global cap: the queue and the picker bound what each replica gets
            # Per replica: far above what an engine batches at once (vLLM's default max_num_seqs
            # is 256), so the cap never queues requests the picker meant to send now.
            limit_per_host=UPSTREAM_CONNECTIONS_PER_REPLICA,
            keepalive_timeout=30,
            ttl_dns_cache=30,
            enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=gw_cfg.connect_timeout_s)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,  # bytes pass through as the replica encoded them
            # One session for every client: a jar would send a cookie answered to one user with
            # the next user's requests. Set-Cookie and Cookie pass through as headers.
            cookie_jar=aiohttp.DummyCookieJar(),
            # We forward the client's own headers; aiohttp's defaults would add or change them.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        gateway.session = session
        gateway.loop = asyncio.get_running_loop()
        peers_dir = os.environ.get(PEERS_ENV_DIR, "")
        if worker >= 0 and peers_dir and gw_cfg.peer_sync_s > 0:
            fleet.peers = PeerAccounts(
                peers_dir,
                worker,
                fleet.ledger.snapshots,
                learned=gateway.learned,
                epoch=gateway.policy_epoch,
                learn=gateway.learn_from_peers,
                prefixes=gateway.drain_picks,
                add_prefixes=gateway.peer_picked,
                touched=fleet.peers_touched,
                interval_s=gw_cfg.peer_sync_s,
                loop=asyncio.get_running_loop(),
            )
            gateway.share_with_peers()
        discovery = Discovery(
            cfg.pools,
            fleet,
            kubernetes=gw_cfg.kubernetes,
            services=gw_cfg.services,
            api_client=kube_api_client,
        )
        app[DISCOVERY] = discovery
        await discovery.start()
        feeds = StateFeeds(
            fleet,
            session,
            gw_cfg.agents,
            scrape_interval_s=gw_cfg.scrape_interval_s,
            scrape=gw_cfg.scrape_fallback,
            engines={p.name: p.engine for p in cfg.pools},
        )
        feeds.start()
        ticker = asyncio.create_task(_tick(fleet), name="gateway tick")
        try:
            yield
        finally:
            await cancel_and_wait(ticker)
            metrics.flush()
            await feeds.stop()
            await app[DISCOVERY].stop()
            await session.close()
            gateway.loop = None
            if fleet.peers is not None:
                fleet.peers.close()
                fleet.peers = None

    app.cleanup_ctx.append(lifecycle)

    def closing(response: web.StreamResponse) -> web.StreamResponse:
        # While draining, an answer not yet sent says Connection: close, so a keep-alive client
        # does not write its next request into a connection that is about to close. (A check
        # here, not an on_response_prepare hook: that would be one more await per response.)
        if gateway.draining and not response.prepared:
            response.force_close()
        return response

    async def completions(request: web.Request) -> web.StreamResponse:
        return closing(await gateway.handle(request, "completions"))

    async def chat(request: web.Request) -> web.StreamResponse:
        return closing(await gateway.handle(request, "chat/completions"))

    async def models(request: web.Request) -> web.Response:
        try:
            gateway.check_auth(request)
        except errors.GatewayError as e:
            return e.response()
        data = [_model_object(m) for m in gateway.models()]
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    async def model(request: web.Request) -> web.Response:
        """GET /v1/models/{id} (the openai client's `models.retrieve`)."""
        name = request.match_info["id"]
        try:
            gateway.check_auth(request)
            if name not in gateway.model_pools:
                raise errors.unknown_model(name)
        except errors.GatewayError as e:
            return e.response()
        return web.Response(body=orjson.dumps(_model_object(name)), content_type="application/json")

    async def no_route(request: web.Request) -> web.Response:
        """Anything no route serves: OpenAI-style 404, or 405 for a known path's wrong method.

        A catch-all route rather than a middleware: it costs the routed requests nothing."""
        allowed: set[str] = set()
        for resource in app.router.resources():
            if resource is not catch_all:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            return errors.GatewayError(
                405,
                f"Method {request.method} is not allowed for {request.path}; "
                f"use {', '.join(sorted(allowed))}.",
                "invalid_request_error",
                None,
                "method_not_allowed",
                {"Allow": ", ".join(sorted(allowed))},
            ).response()
        return errors.GatewayError(
            404,
            f"Unknown request URL: {request.method} {request.path}.",
            "invalid_request_error",
            None,
            "unknown_url",
        ).response()

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        """Ready once every pool's discovery has reported. A pool without replicas is a state
        the gateway serves (it holds the requests: scale from zero), not a reason to leave the
        Service: every gateway sees the same fleet, and with all of them unready nothing would
        reach one to be held, so nothing would scale the pool up."""
        now = time.time()
        pools = [p.name for p in gateway.cfg.pools]
        unsynced = [p for p in pools if p not in fleet.synced]
        pickable = {p: len(fleet.views(p, now)) for p in pools}
        ok = not unsynced
        body = {"ready": ok, "unsynced": unsynced, "replicas": pickable}
        return web.Response(
            status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json"
        )

    async def prom(request: web.Request) -> web.Response:
        registry = REGISTRY
        metrics.flush()  # this worker's latest (the others flush on their tick)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several workers: report them all
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def fleet_view(request: web.Request) -> web.Response:
        """What the gateway believes about each replica (for people and tests, not for scripts).
        It names the replicas' addresses: behind the API keys when the gateway has some."""
        try:
            gateway.check_auth(request)
        except errors.GatewayError as e:
            return e.response()
        now = time.time()
        pools = {}
        for name, reps in fleet.pools.items():
            pools[name] = [
                {
                    "id": r.replica_id,
                    "url": r.url,
                    "terminating": r.terminating,
                    "ejected": r.ejected_until > now,
                    "inflight": r.inflight,
                    "source": r.state_source,
                    "state_age_s": None if r.state is None else round(r.state.age(now), 3),
                    "state": None
                    if r.state is None
                    else {
                        "waiting": r.state.waiting,
                        "running": r.state.running,
                        "kv_usage": r.state.kv_usage,
                        "kv_blocks_total": r.state.kv_blocks_total,
                        "engine": r.state.engine,
                    },
                }
                for r in reps.values()
            ]
        queues = {name: len(rt.queue) for name, rt in gateway.pools.items()}
        return web.Response(
            body=orjson.dumps({"pools": pools, "queues": queues}), content_type="application/json"
        )

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id:.+}", model)  # model names may hold slashes
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prom)
    app.router.add_get("/debug/fleet", fleet_view)
    catch_all = app.router.add_route("*", "/{path:.*}", no_route).resource
    return app


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "kvpilot"}


async def _tick(fleet: Fleet) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        fleet.tick(time.time())
        metrics.flush()  # the request path's tallies (other workers' /metrics read our files)


async def apply_config(app: web.Application, cfg: Config) -> None:
    """Apply a new valid config to a running gateway: pools, policies, endpoints, limits.

    Listen address, Kubernetes mode and agents take effect on restart only.
    """
    gateway = app[GATEWAY]
    old_pools = {p.name for p in gateway.cfg.pools}
    gateway.configure(cfg)
    await app[DISCOVERY].restart(cfg.pools, cfg.gateway.services)  # old watches end first
    for name in old_pools - {p.name for p in cfg.pools}:
        gateway.fleet.drop_pool(name)


class GatewayRunner(web.AppRunner):
    """aiohttp's runner with the gateway's shutdown grace (`Gateway.drain`) between closing the
    listening socket and aiohttp's own cleanup: that closes every connection before its
    on_shutdown hooks run, and a closed connection reads no more, so a request whose body was
    still arriving could never finish within the grace."""

    async def cleanup(self) -> None:
        for site in list(self.sites):
            await site.stop()
        if self.server is not None:
            await asyncio.sleep(0)  # as aiohttp does: requests already in have started
            gateway = self.app[GATEWAY]
            await gateway.drain(gateway.gw.shutdown_timeout_s, connections=self.server.connections)
        await super().cleanup()


async def start_gateway(
    cfg: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    kube_api_client: Any = None,
    reuse_port: bool = False,
    worker: int = -1,
) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner (call `cleanup()` to stop) and the base URL .../v1.

    `reuse_port`: share the port with other gateway workers (SO_REUSEPORT); `worker`: this
    process's index among them."""
    lhost, lport = parse_listen(cfg.gateway.listen)
    host = lhost if host is None else host
    port = lport if port is None else port
    app = build_app(cfg, kube_api_client=kube_api_client, worker=worker)
    # handler_cancellation: a client that goes away cancels its handler, which closes upstream.
    runner = GatewayRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=AIOHTTP_SHUTDOWN_S
    )
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock)
    await site.start()
    bound = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return runner, f"http://{shown}:{bound}/v1"


@contextlib.asynccontextmanager
async def run_gateway(
    cfg: Config, *, host: str | None = None, port: int | None = None, kube_api_client: Any = None
) -> AsyncIterator[str]:
    """Serve the gateway in this event loop; yields its base URL (http://HOST:PORT/v1).

    `port=0` picks a free port. This is the hook `kvpilot demo` and the tests use:

        async with run_gateway(cfg, port=0) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
    """
    runner, url = await start_gateway(cfg, host=host, port=port, kube_api_client=kube_api_client)
    try:
        yield url
    finally:
        await runner.cleanup()
