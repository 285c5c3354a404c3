"""gateway/fleet.py's view of a pool: what the picker is offered, and when a view is new."""

from __future__ import annotations

from gateway.estimate import Estimator
from gateway.fleet import Endpoint, Fleet
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
