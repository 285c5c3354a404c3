"""`gateway.workers: N`: N processes on one port (SO_REUSEPORT) behind one supervisor.

The real command line in a child process, in front of an aiohttp upstream served by this test's
event loop. Checks: every request is answered, more than one worker answers, /metrics from any
worker counts the requests of all of them, and SIGTERM to the supervisor stops every worker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, multiprocess

from kvpilot.config import ConfigError, parse_config

MODEL = "llama-3.1-8b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_workers_must_be_0_to_64() -> None:
    assert parse_config({"gateway": {"workers": 4}}).gateway.workers == 4
    assert parse_config({"gateway": {"workers": 0}}).gateway.workers == 0  # one per CPU
    for bad in (-1, 65):
        with pytest.raises(ConfigError, match="gateway.workers"):
            parse_config({"gateway": {"workers": bad}})


async def test_two_workers_share_the_port_and_their_metrics(tmp_path: Path) -> None:
    pids: set[str] = set()  # request ids the upstream saw

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        pids.add(request.headers.get("x-request-id", ""))
        return web.json_response(
            {"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        )

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    port = free_port()
    cfg = tmp_path / "kvpilot.yaml"
    cfg.write_text(
        f"pools:\n  - name: p\n    models: [{MODEL}]\n"
        f"    endpoints: [http://127.0.0.1:{upstream.port}]\n"
        f"gateway:\n  listen: 127.0.0.1:{port}\n  policy: least-request\n  workers: 2\n"
        "  scrape_fallback: false\n"
    )
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "kvpilot.cli", "gateway", "--config", str(cfg)],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for _ in range(200):  # both workers up: /healthz answers (bounded wait)
                if len(children(proc.pid)) == 2:
                    try:
                        async with s.get(f"{base}/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.1)
            workers = set(children(proc.pid))
            assert len(workers) == 2
            # /healthz answering says one worker listens, not both: the other may bind a moment
            # later. So send in rounds, on fresh connections, until both workers have routed
            # (bounded: 400 requests), and check the counts across all of them.
            n = 0
            seen: set[str] = set()
            total = 0.0
            while n < 400 and seen != {str(p) for p in workers}:
                for _ in range(20):
                    # A fresh connection each time, so that the kernel spreads them over workers.
                    conn = aiohttp.TCPConnector(force_close=True)
                    async with (
                        aiohttp.ClientSession(connector=conn) as c,
                        c.post(
                            f"{base}/v1/completions",
                            json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                            headers={"x-request-id": f"r{n}"},
                        ) as r,
                    ):
                        assert r.status == 200
                        assert (await r.json())["choices"][0]["text"] == "ok"
                    n += 1
                # Which worker accepted a connection is not visible from outside; the metrics
                # carry one in-flight series per worker process that routed a request.
                async with s.get(f"{base}/metrics") as r:
                    text = await r.text()
                seen = set(re.findall(r'kvpilot_gateway_inflight_requests\{pid="(\d+)"', text))
            assert len(pids) == n
            # Every worker's requests, whichever worker answers the scrape: the other worker's
            # tallied counts reach its file on its next tick (gateway/metrics.py).
            for _ in range(50):  # (bounded: 5 s, ten ticks)
                async with s.get(f"{base}/metrics") as r:
                    text = await r.text()
                total = sum(
                    float(m.group(1))
                    for m in re.finditer(
                        r'kvpilot_gateway_requests_total\{[^}]*code="200"[^}]*\} ([\d.e+]+)', text
                    )
                )
                if total == n:
                    break
                await asyncio.sleep(0.1)
        assert total == n
        assert seen == {str(p) for p in workers}  # both workers served requests
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
        await upstream.close()
    assert not any(alive(pid) for pid in workers)


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


async def test_a_second_worker_avoids_the_replica_the_first_keeps_busy(tmp_path: Path) -> None:
    """Two real worker processes, least-request, no replica states (in-flight counts only): a
    request held open on one replica through one worker must steer the requests that reach the
    *other* worker to the other replica. Without shared totals that worker sees 0 and 0 and
    picks at random (about half the requests to the busy one)."""
    release = asyncio.Event()
    got: dict[str, list[str]] = {"a": [], "b": []}

    def upstream(name: str) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            body = await request.json()
            got[name].append(body["prompt"])
            if body["prompt"] == "hold":
                await release.wait()
            return web.json_response(
                {"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
            )

        app = web.Application()
        app.router.add_post("/v1/completions", answer)
        return app

    servers = [TestServer(upstream(n), host="127.0.0.1") for n in ("a", "b")]
    for s in servers:
        await s.start_server()
    port = free_port()
    cfg = tmp_path / "kvpilot.yaml"
    cfg.write_text(
        "pools:\n  - name: p\n    models: [m]\n    endpoints: ["
        + ", ".join(f"http://127.0.0.1:{s.port}" for s in servers)
        + f"]\ngateway:\n  listen: 127.0.0.1:{port}\n  policy: least-request\n  workers: 2\n"
        "  scrape_fallback: false\n"
    )
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "kvpilot.cli", "gateway", "--config", str(cfg)],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    async def post(prompt: str) -> int:
        conn = aiohttp.TCPConnector(force_close=True)  # a fresh connection: any worker
        async with (
            aiohttp.ClientSession(connector=conn) as c,
            c.post(f"{base}/v1/completions", json={"model": "m", "prompt": prompt}) as r,
        ):
            await r.read()
            return r.status

    try:
        for _ in range(200):  # both workers started and one answers (bounded wait)
            if len(children(proc.pid)) == 2:
                try:
                    async with aiohttp.ClientSession() as s, s.get(f"{base}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
            await asyncio.sleep(0.1)
        # /healthz answering says one worker listens, not both: probe on fresh connections
        # until both have routed (their in-flight series carry their pids; bounded).
        pids: set[str] = set()
        for _ in range(20):
            for _ in range(10):
                assert await post("probe") == 200
            async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as r:
                pids = set(
                    re.findall(r'kvpilot_gateway_inflight_requests\{pid="(\d+)"', await r.text())
                )
            if len(pids) == 2:
                break
        assert len(pids) == 2, "the second worker never routed a request"
        got["a"].clear()
        got["b"].clear()
        held = asyncio.create_task(post("hold"))
        for _ in range(100):
            if got["a"] or got["b"]:
                break
            await asyncio.sleep(0.02)
        busy = "a" if got["a"] else "b"
        await asyncio.sleep(0.3)  # well past peer_sync_s (10 ms)
        statuses = []
        for i in range(30):
            statuses.append(await post(f"q{i}"))
            # Totals are exchanged every peer_sync_s: a request that ended a moment ago may
            # still count at the other worker for that long (real requests last far longer).
            await asyncio.sleep(0.03)
        assert statuses == [200] * 30
        assert got[busy] == ["hold"], f"the busy replica got {got[busy][1:]} as well"
        other = "b" if busy == "a" else "a"
        assert len(got[other]) == 30
        release.set()
        assert await held == 200
    finally:
        release.set()
        proc.terminate()
        await proc.wait()
        for s in servers:
            await s.close()


def run_worker(
    code: str, directory: Path, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh Python process as a gateway worker would run (prometheus-client's
    multiprocess mode, its files in `directory`)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": "."}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, check=check, capture_output=True, text=True
    )


def workers_registry(directory: Path) -> CollectorRegistry:
    """What /metrics reports across the workers whose files are in `directory`."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return registry


def test_a_worker_tells_prometheus_its_pid_once_and_its_samples_still_add_up(
    tmp_path: Path,
) -> None:
    """gateway.metrics.pin_worker_pid: the worker's samples land in its own files (named by its
    pid, as prometheus-client's multiprocess collector expects) and add up across workers."""
    # os.getpid counted from before prometheus-client binds it (its default process id)
    code = (
        "import os\n"
        "real, asked = os.getpid, []\n"
        "os.getpid = lambda: asked.append(1) or real()\n"
        "from gateway import metrics\n"
        "metrics.pin_worker_pid()\n"
        "c = metrics.child(metrics.SHED, 'p', 'queue_full')\n"
        "del asked[:]\n"
        "c.inc(); c.inc()\n"
        "metrics.child(metrics.E2E, 'p', 'm').observe(0.02)\n"
        "print(real(), len(asked))\n"
    )
    pids = []
    for _ in range(2):
        out = run_worker(code, tmp_path).stdout.split()
        assert out[1] == "0"  # no os.getpid() per sample
        pids.append(out[0])
    assert {f.name for f in tmp_path.iterdir()} == {
        f"{kind}_{pid}.db" for kind in ("counter", "histogram") for pid in pids
    }
    registry = workers_registry(tmp_path)
    labels = {"pool": "p", "reason": "queue_full"}
    assert registry.get_sample_value("kvpilot_gateway_shed_total", labels) == 4
    e2e = {"pool": "p", "model": "m", "le": "0.025"}
    assert registry.get_sample_value("kvpilot_gateway_e2e_seconds_bucket", e2e) == 2


def test_pinning_the_pid_after_a_sample_is_refused(tmp_path: Path) -> None:
    """A sample made before the pin has its file: a second writer on it would corrupt it."""
    code = (
        "from gateway import metrics\n"
        "metrics.child(metrics.SHED, 'p', 'queue_full').inc()\n"
        "metrics.pin_worker_pid()\n"
    )
    run = run_worker(code, tmp_path, check=False)
    assert run.returncode != 0 and "before the worker's first metric sample" in run.stderr


def test_a_replica_that_leaves_keeps_its_last_tallied_counts_with_workers(tmp_path: Path) -> None:
    """With workers a left replica's series stay in the files (they cannot be dropped there):
    the counts tallied since the last flush must reach them, not vanish with the tally."""
    code = (
        "from gateway import metrics\n"
        "metrics.pin_worker_pid()\n"
        "for _ in range(3):\n"
        "    metrics.child(metrics.REQUESTS, 'p', 'm', 'r1', '200').inc()\n"
        "metrics.child(metrics.INFLIGHT, 'p', 'r1').inc()\n"
        "metrics.forget_replicas('p', ['r1'])\n"
    )
    run_worker(code, tmp_path)
    registry = workers_registry(tmp_path)
    labels = {"pool": "p", "model": "m", "replica": "r1", "code": "200"}
    assert registry.get_sample_value("kvpilot_gateway_requests_total", labels) == 3
    inflight = [
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "kvpilot_gateway_inflight_requests" and s.labels.get("replica") == "r1"
    ]
    assert inflight == [0.0]  # zeroed: it holds nothing any more
