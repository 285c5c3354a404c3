"""gateway/fleet.py's view of a pool: what the picker is offered, and when a view is new."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.estimate import Estimator
from gateway.fleet import Endpoint, Fleet
from gateway.policy import RateSeed
from kvpilot.signals import ReplicaState

NOW = 1_000.0


def fleet(n: int = 3) -> Fleet:
    f = Fleet(stale_after_s=5.0, eject_after=1, eject_for_s=10.0)
    f.set_endpoints("p", [Endpoint(f"r{i}", f"http://10.0.0.{i}:8000") for i in range(n)])
    return f


def state(i: int, at: float, healthy: bool = True) -> ReplicaState:
    return ReplicaState(
        replica_id=f"r{i}", address=f"http://10.0.0.{i}:8000", pool="p", observed_at=at,
        healthy=healthy,
    )  # fmt: skip


def test_views_leave_out_unhealthy_ejected_excluded_and_drop_stale_states() -> None:
    f = fleet(4)
    f.observe_state(state(0, NOW - 1))
    f.observe_state(state(1, NOW - 6))  # older than stale_after_s: offered without its state
    f.observe_state(state(2, NOW - 1, healthy=False))
    f.failed("r3", NOW)  # eject_after 1: out for 10 s
    views = {v.replica_id: v for v in f.views("p", NOW)}
    assert set(views) == {"r0", "r1"}
    assert views["r0"].state is not None and views["r1"].state is None
    assert [v.replica_id for v in f.views("p", NOW, frozenset({"r0"}))] == ["r1"]
    assert "r3" in {v.replica_id for v in f.views("p", NOW + 11)}  # its ejection ran out


def test_a_view_is_the_same_object_until_its_state_or_account_changes() -> None:
    """Headroom keeps a replica's derived entry while the view object is the same, so an
    unchanged replica costs a pick one identity check."""
    f = fleet(2)
    f.observe_state(state(0, NOW))
    first = {v.replica_id: v for v in f.views("p", NOW)}
    again = {v.replica_id: v for v in f.views("p", NOW + 1)}
    assert all(again[r] is first[r] for r in first)
    req = Estimator().features("q1", "m", "hello", 8)
    f.start("r0", req, NOW + 1)  # r0's in-flight account changed, r1's did not
    after = {v.replica_id: v for v in f.views("p", NOW + 1)}
    assert after["r0"] is not first["r0"] and after["r0"].inflight.requests == 1
    assert after["r1"] is first["r1"]
    f.observe_state(state(1, NOW + 2))  # a new state for r1
    assert {v.replica_id: v for v in f.views("p", NOW + 2)}["r1"] is not first["r1"]


def test_views_change_with_time_alone_and_keep_the_pools_order() -> None:
    """Between picks only touched replicas are looked at again; what time changes on its own (a
    state going stale, an ejection ending) must still show at the next pick."""
    f = fleet(5)
    for i in range(5):
        f.observe_state(state(i, NOW))
    assert [v.replica_id for v in f.views("p", NOW)] == ["r0", "r1", "r2", "r3", "r4"]
    f.failed("r1", NOW)  # ejected until NOW + 10
    f.observe_state(state(2, NOW + 3, healthy=False))
    assert [v.replica_id for v in f.views("p", NOW + 4)] == ["r0", "r3", "r4"]
    # NOW + 6: the states of r0, r3, r4 (from NOW) are stale; r2's unhealthy one (NOW + 3) not yet.
    later = f.views("p", NOW + 6)
    assert [v.replica_id for v in later] == ["r0", "r3", "r4"]
    assert all(v.state is None for v in later)
    # NOW + 9: r2's unhealthy state is stale too, so r2 is offered (on in-flight counts alone).
    assert [v.replica_id for v in f.views("p", NOW + 9)] == ["r0", "r2", "r3", "r4"]
    assert [v.replica_id for v in f.views("p", NOW + 10)] == ["r0", "r1", "r2", "r3", "r4"]


def test_a_replica_two_pools_list_is_accounted_and_ejected_per_pool() -> None:
    """One model server in two pools: each pool keeps its own failures, ejection and in-flight
    count; the server's ledger account (its load) is shared by both pools' views."""
    f = Fleet(stale_after_s=5.0, eject_after=1, eject_for_s=10.0)
    f.set_endpoints("a", [Endpoint(f"r{i}", f"http://10.0.0.{i}:8000") for i in range(2)])
    f.set_endpoints("b", [Endpoint("r0", "http://10.0.0.0:8000")])
    req = Estimator().features("q1", "m", "hello", 8)
    f.start("r0", req, NOW, "a")
    ra, rb = f.replica("r0", "a"), f.replica("r0", "b")
    assert ra is not None and rb is not None and ra is not rb
    assert (ra.inflight, rb.inflight) == (1, 0)
    assert {v.replica_id: v for v in f.views("b", NOW)}["r0"].inflight.requests == 1
    assert f.failed("r0", NOW, "a")  # out of pool a's rotation, still in pool b's
    assert [v.replica_id for v in f.views("a", NOW)] == ["r1"]
    assert [v.replica_id for v in f.views("b", NOW)] == ["r0"]
    f.finish("r0", "q1", NOW, "a")
    assert (ra.inflight, rb.inflight) == (0, 0)
    f.observe_state(state(0, NOW))  # the server's state reaches both records
    assert ra.state is not None and ra.state is rb.state


def test_at_most_half_of_a_pool_is_ejected_at_once() -> None:
    f = fleet(5)  # eject_after 1
    assert f.failed("r0", NOW) and f.failed("r1", NOW)
    assert not f.failed("r2", NOW)  # 2 of 5 out already: r2 keeps serving
    assert [v.replica_id for v in f.views("p", NOW)] == ["r2", "r3", "r4"]
    assert f.failed("r2", NOW + 11)  # the others came back: now it can go
    one = fleet(1)
    assert not one.failed("r0", NOW)  # a pool of one keeps its replica
    assert [v.replica_id for v in one.views("p", NOW)] == ["r0"]


def test_a_replica_that_leaves_is_forgotten_by_ledger_metrics_and_policy() -> None:
    left: list[tuple[str, str]] = []
    f = Fleet(stale_after_s=5.0, eject_after=1, on_leave=lambda p, r: left.append((p, r)))
    f.set_endpoints("p", [Endpoint(f"r{i}", f"http://10.0.0.{i}:8000") for i in range(3)])
    f.set_endpoints("q", [Endpoint("r2", "http://10.0.0.2:8000")])
    est = Estimator()
    for i in range(3):
        f.start(f"r{i}", est.features(f"q{i}", "m", "hello", 8), NOW, "p")
    assert f.failed("r1", NOW, "p")
    series = ("kvpilot_gateway_inflight_requests", "kvpilot_gateway_ejections_total")
    assert REGISTRY.get_sample_value(series[0], {"pool": "p", "replica": "r1"}) == 1.0
    f.set_endpoints("p", [Endpoint("r0", "http://10.0.0.0:8000")])
    assert sorted(left) == [("p", "r1"), ("p", "r2")]
    # r1 is gone everywhere; r2 still serves pool q, so its account (the server's load) stays
    assert sorted(f.ledger.replicas()) == ["r0", "r2"]
    for name in series:
        for rid in ("r1", "r2"):
            assert REGISTRY.get_sample_value(name, {"pool": "p", "replica": rid}) is None
    assert not any(k[1:3] == ("p", "r1") for k in metrics._children)
    f.finish("r1", "q1", NOW)  # an answer that comes back after it left changes nothing
    assert REGISTRY.get_sample_value(series[0], {"pool": "p", "replica": "r1"}) is None


def test_a_request_ending_on_a_shared_replica_wakes_every_pool_that_lists_it() -> None:
    """The review's repro: the server has room again for pool b's waiters too."""
    woken: list[str] = []
    f = Fleet(on_change=woken.append)
    f.set_endpoints("a", [Endpoint("r", "http://r:1")])
    f.set_endpoints("b", [Endpoint("r", "http://r:1")])
    f.start("r", Estimator().features("q", "m", "hi", 16), NOW, "a")
    woken.clear()
    f.finish("r", "q", NOW + 1, "a")
    assert sorted(woken) == ["a", "b"]


def test_kv_caches_cover_every_replica_the_pool_knows() -> None:
    """Whether a request can ever fit is asked of every replica, pickable or not: ejected,
    unhealthy, or with a stale state (a cache's size does not age); not of a terminating one,
    which never comes back."""
    f = Fleet(stale_after_s=5.0, eject_after=1, eject_for_s=10.0)
    eps = [Endpoint(f"r{i}", f"http://10.0.0.{i}:8000", terminating=i == 3) for i in range(5)]
    f.set_endpoints("p", eps)
    for i, blocks in ((0, 1000), (1, 2000), (2, 3000), (3, 4000)):
        s = state(i, NOW - 60 if i == 1 else NOW, healthy=i != 2)  # r1's is stale, r2 unwell
        f.observe_state(dataclasses.replace(s, kv_blocks_total=blocks, kv_block_size=16))
    assert f.failed("r0", NOW)  # ejected
    assert {v.replica_id for v in f.views("p", NOW)} == {"r1", "r4"}  # all a pick is offered
    caches = dict(f.kv_caches("p"))
    assert caches == {
        "r0": 16_000.0, "r1": 32_000.0, "r2": 48_000.0, "r4": math.inf,
    }  # fmt: skip
    # No state: the pool's speed profile says, where it knows the cache.
    f.profiles["p"] = RateSeed(kv_blocks_total=500, block_size=32)
    assert dict(f.kv_caches("p"))["r4"] == 16_000.0


def test_a_replica_that_cannot_be_ejected_is_logged_once_per_run_of_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead replica of a pool of one fails every request sent to it: one line, not one per
    request, until it answers again."""
    f = fleet(1)  # eject_after 1
    with caplog.at_level(logging.INFO, logger="gateway.fleet"):
        for i in range(5):
            assert not f.failed("r0", NOW + i)
        f.succeeded("r0")
        assert not f.failed("r0", NOW + 9)
    said = [r for r in caplog.records if "not ejected" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO, logging.INFO]
