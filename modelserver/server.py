"""The model server's HTTP side: an OpenAI-compatible aiohttp app around the emulated engine.

`EngineLoop` drives `Engine.step(now)` in wall time divided by the time scale: it runs a step, sleeps
for the step's modelled duration (scaled), then hands that step's tokens to the waiting requests.
The engine's clock is in modelled seconds: a server at `--time-scale 20` reports through `/metrics`
the latencies the emulated GPU would show, while answering 20 times faster.

The handlers only parse, validate and format; everything about timing and batching is the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash
from aiohttp import web

from kvpilot.signals import GpuStats, to_dict
from modelserver import tokenizer
from modelserver.metrics import CONTENT_TYPE, ServerMetrics
from modelserver.scheduler import Engine, EngineConfig, StepOutput, TokenOutput

log = logging.getLogger("kvpilot.modelserver")

ENGINE_NAME = "kvpilot"
GPU_WINDOW_S = 1.0  # NVML-style activity is averaged over the last modelled second of steps
IDLE_POWER_SHARE = 0.12  # idle board power as a share of TDP (H100 SXM ~70 W of 700 W)
MAX_LAG_WALL_S = 0.1  # past this the loop stops trying to catch up and re-anchors its clock
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    time_scale: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def model_name(self) -> str:
        return self.engine.model.name


def max_model_len(engine: Engine) -> int:
    """The engine's context limit (the contract's default: the model's context length)."""
    limit = getattr(engine, "max_model_len", None)
    return int(limit or engine.config.max_model_len or engine.config.model.context_length)


class ApiError(Exception):
    """An OpenAI-style error: becomes `{"error": {message, type, param, code}}` with its status."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param)


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    err_type = ApiError.TYPES.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError"
    )
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


# ---------------------------------------------------------------------------------------------
# The engine loop


@dataclass(eq=False)
class Generation:
    """One request in flight: the queue its tokens arrive on, and what its metrics need."""

    request_id: str
    prompt_len: int
    arrival: float  # engine seconds
    queue: asyncio.Queue[TokenOutput | None] = field(default_factory=asyncio.Queue)
    num_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float = 0.0
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class _StepRecord:
    start: float
    end: float
    compute: float
    mem_bw: float


class EngineLoop:
    """Runs the engine in scaled wall time and routes each step's tokens to their requests."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, time_scale: float) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.engine = engine
        self.metrics = metrics
        self.time_scale = time_scale
        self.model_name = engine.config.model.name
        self._origin = time.monotonic()  # wall time at engine time 0
        self._t = 0.0  # the engine clock (modelled seconds)
        self._busy = False
        self._wake = asyncio.Event()
        self._live: dict[str, Generation] = {}
        self._ids = itertools.count()
        self._steps: deque[_StepRecord] = deque()
        self._last_stats = engine.stats()
        self._closed = False
        self.failed: str | None = None  # why the engine loop died, if it did
        metrics.bind_state(
            running=lambda: self.engine.stats().num_running,
            waiting=lambda: self.engine.stats().num_waiting,
            kv_usage=lambda: self.engine.stats().kv_usage,
        )

    # -- clock
    def _wall_engine_time(self) -> float:
        return (time.monotonic() - self._origin) * self.time_scale

    def now(self) -> float:
        """The engine time of an event happening now (an arrival, a scrape)."""
        wall = self._wall_engine_time()
        # While a step "runs" the engine clock is at its end and wall time is inside it; while the
        # loop lags, wall time is ahead and the engine has not got there yet.
        return min(wall, self._t) if self._busy else max(wall, self._t)

    # -- requests
    def submit(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> Generation:
        if self._closed:
            raise ApiError(503, self.failed or "the server is shutting down")
        # Ids are never reused, so tokens of an aborted request still in the running step can
        # never reach a newcomer. Answers are keyed by the prompt instead: the same prompt gives
        # the same answer on every run and every replica (like greedy decoding).
        request_id = f"r{next(self._ids)}"
        key = xxhash.xxh64(orjson.dumps(list(prompt_token_ids)), seed=seed or 0).hexdigest()
        gen = Generation(request_id, len(prompt_token_ids), self.now())
        self.engine.add_request(
            request_id,
            prompt_token_ids,
            max_tokens,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            arrival_time=gen.arrival,
            sample_key=key,
        )
        self._live[request_id] = gen
        self._wake.set()
        return gen

    def release(self, gen: Generation) -> None:
        """The handler is done with a request: abort it in the engine if it has not finished."""
        if self._live.pop(gen.request_id, None) is not None and not gen.finished:
            self.engine.abort_request(gen.request_id)
            self._sync_counters()

    def close(self) -> None:
        """Shutting down: refuse new requests and tell every waiting handler to stop."""
        self._closed = True
        for gen in list(self._live.values()):
            gen.queue.put_nowait(None)

    # -- the loop
    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except (
            Exception
        ) as e:  # an engine bug: fail loudly and visibly rather than hang every request
            log.exception("the engine loop died")
            self.failed = f"the engine failed: {type(e).__name__}: {e}"
            self.close()

    async def _run(self) -> None:
        scale = self.time_scale
        while True:
            if not self.engine.has_unfinished():
                self._busy = False
                self._wake.clear()
                await self._wake.wait()
                self._t = max(self._t, self._wall_engine_time())
            self._busy = True
            now = self._t
            cpu0 = time.thread_time()
            out = self.engine.step(now)
            cpu = time.thread_time() - cpu0
            if out.duration_s <= 0.0:
                # Nothing schedulable (e.g. every request waits on blocks an abort will free).
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.01)
                self._t = max(self._t, self._wall_engine_time())
                self._deliver(out, now)
                continue
            end = now + out.duration_s
            self._t = end
            self._record(out, end, cpu)
            delay = self._origin + end / scale - time.monotonic()
            if delay > 0:
                self.metrics.engine_lag.set(0.0)
                await asyncio.sleep(delay)
            else:
                self.metrics.engine_lag.set(-delay * scale)
                if -delay > MAX_LAG_WALL_S:
                    # Too slow to keep the modelled pace: re-anchor rather than burst to catch up.
                    self._origin = time.monotonic() - end / scale
                    self.metrics.engine_resyncs.inc()
                await asyncio.sleep(0)  # let the handlers run between steps
            self._deliver(out, end)

    def _record(self, out: StepOutput, end: float, cpu: float) -> None:
        m = self.metrics
        m.engine_steps.inc()
        m.engine_step_cpu.inc(cpu)
        m.engine_step_modelled.inc(out.duration_s)
        self._steps.append(_StepRecord(out.start, end, out.compute_util, out.mem_bw_util))
        horizon = end - GPU_WINDOW_S
        while self._steps and self._steps[0].end <= horizon:
            self._steps.popleft()

    def _deliver(self, out: StepOutput, at: float) -> None:
        m = self.metrics
        live = self._live
        for tok in out.outputs:
            gen = live.get(tok.request_id)
            if gen is None:  # aborted while its step ran
                continue
            if gen.first_token_at is None:
                gen.first_token_at = at
                gen.num_cached_tokens = tok.num_cached_tokens
                m.time_to_first_token.observe(at - gen.arrival)
                # Queue time ends when the engine first scheduled the request (modelled seconds).
                m.request_queue_time.observe(tok.queue_time_s)
                m.prompt_tokens.inc(gen.prompt_len)
            else:
                m.inter_token_latency.observe(at - gen.last_token_at)
            gen.last_token_at = at
            gen.num_tokens += 1
            m.generation_tokens.inc()
            if tok.finish_reason is not None:
                gen.finish_reason = tok.finish_reason
                del live[tok.request_id]
                m.e2e_request_latency.observe(at - gen.arrival)
                m.request_prompt_tokens.observe(gen.prompt_len)
                m.request_generation_tokens.observe(gen.num_tokens)
                m.request_success(self.model_name, tok.finish_reason)
            gen.queue.put_nowait(tok)
        self._sync_counters()

    def _sync_counters(self) -> None:
        s = self.engine.stats()
        last, m = self._last_stats, self.metrics
        if s.prefix_queries_tokens > last.prefix_queries_tokens:
            m.prefix_cache_queries.inc(s.prefix_queries_tokens - last.prefix_queries_tokens)
        if s.prefix_hits_tokens > last.prefix_hits_tokens:
            m.prefix_cache_hits.inc(s.prefix_hits_tokens - last.prefix_hits_tokens)
        if s.num_preemptions > last.num_preemptions:
            m.num_preemptions.inc(s.num_preemptions - last.num_preemptions)
        self._last_stats = s

    # -- what NVML would see
    def gpu_activity(self) -> tuple[float, float, float]:
        """(duty cycle, SM activity, memory-bandwidth activity) over the last modelled second."""
        now = self.now()
        lo = now - GPU_WINDOW_S
        busy = compute = mem_bw = 0.0
        for s in self._steps:
            overlap = min(s.end, now) - max(s.start, lo)
            if overlap > 0:
                busy += overlap
                compute += overlap * s.compute
                mem_bw += overlap * s.mem_bw
        return (
            min(1.0, busy / GPU_WINDOW_S),
            min(1.0, compute / GPU_WINDOW_S),
            min(1.0, mem_bw / GPU_WINDOW_S),
        )


# ---------------------------------------------------------------------------------------------
# Request parsing


@dataclass(frozen=True)
class SamplingRequest:
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    seed: int | None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _opt(body: dict[str, Any], key: str, check: Callable[[Any], bool], expected: str) -> Any:
    value = body.get(key)
    if value is not None and not check(value):
        raise ApiError(
            400, f"'{key}' must be {expected}, got {type(value).__name__} {value!r}", key
        )
    return value


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict[str, Any], config: ServerConfig) -> None:
    model = _opt(body, "model", lambda v: isinstance(v, str), "a string")
    if model is not None and model != config.model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")


def parse_prompt(body: dict[str, Any]) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    prompt = body["prompt"]
    # OpenAI accepts a string, a list of token ids, or a batch of either; one prompt per request here.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(_is_int(t) and t >= 0 for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise ApiError(400, "only one prompt per request is supported (got a batch)", "prompt")
    else:
        raise ApiError(
            400, "'prompt' must be a string or a list of non-negative token ids", "prompt"
        )
    if not ids:
        raise ApiError(400, "the prompt cannot be empty", "prompt")
    return ids


def parse_messages(body: dict[str, Any], model_name: str) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = msg.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ApiError(
                400,
                f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {role!r}",
                f"{where}.role",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ApiError(
                400, f"{where}.content must be a string or a list of parts", f"{where}.content"
            )
    return tokenizer.encode(tokenizer.render_chat(model_name, messages))


def parse_sampling(
    body: dict[str, Any], prompt_ids: list[int], engine: Engine, config: ServerConfig, *, chat: bool
) -> SamplingRequest:
    max_tokens = _opt(body, "max_tokens", _is_int, "an integer")
    if chat:
        mct = _opt(body, "max_completion_tokens", _is_int, "an integer")
        max_tokens = mct if mct is not None else max_tokens
    min_tokens = _opt(body, "min_tokens", _is_int, "an integer") or 0
    ignore_eos = bool(_opt(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean"))
    stream = bool(_opt(body, "stream", lambda v: isinstance(v, bool), "a boolean"))
    n = _opt(body, "n", _is_int, "an integer")
    seed = _opt(body, "seed", _is_int, "an integer")
    for key in (
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
    ):
        _opt(body, key, _is_number, "a number")
    _opt(body, "top_k", _is_int, "an integer")
    _opt(body, "stop", lambda v: isinstance(v, str | list), "a string or a list of strings")
    options = _opt(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    if options and not stream:
        raise ApiError(
            400, "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if min_tokens < 0:
        raise ApiError(
            400, f"min_tokens must be greater than or equal to 0, got {min_tokens}.", "min_tokens"
        )
    if max_tokens is not None and min_tokens > max_tokens:
        raise ApiError(
            400,
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
            "min_tokens",
        )
    if max_tokens is None:  # as vLLM: whatever the context leaves
        max_tokens = max(1, max_model_len(engine) - len(prompt_ids))
    try:
        engine.validate(len(prompt_ids), max_tokens)
    except ValueError as e:
        raise ApiError(400, str(e), "messages" if chat else "prompt") from None
    return SamplingRequest(
        prompt_token_ids=tuple(prompt_ids),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        continuous_usage=bool(options.get("continuous_usage_stats")),
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Handlers

LOOP = web.AppKey("engine_loop", EngineLoop)
CONFIG = web.AppKey("server_config", ServerConfig)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _usage(gen: Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.prompt_len,
        "completion_tokens": gen.num_tokens,
        "total_tokens": gen.prompt_len + gen.num_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.num_cached_tokens},
    }


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    loop, config = request.app[LOOP], request.app[CONFIG]
    body = await read_json(request)
    check_model(body, config)
    if chat:
        prompt_ids = parse_messages(body, config.model_name)
    else:
        prompt_ids = parse_prompt(body)
        _opt(body, "echo", lambda v: isinstance(v, bool), "a boolean")
    params = parse_sampling(body, prompt_ids, loop.engine, config, chat=chat)
    gen = loop.submit(
        params.prompt_token_ids,
        params.max_tokens,
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
        seed=params.seed,
    )
    response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    try:
        if params.stream:
            return await _stream(request, gen, params, response_id, config.model_name, chat=chat)
        return await _complete(request, gen, response_id, config.model_name, chat=chat)
    finally:
        loop.release(gen)  # aborts in the engine (freeing its blocks) unless it finished


async def _tokens(loop: EngineLoop, gen: Generation) -> AsyncIterator[TokenOutput]:
    while True:
        tok = await gen.queue.get()
        if tok is None:
            raise ApiError(503, loop.failed or "the server is shutting down")
        yield tok
        if tok.finish_reason is not None:
            return


async def _complete(
    request: web.Request, gen: Generation, response_id: str, model: str, *, chat: bool
) -> web.StreamResponse:
    ids: list[int] = []
    finish_reason = None
    async for tok in _tokens(request.app[LOOP], gen):
        ids.append(tok.token_id)
        finish_reason = tok.finish_reason
        if _disconnected(request):
            return web.Response(status=499)  # nobody reads it; the finally clause aborts
    text = tokenizer.detokenize(ids)
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
    else:
        choice["text"] = text
    choice["stop_reason"] = None
    body = {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(gen),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _stream(
    request: web.Request,
    gen: Generation,
    params: SamplingRequest,
    response_id: str,
    model: str,
    *,
    chat: bool,
) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": response_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"

    try:
        async for tok in _tokens(request.app[LOOP], gen):
            text = tokenizer.token_text(tok.token_id, tok.index)
            usage = _usage(gen) if params.continuous_usage else None
            if chat:
                if tok.index == 0:  # vLLM opens the assistant turn with the first output
                    role = {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    await resp.write(chunk([role]))
                choice = {
                    "index": 0,
                    "delta": {"content": text},
                    "logprobs": None,
                    "finish_reason": tok.finish_reason,
                }
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": tok.finish_reason,
                    "stop_reason": None,
                }
            await resp.write(chunk([choice], usage))
        if params.include_usage:
            await resp.write(chunk([], _usage(gen)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (
        ApiError
    ) as e:  # shutdown mid-stream: tell the client, the way vLLM reports stream errors
        err = {
            "error": {
                "message": e.message,
                "type": "ServiceUnavailableError",
                "param": None,
                "code": e.status,
            }
        }
        with contextlib.suppress(ConnectionError):
            await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
    except ConnectionError:
        pass  # the client went away: the caller's finally aborts the request
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    card = {
        "id": config.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": ENGINE_NAME,
        "root": config.engine.model.hf_id,
        "parent": None,
        "max_model_len": max_model_len(request.app[LOOP].engine),
    }
    return web.json_response(
        {"object": "list", "data": [card]}, dumps=lambda o: orjson.dumps(o).decode()
    )


async def health(request: web.Request) -> web.Response:
    failed = request.app[LOOP].failed
    return web.Response(status=200) if failed is None else error_response(503, failed)


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """POST /reset_prefix_cache, as vLLM's server has it: forget every cached prefix (blocks in
    use stay with their requests), e.g. between benchmark runs."""
    request.app[LOOP].engine.pool.reset_prefix_cache()
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[LOOP].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def gpu_uuid(port: int, index: int) -> str:
    """A stable NVML-style UUID for emulated GPU `index` of the server on `port`."""
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"kvpilot-modelserver:{port}/{index}"))


def engine_state(loop: EngineLoop, config: ServerConfig, port: int) -> dict[str, Any]:
    engine = loop.engine
    stats = engine.stats()
    gpu, n = config.engine.gpu, config.engine.num_gpus
    util, sm, bw = loop.gpu_activity()
    per_gpu_used = (stats.weight_bytes + stats.num_used_blocks * stats.kv_bytes_per_block) // n
    activity = min(1.0, 0.4 * util + 0.6 * max(sm, bw))
    idle_w = IDLE_POWER_SHARE * gpu.tdp_w
    gpus = [
        GpuStats(
            uuid=gpu_uuid(port, i),
            index=i,
            name=gpu.product_name,
            hbm_used_bytes=int(per_gpu_used),
            hbm_total_bytes=gpu.memory_bytes,
            util=round(util, 4),
            mem_bw_util=round(bw, 4),
            sm_active=round(sm, 4),
            power_w=round(idle_w + (gpu.tdp_w - idle_w) * activity, 1),
            temp_c=round(32.0 + 43.0 * activity, 1),
        )
        for i in range(n)
    ]
    return {
        "engine": ENGINE_NAME,
        "model": config.model_name,
        "accelerator": gpu.label,
        "num_gpus": n,
        "observed_at": time.time(),
        "waiting": stats.num_waiting,
        "running": stats.num_running,
        "kv_usage": stats.kv_usage,
        "kv_blocks_total": stats.num_gpu_blocks,
        "kv_block_size": stats.block_size,
        "time_scale": loop.time_scale,
        "gpus": [to_dict(g) for g in gpus],
    }


async def state(request: web.Request) -> web.Response:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else request.app[CONFIG].port
    body = engine_state(request.app[LOOP], request.app[CONFIG], port)
    return web.Response(body=orjson.dumps(body), content_type="application/json")


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, e.reason)
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error")


def build_app(config: ServerConfig, engine: Engine | None = None) -> web.Application:
    """The server as an aiohttp app; the engine loop starts and stops with it."""
    app = web.Application(middlewares=[openai_errors], client_max_size=64 * 1024 * 1024)
    app[CONFIG] = config
    engine = engine or Engine(config.engine)
    metrics_ = ServerMetrics(config.model_name)
    metrics_.set_cache_config(
        config.model_name,
        engine.config.block_size,
        engine.num_gpu_blocks,
        engine.config.enable_prefix_caching,
        engine.config.gpu_memory_utilization,
    )

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        loop = EngineLoop(engine, metrics_, config.time_scale)
        app[LOOP] = loop
        task = asyncio.create_task(loop.run(), name="engine-loop")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def on_shutdown(app: web.Application) -> None:
        app[LOOP].close()  # ends open streams now rather than after the shutdown timeout

    app.cleanup_ctx.append(engine_ctx)
    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/engine/state", state)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    return app


@dataclass
class RunningServer:
    runner: web.AppRunner
    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def engine(self) -> Engine:
        return self.app[LOOP].engine

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(config: ServerConfig, engine: Engine | None = None) -> RunningServer:
    """Start serving on config.host:config.port (0 picks a free port) and return at once."""
    app = build_app(config, engine)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    return RunningServer(runner, app, str(host), int(port))
