"""The model server's OpenAI-compatible API, driven by the official `openai` client.

Servers run in-process on ephemeral loopback ports with the real engine, time-scaled so that a few
hundred modelled tokens take milliseconds; the command-line test starts `kvpilot modelserver` as a
subprocess.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from kvpilot.signals import GpuStats, from_dict
from modelserver import profiles, tokenizer
from modelserver.scheduler import Engine, EngineConfig, StepOutput
from modelserver.server import RunningServer, ServerConfig, gpu_uuid, start_server

MODEL = "llama-3.1-8b"
MAX_MODEL_LEN = 4096


def _config(**engine_kw: object) -> ServerConfig:
    engine = EngineConfig(
        model=profiles.resolve_model(MODEL),
        gpu=profiles.resolve_gpu(str(engine_kw.pop("gpu", "h100"))),
        max_model_len=MAX_MODEL_LEN,
        **engine_kw,  # type: ignore[arg-type]
    )
    return ServerConfig(engine=engine, time_scale=100.0, port=0)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    srv = await start_server(_config())
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


PROMPT = "The quick brown fox jumps over the lazy dog. Explain why this sentence is famous."
FIXED = {"ignore_eos": True}


async def test_completion_non_streaming(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=17, extra_body=FIXED)
    assert r.object == "text_completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.text.split()) == 17  # one word per generated token
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(PROMPT.encode())  # byte-level tokenizer
    assert r.usage.completion_tokens == 17
    assert r.usage.total_tokens == r.usage.prompt_tokens + 17


async def test_completion_streaming_matches_non_streaming(client: openai.AsyncOpenAI) -> None:
    """Same prompt, same answer: streamed chunks join to the non-streamed text."""
    whole = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=25, extra_body=FIXED
    )
    stream = await client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=25,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FIXED,
    )
    texts, finishes, usage = [], [], None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(texts) == 25  # one chunk per token
    assert "".join(texts) == whole.choices[0].text
    assert finishes[:-1] == [None] * 24 and finishes[-1] == "length"
    assert usage is not None and usage.completion_tokens == 25
    assert usage.prompt_tokens == len(PROMPT.encode())


async def test_streaming_without_include_usage_sends_no_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, stream=True, extra_body=FIXED
    )
    chunks = [c async for c in stream]
    assert len(chunks) == 5
    assert all(c.usage is None for c in chunks)


async def test_chat_non_streaming(client: openai.AsyncOpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three rivers."},
    ]
    r = await client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, extra_body=FIXED
    )
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and len(msg.content.split()) == 12
    assert r.choices[0].finish_reason == "length"
    prompt = tokenizer.render_chat(MODEL, messages)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.usage.completion_tokens == 12


async def test_chat_streaming(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FIXED,
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert len(content) == 9 and all(content)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


async def test_min_tokens_fixes_the_output_length(client: openai.AsyncOpenAI) -> None:
    """Without ignore_eos a request stops on its own; min_tokens = max_tokens pins the length."""
    for n in (1, 40):
        r = await client.completions.create(
            model=MODEL, prompt=f"pin {n}", max_tokens=n, extra_body={"min_tokens": n}
        )
        assert r.usage.completion_tokens == n


async def test_natural_stop_without_ignore_eos(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(model=MODEL, prompt="Tell me a story.", max_tokens=3000)
    assert r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens < 3000


async def test_token_id_prompt(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(
        model=MODEL, prompt=list(range(300)), max_tokens=3, extra_body=FIXED
    )
    assert r.usage.prompt_tokens == 300 and r.usage.completion_tokens == 3


async def test_models_and_health(
    server: RunningServer, client: openai.AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    listed = await client.models.list()
    assert [m.id for m in listed.data] == [MODEL]
    async with http.get(server.url + "/health") as r:
        assert r.status == 200


# ---------------------------------------------------------------------------------------------
# Bad input


async def _post(http: aiohttp.ClientSession, url: str, data: bytes | str) -> tuple[int, dict]:
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"model": "llama-3.1-8b", "prompt": "hi"', None),  # malformed JSON
        ("/v1/completions", "[1, 2]", None),  # not an object
        ("/v1/completions", '{"model": "llama-3.1-8b"}', "prompt"),  # missing prompt
        ("/v1/completions", '{"prompt": 42}', "prompt"),
        ("/v1/completions", '{"prompt": ""}', "prompt"),
        ("/v1/completions", '{"prompt": ["a", "b"]}', "prompt"),  # batches: one prompt only
        ("/v1/completions", '{"prompt": "hi", "max_tokens": "ten"}', "max_tokens"),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 4, "min_tokens": 5}', "min_tokens"),
        ("/v1/completions", '{"prompt": "hi", "stream": "yes"}', "stream"),
        ("/v1/completions", '{"prompt": "hi", "temperature": "hot"}', "temperature"),
        ("/v1/completions", '{"prompt": "hi", "n": 2}', "n"),
        (
            "/v1/completions",
            '{"prompt": "hi", "stream_options": {"include_usage": true}}',
            "stream_options",
        ),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 5000}', "prompt"),  # beyond context
        ("/v1/chat/completions", '{"model": "llama-3.1-8b"}', "messages"),
        ("/v1/chat/completions", '{"messages": []}', "messages"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "wizard", "content": "x"}]}',
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": 7}]}',
            "messages[0].content",
        ),
    ],
)
async def test_bad_requests_get_openai_style_400(
    server: RunningServer, http: aiohttp.ClientSession, path: str, body: str, param: str | None
) -> None:
    status, payload = await _post(http, server.url + path, body)
    assert status == 400, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert err["param"] == param and err["message"]


async def test_prompt_beyond_context_length(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    prompt = "x" * (MAX_MODEL_LEN + 10)
    status, payload = await _post(
        http, server.url + "/v1/completions", f'{{"prompt": "{prompt}", "max_tokens": 1}}'
    )
    assert status == 400
    assert str(MAX_MODEL_LEN) in payload["error"]["message"]


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
    assert info.value.status_code == 404
    assert info.value.body["type"] == "NotFoundError" and "gpt-9" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]
        )


async def test_bad_request_through_the_client(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=MAX_MODEL_LEN)
    assert info.value.status_code == 400


async def test_unknown_route_is_json_404(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.url + "/v1/nothing") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == 404


# ---------------------------------------------------------------------------------------------
# What NVML would see


async def test_engine_state_reports_gpus() -> None:
    # Time scale 10: the long request below outlasts the test by seconds, even on a loaded machine.
    config = dataclasses.replace(_config(gpu="nvidia-a100-80gb", num_gpus=2), time_scale=10.0)
    srv = await start_server(config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.url + "/v1/engine/state") as r:
                idle = await r.json()
            assert idle["engine"] == "kvpilot" and idle["model"] == MODEL
            assert idle["accelerator"] == "nvidia-a100-80gb" and idle["num_gpus"] == 2
            gpus = [from_dict(GpuStats, g) for g in idle["gpus"]]
            assert [g.index for g in gpus] == [0, 1]
            assert [g.uuid for g in gpus] == [gpu_uuid(srv.port, 0), gpu_uuid(srv.port, 1)]
            a100 = profiles.resolve_gpu("a100-80gb")
            for g in gpus:
                assert g.name == a100.product_name and g.hbm_total_bytes == a100.memory_bytes
                weights_per_gpu = srv.engine.stats().weight_bytes // 2
                assert g.hbm_used_bytes == weights_per_gpu  # no KV blocks held yet
                assert g.util == 0.0 and g.power_w is not None and g.power_w < a100.tdp_w
            # Under load: KV blocks add to HBM used and the duty cycle rises.
            body = {"prompt": "y" * 500, "max_tokens": 3500, "ignore_eos": True, "stream": True}
            async with http.post(srv.url + "/v1/completions", json=body) as stream:
                for _ in range(30):
                    await stream.content.readline()
                async with http.get(srv.url + "/v1/engine/state") as r:
                    busy = await r.json()
            assert busy["running"] == 1
            g0 = from_dict(GpuStats, busy["gpus"][0])
            assert g0.hbm_used_bytes > gpus[0].hbm_used_bytes
            assert g0.util > 0.0 and g0.mem_bw_util > 0.0
            assert g0.power_w > gpus[0].power_w
    finally:
        await srv.stop()


# ---------------------------------------------------------------------------------------------
# The command line


async def _start_cli(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvpilot", "modelserver", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
    return proc, line


async def test_cli_serves_the_openai_client() -> None:
    # No --max-model-len: Llama-3.1-8B's 128k context does not fit an L4's KV cache, so the server
    # serves what fits (and says so) rather than refusing requests that leave out max_tokens.
    proc, line = await _start_cli(
        "--model", "Llama-3.1-8B", "--gpu", "nvidia-l4", "--port", "0", "--time-scale", "50"
    )  # fmt: skip
    try:
        prefix = "kvpilot modelserver llama-3.1-8b on 1x nvidia-l4 listening on http://127.0.0.1:"
        assert line.startswith(prefix) and line.rstrip().endswith("KV blocks")
        url = line.split("listening on ")[1].split(",")[0]
        blocks = int(line.rsplit(", ", 1)[1].split()[0])
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
            (card,) = (await c.models.list()).data
            assert card.id == MODEL and card.model_extra["max_model_len"] == blocks * 16
            r = await c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                extra_body=FIXED,
            )
            assert r.usage.completion_tokens == 4
            r = await c.completions.create(model=MODEL, prompt="no max_tokens given")
            assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), timeout=20)
        err = (await proc.stderr.read()).decode()
    assert rc == 0
    assert "serving --max-model-len" in err


@pytest.mark.parametrize(
    ("args", "flag", "choice"),
    [
        (["--model", "llama-3.1-8b", "--gpu", "tpu-v5"], "--gpu", "nvidia-h100-80gb"),
        (["--model", "gpt-9", "--gpu", "h100"], "--model", "llama-3.1-8b"),
        (["--model", "llama-3.1-8b", "--gpu", "h100", "--dtype", "fp4"], "--dtype", "int4"),
        (["--model", "llama-3.1-8b", "--gpu", "h100", "--time-scale", "-1"], "--time-scale", ""),
    ],
)
async def test_cli_bad_flag_is_one_line_and_exit_2(args: list[str], flag: str, choice: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvpilot", "modelserver", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert flag in lines[0] and choice in lines[0]
    assert out == b""


async def test_same_prompt_right_after_a_disconnect_gets_its_own_answer() -> None:
    """Answers are keyed by the prompt. A retry that arrives after the server aborted a dropped
    stream, while the step that still holds the aborted request's last token runs (steps are
    ~130 ms of wall time here), must not receive that token."""
    srv = await start_server(
        ServerConfig(
            engine=EngineConfig(
                model=profiles.resolve_model(MODEL),
                gpu=profiles.resolve_gpu("l4"),
                max_model_len=4096,
            ),
            time_scale=0.5,
            port=0,
        )
    )
    try:
        body = {"model": MODEL, "prompt": "retry me", "max_tokens": 6, "ignore_eos": True}
        async with aiohttp.ClientSession() as http:
            resp = await http.post(srv.url + "/v1/completions", json={**body, "stream": True})
            for _ in range(4):
                await resp.content.readline()
            resp.close()
            for _ in range(2000):  # until the server has noticed and aborted
                if not srv.engine.has_unfinished():
                    break
                await asyncio.sleep(0.001)
            async with http.post(srv.url + "/v1/completions", json=body) as r:
                retry = await r.json()
        assert retry["usage"]["completion_tokens"] == 6
        assert retry["choices"][0]["finish_reason"] == "length"
        assert len(retry["choices"][0]["text"].split()) == 6
    finally:
        await srv.stop()


async def test_identical_prompts_in_flight_together_each_get_the_same_answer(
    client: openai.AsyncOpenAI,
) -> None:
    async def one(stream: bool) -> str:
        kw = {
            "model": MODEL,
            "prompt": "Write an essay.",
            "max_tokens": 12,
            "extra_body": {"ignore_eos": True},
        }
        if not stream:
            return (await client.completions.create(**kw)).choices[0].text
        chunks = await client.completions.create(**kw, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    answers = await asyncio.gather(*(one(i % 2 == 0) for i in range(16)))
    assert len(set(answers)) == 1
    assert len(answers[0].split()) == 12


class _FailingEngine(Engine):
    """The real engine with a fault injected: its third step raises."""

    steps = 0

    def step(self, now: float) -> StepOutput:
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("injected fault")
        return super().step(now)


async def test_engine_failure_fails_requests_and_health() -> None:
    config = _config()
    srv = await start_server(config, _FailingEngine(config.engine))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.url + "/health") as r:
                assert r.status == 200
            body = {"prompt": "doomed", "max_tokens": 50, "ignore_eos": True}
            async with http.post(srv.url + "/v1/completions", json=body) as r:
                assert r.status == 503
                err = (await r.json())["error"]
            assert err["type"] == "ServiceUnavailableError" and "injected fault" in err["message"]
            async with http.get(srv.url + "/health") as r:
                assert r.status == 503
            async with http.post(srv.url + "/v1/completions", json=body) as r:
                assert r.status == 503  # refused at once, not left hanging
    finally:
        await srv.stop()


async def test_cli_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvpilot", "modelserver", "--model", MODEL, "--gpu", "h100",
            "--port", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 1 and out == b""
    (line,) = err.decode().strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line
