"""System calls per proxied request: what each hop asks of the kernel, by name.

    .venv/bin/python bench/syscalls.py [--workers 2] [--rate 200] [--duration 5]
        [--connections 2] [--backend-delay-ms MS] [--compare DIR]

Under gVisor (GKE Sandbox, and the lent GPU machines' hosts) every system call and every wake-up
of a sleeping process goes through a user-space kernel and costs several times what it costs on
Linux, so at a paced load a proxy's added latency follows how many it makes a request. This
counts them with `strace -c -f` on the target's whole process tree while `wrk` sends a paced load
(`--rate` req/s over 2 connections): the aiohttp floor (bench/aiohttp_floor.py, `--workers`
processes) and `kvpilot gateway` (`gateway.workers: --workers`, headroom), both in front of the
fixed-answer backend. Counts are per request; `epoll_pwait` includes the wake-ups. strace slows
every call, so read the counts, not the times.

The backend answers at once unless `--backend-delay-ms` (a model server takes milliseconds at
least): then a turn of the event loop that a fast answer would share with reading the answer
shows as a poll of its own. `--compare DIR` also counts the gateway of another source tree.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy import (  # noqa: E402
    LUA,
    PY,
    ROOT,
    free_port,
    gateway_command,
    gateway_config,
    started,
    tree,
    wrk,
)


def count(
    pid: int, url: str, lua: str, duration: int, connections: int
) -> tuple[int, dict[str, int]]:
    """Requests answered and system calls by name, over `duration` s of paced load."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        cmd = ["strace", "-f", "-c", "-o", f.name]
        for p in tree(pid):
            cmd += ["-p", str(p)]
        tracer = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        try:
            r = wrk(url, lua, connections, duration)
        finally:
            tracer.terminate()
            tracer.wait(10)
        calls: dict[str, int] = {}
        for line in Path(f.name).read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m.group(2) != "total":
                calls[m.group(2)] = int(m.group(1))
    return round(r.rps * duration), calls


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=2, help="gateway workers, floor processes")
    ap.add_argument("--rate", type=int, default=200, help="requests/s in total")
    ap.add_argument("--duration", type=int, default=5, help="seconds (at most 15)")
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--backend-delay-ms", type=float, default=0.0, help="before each answer")
    ap.add_argument("--compare", metavar="DIR", help="also the gateway of this source tree")
    args = ap.parse_args()
    for tool in ("strace", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install -y {tool})", file=sys.stderr)
            return 2
    duration = min(args.duration, 15)
    conns = max(1, args.connections)
    lua = LUA % ("", f"function delay() return {1000.0 * conns / args.rate:.3f} end")
    with tempfile.TemporaryDirectory() as td:
        bport, gport, fport = free_port(), free_port(), free_port()
        cfg = Path(td) / "kvpilot.yaml"
        gateway_config(cfg, gport, bport, args.workers)
        backend = [PY, str(ROOT / "bench" / "fixed_backend.py"), "--port", str(bport)]
        backend += ["--delay-ms", str(args.backend_delay_ms)]
        floor = [PY, str(ROOT / "bench" / "aiohttp_floor.py"), "--port", str(fport)]
        floor += ["--upstream", f"http://127.0.0.1:{bport}", "--processes", str(args.workers)]
        rows: dict[str, tuple[int, dict[str, int]]] = {}
        targets = [
            ("aiohttp floor", floor, fport, ROOT),
            ("kvpilot gateway", gateway_command(cfg), gport, ROOT),
        ]
        if args.compare:  # the same config (and port: one at a time), the other tree's code
            other = Path(args.compare).resolve()
            targets.append((f"gateway [{other.name}]", targets[1][1], gport, other))
        with started(backend, bport):
            for name, cmd, port, cwd in targets:
                with started(cmd, port, cwd=cwd) as proc:
                    url = f"http://127.0.0.1:{port}/v1/completions"
                    time.sleep(1.0)
                    wrk(url, lua, conns, 2)  # warm up: connections, caches, learning
                    rows[name] = count(proc.pid, url, lua, duration, conns)
    print(
        f"{args.workers} worker(s); paced ~{args.rate} req/s over {conns} connection(s), "
        f"{duration} s; backend delay {args.backend_delay_ms:g} ms; system calls per request "
        "(strace -c -f)\n"
    )
    names = sorted(
        {c for _, calls in rows.values() for c in calls},
        key=lambda c: -max(calls.get(c, 0) / max(n, 1) for n, calls in rows.values()),
    )
    print("| syscall | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for c in names:
        per = [calls.get(c, 0) / max(n, 1) for n, calls in rows.values()]
        if max(per) >= 0.01:
            print(f"| {c} | " + " | ".join(f"{v:.2f}" for v in per) + " |")
    totals = [sum(calls.values()) / max(n, 1) for n, calls in rows.values()]
    print("| **all** | " + " | ".join(f"**{v:.2f}**" for v in totals) + " |")
    print("| requests | " + " | ".join(f"{n:,}" for n, _ in rows.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
