"""The daily demand profile: yesterday's shape without its bursts, scaled to today's level."""

from __future__ import annotations

import dataclasses
import math

import pytest

from controller.replicas import PoolObservation, ReplicaAutoscaler
from controller.season import DailyProfile
from kvpilot.config import PoolScalingConfig
from kvpilot.signals import ReplicaState

DAY = 9600.0  # 96 bins of 100 s


def diurnal(t: float) -> float:
    """1000 at the trough (t = 0), 5000 half a day later."""
    return 3000.0 - 2000.0 * math.cos(2 * math.pi * t / DAY)


def feed(p: DailyProfile, start: float, end: float, f, step: float = 15.0) -> None:  # noqa: ANN001
    t = start
    while t < end:
        p.update(f(t), t)
        t += step


def test_no_forecast_until_a_whole_day_is_seen() -> None:
    p = DailyProfile(DAY)
    feed(p, 0.0, DAY - 200.0, diurnal)
    assert not p.ready and p.forecast(DAY) is None
    feed(p, DAY - 200.0, DAY + 30.0, diurnal)
    assert p.ready and p.forecast(DAY + 100.0) is not None


def test_forecast_follows_yesterdays_shape_ahead_of_time() -> None:
    p = DailyProfile(DAY)
    feed(p, 0.0, DAY + 30.0, diurnal)
    # Early on day 2, before the afternoon: the forecast for hours ahead is the curve there,
    # not today's level carried forward.
    for ahead in (1200.0, 2400.0, 4800.0):
        at = DAY + 60.0 + ahead
        f = p.forecast(at)
        assert f == pytest.approx(diurnal(at), rel=0.06)
    assert p.forecast(DAY + 4800.0) > 3 * diurnal(DAY + 60.0)  # the peak, seen from the trough


def test_yesterdays_burst_is_not_ordered_again() -> None:
    p = DailyProfile(DAY)

    def with_burst(t: float) -> float:
        return diurnal(t) * (1.8 if 4000.0 <= t < 4300.0 else 1.0)  # three bins

    feed(p, 0.0, DAY + 30.0, with_burst)
    f = p.forecast(DAY + 4150.0)
    assert f == pytest.approx(diurnal(4150.0), rel=0.05)  # the shape, not 1.8x it


def test_a_busier_day_scales_the_forecast_but_one_burst_does_not() -> None:
    p = DailyProfile(DAY)
    feed(p, 0.0, DAY + 30.0, diurnal)
    feed(p, DAY + 30.0, DAY + 1500.0, lambda t: 1.3 * diurnal(t))  # 15 bins at 1.3x
    assert p.level() == pytest.approx(1.3, rel=0.03)
    assert p.forecast(DAY + 4000.0) == pytest.approx(1.3 * diurnal(4000.0), rel=0.06)

    q = DailyProfile(DAY)
    feed(q, 0.0, DAY + 30.0, diurnal)
    feed(q, DAY + 30.0, DAY + 1500.0, lambda t: diurnal(t) * (2.0 if t < DAY + 400 else 1.0))
    assert q.level() == pytest.approx(1.0, abs=0.03)  # 4 burst bins of 12: the median holds


def test_level_is_bounded() -> None:
    p = DailyProfile(DAY)
    feed(p, 0.0, DAY + 30.0, diurnal)
    feed(p, DAY + 30.0, DAY + 1500.0, lambda t: 10 * diurnal(t))
    assert p.level() == 2.0


def test_days_blend_and_a_clock_going_back_is_ignored() -> None:
    p = DailyProfile(DAY, smooth_bins=1)
    feed(p, 0.0, DAY + 30.0, lambda t: 1000.0)
    feed(p, DAY + 30.0, 2 * DAY + 30.0, lambda t: 2000.0)
    assert p.forecast(2 * DAY + 500.0) == pytest.approx(1500.0 * p.level())
    before = p.smoothed()[:]
    p.update(1e9, 10.0)  # a timestamp from the past
    assert p.smoothed() == before


def test_bad_period_is_refused() -> None:
    with pytest.raises(ValueError, match="period_s"):
        DailyProfile(0.0)


# --- the autoscaler uses it once a day is seen ------------------------------------------------


def test_autoscaler_orders_the_morning_ramp_from_yesterday() -> None:
    """Day 2 at the trough, demand flat for the last hours: the trend says nothing, the daily
    profile says the peak comes within the lead time."""
    base = PoolScalingConfig(
        min_replicas=1,
        max_replicas=50,
        target_utilization=1.0,
        scale_up_margin=0.0,
        scale_down_tolerance=0.0,
        lead_time_s=2400.0,
        batch_target=40,
        capacity_tokens_per_s=1000.0,  # one replica at saturation 1 (running 40)
        demand_window_s=15.0,
    )
    seasonal = ReplicaAutoscaler(dataclasses.replace(base, season_s=DAY))
    trend = ReplicaAutoscaler(dataclasses.replace(base, season_s=0.0))
    last: dict[str, object] = {}
    t = 0.0
    while t <= DAY + 300.0:
        demand = diurnal(t)
        n = max(1, math.ceil(demand / 1000.0))
        states = [
            ReplicaState(
                replica_id=f"r{i}",
                address=f"http://r{i}",
                pool="p",
                running=round(40 * demand / n / 1000.0),
                generation_tokens_per_s=demand / n,
                observed_at=t,
            )
            for i in range(n)
        ]
        for name, a in (("seasonal", seasonal), ("trend", trend)):
            last[name] = a.decide(PoolObservation(n, states), t)
        t += 15.0
    s, tr = last["seasonal"], last["trend"]
    # Demand 2400 s after the trough is diurnal(2700) ~ 3.4k tok/s: 4 replicas; the trend, at
    # the flat bottom of the curve, sees ~1k.
    assert s.forecast is not None and tr.forecast is not None  # type: ignore[attr-defined]
    assert s.forecast >= 4 and tr.forecast <= 2  # type: ignore[attr-defined]
    assert "(daily profile)" in s.reason  # type: ignore[attr-defined]
    assert s.demand_level == pytest.approx(1.0, abs=0.05)  # type: ignore[attr-defined]
    assert tr.demand_level is None  # type: ignore[attr-defined]


def test_a_settings_change_keeps_the_learned_day() -> None:
    cfg = PoolScalingConfig(season_s=DAY, demand_window_s=15.0)
    a = ReplicaAutoscaler(cfg)
    assert a._season is not None
    feed(a._season, 0.0, DAY + 30.0, diurnal)
    kept = a.with_settings(dataclasses.replace(cfg, target_utilization=0.7))
    assert kept._season is a._season
    fresh = a.with_settings(dataclasses.replace(cfg, season_s=2 * DAY))
    assert fresh._season is not None and not fresh._season.ready


def test_quiet_nights_do_not_set_the_level() -> None:
    """No traffic at night: a decaying average leaves tails like 1e-200 in those bins, and one
    tail over another is any ratio at all; the level at dawn must come from real demand."""

    def day_only(t: float) -> float:
        h = (t % DAY) / DAY * 24
        return diurnal(t) if 7.2 <= h < 20.4 else 1e-200 * (1 + (t % 1000))

    p = DailyProfile(DAY)
    feed(p, 0.0, 2 * DAY + DAY * 7.5 / 24, day_only)
    assert p.level() == pytest.approx(1.0, abs=0.05)


def test_a_day_whose_first_bin_is_missed_still_reads_its_level() -> None:
    """The reference for a new day is taken at its first bin seen, not only at the ring index
    the profile started at (the controller may see no replica then)."""
    p = DailyProfile(DAY)
    feed(p, 0.0, DAY, diurnal)
    feed(p, DAY + 300.0, DAY + 3000.0, lambda t: 1.2 * diurnal(t))  # bins 0-2 of day 2 missed
    assert p.level() == pytest.approx(1.2, rel=0.03)


def test_a_pool_at_zero_still_learns_its_night() -> None:
    cfg = PoolScalingConfig(season_s=DAY, min_replicas=0, scale_to_zero=True)
    a = ReplicaAutoscaler(cfg)
    assert a._season is not None
    t = 0.0
    while t <= DAY + 200.0:  # a whole day at zero: the profile is complete (and flat)
        a.decide(PoolObservation(0), t)
        t += 15.0
    assert a._season.ready and a._season.forecast(DAY + 500.0) == 0.0


def test_a_saved_profile_goes_on_exactly_where_it_stopped() -> None:
    """state() through JSON and back: the same forecasts and level, and the same learning after."""
    import json

    p = DailyProfile(DAY)
    feed(p, 0.0, 2 * DAY + 1234.0, lambda t: diurnal(t) * (1.3 if t > DAY else 1.0))
    q = DailyProfile.from_state(json.loads(json.dumps(p.state())), DAY)
    assert q.ready and q.level() == p.level() != 1.0
    assert [q.forecast(2 * DAY + x) for x in range(0, 9600, 700)] == [
        p.forecast(2 * DAY + x) for x in range(0, 9600, 700)
    ]
    # the bin being filled when it was saved is closed alike, and both learn on the same
    feed(p, 2 * DAY + 1234.0, 3 * DAY, lambda t: 2 * diurnal(t))
    feed(q, 2 * DAY + 1234.0, 3 * DAY, lambda t: 2 * diurnal(t))
    assert q.state() == p.state()


def test_a_saved_profile_of_another_period_or_a_broken_one_is_refused() -> None:
    p = DailyProfile(DAY)
    feed(p, 0.0, DAY + 30.0, diurnal)
    st = p.state()
    with pytest.raises(ValueError, match="9600"):
        DailyProfile.from_state(st, 2 * DAY)  # season_s changed: its bins mean other times
    with pytest.raises(ValueError, match="a value of"):
        DailyProfile.from_state({**st, "profile": [-1.0] * 96}, DAY)
    # what json.loads reads besides plain numbers: never an OverflowError or a NaN level
    for bad in ({"sum": float("nan")}, {"ratios": [float("inf")]}, {"n": 1e400}, {"bin": True}):
        with pytest.raises(ValueError):
            DailyProfile.from_state({**st, **bad}, DAY)
    with pytest.raises(ValueError, match="number of bins"):
        DailyProfile.from_state({**st, "profile": st["profile"][:10]}, DAY)
    with pytest.raises(ValueError, match="not a daily profile"):
        DailyProfile.from_state({"period_s": DAY, "bins": 96}, DAY)


def test_an_autoscaler_restores_a_profile_only_of_its_own_period() -> None:
    cfg = PoolScalingConfig(season_s=DAY)
    learned = ReplicaAutoscaler(cfg)
    assert learned._season is not None
    feed(learned._season, 0.0, DAY + 30.0, diurnal)
    fresh = ReplicaAutoscaler(cfg)
    fresh.restore_season(learned.season_state() or {})
    assert fresh._season is not None and fresh._season.ready
    other = ReplicaAutoscaler(dataclasses.replace(cfg, season_s=2 * DAY))
    with pytest.raises(ValueError):
        other.restore_season(learned.season_state() or {})
    assert other._season is not None and not other._season.ready  # kept as it was
    off = ReplicaAutoscaler(dataclasses.replace(cfg, season_s=0))
    assert off.season_state() is None
    with pytest.raises(ValueError, match="no daily profile"):
        off.restore_season(learned.season_state() or {})


def test_peakness_runs_from_the_daily_mean_to_the_peak() -> None:
    """0 at or below the day's mean, 1 at its peak, in between on the way up; 0 before a whole
    day is seen and on a flat day."""
    p = DailyProfile(DAY)
    feed(p, 0.0, DAY - 200.0, diurnal)
    assert p.peakness(DAY / 2) == 0.0  # not ready
    feed(p, DAY - 200.0, DAY + 30.0, diurnal)
    assert p.peakness(DAY / 2) == pytest.approx(1.0, abs=0.02)  # the peak (5000)
    assert p.peakness(0.0) == 0.0 and p.peakness(DAY / 8) == 0.0  # the trough, below the mean
    # Three eighths of a day: 3000 + 2000 x 0.707, about 0.7 of the way from the mean (3000).
    assert p.peakness(3 * DAY / 8) == pytest.approx(0.707, abs=0.05)
    flat = DailyProfile(DAY)
    feed(flat, 0.0, DAY + 30.0, lambda t: 2000.0)
    assert flat.peakness(DAY / 2) == 0.0
    # A peak 2.5 % above the mean is a tenth of a peak (PEAK_RISE 0.25), not a whole one.
    near_flat = DailyProfile(DAY)
    feed(near_flat, 0.0, DAY + 30.0, lambda t: 2000.0 + 50.0 * math.cos(2 * math.pi * t / DAY))
    assert near_flat.peakness(DAY) == pytest.approx(0.1, abs=0.02)
