"""The autoscaling benchmark's baselines, each on hand-made observations of its own signal."""

from __future__ import annotations

import pytest

from kvpilot.signals import ReplicaState
from sim.autoscale_policies import (
    FleetObservation,
    HpaBehavior,
    HpaDutyCycle,
    HpaQueue,
    KnativeKpa,
    Kvpilot,
    Limits,
    LlmdSaturation,
    ReplicaMetrics,
    Sample,
    make_policy,
)

LIM = Limits(1, 20)


def rm(
    i: int,
    now: float,
    *,
    waiting: int = 0,
    kv: float = 0.0,
    inflight: int = 0,
    duty: float = 0.0,
    span: int = 1,
) -> ReplicaMetrics:
    """A replica with `span` identical one-second samples ending at `now`."""
    samples = tuple(Sample(now - span + 1 + k, waiting, 0, kv, inflight, duty) for k in range(span))
    return ReplicaMetrics(f"r{i}", samples)


def obs(ready: list[ReplicaMetrics], spec: int | None = None, **kw: object) -> FleetObservation:
    return FleetObservation(spec if spec is not None else len(ready), tuple(ready), **kw)  # type: ignore[arg-type]


# ---- HPA on queue size ------------------------------------------------------------------------


def test_hpa_queue_scales_to_ratio_times_pods() -> None:
    p = HpaQueue(4.0, LIM)
    d = p.decide(obs([rm(i, 0, waiting=6) for i in range(4)]), 0.0)
    assert d.replicas == 6  # ceil(6/4 x 4)


def test_hpa_queue_tolerance_holds() -> None:
    p = HpaQueue(4.0, LIM)
    # mean 4.25 waiting: ratio 1.06, within 0.1 of 1
    ready = [rm(0, 0, waiting=4), rm(1, 0, waiting=4), rm(2, 0, waiting=4), rm(3, 0, waiting=5)]
    assert p.decide(obs(ready), 0.0).replicas == 4


def test_hpa_queue_scale_up_rate_limit() -> None:
    p = HpaQueue(1.0, LIM)
    d = p.decide(obs([rm(i, 0, waiting=30) for i in range(2)]), 0.0)
    assert d.replicas == 6  # max(100 % of 2, 2 + 4 pods) per 15 s
    # in the same 15 s period the limit counts from the period's start (2), so no more
    d2 = p.decide(obs([rm(i, 5, waiting=30) for i in range(2)], spec=6, pending=4), 5.0)
    assert d2.replicas == 6


def test_hpa_queue_scale_down_waits_for_stabilization_window() -> None:
    p = HpaQueue(2.0, LIM)
    busy = [rm(i, 0, waiting=2) for i in range(6)]
    assert p.decide(obs(busy), 0.0).replicas == 6
    t = 15.0
    while t < 300.0:
        idle = [rm(i, t, waiting=0) for i in range(6)]
        assert p.decide(obs(idle), t).replicas == 6, t  # the busy recommendation is in the window
        t += 15.0
    idle = [rm(i, t, waiting=0) for i in range(6)]
    assert p.decide(obs(idle), t).replicas == 1  # 300 s on: min replicas


def test_hpa_queue_pending_pods_damp_scale_up() -> None:
    p = HpaQueue(2.0, LIM)
    # 2 ready at ratio 2, 2 pending counted at 0: ratio (2+2)/4 = 1.0 -> within tolerance, hold
    d = p.decide(obs([rm(0, 0, waiting=4), rm(1, 0, waiting=4)], spec=4, pending=2), 0.0)
    assert d.replicas == 4


def test_hpa_behavior_scale_down_is_not_rate_limited_beyond_window() -> None:
    b = HpaBehavior(LIM)
    assert b.apply(10, 10, 0.0) == 10
    assert b.apply(10, 3, 15.0) == 10  # the 10 at t=0 is within the 300 s window
    assert b.apply(10, 3, 300.0) == 3  # out of it: all the way down at once (100 % per 15 s)


def test_hpa_duty_cycle_averages_over_sync_period() -> None:
    p = HpaDutyCycle(50.0, LIM)
    ready = [rm(i, 15.0, duty=0.9, span=15) for i in range(3)]
    assert p.decide(obs(ready), 15.0).replicas == 6  # ceil(90/50 x 3)


def test_hpa_duty_cycle_counts_loading_gpus_at_zero() -> None:
    p = HpaDutyCycle(50.0, LIM)
    # 2 busy at 100 %, 2 loading at 0 %: mean 50 % -> hold (not a scale-up to 4 + more)
    ready = [rm(i, 15.0, duty=1.0, span=15) for i in range(2)]
    assert p.decide(obs(ready, spec=4, starting=2), 15.0).replicas == 4


def test_hpa_no_metrics_no_scaling() -> None:
    assert HpaQueue(2.0, LIM).decide(obs([], spec=3, starting=3), 0.0).replicas == 3


# ---- Knative KPA ------------------------------------------------------------------------------


def kpa_obs(t: float, per_pod: float, pods: int) -> FleetObservation:
    return obs([rm(i, t, inflight=int(per_pod)) for i in range(pods)])


def test_kpa_stable_mode_targets_concurrency_times_utilization() -> None:
    p = KnativeKpa(10.0, LIM)  # 7 per pod at 70 %
    d = None
    for t in range(0, 60, 2):
        d = p.decide(kpa_obs(float(t), 7, 3), float(t))
    assert d is not None and d.replicas == 3 and not p.panicking


def test_kpa_panic_triggers_and_holds_then_ends() -> None:
    p = KnativeKpa(10.0, LIM)
    for t in range(0, 60, 2):
        p.decide(kpa_obs(float(t), 7, 2), float(t))  # 14 total, 2 pods: steady
    # a surge: 35 per pod on 2 pods = 70 total -> panic wants 10 pods = 5x ready >= 200 %
    for t in range(60, 66, 2):
        d = p.decide(kpa_obs(float(t), 35, 2), float(t))
    assert p.panicking
    assert d.replicas == 10
    # the surge ends at once: panic holds the count (no scale-down) ...
    for t in range(66, 120, 2):
        d = p.decide(kpa_obs(float(t), 1, 2), float(t))
        assert d.replicas == 10, t
    # ... until a stable window has passed without crossing the threshold (the last crossing
    # is at 68 s: ceil(24.7 / 7) = 4 pods wanted = 2x ready, Knative rounds before comparing)
    for t in range(120, 132, 2):
        d = p.decide(kpa_obs(float(t), 1, 2), float(t))
    assert not p.panicking
    assert d.replicas == 1  # max scale-down rate 2: floor(2 / 2) = 1


def test_kpa_below_panic_threshold_stays_stable() -> None:
    p = KnativeKpa(10.0, LIM)
    for t in range(0, 60, 2):
        p.decide(kpa_obs(float(t), 6, 4), float(t))
    d = p.decide(kpa_obs(60.0, 10, 4), 60.0)  # panic would want 6 pods: 1.5x < 2
    assert not p.panicking
    assert d.replicas == 4  # the stable average barely moved


# ---- llm-d saturation analyzer ----------------------------------------------------------------


def test_llmd_scales_up_one_when_all_saturated() -> None:
    p = LlmdSaturation(LIM)
    d = p.decide(obs([rm(i, 60, kv=0.85, span=60) for i in range(3)]), 60.0)
    assert d.replicas == 4


def test_llmd_queue_spare_trigger() -> None:
    p = LlmdSaturation(LIM)
    # queue 3 on each: spare 2 < 3 -> up, though KV is fine
    d = p.decide(obs([rm(i, 60, waiting=3, kv=0.2, span=60) for i in range(3)]), 60.0)
    assert d.replicas == 4


def test_llmd_holds_while_replicas_start() -> None:
    p = LlmdSaturation(LIM)
    d = p.decide(obs([rm(i, 60, kv=0.95) for i in range(3)], spec=4, starting=1), 60.0)
    assert d.replicas == 4


def test_llmd_scale_down_only_when_safe() -> None:
    p = LlmdSaturation(LIM)
    assert p.decide(obs([rm(i, 60, kv=0.1) for i in range(4)]), 60.0).replicas == 3
    # KV 0.5 on 4: after removal 0.667 -> spare 0.133 >= 0.1: safe
    assert p.decide(obs([rm(i, 60, kv=0.5) for i in range(4)]), 60.0).replicas == 3
    # KV 0.6 on 4: after removal 0.8 -> spare 0 < 0.1: keep 4
    assert p.decide(obs([rm(i, 60, kv=0.6) for i in range(4)]), 60.0).replicas == 4


def test_llmd_uses_peak_over_the_minute() -> None:
    p = LlmdSaturation(LIM)
    spike = Sample(30.0, 0, 0, 0.9, 0, 0.0)
    calm = tuple(Sample(float(t), 0, 0, 0.1, 0, 0.0) for t in range(31, 61))
    ready = [ReplicaMetrics(f"r{i}", (spike, *calm)) for i in range(2)]
    assert p.decide(obs(ready), 60.0).replicas == 3  # both saturated at the peak


# ---- kvpilot ----------------------------------------------------------------------------------


def state(i: int, now: float, waiting: int, kv: float) -> ReplicaState:
    return ReplicaState(
        f"r{i}", f"sim://r{i}", "sim", waiting=waiting, kv_usage=kv, observed_at=now
    )


def test_kvpilot_uses_the_controller_at_defaults() -> None:
    p = Kvpilot(LIM)
    assert p.config is not None and p.config.queue_target == 4.0 and p.config.forecast
    ready = [rm(i, 0, waiting=8) for i in range(2)]
    states = tuple(state(i, 0.0, 8, 0.5) for i in range(2))
    d = p.decide(FleetObservation(2, tuple(ready), states=states), 0.0)
    # saturation 2.0 on 2 replicas against a 0.6 utilization target: ceil(2 * 2 / 0.6) = 7,
    # plus the 10 % step margin = 8, limited to max(2 x 2, 2 + 4) = 6 in one period
    assert d.replicas == 6 and "rate-limited" in d.reason
    assert d.placeholders >= 0


def test_make_policy_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown autoscaling policy"):
        make_policy("vpa", 1, LIM)


def test_hpa_records_its_initial_recommendation() -> None:
    """Kubernetes' recordInitialRecommendation: a new HPA does not drop the size it found at
    its first decision, it waits out the scale-down window."""
    b = HpaBehavior(LIM)
    assert b.apply(4, 1, 60.0) == 4
    assert b.apply(4, 1, 300.0) == 4
    assert b.apply(4, 1, 361.0) == 1
