"""What a proxy adds: the same wrk load against a fixed-answer backend, directly and through proxies.

    .venv/bin/python bench/proxy.py [--duration 5] [--repeat 3] [--workers 2[,4...]] [--rate 1000]
                                    [--threads 1] [--backend-processes 1] [--unshared]
                                    [--runs max,paced,stream] [--paced-duration S]
                                    [--skip single,floor,floors,vllm-router,nginx]
                                    [--compare DIR] [--prompt-chars N]

Targets (all on loopback, all started once and measured in turn, repetition by repetition, so
that the machine's load drifts over all of them alike): the backend itself
(bench/fixed_backend.py), the kvpilot gateway (`kvpilot gateway`, headroom policy, one process,
and with `--workers N[,M...]` also N (M...) worker processes on one port), the aiohttp floor
(bench/aiohttp_floor.py: the least an aiohttp server + ClientSession proxy costs; one process,
and as many processes as each multi-worker gateway), vllm-router
(`--policy round_robin`, when installed) and nginx as a plain reverse proxy with upstream
keep-alive (when installed). For
each target and repetition:
  - max: requests/s with `--connections` connections, p50/p99 latency, and the target's CPU time
    per request (its whole process tree, user + system, from /proc);
  - paced: about `--rate` requests/s (wrk's `delay()` per connection), p50/p99 latency, so the
    added latency is read at a fixed load, not at saturation;
  - stream (backend and gateways): each request streams `--chunks` SSE events; relayed chunks/s.
Prints the medians over the repetitions with their range, and the gateway / vllm-router ratio of
each repetition. Every run is bounded by `--duration` seconds (at most 15; the paced ones by
`--paced-duration`, default the same: a p99 from 4 s at 1,000 req/s rests on its 40 slowest
requests). `--runs` and `--skip` narrow a run to what is being re-measured. On a many-core
machine give wrk `--threads` and the backend `--backend-processes` so that neither caps the
proxies (the defaults, 1 and 1, suit a 2-core box). `--compare DIR` runs every gateway also from
another checkout (e.g. `git worktree add .ab/base HEAD~3`, a path that travels to a lent machine
with `carry`), side by side on the same host: the only fair A/B of a change, since hosts differ
more than most changes do. `--prompt-chars N` sends a prompt of N characters instead of nine
words: the gateway reads a prompt (its prefix hashes and index grow with it), the others only
forward it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
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
# `--skip` names -> the targets they leave out
SKIPPABLE = {
    "single": "kvpilot gateway",
    "floor": "aiohttp floor (minimal proxy)",
    "floors": "aiohttp floor (N processes)",  # one per multi-worker gateway, as many processes
    "vllm-router": "vllm-router",
    "nginx": "nginx",
}


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
def started(
    cmd: list[str], port: int, deadline_s: float = 20, **kw: object
) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryFile() as err:  # what it says if it fails to start
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kw)  # type: ignore[call-overload]
        try:
            try:
                wait_port(port, p, deadline_s)
            except RuntimeError as e:
                err.seek(0)
                tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{cmd[0]} ...: {e}: {' | '.join(tail)}") from None
            yield p
        finally:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


PROMPT = "The quick brown fox jumps over the lazy dog"  # as in LUA (--prompt-chars swaps it)
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "fixed", "prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 16%s}'
%s
"""


def long_prompt(chars: int) -> str:
    """`chars` characters of plain ASCII words (nothing a Lua or JSON string must escape)."""
    words = "The quick brown fox jumps over the lazy dog while the model reads a long document. "
    return (words * (chars // len(words) + 1))[:chars]


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = 0.0  # the target's CPU time per request (process tree, user + system)


def tree(pid: int) -> list[int]:
    """A process and its live descendants (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile
        out.append(p)
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (alive ones)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wrk(
    url: str, lua: str, connections: int, duration: int, pid: int | None = None, threads: int = 1
) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
        script = f.name
    cpu0 = tree_cpu_s(pid) if pid else 0.0
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
    cpu = (tree_cpu_s(pid) - cpu0) if pid else 0.0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:.*?timeout (\d+)", out)
    errs += int(m.group(1)) if m else 0
    return Result(rps, p50, p99, errs, 1e6 * cpu / n if n else 0.0)


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


def gateway_command(cfg: Path) -> list[str]:
    """`kvpilot gateway` on `cfg`, quiet. Run with `cwd=TREE` it is that tree's gateway:
    `python -m` puts the working directory first on sys.path."""
    return [PY, "-m", "kvpilot.cli", "gateway", "--config", str(cfg), "--log-level", "WARNING"]


def gateway_config(
    path: Path, port: int, backend: int, workers: int, peer_sync_s: float | None = None
) -> None:
    path.write_text(
        f"pools:\n  - name: fixed\n    models: [{MODEL}]\n"
        f"    endpoints: [http://127.0.0.1:{backend}]\n"
        f"gateway:\n  listen: 127.0.0.1:{port}\n  policy: headroom\n  workers: {workers}\n"
        + ("" if peer_sync_s is None else f"  peer_sync_s: {peer_sync_s}\n")
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """Median [min-max]."""
    if len(values) == 1:
        return fmt.format(values[0])
    lo, hi = min(values), max(values)
    return f"{fmt.format(statistics.median(values))} [{fmt.format(lo)}-{fmt.format(hi)}]"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=int, default=1000, help="paced run: requests/s in total")
    ap.add_argument("--chunks", type=int, default=64, help="SSE events per streamed answer")
    ap.add_argument(
        "--workers", default="2", help="also gateways with N[,M...] workers (comma list); 0: none"
    )
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument(
        "--unshared",
        action="store_true",
        help="also each multi-worker gateway with peer_sync_s: 0 (what sharing costs)",
    )
    ap.add_argument("--backend-processes", type=int, default=1)
    ap.add_argument("--runs", default="max,paced,stream", help="which runs (comma list)")
    ap.add_argument("--paced-duration", type=int, default=0, help="seconds (default --duration)")
    ap.add_argument(
        "--skip", default="", help="targets left out: single (one-process gateway), floor, "
        "floors (the floors with as many processes as each multi-worker gateway), vllm-router, "
        "nginx (comma list)"
    )  # fmt: skip
    ap.add_argument("--compare", metavar="DIR", help="also every gateway from this source tree")
    ap.add_argument("--prompt-chars", type=int, default=0, help="a prompt of this many characters")
    args = ap.parse_args()
    duration = min(args.duration, 15)
    paced_duration = min(args.paced_duration or args.duration, 15)
    runs_wanted = set(args.runs.split(","))
    skip = set(filter(None, args.skip.split(",")))
    if bad := (runs_wanted - {"max", "paced", "stream"}) or (skip - SKIPPABLE.keys()):
        print(f"unknown --runs or --skip entries: {sorted(bad)}", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    paced_conns = 10
    delay_ms = 1000.0 * paced_conns / args.rate
    lua = LUA if args.prompt_chars <= 0 else LUA.replace(PROMPT, long_prompt(args.prompt_chars))
    lua_max = lua % ("", "")
    lua_paced = lua % ("", f"function delay() return {delay_ms:.3f} end")
    lua_stream = lua % (', "stream": true', "")

    # (target, run) -> one Result per repetition
    results: dict[tuple[str, str], list[Result]] = {}
    names: list[str] = []
    notes: list[str] = []
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as td, contextlib.ExitStack() as stack:
        tmp = Path(td)
        bport = free_port()
        backend_cmd = [PY, str(ROOT / "bench" / "fixed_backend.py"), "--port", str(bport)]
        backend_cmd += ["--chunks", str(args.chunks), "--processes", str(args.backend_processes)]
        commands: list[tuple[str, list[str], int, bool]] = []
        tree = Path(args.compare).resolve() if args.compare else None
        twins: dict[str, str] = {}  # --compare: a gateway run from `tree` -> the one it mirrors
        gateways = [(1, None)]
        for w in (w for w in map(int, args.workers.split(",")) if w > 1):
            gateways += [(w, None)] + ([(w, 0.0)] if args.unshared else [])
        for w, sync in gateways:
            gport = free_port()
            cfg = tmp / f"kvpilot-{w}-{sync}.yaml"
            gateway_config(cfg, gport, bport, w, sync)
            name = "kvpilot gateway" + (f" ({w} workers)" if w > 1 else "")
            name = name.replace(")", ", unshared)") if sync == 0.0 else name
            commands.append((name, gateway_command(cfg), gport, True))
            if tree is not None:
                cport = free_port()
                ccfg = tmp / f"compare-{w}-{sync}.yaml"
                gateway_config(ccfg, cport, bport, w, sync)
                twins[f"{name} [{tree.name}]"] = name
                commands.append((f"{name} [{tree.name}]", gateway_command(ccfg), cport, True))
        for w in [1] + sorted({w for w, _ in gateways if w > 1}):
            # The floor beside each gateway size: a 16-worker gateway against a one-process
            # floor would credit the floor's tail to kvpilot's work (or the reverse).
            fport = free_port()
            floor = [PY, str(ROOT / "bench" / "aiohttp_floor.py"), "--port", str(fport)]
            floor += ["--upstream", f"http://127.0.0.1:{bport}", "--processes", str(w)]
            name = SKIPPABLE["floor"] if w == 1 else f"aiohttp floor ({w} processes)"
            commands.append((name, floor, fport, True))
        router = shutil.which("vllm-router") or str(Path(PY).parent / "vllm-router")
        if Path(router).exists():
            rport = free_port()
            cmd = [router, "--host", "127.0.0.1", "--port", str(rport)]
            cmd += ["--worker-urls", f"http://127.0.0.1:{bport}", "--policy", "round_robin"]
            cmd += ["--log-level", "warning", "--prometheus-port", str(free_port())]
            commands.append(("vllm-router", cmd, rport, False))
        else:
            notes.append("vllm-router not installed: not measured")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if Path(nginx).exists():
            nport = free_port()
            conf = nginx_conf(tmp, nport, bport)
            commands.append(("nginx", [nginx, "-c", str(conf), "-p", str(tmp)], nport, False))
        else:
            notes.append("nginx not installed: not measured")
        left_out = {SKIPPABLE[k] for k in skip}
        if "floors" in skip:
            left_out |= {c[0] for c in commands if c[0].endswith(" processes)")}
        commands = [c for c in commands if twins.get(c[0], c[0]) not in left_out]

        backend = stack.enter_context(started(backend_cmd, bport))
        targets: list[tuple[str, int, int, bool]] = [("backend (direct)", bport, backend.pid, True)]
        for name, cmd, port, streams in commands:
            try:
                proc = stack.enter_context(started(cmd, port, cwd=tree if name in twins else None))
            except RuntimeError as e:
                notes.append(f"{name}: failed to start ({e})")
                continue
            targets.append((name, port, proc.pid, streams))
        time.sleep(1.0)
        names = [t[0] for t in targets]
        for _name, port, _pid, _ in targets:  # warm up connections and the targets' caches
            wrk(f"http://127.0.0.1:{port}/v1/completions", lua_max, 4, 1, threads=1)
        for rep in range(args.repeat):
            for name, port, pid, streams in targets:
                url = f"http://127.0.0.1:{port}/v1/completions"
                runs = [
                    ("max", lua_max, args.connections, duration),
                    ("paced", lua_paced, paced_conns, paced_duration),
                ]
                if streams:
                    runs.append(("stream", lua_stream, args.connections, duration))
                for kind, lua, conns, secs in runs:
                    if kind not in runs_wanted:
                        continue
                    try:
                        r = wrk(url, lua, conns, secs, pid, min(args.threads, conns))
                    except (subprocess.CalledProcessError, AttributeError) as e:
                        notes.append(f"{name} {kind} rep {rep + 1}: wrk failed ({e})")
                        continue
                    results.setdefault((name, kind), []).append(r)

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average {load_before} before, "
        f"{loadavg()} after; wrk -t{args.threads}, {duration}s per run ({paced_duration}s paced), "
        f"{args.repeat} repetitions"
    )
    print(
        f"max: -c{args.connections}; paced: -c{paced_conns} with delay {delay_ms:.1f} ms "
        f"(~{args.rate} req/s); stream: {args.chunks} SSE events per answer; "
        f"backend processes: {args.backend_processes}\n"
    )
    print(
        "Medians over the repetitions, [min-max]; added latency = target - backend, per repetition.\n"
    )
    print(
        "| target | run | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU µs/req | errors |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("max", "paced", "stream"):
        base = results.get(("backend (direct)", kind), [])
        for name in names:
            rs = results.get((name, kind))
            if not rs:
                continue
            rate = (
                [r.rps * (args.chunks + 1) for r in rs] if kind == "stream" else [r.rps for r in rs]
            )
            unit = " chunks/s" if kind == "stream" else ""
            added50 = added99 = ""
            if not name.startswith("backend") and len(base) == len(rs):
                added50 = spread(
                    [r.p50_ms - b.p50_ms for r, b in zip(rs, base, strict=True)], "{:+.2f}"
                )
                added99 = spread(
                    [r.p99_ms - b.p99_ms for r, b in zip(rs, base, strict=True)], "{:+.2f}"
                )
            print(
                f"| {name} | {kind} | {spread(rate)}{unit} | {spread([r.p50_ms for r in rs], '{:.2f}')} | "
                f"{spread([r.p99_ms for r in rs], '{:.2f}')} | {added50} | {added99} | "
                f"{spread([r.cpu_us for r in rs])} | {sum(r.errors for r in rs)} |"
            )
    vr = results.get(("vllm-router", "max"), [])
    for name in names:
        gw = results.get((name, "max"), [])
        if name.startswith(("kvpilot", "aiohttp")) and vr and len(gw) == len(vr):
            ratios = [g.rps / v.rps for g, v in zip(gw, vr, strict=True)]
            print(
                f"\n{name} / vllm-router requests/s (max), per repetition: "
                + ", ".join(f"{x:.2f}x" for x in ratios)
                + f"; median {statistics.median(ratios):.2f}x"
            )
    for other, this in twins.items():  # --compare: each pair, repetition by repetition
        for kind in ("max", "paced"):
            a, b = results.get((this, kind), []), results.get((other, kind), [])
            if a and len(a) == len(b):
                pairs = list(zip(a, b, strict=True))
                print(
                    f"\n{this} against {other}, {kind}, per repetition: p50 "
                    + ", ".join(f"{x.p50_ms - y.p50_ms:+.2f}" for x, y in pairs)
                    + " ms; p99 "
                    + ", ".join(f"{x.p99_ms - y.p99_ms:+.2f}" for x, y in pairs)
                    + " ms; CPU per request "
                    + ", ".join(f"{x.cpu_us / y.cpu_us:.2f}x" for x, y in pairs)
                )
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
