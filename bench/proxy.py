"""What a proxy adds: the same wrk load against a fixed-answer backend, directly and through proxies.

    .venv/bin/python bench/proxy.py [--duration 8] [--connections 32] [--rate 1000]

Targets (all on loopback): the backend itself (bench/fixed_backend.py), the kvpilot gateway
(`kvpilot gateway`, headroom policy, one process), vllm-router (`--policy round_robin`, when
installed) and nginx as a plain reverse proxy with upstream keep-alive (when installed). For each:
  - max: requests/s with `--connections` connections, and p50/p99 latency;
  - paced: about `--rate` requests/s (wrk's `delay()` per connection), p50/p99 latency, so the
    added latency is read at a fixed load, not at saturation;
  - stream (backend and gateway): each request streams `--chunks` SSE events; relayed chunks/s.
Every run is bounded by `--duration` seconds (at most 15). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = "fixed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, deadline_s: float = 20) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def started(cmd: list[str], port: int, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    try:
        wait_port(port, p)
        yield p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "fixed", "prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 16%s}'
%s
"""


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(url: str, lua: str, connections: int, duration: int, threads: int = 1) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
        script = f.name
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{duration}s",
                "--latency",
                "-s",
                script,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=duration + 30,
            check=True,
        ).stdout
    finally:
        os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:.*?timeout (\d+)", out)
    errs += int(m.group(1)) if m else 0
    return Result(rps, p50, p99, errs)


def _ms(s: str) -> float:
    v = float(re.match(r"[\d.]+", s).group(0))  # type: ignore[union-attr]
    unit = s[len(re.match(r"[\d.]+", s).group(0)) :]  # type: ignore[union-attr]
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def nginx_conf(tmp: Path, port: int, backend: int) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
    return conf


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=int, default=1000, help="paced run: requests/s in total")
    ap.add_argument("--chunks", type=int, default=64, help="SSE events per streamed answer")
    args = ap.parse_args()
    duration = min(args.duration, 15)
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    paced_conns = 10
    delay_ms = 1000.0 * paced_conns / args.rate
    lua_max = LUA % ("", "")
    lua_paced = LUA % ("", f"function delay() return {delay_ms:.3f} end")
    lua_stream = LUA % (', "stream": true', "")

    rows: list[tuple[str, str, Result]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        bport = free_port()
        backend_cmd = [
            PY,
            str(ROOT / "bench" / "fixed_backend.py"),
            "--port",
            str(bport),
            "--chunks",
            str(args.chunks),
        ]
        with started(backend_cmd, bport):
            targets: list[tuple[str, list[str] | None, int]] = []
            gport = free_port()
            cfg = tmp / "kvpilot.yaml"
            cfg.write_text(
                f"pools:\n  - name: fixed\n    models: [{MODEL}]\n"
                f"    endpoints: [http://127.0.0.1:{bport}]\n"
                f"gateway:\n  listen: 127.0.0.1:{gport}\n  policy: headroom\n"
            )
            targets.append(
                (
                    "kvpilot gateway",
                    [
                        PY,
                        "-m",
                        "kvpilot.cli",
                        "gateway",
                        "--config",
                        str(cfg),
                        "--log-level",
                        "WARNING",
                    ],
                    gport,
                )
            )
            router = shutil.which("vllm-router") or str(Path(PY).parent / "vllm-router")
            if Path(router).exists():
                rport = free_port()
                targets.append(
                    (
                        "vllm-router",
                        [
                            router,
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(rport),
                            "--worker-urls",
                            f"http://127.0.0.1:{bport}",
                            "--policy",
                            "round_robin",
                            "--log-level",
                            "warning",
                            "--prometheus-port",
                            str(free_port()),
                        ],
                        rport,
                    )
                )
            else:
                notes.append("vllm-router not installed: not measured")
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            if Path(nginx).exists():
                nport = free_port()
                conf = nginx_conf(tmp, nport, bport)
                targets.append(("nginx", [nginx, "-c", str(conf), "-p", str(tmp)], nport))
            else:
                notes.append("nginx not installed: not measured")

            def measure(name: str, port: int, streams: bool) -> None:
                url = f"http://127.0.0.1:{port}/v1/completions"
                wrk(url, lua_max, 4, 2)  # warm up connections and the target's caches
                rows.append((name, "max", wrk(url, lua_max, args.connections, duration)))
                rows.append((name, "paced", wrk(url, lua_paced, paced_conns, duration)))
                if streams:
                    rows.append((name, "stream", wrk(url, lua_stream, args.connections, duration)))

            measure("backend (direct)", bport, True)
            for name, cmd, port in targets:
                try:
                    with started(cmd, port):  # type: ignore[arg-type]
                        time.sleep(1.0)
                        measure(name, port, name == "kvpilot gateway")
                except (RuntimeError, subprocess.CalledProcessError, AttributeError) as e:
                    notes.append(f"{name}: failed to run ({e})")

    base = {kind: r for name, kind, r in rows if name == "backend (direct)"}
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; wrk -t1, {duration}s per run"
    )
    print(
        f"max: -c{args.connections}; paced: -c{paced_conns} with delay {delay_ms:.1f} ms "
        f"(~{args.rate} req/s); stream: {args.chunks} SSE events per answer\n"
    )
    print(
        "| target | run | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | chunks/s | errors |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, kind, r in rows:
        b = base[kind]
        added = "" if name.startswith("backend") else f"{r.p50_ms - b.p50_ms:+.2f}"
        added99 = "" if name.startswith("backend") else f"{r.p99_ms - b.p99_ms:+.2f}"
        chunks = f"{r.rps * (args.chunks + 1):,.0f}" if kind == "stream" else ""
        print(
            f"| {name} | {kind} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {added} | "
            f"{added99} | {chunks} | {r.errors} |"
        )
    gw = {k: r for n, k, r in rows if n == "kvpilot gateway"}
    vr = {k: r for n, k, r in rows if n == "vllm-router"}
    if "max" in gw and "max" in vr:
        print(f"\ngateway / vllm-router requests/s (max): {gw['max'].rps / vr['max'].rps:.2f}x")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
