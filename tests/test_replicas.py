"""Replica policy: the HPA's worked examples, its missing-metric rules, limits, panic, zero, forecast."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest

from controller.replicas import (
    Ewma,
    Holt,
    PoolObservation,
    ReplicaAutoscaler,
    hpa_replicas,
    saturation,
)
from kvpilot.config import PoolScalingConfig
from kvpilot.signals import ReplicaState

# The plain HPA: no utilization headroom, no step margin, no scale-down hysteresis, no forecast,
# every scale-up at once.
CFG = PoolScalingConfig(
    min_replicas=1,
    max_replicas=50,
    queue_target=4,
    kv_target=0.8,
    batch_target=40,
    forecast=False,
    target_utilization=1.0,
    profile_utilization=1.0,
    peak_utilization=1.0,
    scale_up_margin=0.0,
    scale_down_tolerance=0.0,
    spike_hold_s=0.0,
)


def rs(
    i: int, *, waiting: int = 0, running: int = 0, kv: float = 0.0, **kw: object
) -> ReplicaState:
    fields = {"observed_at": 1000.0, **kw}
    return ReplicaState(
        replica_id=f"r{i}",
        address=f"http://r{i}",
        pool="p",
        waiting=waiting,
        running=running,
        kv_usage=kv,
        **fields,  # type: ignore[arg-type]
    )


def at_ratio(n: int, ratio: float, **kw: object) -> list[ReplicaState]:
    """n replicas whose saturation is `ratio` (through the batch target)."""
    return [rs(i, running=round(ratio * 40), **kw) for i in range(n)]


# --- the HPA documentation's worked examples ---------------------------------------------------


def test_hpa_doc_example_double_when_metric_is_twice_the_target() -> None:
    # "if the current metric value is 200m, and the desired value is 100m, the number of replicas
    # will be doubled, since 200.0 / 100.0 == 2.0"
    assert hpa_replicas(3, [2.0, 2.0, 2.0]) == 6


def test_hpa_doc_example_halve_when_metric_is_half_the_target() -> None:
    # "If the current value is instead 50m, you'll halve the number of replicas"
    assert hpa_replicas(4, [0.5, 0.5, 0.5, 0.5]) == 2


def test_hpa_skips_scaling_within_tolerance() -> None:
    assert hpa_replicas(10, [1.08] * 10) == 10
    assert hpa_replicas(10, [0.92] * 10) == 10
    assert hpa_replicas(10, [1.2] * 10) == 12


def test_hpa_missing_metrics_dampen_scale_up() -> None:
    # 3 replicas at 2x the target, one without metrics (assumed at 0 when scaling up):
    # (2 + 2 + 2 + 0) / 4 = 1.5 -> ceil(1.5 * 4) = 6, not 8.
    assert hpa_replicas(4, [2.0, 2.0, 2.0], missing=1) == 6


def test_hpa_missing_metrics_dampen_scale_down() -> None:
    # Missing replicas assumed at the target (100 %) when scaling down: (0.2 + 0.2 + 1 + 1) / 4.
    assert hpa_replicas(4, [0.2, 0.2], missing=2) == 3
    # ... and when that flips the direction, nothing changes.
    assert hpa_replicas(4, [0.9], missing=3) == 4


def test_hpa_not_ready_pods_count_as_zero_on_scale_up_only() -> None:
    assert hpa_replicas(4, [2.0, 2.0], unready=2) == 4  # (2+2+0+0)/4 = 1.0: within tolerance
    assert hpa_replicas(4, [3.0, 3.0], unready=2) == 6
    # Scaling down, not-ready replicas are left out: ceil(0.25 * 2) = 1.
    assert hpa_replicas(4, [0.25, 0.25], unready=2) == 1


# --- the autoscaler ----------------------------------------------------------------------------


def test_saturation_is_the_worst_of_queue_kv_and_batch() -> None:
    assert saturation(rs(0, waiting=8, running=4, kv=0.4), CFG) == 2.0
    assert saturation(rs(0, waiting=0, running=4, kv=0.6), CFG) == pytest.approx(0.75)
    assert saturation(rs(0, waiting=0, running=60, kv=0.1), CFG) == 1.5


def test_scale_up_at_once_limited_to_100_percent_or_4_pods_per_period() -> None:
    a = ReplicaAutoscaler(CFG)
    d = a.decide(PoolObservation(1, at_ratio(1, 10.0)), 1000.0)
    assert (d.reactive, d.desired) == (10, 5)  # max(1 * 2, 1 + 4)
    # Within the same 15 s period the limit counts from the replicas at its start (1).
    d = a.decide(PoolObservation(5, at_ratio(5, 10.0, observed_at=1005.0)), 1005.0)
    assert d.desired == 5
    d = a.decide(PoolObservation(5, at_ratio(5, 10.0, observed_at=1016.0)), 1016.0)
    assert d.desired == 10  # max(5 * 2, 5 + 4)


def test_scale_down_waits_for_the_stabilization_window() -> None:
    a = ReplicaAutoscaler(CFG)
    t = 1000.0
    assert a.decide(PoolObservation(8, at_ratio(8, 1.0, observed_at=t)), t).desired == 8
    for step in range(1, 20):  # load drops to a quarter: raw recommendation is 2
        t = 1000.0 + 15 * step
        d = a.decide(PoolObservation(8, at_ratio(8, 0.25, observed_at=t)), t)
        assert d.desired == 8, (step, d)
    t = 1000.0 + 301
    d = a.decide(PoolObservation(8, at_ratio(8, 0.25, observed_at=t)), t)
    assert d.desired == 2
    assert d.reason.startswith("saturation 0.25")


def test_never_scales_down_on_missing_data() -> None:
    a = ReplicaAutoscaler(dataclasses.replace(CFG, scale_down_stabilization_s=0))
    # All agents down (no states at all): hold.
    d = a.decide(PoolObservation(6, []), 1000.0)
    assert d.desired == 6 and "holding" in d.reason
    # Stale states count as missing too.
    d = a.decide(PoolObservation(6, at_ratio(6, 0.1, observed_at=900.0)), 1000.0)
    assert d.desired == 6
    # One fresh idle replica and five without metrics: (0.1 + 5 * 1) / 6 -> within... no, 0.85.
    d = a.decide(PoolObservation(6, at_ratio(1, 0.1)), 1000.0)
    assert d.desired >= 5


def test_panic_mode_blocks_scale_down() -> None:
    cfg = dataclasses.replace(CFG, scale_down_stabilization_s=0, panic_hold_s=60, max_replicas=4)
    a = ReplicaAutoscaler(cfg)
    d = a.decide(PoolObservation(4, at_ratio(4, 3.0)), 1000.0)
    assert d.panic and d.desired == 4
    d = a.decide(PoolObservation(4, at_ratio(4, 0.2, observed_at=1030.0)), 1030.0)
    assert d.panic and d.desired == 4 and "panic" in d.reason
    d = a.decide(PoolObservation(4, at_ratio(4, 0.2, observed_at=1061.0)), 1061.0)
    assert not d.panic and d.desired == 1


def profiled(cfg: PoolScalingConfig = CFG, tokens_per_s: float = 0.0) -> ReplicaAutoscaler:
    """An autoscaler that has seen a whole day at a flat demand (quiet by default): its forecast
    is the daily profile's."""
    a = ReplicaAutoscaler(
        dataclasses.replace(cfg, forecast=True, season_s=960.0, capacity_tokens_per_s=1000.0)
    )
    assert a._season is not None
    for t in range(0, 1000, 5):
        a._season.update(tokens_per_s, float(t))
    assert a._season.ready
    return a


def test_pending_replicas_are_unready_and_go_once_not_needed() -> None:
    """Pods still Pending (no node) are the HPA's unready pods: set aside when scaling down, so
    once the burst that ordered them has passed (a minute of recommendations the placed
    replicas cover) they go, without waiting out the window that protects serving replicas."""

    def run(pending: int) -> list[tuple[float, int, str]]:
        a = profiled()
        assert a.decide(PoolObservation(4, at_ratio(4, 1.9)), 1000.0).desired == 8  # a burst
        out = []
        current = 8
        for t in (1015.0, 1030.0, 1045.0, 1060.0, 1075.0, 1090.0):
            # the burst is over; the 4 new pods wait for nodes (no state yet)
            obs = PoolObservation(
                current, at_ratio(4, 0.8, observed_at=t), pending_replicas=pending
            )
            d = a.decide(obs, t)
            out.append((t, d.desired, d.reason))
            current = d.desired
        return out

    steps = run(pending=4)
    assert [d for t, d, _ in steps if t < 1075.0] == [8, 8, 8, 8]  # a minute's hold first
    t, desired, reason = steps[4]
    assert desired == 4 and "4 pending replicas no longer needed" in reason
    assert steps[5][1] == 4  # and no re-order after
    # Not known to be Pending (e.g. loading their model): missing, assumed at target: held.
    assert all(d == 8 for _, d, _ in run(pending=0))


def test_without_a_daily_profile_pending_replicas_stay_while_demand_rises() -> None:
    """On the trend alone (a first day), Pending replicas while demand rises may be a ramp's,
    ordered early: held. With demand flat they are a passed burst's: dropped."""

    def sizes(tokens: Callable[[float], float]) -> list[int]:
        cfg = dataclasses.replace(
            CFG, forecast=True, capacity_tokens_per_s=1000.0, lead_time_s=0.0, demand_window_s=15
        )
        a = ReplicaAutoscaler(cfg)
        a.decide(PoolObservation(4, at_ratio(4, 1.9, generation_tokens_per_s=100.0)), 1000.0)
        out = []
        for t in (1015.0, 1030.0, 1045.0, 1060.0, 1075.0, 1090.0, 1105.0):
            states = at_ratio(4, 0.8, observed_at=t, generation_tokens_per_s=tokens(t))
            out.append(a.decide(PoolObservation(8, states, pending_replicas=4), t).desired)
        return out

    assert sizes(lambda t: 100.0 + 5.0 * (t - 1000.0)) == [8] * 7
    assert sizes(lambda t: 100.0)[-1] == 4


def test_pending_replicas_go_when_the_placed_ones_sit_within_tolerance() -> None:
    """After a burst the placed replicas usually sit near their target, where the HPA keeps the
    current size (Pending ones included): judged without the Pending ones, they cover the need."""
    a = profiled()
    a.decide(PoolObservation(4, at_ratio(4, 1.9)), 1000.0)
    sizes = []
    current = 8
    for t in (1015.0, 1030.0, 1045.0, 1060.0, 1075.0):
        obs = PoolObservation(current, at_ratio(4, 0.95, observed_at=t), pending_replicas=4)
        current = a.decide(obs, t).desired
        sizes.append(current)
    assert sizes == [8, 8, 8, 8, 4]


def test_pending_replicas_stay_while_needed_or_in_panic() -> None:
    def sizes(a: ReplicaAutoscaler, ratio: float, burst: float = 1.9) -> list[int]:
        a.decide(PoolObservation(4, at_ratio(4, burst)), 1000.0)
        out = []
        for t in (1015.0, 1030.0, 1045.0, 1060.0, 1075.0, 1090.0):
            obs = PoolObservation(8, at_ratio(4, ratio, observed_at=t), pending_replicas=4)
            out.append(a.decide(obs, t).desired)
        return out

    # still overloaded: the placed replicas do not cover the need, the pending ones stay
    assert sizes(profiled(), 1.6) == [8] * 6
    # covered, but in panic (a sudden overload that may come back): they stay
    calm = profiled(dataclasses.replace(CFG, panic_threshold=1.5, panic_hold_s=120))
    assert sizes(calm, 0.5, burst=2.0) == [8] * 6


# Spikes: 1-s demand average and an untrended level (the tests' demand moves at once), a day of
# 9600 s (100-s bins: today's level moves only over many bins, not within a test).
SPIKY = dataclasses.replace(CFG, spike_hold_s=120.0, demand_window_s=1.0, trend_alpha=1.0)


T0 = 12400.0  # a day and 24 bins seen: today's level (the median of 24 bin ratios) is 1


def day(
    cfg: PoolScalingConfig, usual: Callable[[float], float], until: float = T0
) -> ReplicaAutoscaler:
    """An autoscaler that has seen `usual(t)` tokens/s until `until`; capacity 1000 tokens/s."""
    a = ReplicaAutoscaler(
        dataclasses.replace(cfg, forecast=True, season_s=9600.0, capacity_tokens_per_s=1000.0)
    )
    assert a._season is not None
    for t in range(0, int(until), 50):
        a._season.update(usual(float(t)), float(t))
    assert a._season.ready
    return a


def tokens_at(n: int, ratio: float, tokens_per_s: float, t: float) -> list[ReplicaState]:
    """n replicas at saturation `ratio`, serving `tokens_per_s` between them."""
    return at_ratio(n, ratio, observed_at=t, generation_tokens_per_s=tokens_per_s / n)


def test_a_spike_above_the_daily_profile_gets_warm_capacity_until_it_lasts() -> None:
    """Twice the demand the profile expects: new nodes would come after a burst of minutes
    has passed, so only spare replicas (placeholders on nodes) start, until the spike has
    lasted spike_hold_s; then it is a level and is ordered in full."""

    def run(
        spare: int | None, demand: Callable[[float], float], cfg: PoolScalingConfig = SPIKY
    ) -> list[tuple[int, int | None, str]]:
        a = day(cfg, lambda t: 4000.0)  # 4 replicas' worth
        out = []
        for t in range(int(T0), int(T0) + 181, 15):
            # saturation follows the demand: 1.9 at twice the profile's
            states = tokens_at(4, 1.9 * demand(t) / 8000.0, demand(t), float(t))
            d = a.decide(PoolObservation(4, states, spare_replicas=spare), float(t))
            out.append((d.desired, d.forecast, d.reason))
        return out

    spike = run(0, lambda t: 8000.0)
    assert [d for d, _, _ in spike[:8]] == [4] * 8  # 0 .. 105 s: the profile's 4, no more
    assert "above the daily profile: 4 without new nodes" in spike[0][2]
    assert all(f is not None and f <= 4 for _, f, _ in spike[:8])  # no placeholders either
    assert [d for d, _, _ in spike[8:]] == [8] * 5  # lasted 120 s: ordered
    # Spare replicas start at once; where they are not known, no cap.
    assert run(2, lambda t: 8000.0)[0][0] == 6
    assert run(None, lambda t: 8000.0)[0][0] == 8
    # A need back within the cap ends the spike: the next one is held anew.
    dips = run(0, lambda t: 4000.0 if t == T0 + 90 else 8000.0)
    assert [d for d, _, _ in dips] == [4] * 13
    # Off (spike_hold_s 0, the HPA's way), or no day seen yet: at once.
    assert run(0, lambda t: 8000.0, dataclasses.replace(SPIKY, spike_hold_s=0.0))[0][0] == 8
    trend_only = ReplicaAutoscaler(dataclasses.replace(SPIKY, capacity_tokens_per_s=1000.0))
    states = tokens_at(4, 1.9, 8000.0, T0)
    assert trend_only.decide(PoolObservation(4, states, spare_replicas=0), T0).desired == 8


def test_each_rise_past_the_cap_waits_its_hold_and_the_forecast_counts() -> None:
    """After the hold the pool catches up; a further rise past the new cap waits its own hold
    (bounded, and never below what the pool has). A forecast above the profile (saturation
    within tolerance, demand high) counts as the need: held, then ordered."""
    a = day(SPIKY, lambda t: 4000.0)
    current, sizes = 4, []
    for t in range(int(T0), int(T0) + 346, 15):
        demand = 8000.0 if t < T0 + 200 else 12000.0
        states = tokens_at(current, demand / 1000.0 * 0.95 / current, demand, float(t))
        current = a.decide(PoolObservation(current, states, spare_replicas=0), float(t)).desired
        sizes.append((t, current))
    assert dict(sizes)[T0 + 105] == 4 and dict(sizes)[T0 + 120] == 8
    assert dict(sizes)[T0 + 315] == 8 and dict(sizes)[T0 + 330] == 12  # 120 s again

    # A settings reload in the middle of a spike does not restart its hold.
    c = day(SPIKY, lambda t: 4000.0)
    assert (
        c.decide(PoolObservation(4, tokens_at(4, 1.9, 8000.0, T0), spare_replicas=0), T0).desired
        == 4
    )
    c = c.with_settings(c.cfg)
    d = c.decide(
        PoolObservation(4, tokens_at(4, 1.9, 8000.0, T0 + 120), spare_replicas=0), T0 + 120
    )
    assert d.desired == 8

    b = day(SPIKY, lambda t: 4000.0)
    out = []
    for t in range(int(T0), int(T0) + 181, 15):
        states = tokens_at(10, 1.0, 10500.0, float(t))  # reactive: 10 (within tolerance)
        out.append(b.decide(PoolObservation(10, states, spare_replicas=0), float(t)).desired)
    # forecast 10.5k / 1k from the second decision (the level needs two): held, then 11
    assert out[:9] == [10] * 9 and out[9:] == [11] * 4


def test_the_spike_cap_is_the_profiles_need_at_the_lead_time() -> None:
    """During a spike the pool may grow to what the profile asks for when a node ordered now
    would serve: before the morning ramp, that is the ramp's size; before the evening's way
    down, a quiet pool."""
    cfg = dataclasses.replace(SPIKY, lead_time_s=4800.0)
    sizes = []
    for now in (19200.0 + 2400.0, 19200.0 + 7200.0):  # before the ramp; before the way down
        a = day(cfg, lambda t: 2000.0 if t % 9600 < 4800 else 8000.0, until=now)
        usual = 2000.0 if now % 9600 < 4800 else 8000.0
        states = tokens_at(4, 1.9, 2 * usual, now)
        sizes.append(a.decide(PoolObservation(4, states, spare_replicas=0), now).desired)
    assert sizes == [8, 4]


def test_a_restored_profile_waits_for_the_capacity_before_its_settings() -> None:
    """A new leader restores the profile, but turns its demand into replicas only once it has
    learned a replica's capacity: until then the trend's utilization and no spike cap."""
    cfg = dataclasses.replace(
        SPIKY, target_utilization=0.5, profile_utilization=0.8, forecast=True, season_s=9600.0
    )
    learned = day(cfg, lambda t: 4000.0)
    fresh = ReplicaAutoscaler(cfg)
    assert learned._season is not None
    fresh.restore_season(learned._season.state())
    states = tokens_at(4, 0.72, 8000.0, T0)
    d = fresh.decide(PoolObservation(4, states, spare_replicas=0), T0)
    assert d.desired == 6 and "above the daily profile" not in d.reason  # 4 x 0.72 / 0.5


def test_the_held_utilization_rises_and_the_margin_goes_once_the_profile_forecasts() -> None:
    """On the trend alone the headroom must also carry a ramp the trend has yet to see
    (target_utilization); once the profile orders ramps ahead, bursts alone
    (profile_utilization)."""
    cfg = dataclasses.replace(CFG, target_utilization=0.5, profile_utilization=0.8)
    trend = ReplicaAutoscaler(dataclasses.replace(cfg, forecast=True, capacity_tokens_per_s=1e3))
    assert trend.decide(PoolObservation(4, at_ratio(4, 0.8)), 1000.0).desired == 7  # 6.4
    assert profiled(cfg).decide(PoolObservation(4, at_ratio(4, 0.8)), 1000.0).desired == 4
    # The step margin too is for the trend's lateness: the profile sizes a ramp itself.
    cfg = dataclasses.replace(CFG, scale_up_margin=0.25)
    trend = ReplicaAutoscaler(dataclasses.replace(cfg, forecast=True, capacity_tokens_per_s=1e3))
    assert trend.decide(PoolObservation(4, at_ratio(4, 1.5)), 1000.0).desired == 8  # 6 x 1.25
    assert profiled(cfg).decide(PoolObservation(4, at_ratio(4, 1.5)), 1000.0).desired == 6


def test_the_daily_peak_holds_more_headroom_than_the_rest_of_the_day() -> None:
    """Once the profile forecasts: profile_utilization up to the day's mean, peak_utilization
    at its peak (a burst there puts the most requests at risk). The same saturation asks for
    more replicas at the peak than in the morning."""
    cfg = dataclasses.replace(CFG, profile_utilization=0.8, peak_utilization=0.5)
    a = day(cfg, lambda t: 1000.0 + 3000.0 * max(0.0, math.sin(math.pi * (t % 9600) / 9600)))
    morning, peak = 9600.0 * 2 + 200.0, 9600.0 * 2 + 4800.0  # the day's start; its middle
    assert a._utilization(morning) == pytest.approx(0.8)
    assert a._utilization(peak) == pytest.approx(0.5, abs=0.01)
    # The HPA's own recommendation (before the forecast): 4 x 0.6 / 0.5 and 4 x 0.6 / 0.8.
    assert a.decide(PoolObservation(4, at_ratio(4, 0.6, observed_at=peak)), peak).reactive == 5
    m = day(cfg, lambda t: 1000.0 + 3000.0 * max(0.0, math.sin(math.pi * (t % 9600) / 9600)))
    assert (
        m.decide(PoolObservation(4, at_ratio(4, 0.6, observed_at=morning)), morning).reactive == 3
    )
    # peak_utilization above profile_utilization changes nothing.
    b = day(dataclasses.replace(cfg, peak_utilization=1.0), lambda t: 1000.0 + t % 9600)
    top = 9600.0 * 2 + 9000.0  # the sawtooth's own peak (its smoothed bins' highest)
    assert b._season is not None and b._season.peakness(top) > 0.9
    assert b._utilization(top) == b._utilization(morning) == pytest.approx(0.8)


def test_min_and_max_bound_the_decision() -> None:
    a = ReplicaAutoscaler(dataclasses.replace(CFG, min_replicas=2, max_replicas=3))
    assert a.decide(PoolObservation(2, at_ratio(2, 5.0)), 1000.0).desired == 3
    b = ReplicaAutoscaler(dataclasses.replace(CFG, min_replicas=2, scale_down_stabilization_s=0))
    assert b.decide(PoolObservation(3, at_ratio(3, 0.01)), 1000.0).desired == 2


def test_scale_to_zero_after_idle_and_back_on_held_requests() -> None:
    cfg = dataclasses.replace(
        CFG,
        min_replicas=0,
        scale_to_zero=True,
        idle_before_zero_s=120,
        scale_down_stabilization_s=0,
    )
    a = ReplicaAutoscaler(cfg)
    assert a.decide(PoolObservation(1, [rs(0, running=2)]), 1000.0).desired == 1
    assert a.decide(PoolObservation(1, [rs(0, observed_at=1060.0)]), 1060.0).desired == 1
    d = a.decide(PoolObservation(1, [rs(0, observed_at=1121.0)]), 1121.0)
    assert d.desired == 0 and "idle" in d.reason
    assert a.decide(PoolObservation(0, []), 1200.0).desired == 0
    assert a.decide(PoolObservation(0, [], held_requests=3), 1201.0).desired == 1


def test_without_scale_to_zero_min_one_holds() -> None:
    a = ReplicaAutoscaler(dataclasses.replace(CFG, scale_down_stabilization_s=0))
    assert a.decide(PoolObservation(1, [rs(0)]), 1000.0).desired == 1


def test_holt_follows_a_linear_trend() -> None:
    h = Holt(alpha=0.5, beta=0.5)
    for t in range(0, 300, 15):
        h.update(100.0 + 2.0 * t, float(t))
    f = h.forecast(120.0)
    assert f is not None
    # Truth at t=285+120 is 910; smoothing lags a little but gets the trend.
    assert 850 < f < 960


def test_forecast_scales_up_ahead_of_a_ramp() -> None:
    # Undamped, lightly smoothed: the mechanism, on a ramp only 165 s long.
    cfg = dataclasses.replace(
        CFG,
        forecast=True,
        lead_time_s=180,
        max_replicas=50,
        demand_window_s=1.0,
        trend_alpha=0.5,
        trend_beta=0.3,
        trend_damping_s=math.inf,
        capacity_learn_rate=0.2,
    )
    a = ReplicaAutoscaler(cfg)
    fc = ReplicaAutoscaler(dataclasses.replace(cfg, forecast=False))
    # Each replica serves 1000 tok/s at saturation 1 (running 40 = batch target).
    t, n = 1000.0, 4
    last = last_plain = None
    for step in range(12):
        t = 1000.0 + 15 * step
        demand = 3600.0 + 150.0 * step * 15 / 15  # tokens/s, rising 10 tok/s per second
        per = demand / n
        sat = per / 1000.0
        states = [
            rs(i, running=round(sat * 40), generation_tokens_per_s=per, observed_at=t)
            for i in range(n)
        ]
        last = a.decide(PoolObservation(n, states), t)
        last_plain = fc.decide(PoolObservation(n, states), t)
    assert last is not None and last_plain is not None
    assert last.forecast is not None
    # Demand in 180 s is about 5250 + 1800 = 7050 tok/s -> 8 replicas; the reactive answer lags.
    assert last.desired > last_plain.desired
    assert 7 <= last.forecast <= 10


# --- kvpilot's defaults on top of the HPA ------------------------------------------------------


def test_target_utilization_keeps_headroom() -> None:
    # Saturation 0.9 on 4 replicas against a 0.6 utilization target: ratio 1.5 -> 6 replicas.
    a = ReplicaAutoscaler(dataclasses.replace(CFG, target_utilization=0.6))
    d = a.decide(PoolObservation(4, at_ratio(4, 0.9)), 1000.0)
    assert (d.reactive, d.desired) == (6, 6)


def test_scale_up_margin_steps_past_the_need() -> None:
    a = ReplicaAutoscaler(dataclasses.replace(CFG, scale_up_margin=0.25))
    d = a.decide(PoolObservation(4, at_ratio(4, 1.5)), 1000.0)
    assert d.reactive == 6 and d.desired == 8  # ceil(6 * 1.25)


def test_scale_down_tolerance_ignores_small_drops() -> None:
    cfg = dataclasses.replace(CFG, scale_down_tolerance=0.3, scale_down_stabilization_s=0)
    a = ReplicaAutoscaler(cfg)
    # 10 -> 8 is a drop of 20 %: held.
    assert a.decide(PoolObservation(10, at_ratio(10, 0.8)), 1000.0).desired == 10
    # 10 -> 5 is a real drop: taken.
    d = a.decide(PoolObservation(10, at_ratio(10, 0.5, observed_at=1015.0)), 1015.0)
    assert d.desired == 5


def test_by_default_a_small_drop_is_taken_once_the_window_allows() -> None:
    # No scale-down tolerance by default: 10 -> 9 goes once the 300 s window has passed,
    # freeing a node; under a 20 % tolerance the same drop is held.
    cfg = dataclasses.replace(PoolScalingConfig(), max_replicas=20, forecast=False)
    assert cfg.scale_down_tolerance == 0.0

    # Saturation 28 / 48 = 0.583 against the 0.65 held: ceil(10 x 0.897) = 9.
    def at(t: float) -> PoolObservation:
        return PoolObservation(10, [rs(i, running=28, observed_at=t) for i in range(10)])

    for tolerance, after_window in ((0.0, 9), (0.2, 10)):
        a = ReplicaAutoscaler(dataclasses.replace(cfg, scale_down_tolerance=tolerance))
        assert a.decide(at(1000.0), 1000.0).desired == 10  # the window holds the size found
        assert a.decide(at(1301.0), 1301.0).desired == after_window


def test_ewma_smooths_in_continuous_time() -> None:
    e = Ewma(60.0)
    assert e.update(100.0, 0.0) == 100.0
    v = e.update(200.0, 60.0)  # one time constant: 1 - 1/e of the way
    assert v == pytest.approx(100.0 + 100.0 * (1 - math.exp(-1)))


def test_damped_trend_carries_at_most_trend_times_damping() -> None:
    h = Holt(alpha=0.5, beta=0.5, damping_s=300.0)
    for t in range(0, 600, 15):
        h.update(100.0 + 2.0 * t, float(t))
    near, far = h.forecast(60.0), h.forecast(100_000.0)
    assert near is not None and far is not None and h.level is not None
    assert far - h.level <= h.trend * 300.0 + 1e-6
    assert near < far


def test_forecast_is_steady_on_noisy_token_rates() -> None:
    # Constant demand (running 20 of 40 on 8 replicas) whose 1 s token rates swing 3x from one
    # scrape to the next: fed every scrape, the forecast stays within one replica.
    cfg = dataclasses.replace(CFG, forecast=True, lead_time_s=600, scale_down_stabilization_s=0)
    a = ReplicaAutoscaler(cfg)
    forecasts = []
    for step in range(600):
        t = 1000.0 + step
        per = 200.0 if step % 2 else 600.0
        states = [rs(i, running=20, generation_tokens_per_s=per, observed_at=t) for i in range(8)]
        if step % 15:
            a.observe(states, t)
        else:
            d = a.decide(PoolObservation(8, states), t)
            if step >= 300 and d.forecast is not None:
                forecasts.append(d.forecast)
    assert forecasts and max(forecasts) - min(forecasts) <= 1
    assert 3 <= min(forecasts) <= 5  # 8 replicas at saturation 0.5 -> 4 at saturation 1


def test_config_rejects_bad_scaling_values(tmp_path) -> None:  # noqa: ANN001
    from kvpilot.config import ConfigError, load_config

    for bad in (
        "target_utilization: 0",
        "scale_down_tolerance: 1",
        "trend_damping_s: 0",
        "capacity_min_saturation: 1.5",
        "capacity_max_saturation: 0.4",
        "profile_utilization: 1.2",
        "peak_utilization: 0",
        "peak_utilization: 1.5",
        "spike_hold_s: -1",
    ):
        f = tmp_path / "k.yaml"
        f.write_text(
            "pools:\n  - name: p\n    models: [m]\n    endpoints: [http://127.0.0.1:1]\n"
            f"controller:\n  pools:\n    p:\n      {bad}\n"
        )
        with pytest.raises(ConfigError, match=bad.split(":")[0]):
            load_config(str(f))


def test_forecast_never_asks_past_max_replicas() -> None:
    cfg = dataclasses.replace(CFG, forecast=True, max_replicas=6, capacity_tokens_per_s=100.0)
    a = ReplicaAutoscaler(cfg)
    d = None
    for step in range(10):
        t = 1000.0 + 15 * step
        states = [
            rs(i, running=20, generation_tokens_per_s=5000.0, observed_at=t) for i in range(4)
        ]
        d = a.decide(PoolObservation(4, states), t)
    assert d is not None and d.forecast == 6


def test_capacity_is_learned_only_from_replicas_near_the_held_utilization() -> None:
    # Saturation grows faster than throughput as a replica fills, so a lightly loaded pool
    # overstates what a replica serves at the held utilization: it teaches no capacity (and so
    # makes no forecast) below capacity_min_saturation, and does once the replicas are busier.
    cfg = dataclasses.replace(CFG, forecast=True, demand_window_s=1.0)

    def last_forecast(a: ReplicaAutoscaler, sat: float, start: float) -> int | None:
        d = None
        for step in range(20):
            t = start + 15 * step
            states = [
                rs(i, running=round(sat * 40), generation_tokens_per_s=1000 * sat, observed_at=t)
                for i in range(4)
            ]
            d = a.decide(PoolObservation(4, states), t)
        assert d is not None
        return d.forecast

    strict = ReplicaAutoscaler(dataclasses.replace(cfg, capacity_min_saturation=0.5))
    loose = ReplicaAutoscaler(dataclasses.replace(cfg, capacity_min_saturation=0.3))
    assert last_forecast(loose, 0.4, 1000.0) == 2  # 4 x 400 tok/s at 1000 tok/s per replica
    assert last_forecast(strict, 0.4, 1000.0) is None
    # At saturation 0.6 it learns 1000 tok/s per unit: 2400 tok/s -> 3 replicas (or one more
    # while the step from 1600 tok/s still shows in the trend).
    assert last_forecast(strict, 0.6, 2000.0) in (3, 4)


def test_an_overloaded_pool_teaches_no_capacity() -> None:
    # Past saturation 1 the waiting queue grows with the backlog while tokens/s stays at the
    # replicas' limit: tokens per unit of saturation then reads a fraction of a replica's real
    # capacity, and a forecast divided by it asks for far too many replicas.
    cfg = dataclasses.replace(CFG, forecast=True, demand_window_s=1.0, max_replicas=50)

    def run(a: ReplicaAutoscaler) -> int | None:
        d = None
        for step in range(40):
            t = 1000.0 + 15 * step
            if step < 20:  # at saturation 0.6: 600 tok/s each, so 1000 tok/s per unit
                states = [
                    rs(i, running=24, generation_tokens_per_s=600.0, observed_at=t)
                    for i in range(4)
                ]
            else:  # a backlog: 12 waiting (saturation 3), tokens/s at the limit
                states = [
                    rs(i, waiting=12, running=40, generation_tokens_per_s=1000.0, observed_at=t)
                    for i in range(4)
                ]
            d = a.decide(PoolObservation(4, states), t)
        assert d is not None
        return d.forecast

    banded = run(ReplicaAutoscaler(cfg))
    unbanded = run(ReplicaAutoscaler(dataclasses.replace(cfg, capacity_max_saturation=10.0)))
    # 4,000 tok/s at 1,000 per replica: 4 (5 while the trend from 2,400 still shows)
    assert banded in (4, 5)
    assert unbanded is not None and unbanded >= 8


# --- what a fresh autoscaler, a lowered max and a write that never happened must not do ----------


def test_a_fresh_autoscaler_waits_out_the_window_before_scaling_down() -> None:
    # As the HPA records its initial recommendation: a start, failover or new settings must not
    # shrink the pool on the first sample.
    a = ReplicaAutoscaler(CFG)  # 300 s window
    d = a.decide(PoolObservation(8, at_ratio(8, 0.1)), 1000.0)
    assert d.desired == 8 and "stabilizing" in d.reason
    d = a.decide(PoolObservation(8, at_ratio(8, 0.1, observed_at=1301.0)), 1301.0)
    assert d.desired == 1


def test_max_replicas_applies_even_within_tolerance_or_panic() -> None:
    calm = ReplicaAutoscaler(dataclasses.replace(CFG, max_replicas=9, scale_down_tolerance=0.2))
    d = calm.decide(PoolObservation(10, at_ratio(10, 1.0)), 1000.0)
    assert d.desired == 9 and "max_replicas" in d.reason
    hot = ReplicaAutoscaler(dataclasses.replace(CFG, max_replicas=4, panic_hold_s=60))
    d = hot.decide(PoolObservation(6, at_ratio(6, 2.5)), 1000.0)
    assert d.panic and d.desired == 4


def test_missing_pods_at_exactly_the_target_never_scale_down() -> None:
    # replica_calculator.go leaves missing pods out at ratio 1.0 (no direction to guard).
    assert hpa_replicas(4, [1.0], missing=3) == 4


def test_a_scale_up_that_never_happened_does_not_eat_the_rate_limit() -> None:
    a = ReplicaAutoscaler(CFG)
    assert a.decide(PoolObservation(4, at_ratio(4, 2.0)), 1000.0).desired == 8
    # Dry-run or a failed write: still 4 replicas 5 s later. The limit counts from 4, not from
    # 4 - 4 = 0, so the same decision stands instead of flapping between 8 and 4.
    d = a.decide(PoolObservation(4, at_ratio(4, 2.0, observed_at=1005.0)), 1005.0)
    assert d.desired == 8
    # Applied: 8 replicas now; within the period the limit counts from the 4 at its start.
    d = a.decide(PoolObservation(8, at_ratio(8, 4.0, observed_at=1010.0)), 1010.0)
    assert d.desired == 8 and "rate-limited" in d.reason


def test_replicas_removed_in_the_period_add_back_to_its_start() -> None:
    """Kubernetes takes the scale-up limit from current - added + removed in the period: a
    scale-down (here Pending replicas dropped) frees the room the scale-up before it used."""
    a = profiled(dataclasses.replace(CFG, scale_up_period_s=300.0, scale_up_pods=0))
    assert a.decide(PoolObservation(4, at_ratio(4, 1.9)), 1000.0).desired == 8  # +4
    current = 8
    for t in (1015.0, 1030.0, 1045.0, 1060.0, 1075.0):  # the burst passed before the nodes
        obs = PoolObservation(current, at_ratio(4, 0.8, observed_at=t), pending_replicas=4)
        current = a.decide(obs, t).desired
    assert current == 4  # -4
    # It comes back: the period started at 4 (4 - 4 + 4), so 100 % allows 8 again.
    d = a.decide(PoolObservation(4, at_ratio(4, 1.9, observed_at=1090.0)), 1090.0)
    assert d.desired == 8 and "rate-limited" not in d.reason


def test_scale_to_zero_does_not_wait_a_second_window() -> None:
    cfg = dataclasses.replace(CFG, min_replicas=0, scale_to_zero=True, idle_before_zero_s=120)
    a = ReplicaAutoscaler(cfg)  # 300 s window: the idle time is the wait, not idle + window
    assert a.decide(PoolObservation(1, [rs(0, running=2)]), 1000.0).desired == 1
    d = a.decide(PoolObservation(1, [rs(0, observed_at=1121.0)]), 1121.0)
    assert d.desired == 0 and "idle" in d.reason


def test_new_settings_keep_the_scaling_history() -> None:
    a = ReplicaAutoscaler(CFG)
    assert a.decide(PoolObservation(8, at_ratio(8, 1.0)), 1000.0).desired == 8
    # A config edit at 1100 s (say max_replicas): the window still holds the 8 seen at 1000 s.
    b = a.with_settings(dataclasses.replace(CFG, max_replicas=40))
    d = b.decide(PoolObservation(8, at_ratio(8, 0.1, observed_at=1100.0)), 1100.0)
    assert d.desired == 8 and "stabilizing" in d.reason
    d = b.decide(PoolObservation(8, at_ratio(8, 0.1, observed_at=1301.0)), 1301.0)
    assert d.desired == 1
