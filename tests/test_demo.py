"""`kvpilot demo` runs end to end on its own: servers up, load, figures printed, everything stopped."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_exits_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvpilot", "demo", "--duration", "3", "--concurrency", "6"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.count("listening on http://127.0.0.1:") == 2
    assert "gen" in out and "tok/s" in out and "TTFT" in out and "KV" in out
    summary = out.split("summary (modelled time):")[1]
    lines = [line for line in summary.splitlines() if "requests" in line]
    assert len(lines) == 2
    for line in lines:
        done = int(line.split(": ")[1].split(" requests")[0])
        assert done > 0 and "(0 failed)" in line
    assert "all servers stopped." in out
