"""gateway/metrics.py's tallies: the request path's updates summed in plain Python and handed to
prometheus-client on flush must expose exactly what direct updates would."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from gateway import metrics

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# below the first bound, on bounds (a value on a bound falls in it), between, past the last
VALUES = (0.0, 0.001, 0.005, 0.0050001, 0.01, 0.3, 1.0, 119.9, 120.0, 120.5, 1e6, 0.02, 0.02)


def samples(registry: CollectorRegistry, prefix: str) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (s.name.removeprefix(prefix), tuple(sorted(s.labels.items()))): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name.startswith(prefix) and not s.name.endswith("_created")
    }


def test_a_tallied_histogram_exposes_what_direct_observations_would() -> None:
    reg = CollectorRegistry()
    tallied = Histogram("tallied_seconds", "t", ["pool"], buckets=BOUNDS, registry=reg)
    direct = Histogram("direct_seconds", "d", ["pool"], buckets=BOUNDS, registry=reg)
    t = metrics.child(tallied, "p")
    for v in VALUES:
        t.observe(v)
        direct.labels("p").observe(v)
    assert samples(reg, "tallied_seconds")[("_count", (("pool", "p"),))] == 0  # not yet handed
    metrics.flush()
    same(samples(reg, "tallied_seconds"), samples(reg, "direct_seconds"))
    assert samples(reg, "tallied_seconds")[("_count", (("pool", "p"),))] == len(VALUES)
    for v in (0.07, 0.07):  # a second round adds to the first
        t.observe(v)
        direct.labels("p").observe(v)
    metrics.flush()
    same(samples(reg, "tallied_seconds"), samples(reg, "direct_seconds"))


def same(got: dict[Any, float], want: dict[Any, float]) -> None:
    """Equal bucket by bucket; the sums up to float rounding (added in another order)."""
    sums = [k for k in want if k[0] == "_sum"]
    assert {k: v for k, v in got.items() if k not in sums} == {
        k: v for k, v in want.items() if k not in sums
    }
    for k in sums:
        assert got[k] == pytest.approx(want[k], rel=1e-12)


def test_counter_and_gauge_tallies_sum_and_a_gauge_set_overrides_what_is_pending() -> None:
    reg = CollectorRegistry()
    c = metrics.child(Counter("tally_requests", "c", ["code"], registry=reg), "200")
    g = metrics.child(Gauge("tally_inflight", "g", ["replica"], registry=reg), "r0")
    for _ in range(5):
        c.inc()
        g.inc()
    c.inc(2.5)
    g.dec()
    assert reg.get_sample_value("tally_requests_total", {"code": "200"}) == 0
    metrics.flush()
    assert reg.get_sample_value("tally_requests_total", {"code": "200"}) == 7.5
    assert reg.get_sample_value("tally_inflight", {"replica": "r0"}) == 4
    g.inc()
    g.dec()  # a request started and ended between two flushes: the level stays
    metrics.flush()
    assert reg.get_sample_value("tally_inflight", {"replica": "r0"}) == 4
    g.inc(3)
    g.set(0)  # a replica that left: zeroed at once, what was pending dropped
    assert reg.get_sample_value("tally_inflight", {"replica": "r0"}) == 0
    metrics.flush()
    assert reg.get_sample_value("tally_inflight", {"replica": "r0"}) == 0


def test_readers_of_the_default_registry_see_every_tallied_update_without_a_flush() -> None:
    labels = {"pool": "tally-test", "reason": "queue_full"}
    before = REGISTRY.get_sample_value("kvpilot_gateway_shed_total", labels) or 0.0
    metrics.child(metrics.SHED, "tally-test", "queue_full").inc(3)
    e2e = {"pool": "tally-test", "model": "m"}
    n0 = REGISTRY.get_sample_value("kvpilot_gateway_e2e_seconds_count", e2e) or 0.0
    metrics.child(metrics.E2E, "tally-test", "m").observe(0.02)
    assert REGISTRY.get_sample_value("kvpilot_gateway_shed_total", labels) == before + 3
    assert REGISTRY.get_sample_value("kvpilot_gateway_e2e_seconds_count", e2e) == n0 + 1
