"""The gateway's Prometheus series: what users felt (TTFT, TPOT, end to end) measured where they felt it.

Module-level collectors in the default registry, so several gateways in one test process share
them; tests read deltas, never absolute values.

The request path's updates are tallied (`child`): summed in plain Python and handed to
prometheus-client by `flush`, on the gateway's tick (every 0.5 s), before each /metrics answer,
before any read of the default registry in this process, and at exit. prometheus-client takes a
lock per update, and with several workers (its multiprocess mode) writes each one to a
memory-mapped file; some ten updates a request cost ~4 % of a request's CPU
(docs/benchmarks.md). With workers, another worker's updates reach /metrics within a tick.
The tallies take no lock: every update and every read of them happens on the event loop's
thread (nothing here serves metrics from a thread of its own).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, values
from prometheus_client.metrics import MetricWrapperBase

_children: dict[tuple[Any, ...], Any] = {}


def flush() -> None:
    """Hand every tallied update to prometheus-client."""
    for c in _children.values():
        c.flush()


class _FlushFirst:
    """Registered before the gateway's series, so the default registry's readers (a /metrics
    answer in one process, tests) see every update: collecting walks collectors in order."""

    def collect(self) -> Iterator[Any]:
        flush()
        return iter(())

    def describe(self) -> Iterator[Any]:
        return iter(())


REGISTRY.register(_FlushFirst())
atexit.register(flush)  # a worker's last updates land in its files

# Latency buckets from 5 ms (a cached short prompt on a fast GPU) to 2 min (a long generation).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_PICK = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)

REQUESTS = Counter(
    "kvpilot_gateway_requests_total",
    "Requests answered, by pool, model, replica ('' when none was picked) and HTTP status.",
    ["pool", "model", "replica", "code"],
)
TTFT = Histogram(
    "kvpilot_gateway_ttft_seconds",
    "Time to first token as the gateway saw it (first streamed byte), by pool and model.",
    ["pool", "model"],
    buckets=_LATENCY,
)
TPOT = Histogram(
    "kvpilot_gateway_tpot_seconds",
    "Mean time per output token after the first, per streamed request.",
    ["pool", "model"],
    buckets=_TPOT,
)
E2E = Histogram(
    "kvpilot_gateway_e2e_seconds",
    "Time from the request's arrival to its last byte, queueing and retries included.",
    ["pool", "model"],
    buckets=_LATENCY,
)
PICK = Histogram(
    "kvpilot_gateway_pick_seconds",
    "Time the policy took to pick a replica (one call).",
    ["pool", "policy"],
    buckets=_PICK,
)
QUEUE_WAIT = Histogram(
    "kvpilot_gateway_queue_wait_seconds",
    "Time requests spent in the saturation queue before a replica was picked.",
    ["pool"],
    buckets=_LATENCY,
)
INFLIGHT = Gauge(
    "kvpilot_gateway_inflight_requests",
    "Requests sent to a replica and not finished, by pool and replica.",
    ["pool", "replica"],
)
QUEUE_LENGTH = Gauge(
    "kvpilot_gateway_queue_length",
    "Requests waiting in the saturation queue, by pool.",
    ["pool"],
)
SHED = Counter(
    "kvpilot_gateway_shed_total",
    "Requests refused with 429, by pool and reason (queue_full, evicted, queue_timeout).",
    ["pool", "reason"],
)
RETRIES = Counter(
    "kvpilot_gateway_retries_total",
    "Requests sent again to another replica after a failure before the first byte, by reason.",
    ["pool", "reason"],
)
RETRY_BUDGET_EXHAUSTED = Counter(
    "kvpilot_gateway_retry_budget_exhausted_total",
    "Failures that were not retried because the retry budget was spent.",
    ["pool"],
)
DECISIONS = Counter(
    "kvpilot_gateway_decisions_total",
    "Picks by pool, policy and the reason the policy gave.",
    ["pool", "policy", "reason"],
)
EJECTIONS = Counter(
    "kvpilot_gateway_ejections_total",
    "Replicas taken out of rotation after consecutive failures.",
    ["pool", "replica"],
)
STREAM_ERRORS = Counter(
    "kvpilot_gateway_stream_errors_total",
    "Streams that failed after their first byte and were ended with an SSE error event.",
    ["pool"],
)
REPLICAS = Gauge(
    "kvpilot_gateway_replicas",
    "Replicas known per pool, by status (ready, terminating, ejected).",
    ["pool", "status"],
)


def pin_worker_pid() -> None:
    """In a worker process (prometheus-client's multiprocess mode): tell prometheus-client this
    process's pid once. Its default asks `os.getpid()` on every inc, set and observe, to notice a
    fork; a worker is exec'd by the supervisor and never forks, and each ask is a system call
    (~10 a request; costly under gVisor, where GKE Sandbox pods run). Call it before the first
    sample: values already made keep the default, and two kinds side by side would share a file."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    pid = os.getpid()
    if any(f.endswith(f"_{pid}.db") for f in os.listdir(directory)):
        # A sample was made already: a second writer on the same file would corrupt it.
        raise RuntimeError("pin_worker_pid() must run before the worker's first metric sample")
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: pid)


def child(metric: MetricWrapperBase, *labels: str) -> Any:
    """`metric.labels(*labels)` as a tally (`inc`, `dec`, `observe`, `set`), remembered: the
    request path calls this several times a request, and prometheus-client's `labels()`
    validates and locks on every call."""
    key = (metric, *labels)
    c = _children.get(key)
    if c is None:
        series = metric.labels(*labels)
        c = _children[key] = _Buckets(series) if isinstance(metric, Histogram) else _Sum(series)
    return c


class _Sum:
    """A counter's or gauge's updates summed until the next flush (a gauge's +1 and -1 of one
    request cancel: nothing to write)."""

    __slots__ = ("series", "pending")

    def __init__(self, series: Any) -> None:
        self.series = series
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def dec(self, amount: float = 1.0) -> None:
        self.pending -= amount

    def set(self, value: float) -> None:
        self.pending = 0.0
        self.series.set(value)

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.series.inc(amount)


class _Buckets:
    """A histogram's observations counted per bucket until the next flush, which adds them to
    prometheus-client's bucket and sum values in one update each (Histogram.observe makes one
    per observation)."""

    __slots__ = ("series", "bounds", "counts", "total", "n")

    def __init__(self, series: Histogram) -> None:
        self.series = series
        self.bounds = list(series._upper_bounds)  # ends with +Inf: every value has a bucket
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.n = 0

    def observe(self, amount: float) -> None:
        # the first bucket whose upper bound is >= amount, as Histogram.observe chooses
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount
        self.n += 1

    def flush(self) -> None:
        if not self.n:
            return
        series, counts = self.series, self.counts
        series._sum.inc(self.total)
        for i, k in enumerate(counts):
            if k:
                series._buckets[i].inc(k)
                counts[i] = 0
        self.total, self.n = 0.0, 0


# Series with a `replica` label, and that label's place among the labels.
_PER_REPLICA = {REQUESTS: 2, INFLIGHT: 1, EJECTIONS: 1}


def forget_replicas(pool: str, replicas: Iterable[str]) -> None:
    """Drop the series of replicas that left `pool`: pods come and go, and a series kept for every
    pod that ever existed would grow the exposition without bound.

    With several workers (prometheus-client's multiprocess mode) a series lives on in the
    workers' files, which cannot drop one: there only the in-flight gauge is zeroed."""
    gone = set(replicas)
    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    for key in [
        k
        for k in _children
        if k[0] in _PER_REPLICA and k[1] == pool and k[1 + _PER_REPLICA[k[0]]] in gone
    ]:
        child = _children.pop(key)
        child.flush()  # with workers the series stays: its last counts still belong to it
        if key[0] is INFLIGHT:
            child.set(0)
        if not multiprocess:
            with contextlib.suppress(KeyError):  # already removed (two gateways in one process)
                key[0].remove(*key[1:])


def forget_pool(pool: str) -> None:
    """A pool left the config: its queue-length series goes (is zeroed with several workers)."""
    QUEUE_LENGTH.labels(pool).set(0)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        with contextlib.suppress(KeyError):
            QUEUE_LENGTH.remove(pool)
