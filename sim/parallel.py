"""Run simulation jobs in worker processes; rows come back in the order the jobs were given.

Shared by `kvpilot sim routing` and `kvpilot sim autoscale`. Callers calibrate before calling,
so forked workers inherit the calibration instead of each measuring it again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

J = TypeVar("J")
Row = dict[str, Any]


def run_parallel(
    fn: Callable[[J], Row],
    jobs: Sequence[J],
    *,
    workers: int = 1,
    on_done: Callable[[Row], None] | None = None,
    start_order: Callable[[J], int] | None = None,
) -> list[Row]:
    """`[fn(job) for job in jobs]`, over `workers` processes when there is more than one.

    `start_order` ranks jobs for submission (lowest first): starting the slowest first keeps the
    last round from being one long run alone. `on_done` sees each row as it finishes.
    """
    rows: list[Row | None] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            rows[i] = fn(job)
            if on_done:
                on_done(rows[i])  # type: ignore[arg-type]
        return [r for r in rows if r is not None]
    import multiprocessing as mp

    ctx = mp.get_context("fork") if hasattr(os, "fork") else None
    order = range(len(jobs))
    if start_order is not None:
        order = sorted(order, key=lambda i: start_order(jobs[i]))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, jobs[i]): i for i in order}
        for fut in as_completed(futures):
            row = fut.result()
            rows[futures[fut]] = row
            if on_done:
                on_done(row)
    return [r for r in rows if r is not None]
