"""The agent's HTTP surface: state snapshot, state stream, Prometheus metrics, probes.

`GET /v1/state/watch` is newline-delimited JSON (`application/x-ndjson`): the current NodeState
at once, then one line per new state (every scrape cycle). A reader too slow for every state gets
the newest one next; nothing queues up behind it.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.hub import StateHub

NDJSON = "application/x-ndjson"


def routes(hub_of: object, ready_of: object, alive_of: object, registry_of: object) -> list:
    """Handlers over getters of the live agent (it is built in the app's cleanup context)."""

    async def state(request: web.Request) -> web.Response:
        hub: StateHub = hub_of(request)  # type: ignore[operator]
        if not hub.latest_json:
            return web.json_response({"error": "no state yet"}, status=503)
        return web.Response(body=hub.latest_json, content_type="application/json")

    async def watch(request: web.Request) -> web.StreamResponse:
        hub: StateHub = hub_of(request)  # type: ignore[operator]
        resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        q = hub.subscribe()
        try:
            while True:
                data = await q.get()
                if not data:  # the agent is shutting down
                    break
                await resp.write(data + b"\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            hub.unsubscribe(q)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry_of(request))  # type: ignore[operator]
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        ok = alive_of(request)  # type: ignore[operator]
        return web.Response(
            text="ok\n" if ok else "scrape loop stopped\n", status=200 if ok else 500
        )

    async def readyz(request: web.Request) -> web.Response:
        ok = ready_of(request)  # type: ignore[operator]
        return web.Response(text="ready\n" if ok else "not ready\n", status=200 if ok else 503)

    return [
        web.get("/v1/state", state),
        web.get("/v1/state/watch", watch),
        web.get("/metrics", metrics),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]
