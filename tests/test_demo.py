"""`kvpilot demo` runs the whole system end to end and stops it all: model servers started by the
controller, an agent per emulated node, the gateway serving the load, a summary, exit 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml


def _children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            out.append(int(stat.parent.name))
    return out


def test_demo_runs_the_whole_system_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpilot", "demo", "--duration", "5", "--port", "0", "--no-serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert _children_of(proc.pid) == []

    # The generated config is real, and it is what the components ran on.
    cfg_path = Path(re.search(r"config: (\S+kvpilot\.yaml)", out).group(1))
    assert cfg_path.parent.parent == tmp_path
    cfg = yaml.safe_load(cfg_path.read_text())
    endpoints = cfg["pools"][0]["endpoints"]
    assert len(endpoints) == 3
    assert cfg["gateway"]["policy"] == "headroom" and len(cfg["gateway"]["agents"]) == 2
    assert cfg["controller"]["mode"] == "local"
    for node in ("h100-node", "l4-node"):
        agent = yaml.safe_load((cfg_path.parent / f"agent-{node}.yaml").read_text())
        assert agent["agent"]["gpus"] == "emulated" and agent["agent"]["node_name"] == node

    # The controller started the pool's first replicas.
    assert "0 -> 2 replicas (below min_replicas)" in out

    # The gateway answered the load, without errors.
    summary = out.split("summary (")[1]
    answered = int(re.search(r"(\d+) requests answered", summary).group(1))
    assert answered > 0 and "errors 0" in summary
    assert re.search(r"client TTFT p50 \d[\d,]* ms p99 \d[\d,]* ms", summary)

    # Per replica: what the gateway sent, and the agent's GPU columns.
    replicas = re.findall(
        r"replica (http://127\.0\.0\.1:\d+) on (\S+) \((\w+)\): gateway sent (\d+) requests; (.*)",
        summary,
    )
    assert [r[0] for r in replicas] == endpoints
    assert [(r[1], r[2]) for r in replicas] == [
        ("h100-node", "h100"),
        ("l4-node", "l4"),
        ("l4-node", "l4"),
    ]
    sent = {url: int(n) for url, _, _, n, _ in replicas}
    assert sum(sent.values()) == answered
    decisions = re.search(r"headroom decisions: (.*)", summary).group(1)
    assert re.search(r"(lowest-cost|prefix-affinity) \d+", decisions)
    for url, _node, gpu, n, seen in replicas[:2]:  # the two the controller starts at once
        assert int(n) > 0, f"{url} got no traffic"
        used, total = map(float, re.search(r"peak HBM ([\d.]+)/([\d.]+) GiB", seen).groups())
        assert 0 < used < total
        assert total == (80 if gpu == "h100" else 22)
    # The live lines (not a terminal here) carry the same agent columns while the load runs.
    assert re.search(r"h100-node:\d+ serving NVIDIA H100[^|]* HBM [1-9][\d.]*/80 GiB", out)
    assert "all stopped." in out
