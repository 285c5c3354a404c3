"""What a gateway worker pays to read its peers' shared files (gateway/peers.py), per read.

    .venv/bin/python bench/peers.py [--workers 12] [--replicas 1] [--reads 2000] [--instructions]

`--workers` PeerAccounts over real mmap'd files in a temporary directory; one of them reads the
others' (`_read`, what `refresh` does before or just after a pick) in three cases: every peer
published new totals since the last read; every peer rewrote the bytes it had (a request came and
went between two reads: the common case at high rates with short requests); nothing was written.
Also the cost of one publish. Wall time per operation, mean over `--reads`. `--instructions`
counts instead, with valgrind's callgrind (noise-free, for an A/B on a shared box), the
user-space instructions of one read in the first case: the loop of publishes and reads run
once, less the same loop without the reads, over `--reads`.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.inflight import InFlight  # noqa: E402
from gateway.peers import PeerAccounts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--instructions", action="store_true", help="count them (callgrind)")
    ap.add_argument("--only", choices=("read", "publish"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.instructions:
        return instructions(args.workers, args.replicas, args.reads)
    n, r = args.reads, args.replicas
    with tempfile.TemporaryDirectory() as d:
        rows: dict[int, dict[str, InFlight]] = {}
        accts = [
            PeerAccounts(d, w, lambda w=w: rows.get(w, {}), interval_s=0.0)
            for w in range(args.workers)
        ]
        me, others = accts[0], accts[1:]
        me.poll(0.0)
        ticks = iter(range(1, 10 * n + 10))

        def clock() -> float:  # reads 20 ms apart, as at peer_sync_s 0.01: a re-listing per 50
            return 0.02 * next(ticks)

        changed = same = idle = publish = 0.0
        for i in range(n):
            for w, o in enumerate(others, 1):  # new totals at every peer
                rows[w] = {f"r{j}": InFlight(i % 7 + 1, 10, 1, 1, 10, 1) for j in range(r)}
                t = time.perf_counter()
                o.publish()
                publish += time.perf_counter() - t
            t = time.perf_counter()
            if args.only != "publish":
                me._read(clock())
            changed += time.perf_counter() - t
        if args.only:  # one case under callgrind (`instructions`): nothing more to run
            for a in accts:
                a.close()
            return 0
        for o in others:
            rows.clear()
            o.publish()
        me._read(clock())
        for _ in range(n):
            for o in others:  # the same bytes again
                o.publish()
            t = time.perf_counter()
            me._read(clock())
            same += time.perf_counter() - t
        for _ in range(n):
            t = time.perf_counter()
            me._read(clock())
            idle += time.perf_counter() - t
        for a in accts:
            a.close()
    k = len(others)
    print(f"{args.workers} workers, {r} replica(s), {n} reads each; µs per read of {k} peers:")
    print("| case | µs per read |\n|---|---:|")
    print(f"| every peer published new totals | {1e6 * changed / n:.1f} |")
    print(f"| every peer rewrote the same bytes | {1e6 * same / n:.1f} |")
    print(f"| nothing written | {1e6 * idle / n:.1f} |")
    print(f"| one publish (one peer) | {1e6 * publish / (n * k):.1f} |")
    return 0


def instructions(workers: int, replicas: int, reads: int) -> int:
    """Instructions per read of `workers - 1` peers that all published new totals."""
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    counts = {}
    with tempfile.TemporaryDirectory() as d:
        for only in ("read", "publish"):
            out = Path(d) / f"cg.{only}"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
            cmd += [__file__, "--workers", str(workers), "--replicas", str(replicas)]
            subprocess.run([*cmd, "--reads", str(reads), "--only", only], check=True,
                           capture_output=True)  # fmt: skip
            text = out.read_text(errors="replace")
            counts[only] = int(re.search(r"^summary:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    per_read = (counts["read"] - counts["publish"]) // reads
    print(f"{workers} workers, {replicas} replica(s), {reads} reads: {per_read:,} instructions per "
          f"read of {workers - 1} peers that all published new totals")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
