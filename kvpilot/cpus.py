"""How many CPUs this process may use: its CPU affinity, bounded by a cgroup CPU limit.

A pod with `resources.limits.cpu: 4` on a 32-core node sees 32 CPUs in os.cpu_count() but is
throttled to 4 by the CFS quota: processes sized by the former would fight over the latter.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cpu_limit(cpu_max: str) -> float | None:
    """CPUs granted by a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD": no limit)."""
    quota, _, period = cpu_max.strip().partition(" ")
    if quota == "max" or not quota:
        return None
    return int(quota) / int(period or "100000")


def available_cpus() -> int:
    """CPUs to size worker processes by: affinity, then the cgroup limit rounded up, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit: float | None = None
    try:
        limit = cpu_limit(CGROUP_V2_CPU_MAX.read_text())
    except (OSError, ValueError):
        try:
            quota = int(CGROUP_V1_QUOTA.read_text())
            if quota > 0:
                limit = quota / int(CGROUP_V1_PERIOD.read_text())
        except (OSError, ValueError):
            pass
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
