"""A fast fixed-answer OpenAI-compatible backend, to measure what a proxy adds and nothing else.

`python bench/fixed_backend.py --port 9001 [--chunks 16] [--processes N] [--delay-ms MS]` answers
every /v1/completions and /v1/chat/completions at once (or after `--delay-ms`, as a model server
takes a while) with the same small JSON, or (with "stream": true) with `--chunks` SSE events and
[DONE]; /metrics publishes the few vLLM gauges a router reads, all idle.
With `--processes N` it runs N processes on one port (SO_REUSEPORT), so that on a many-core
machine the backend is not what caps a proxy's measured rate.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

_COMPLETION = orjson.dumps(
    {
        "id": "cmpl-fixed",
        "object": "text_completion",
        "created": 0,
        "model": "fixed",
        "choices": [{"index": 0, "text": " ok", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
)
_CHAT = orjson.dumps(
    {
        "id": "chatcmpl-fixed",
        "object": "chat.completion",
        "created": 0,
        "model": "fixed",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
)
_METRICS = (
    'vllm:num_requests_waiting{model_name="fixed"} 0\n'
    'vllm:num_requests_running{model_name="fixed"} 0\n'
    'vllm:kv_cache_usage_perc{model_name="fixed"} 0\n'
    'vllm:cache_config_info{block_size="16",num_gpu_blocks="4096"} 1\n'
)


def _event(i: int, chat: bool) -> bytes:
    if chat:
        delta = {
            "id": "chatcmpl-fixed",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fixed",
            "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}],
        }
    else:
        delta = {
            "id": "cmpl-fixed",
            "object": "text_completion",
            "created": 0,
            "model": "fixed",
            "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}],
        }
    return b"data: " + orjson.dumps(delta) + b"\n\n"


def make_app(chunks: int = 16, delay_s: float = 0.0) -> web.Application:
    streams = {
        chat: [_event(i, chat) for i in range(chunks)] + [b"data: [DONE]\n\n"]
        for chat in (False, True)
    }

    async def answer(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if delay_s:
            await asyncio.sleep(delay_s)
        chat = request.path.endswith("chat/completions")
        if b'"stream":true' not in raw.replace(b" ", b""):
            return web.Response(
                body=_CHAT if chat else _COMPLETION, content_type="application/json"
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in streams[chat]:
            await resp.write(ev)  # one write per event: what a token-by-token server does
        await resp.write_eof()
        return resp

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=_METRICS)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fixed", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="before each answer")
    args = ap.parse_args()
    serve = (args.chunks, args.host, args.port, args.processes > 1, args.delay_ms / 1000)
    serve_processes(_serve, serve, args.processes)


def serve_processes(serve: Callable[..., None], args: tuple[Any, ...], processes: int) -> None:
    """`serve(*args)` here and in `processes - 1` more processes (the same port, SO_REUSEPORT):
    daemonic, so when run_app here exits on SIGTERM multiprocessing ends the others."""
    for _ in range(processes - 1):
        multiprocessing.Process(target=serve, args=args, daemon=True).start()
    serve(*args)


def _serve(chunks: int, host: str, port: int, reuse_port: bool, delay_s: float = 0.0) -> None:
    web.run_app(
        make_app(chunks, delay_s),
        host=host,
        port=port,
        reuse_port=reuse_port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
