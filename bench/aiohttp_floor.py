"""The floor under any aiohttp proxy: the least an aiohttp server + one shared ClientSession costs.

    python bench/aiohttp_floor.py --port 9002 --upstream http://127.0.0.1:9001 [--processes N]

bench/proxy.py measures it beside the gateway, so the table separates what aiohttp itself costs a
proxied request (parse, forward, relay: this file) from what kvpilot's gateway adds on top
(validation, features, the pick, the in-flight account, retries, timeouts, metrics). No routing,
no checks, one upstream; the same event loop (uvloop) and session settings as the gateway.
`--processes N` runs N of them on one port (SO_REUSEPORT), as `gateway.workers: N` does, so
that a many-worker gateway is compared with a floor of as many processes.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from fixed_backend import serve_processes  # bench/ is the script's directory


def build(upstream: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        yield
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.post(
            upstream + request.path, data=body, headers=headers, allow_redirects=False
        ) as r:
            ctype = r.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                return web.Response(status=r.status, body=await r.read(), content_type=None,
                                    headers={"Content-Type": ctype})  # fmt: skip
            out = web.StreamResponse(status=r.status, headers={"Content-Type": ctype})
            await out.prepare(request)
            async for chunk in r.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/completions", proxy)
    app.router.add_post("/v1/chat/completions", proxy)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9002)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--processes", type=int, default=1)
    args = ap.parse_args()
    serve = (args.upstream.rstrip("/"), args.host, args.port, args.processes > 1)
    serve_processes(_serve, serve, args.processes)


def _serve(upstream: str, host: str, port: int, reuse_port: bool) -> None:
    web.run_app(
        build(upstream),
        host=host,
        port=port,
        reuse_port=reuse_port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
