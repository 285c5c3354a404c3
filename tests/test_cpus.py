"""kvpilot/cpus.py: `gateway.workers: 0` sizes the workers by the pod's CPU limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpilot import cpus


def test_cpu_limit_reads_cgroup_v2_cpu_max() -> None:
    assert cpus.cpu_limit("max 100000\n") is None
    assert cpus.cpu_limit("400000 100000\n") == 4.0
    assert cpus.cpu_limit("150000 100000") == 1.5
    assert cpus.cpu_limit("50000") == 0.5  # period defaults to 100 ms


def _cgroup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, v2: str | None, v1: str | None
) -> None:
    f2, q1, p1 = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    f2.unlink(missing_ok=True)
    if v2 is not None:
        f2.write_text(v2)
    if v1 is not None:
        q1.write_text(v1)
        p1.write_text("100000\n")
    monkeypatch.setattr(cpus, "CGROUP_V2_CPU_MAX", f2)
    monkeypatch.setattr(cpus, "CGROUP_V1_QUOTA", q1)
    monkeypatch.setattr(cpus, "CGROUP_V1_PERIOD", p1)


def test_available_cpus_is_bounded_by_the_limit_rounded_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    affinity = len(os.sched_getaffinity(0))
    _cgroup(monkeypatch, tmp_path, "max 100000", None)
    assert cpus.available_cpus() == affinity
    _cgroup(monkeypatch, tmp_path, "50000 100000", None)
    assert cpus.available_cpus() == 1  # half a CPU still gets one worker
    _cgroup(monkeypatch, tmp_path, "150000 100000", None)
    assert cpus.available_cpus() == min(affinity, 2)
    _cgroup(monkeypatch, tmp_path, None, "100000\n")  # cgroup v1 only: quota 1 CPU
    assert cpus.available_cpus() == 1
    _cgroup(monkeypatch, tmp_path, None, "-1\n")  # v1, no quota
    assert cpus.available_cpus() == affinity
