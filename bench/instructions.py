"""Instructions per proxied request, counted by valgrind's callgrind: a noise-free A/B measure.

    .venv/bin/python bench/instructions.py [--requests 1000] [--workers N] [--prompt-chars N]

Wall and CPU time on a shared 2-core box move by ±10 % from run to run; user-space instruction
counts do not (three runs agree within 0.2 %). The target runs under
`valgrind --tool=callgrind`; after 300 warm-up requests its counters are zeroed
(`callgrind_control -z`), `--requests` requests follow one at a time on one keep-alive
connection, and the counters are dumped (`callgrind_control -d`). Kernel time (the socket
syscalls) is not counted, so this measures the Python work a request costs. Targets: the
kvpilot gateway (headroom, one replica) and the aiohttp floor (bench/aiohttp_floor.py), in front
of bench/fixed_backend.py. Needs Debian's valgrind; start-up under it takes about a minute.

`--workers N` runs the gateway with `gateway.workers: N` and the floor as N processes, all under
valgrind (`--trace-children=yes`): the count is then the whole process tree's, the supervisor and
the workers that got no request included (their timers, and the peers' shared totals and
learning, gateway/peers.py, which one process does not have), over the requests the one
connection sent to one of them.

`--prompt-chars N` sends a prompt of N characters (English-like ASCII) instead of four words:
the gateway reads the prompt (prefix hashes: one per 64 characters, up to 256), the floor only
forwards it.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hop_latency import BODY, body, probe  # noqa: E402
from proxy import (  # noqa: E402
    PY,
    ROOT,
    free_port,
    gateway_command,
    gateway_config,
    long_prompt,
    started,
    tree,
)


def count(cmd: list[str], port: int, n: int, out: Path, payload: str = BODY) -> int:
    grind = ["valgrind", "--tool=callgrind", "--trace-children=yes"]
    grind += [f"--callgrind-out-file={out}/cg.%p", *cmd]
    with started(grind, port, deadline_s=300) as proc:
        time.sleep(5)  # let start-up under valgrind settle after the port opens
        probe(port, 300, 0.0, payload)
        pids = [str(p) for p in tree(proc.pid)]
        for pid in pids:
            subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        probe(port, n, 0.0, payload)
        for pid in pids:
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        time.sleep(1)
    total = 0
    for pid in pids:
        dumps = sorted(out.glob(f"cg.{pid}.*"), key=lambda p: p.stat().st_mtime)
        text = dumps[-1].read_text(errors="replace")
        total += int(re.search(r"^summary:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return total // n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="gateway.workers (floor: processes)")
    ap.add_argument("--prompt-chars", type=int, default=0, help="a prompt of this many characters")
    args = ap.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    n = min(args.requests, 5000)
    with tempfile.TemporaryDirectory() as td, contextlib.ExitStack() as stack:
        tmp = Path(td)
        bport = free_port()
        stack.enter_context(
            started([PY, str(ROOT / "bench" / "fixed_backend.py"), "--port", str(bport)], bport)
        )
        gport, fport = free_port(), free_port()
        cfg = tmp / "kvpilot.yaml"
        gateway_config(cfg, gport, bport, args.workers)
        targets = [
            ("kvpilot gateway", gateway_command(cfg), gport),
            ("aiohttp floor", [PY, str(ROOT / "bench" / "aiohttp_floor.py"), "--port", str(fport),
                               "--upstream", f"http://127.0.0.1:{bport}",
                               "--processes", str(args.workers)], fport),
        ]  # fmt: skip
        payload = body(long_prompt(args.prompt_chars)) if args.prompt_chars > 0 else BODY
        print("| target | instructions per request |\n|---|---:|")
        for name, cmd, port in targets:
            print(f"| {name} | {count(cmd, port, n, tmp, payload):,} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
