"""How many replicas a pool should have: pure code, fed plain data and `now`.

Reactive part: the Kubernetes HPA algorithm on a per-replica *saturation* (max of queue, KV-cache
and batch against their targets), including its rules for missing metrics and not-ready replicas,
its tolerance, its scale-up rate limits and its scale-down stabilization window, held at a target
utilization below saturation 1 (headroom for bursts no new replica can start in time for). On
top: a panic mode (no scale-down during a sudden overload), optional scale to zero, a step margin
and a scale-down tolerance (fewer, larger actions), and a demand forecast (the pool's tokens/s
averaged over a minute, Holt's damped trend carried over the provisioning lead time, divided by
the learned capacity of a replica; once a day has been seen, the daily profile instead) that
raises the floor when demand trends up faster than nodes and replicas can start, and keeps the
pool from shrinking below what it will need. With the profile, a need above what it expects is
a spike: it grows only onto warm capacity until it has lasted `spike_hold_s`, since new nodes
would come after it has passed.

The live controller and the simulator call the same `ReplicaAutoscaler.decide(obs, now)`; the
autoscaler keeps only its own small history (recommendations, scale-ups, forecast state).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.season import DailyProfile
from kvpilot.config import PoolScalingConfig
from kvpilot.signals import ReplicaState

# Pending replicas go only after the placed ones alone have covered the need this long: a
# burst's tail swings around the target, and dropping and re-ordering on each swing would trade
# the window's waste for a flapping size (35-49 actions a day instead of 11-12 in the simulated
# day when they went on the first covered decision).
PENDING_HOLD_S = 60.0


@dataclass(frozen=True)
class PoolObservation:
    """What the controller knows about one pool at one moment."""

    current_replicas: int  # the workload's spec.replicas
    states: Sequence[ReplicaState] = ()  # latest state per replica from the agents
    held_requests: int = 0  # requests a gateway is holding for this pool (scale from zero)
    arrival_rate_rps: float | None = None  # requests/s, when a gateway reports it
    # The workload's pods in phase Pending (no node yet): the HPA's "unready" pods, set aside
    # when scaling down and counted idle when scaling up (not "missing" like a pod that runs
    # without metrics, which is assumed at target when scaling down).
    pending_replicas: int = 0
    # Replicas that can start without a new node: the pool's placeholder pods on nodes that
    # are up (a replica preempts one at once). What a spike may take before it has lasted
    # `spike_hold_s`. None: not known (no placeholders kept, local mode): no spike cap.
    spare_replicas: int | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    reason: str
    saturation: float | None = None  # mean over replicas with fresh metrics
    ready: int = 0  # replicas with fresh metrics
    panic: bool = False
    reactive: int | None = None  # HPA-style recommendation before limits
    forecast: int | None = None  # replicas the forecast asks for at now + lead time
    demand_level: float | None = None  # today against the daily profile; None: no day seen yet

    @property
    def changed(self) -> bool:
        return self.desired != self.current


def saturation(s: ReplicaState, cfg: PoolScalingConfig) -> float:
    """1.0 = the replica is exactly at its targets; above = over."""
    return max(
        s.waiting / cfg.queue_target, s.kv_usage / cfg.kv_target, s.running / cfg.batch_target
    )


def hpa_replicas(
    current: int,
    ready_ratios: Sequence[float],
    *,
    missing: int = 0,
    unready: int = 0,
    tolerance: float = 0.1,
) -> int:
    """The HPA's replica calculation for one metric, as in Kubernetes' replica_calculator.go.

    ready_ratios: metric / target for each ready replica with metrics. Missing-metric replicas are
    assumed at the target (ratio 1) when scaling down and at 0 when scaling up; not-ready replicas
    at 0, and only when scaling up. If that reverses the direction or lands within the tolerance,
    the current count is kept: missing data never causes a scale-down.
    """
    if not ready_ratios:
        return current
    n_ready = len(ready_ratios)
    ratio = sum(ready_ratios) / n_ready
    scale_up_with_unready = unready > 0 and ratio > 1.0
    if not scale_up_with_unready and missing == 0:
        if abs(1.0 - ratio) <= tolerance:
            return current
        return math.ceil(ratio * n_ready)
    total = sum(ready_ratios)
    count = n_ready
    if missing and ratio != 1.0:
        # At exactly 1.0 Kubernetes leaves missing pods out (neither direction to guard).
        total += missing * (1.0 if ratio < 1.0 else 0.0)
        count += missing
    if scale_up_with_unready:
        count += unready  # at 0
    new_ratio = total / count
    if (
        abs(1.0 - new_ratio) <= tolerance
        or (ratio < 1.0 and new_ratio > 1.0)
        or (ratio > 1.0 and new_ratio < 1.0)
    ):
        return current
    new = math.ceil(new_ratio * count)
    if (new_ratio < 1.0 and new > current) or (new_ratio > 1.0 and new < current):
        return current
    return new


@dataclass
class Ewma:
    """Exponentially weighted moving average in continuous time (time constant `tau_s`), so that
    samples at any cadence (every scrape, or every decision) smooth the same way."""

    tau_s: float
    value: float | None = None
    last_t: float | None = None

    def update(self, x: float, now: float) -> float:
        if self.value is None or self.last_t is None:
            self.value, self.last_t = x, now
            return x
        dt = now - self.last_t
        if dt > 0:
            a = 1.0 - math.exp(-dt / self.tau_s) if self.tau_s > 0 else 1.0
            self.value += a * (x - self.value)
            self.last_t = now
        return self.value


@dataclass
class Holt:
    """Holt's double exponential smoothing: a level and a trend, for forecasting demand. With a
    finite `damping_s` the trend fades with that time constant over the horizon (Gardner's damped
    trend), so a short rise is not carried at full slope over a long lead time."""

    alpha: float = 0.5
    beta: float = 0.3
    damping_s: float = math.inf
    level: float | None = None
    trend: float = 0.0  # per second
    last_t: float | None = None

    def update(self, value: float, now: float) -> None:
        if self.level is None or self.last_t is None:
            self.level, self.last_t = value, now
            return
        dt = now - self.last_t
        if dt <= 0:
            return
        predicted = self.level + self._carry(dt)
        level = self.alpha * value + (1 - self.alpha) * predicted
        self.trend = self.beta * (level - self.level) / dt + (1 - self.beta) * self.trend
        self.level, self.last_t = level, now

    def _carry(self, horizon_s: float) -> float:
        if math.isinf(self.damping_s):
            return self.trend * horizon_s
        return self.trend * self.damping_s * (1.0 - math.exp(-horizon_s / self.damping_s))

    def forecast(self, horizon_s: float) -> float | None:
        if self.level is None:
            return None
        return max(0.0, self.level + self._carry(horizon_s))


@dataclass
class ReplicaAutoscaler:
    """One pool's autoscaler. `decide(obs, now)` is deterministic given the calls before it.

    `observe(states, now)` may be called between decisions (every agent update) so the demand
    average sees every scrape; `decide` observes its own states too.
    """

    cfg: PoolScalingConfig
    _recs: deque[tuple[float, int]] = field(default_factory=deque)
    # Our own scale events, (time, replicas added; negative: removed), as the HPA keeps them:
    # the scale-up limit is taken from the size at the start of the period,
    # current - added + removed.
    _changes: deque[tuple[float, int]] = field(default_factory=deque)
    # A scale decided but not yet seen applied: (time, from, to). It counts only once `current`
    # shows it happened (not in dry-run, not after a failed write).
    _asked: tuple[float, int, int] | None = None
    _panic_until: float = -math.inf
    _busy_at: float | None = None  # last time the pool had any work
    _tokens: Ewma | None = None  # pool tokens/s (prompt + generation), smoothed
    _load: Ewma | None = None  # pool saturation (sum over replicas), smoothed the same way
    _demand: Holt | None = None  # level and trend of the smoothed tokens/s
    _season: DailyProfile | None = None  # the smoothed tokens/s by time of day
    _by_profile: bool = False  # the last forecast was the daily profile's (not the trend's)
    _spike_since: float | None = None  # since when the need runs above the daily profile's
    _covered_since: float | None = None  # since when the placed replicas alone cover the need
    _capacity: float | None = None  # tokens/s one replica serves at saturation 1, learned
    _observed_at: float | None = None
    _first_observed: float | None = None

    def __post_init__(self) -> None:
        cfg = self.cfg
        self._tokens = Ewma(cfg.demand_window_s)
        self._load = Ewma(cfg.demand_window_s)
        self._demand = Holt(cfg.trend_alpha, cfg.trend_beta, cfg.trend_damping_s)
        if cfg.forecast and cfg.season_s > 0:
            self._season = DailyProfile(cfg.season_s)
        if cfg.capacity_tokens_per_s > 0:
            self._capacity = cfg.capacity_tokens_per_s

    def with_settings(self, cfg: PoolScalingConfig) -> ReplicaAutoscaler:
        """A new autoscaler for new settings that keeps this one's scaling history (its
        stabilization window, rate-limit period, panic and idle clocks), so a config edit does
        not act as a fresh start; the forecast learns again under the new settings, except the
        daily profile, which took a day to learn and stays while its period does."""
        new = ReplicaAutoscaler(cfg)
        new._recs, new._changes, new._asked = deque(self._recs), deque(self._changes), self._asked
        new._panic_until, new._busy_at = self._panic_until, self._busy_at
        new._spike_since = self._spike_since  # a config edit does not restart a spike's hold
        old = self._season
        if new._season is not None and old is not None and old.period_s == new._season.period_s:
            new._season = old
        return new

    def season_state(self) -> dict[str, Any] | None:
        """The daily profile learned so far, as plain data (None: no profile kept)."""
        return self._season.state() if self._season is not None else None

    def restore_season(self, state: dict[str, Any]) -> None:
        """Go on from a profile another controller learned (`season_state`); ValueError when it
        is not one of this pool's period, and the profile stays as it was."""
        if self._season is None:
            raise ValueError("no daily profile kept (forecast off or season_s 0)")
        self._season = DailyProfile.from_state(state, self.cfg.season_s)

    def observe(self, states: Sequence[ReplicaState], now: float) -> None:
        """Fold one set of replica states into the smoothed demand (no decision)."""
        cfg = self.cfg
        if not cfg.forecast or (self._observed_at is not None and now <= self._observed_at):
            return
        fresh = [s for s in states if s.healthy and s.age(now) <= cfg.stale_after_s]
        if not fresh:
            return
        self._observed_at = now
        if self._first_observed is None:
            self._first_observed = now
        assert self._tokens is not None and self._load is not None
        self._tokens.update(
            sum(s.prompt_tokens_per_s + s.generation_tokens_per_s for s in fresh), now
        )
        self._load.update(sum(saturation(s, cfg) for s in fresh), now)

    def decide(self, obs: PoolObservation, now: float) -> Decision:
        cfg = self.cfg
        current = obs.current_replicas
        fresh = [s for s in obs.states if s.healthy and s.age(now) <= cfg.stale_after_s]
        unhealthy = sum(1 for s in obs.states if not s.healthy)
        busy = obs.held_requests > 0 or any(
            s.waiting or s.running or s.generation_tokens_per_s > 0 for s in fresh
        )
        if busy or self._busy_at is None:
            self._busy_at = now

        floor = max(1, cfg.min_replicas)
        if current == 0:
            if self._season is not None:
                # A pool at zero serves nothing: its night is part of the day's shape too
                # (without it the profile would never see a whole day).
                self._season.update(0.0, now)
            if not cfg.scale_to_zero:
                return self._finish(now, floor, current, "below min_replicas")
            if obs.held_requests > 0 or (obs.arrival_rate_rps or 0) > 0:
                return self._finish(now, floor, current, "scale from zero")
            return Decision(0, 0, "scaled to zero, no demand")

        if not fresh:
            # All agents down or every replica still starting: hold the current size (within
            # min/max, as the HPA does).
            held = min(cfg.max_replicas, max(current, floor))
            return Decision(held, current, "no fresh metrics; holding", ready=0)

        sats = [saturation(s, cfg) for s in fresh]
        mean_sat = sum(sats) / len(sats)
        self.observe(obs.states, now)
        self._learn(len(fresh), now)
        pending = min(max(0, obs.pending_replicas), current)
        missing = max(0, current - len(fresh) - unhealthy - pending)
        # The HPA on saturation against the target utilization (headroom for bursts a new
        # replica cannot start in time for).
        ratios = [x / self._utilization(now) for x in sats]
        reactive = hpa_replicas(
            current, ratios, missing=missing, unready=unhealthy + pending, tolerance=cfg.tolerance
        )
        if mean_sat >= cfg.panic_threshold:
            self._panic_until = now + cfg.panic_hold_s
        panic = now < self._panic_until

        forecast = self._forecast_replicas(now)
        raw = reactive
        reason = f"saturation {mean_sat:.2f} over {len(fresh)} replicas"
        if forecast is not None and forecast > raw and (missing == 0 or forecast > current):
            by = "daily profile" if self._by_profile else "trend"
            raw, reason = forecast, f"forecast {forecast} replicas in {cfg.lead_time_s:.0f}s ({by})"
        if raw > current and self._margin() > 0:
            # Step past the need: on the trend a rise is usually a ramp it is late for, which
            # goes on rising (and the next step up comes later: fewer, larger actions).
            raw = math.ceil(raw * (1 + self._margin()))
        cap = self._spike_cap(max(reactive, forecast or 0), current, obs.spare_replicas, now)
        if cap is not None and raw > cap:
            raw = cap
            forecast = min(forecast, cap) if forecast is not None else None
            reason += f"; above the daily profile: {cap} without new nodes for now"
        to_zero = False
        if cfg.scale_to_zero and cfg.min_replicas == 0 and not busy:
            idle_for = now - (self._busy_at or now)
            if idle_for >= cfg.idle_before_zero_s:
                raw, reason, to_zero = 0, f"idle for {idle_for:.0f}s", True
        # Are the placed replicas alone enough (the recommendation without the Pending ones,
        # and the forecast)? For how long, is what lets Pending replicas go.
        placed = current - pending
        need = reactive
        if pending:
            need = hpa_replicas(
                placed, ratios, missing=missing, unready=unhealthy, tolerance=cfg.tolerance
            )
        if not pending or max(need, forecast or 0, floor) > placed:
            self._covered_since = None
        elif self._covered_since is None:
            self._covered_since = now
        drop_to = None
        if (
            self._covered_since is not None
            and now - self._covered_since >= PENDING_HOLD_S
            # Only when no ramp is coming: the daily profile knows (Pending replicas it does not
            # ask for are a passed burst's); on the trend alone, only while it is not rising
            # (replicas ordered early in a ramp look just as unneeded for a while: dropping
            # them cost a first day 4 % of its SLO).
            and (self._by_profile or self._rising() is False)
            and not panic
            and raw <= current
        ):
            drop_to = placed
        d = self._finish(now, raw, current, reason, panic=panic, to_zero=to_zero, drop_to=drop_to)
        level = self._season.level() if self._season and self._season.ready else None
        return Decision(
            d.desired, current, d.reason, mean_sat, len(fresh), panic, reactive, forecast, level
        )

    # --- internals ---------------------------------------------------------------------------

    def _finish(
        self,
        now: float,
        raw: int,
        current: int,
        reason: str,
        *,
        panic: bool = False,
        to_zero: bool = False,
        drop_to: int | None = None,
    ) -> Decision:
        cfg = self.cfg
        self._confirm(current)
        if not self._recs and cfg.scale_down_stabilization_s > 0:
            # The HPA's initial recommendation: the size found at start counts in the window,
            # so a fresh autoscaler (start, failover, new settings) waits it out before
            # scaling down instead of acting on its first sample.
            self._recs.append((now, current))
        # Zero only through the idle rule: a low saturation alone keeps one replica.
        floor = 0 if to_zero else max(1, cfg.min_replicas)
        raw = min(cfg.max_replicas, max(floor, raw))
        # Scale-down stabilization: the highest recommendation within the window wins.
        self._recs.append((now, raw))
        while self._recs and self._recs[0][0] < now - cfg.scale_down_stabilization_s:
            self._recs.popleft()
        desired = current
        if raw > current:
            desired = min(raw, self._up_limit(now, current))
            if desired < raw:
                reason += f"; rate-limited to {desired}"
        elif raw < current:
            # To zero only after idle_before_zero_s of no work: that wait is its stabilization.
            window_max = 0 if to_zero else max(r for _, r in self._recs)
            desired = min(current, window_max)
            if panic:
                desired, reason = current, reason + "; panic mode holds"
            elif desired == current and raw < current:
                reason += f"; stabilizing at {desired}"  # the window holds the size
            elif desired > math.floor(current * (1 - cfg.scale_down_tolerance)):
                # Hysteresis: step down only for a real drop, in one action, not one replica
                # at a time as the window's maximum decays.
                desired, reason = current, reason + "; within scale-down tolerance"
            elif desired > raw:
                reason += f"; stabilizing at {desired}"
        if drop_to is not None and drop_to < desired:
            # Pending replicas serve nothing and hold no node yet: once the placed ones have
            # covered the need for PENDING_HOLD_S, those ordered for a burst that has passed go
            # now, not after the window or within the tolerance (both are there for serving
            # capacity, which they are not).
            reason += f"; {desired - drop_to} pending replicas no longer needed"
            desired = drop_to
        if desired > cfg.max_replicas:
            # Above max (max lowered, or a manual scale): no hold keeps it there.
            desired = cfg.max_replicas
            reason += f"; capped at max_replicas {cfg.max_replicas}"
        if desired != current:
            self._asked = (now, current, desired)
        return Decision(desired, current, reason)

    def _spike_cap(self, need: int, current: int, spare: int | None, now: float) -> int | None:
        """The most replicas a scale-up may ask for now (None: no cap).

        Once the daily profile forecasts, new GPU nodes are worth what it asks for at the lead
        time, when a node ordered now would serve. A need beyond that and beyond the spare
        replicas (placeholders already on nodes) is a spike: a burst of minutes is over before
        new nodes serve, and each then bills its provisioning and Cluster Autoscaler's 10
        minutes once empty, for nothing. So the pool grows only to max(current + spare, the
        profile's need at the lead time), and the forecast is capped the same way, until the
        need (the reactive size or the forecast, whichever is more) has stood beyond that for
        `spike_hold_s`: then it is a level, the profile is wrong for today, and it is ordered
        in full. Once the pool has caught up, the next rise beyond the cap waits anew. No cap
        on the trend alone (no day seen yet: a spike cannot be told from a ramp), nor where
        spare replicas are not known."""
        cfg = self.cfg
        expected = self._profile_replicas(now)
        if cfg.spike_hold_s <= 0 or spare is None or expected is None:
            self._spike_since = None
            return None
        cap = max(current + max(0, spare), expected)
        if need > cap:
            if self._spike_since is None:
                self._spike_since = now
        else:
            self._spike_since = None
        if self._spike_since is not None and now - self._spike_since >= cfg.spike_hold_s:
            return None
        return cap

    def _profile_replicas(self, now: float) -> int | None:
        """Replicas the daily profile asks for at the lead time, when a node ordered now would
        serve: what new nodes are worth (None: no day seen yet, or no capacity learned). Not
        what it asks for now: on the evening's way down that is more than the nodes would
        find to do when they come."""
        if not self._profiled():
            return None
        assert self._season is not None
        at = now + self.cfg.lead_time_s
        return self._replicas((self._season.forecast(at) or 0.0) / self._utilization(at))

    def _replicas(self, need: float) -> int:
        """Replicas for `need`, a demand already divided by the utilization held (tokens/s at
        saturation 1), at the learned capacity; within `tolerance` of a whole replica rounds
        down."""
        assert self._capacity
        return math.ceil(need / self._capacity - self.cfg.tolerance)

    def _profiled(self) -> bool:
        """Whether the daily profile forecasts: a whole day seen, and a replica's capacity
        known to turn its demand into replicas (after a restore or a settings reload the
        capacity is learned again first; until then the trend's settings hold)."""
        return self._season is not None and self._season.ready and bool(self._capacity)

    def _utilization(self, at: float) -> float:
        """The saturation held at time `at`. On the trend alone, `target_utilization` (a ramp
        eats the headroom until the trend sees it: 0.7 there cost a first simulated day 14 % of
        its SLO on one seed). Once the daily profile forecasts (it orders a ramp before it
        starts, so the headroom is for bursts alone), `profile_utilization` up to the profile's
        daily mean, then linearly down to `peak_utilization` at its peak: after two days
        learned, the pool sat at 0.7 right at the peak, where a ×1.7 burst of 5 minutes took a
        simulated day to 86 % (nodes come too late for it; only replicas already serving help)."""
        cfg = self.cfg
        if not self._profiled():
            return cfg.target_utilization
        assert self._season is not None
        high = cfg.profile_utilization
        low = min(high, cfg.peak_utilization)
        return high - self._season.peakness(at) * (high - low)

    def _margin(self) -> float:
        """The step past the need on a scale-up: `scale_up_margin` on the trend alone, none
        once the daily profile sizes the ramp itself (there 10 % cost ~0.8 GPU-h of a
        simulated day's ~12, for fewer actions kvpilot does not need: ~10 against the
        baselines' 70-80; on the trend alone, without it a first day lost 1.4 % of its SLO)."""
        return 0.0 if self._profiled() else self.cfg.scale_up_margin

    def _rising(self) -> bool | None:
        """Whether the demand trend is up (None: no trend learned yet)."""
        if self._demand is None or self._demand.level is None:
            return None
        return self._demand.trend > 0

    def _confirm(self, current: int) -> None:
        if self._asked is None:
            return
        t, before, to = self._asked
        self._asked = None
        if to > before and current > before:
            self._changes.append((t, min(current, to) - before))
        elif to < before and current < before:
            self._changes.append((t, max(current, to) - before))

    def _up_limit(self, now: float, current: int) -> int:
        cfg = self.cfg
        while self._changes and self._changes[0][0] <= now - cfg.scale_up_period_s:
            self._changes.popleft()
        start = current - sum(n for _, n in self._changes)  # the size at the period's start
        by_percent = math.ceil(start * (1 + cfg.scale_up_percent / 100))
        return max(by_percent, start + cfg.scale_up_pods, current)

    def _learn(self, n_fresh: int, now: float) -> None:
        cfg = self.cfg
        if not cfg.forecast or self._tokens is None or self._tokens.value is None:
            return
        assert self._demand is not None and self._load is not None
        if self._first_observed is None or now - self._first_observed < cfg.demand_window_s:
            return  # the averages are still filling: a "trend" now is only their warm-up
        tokens, load = self._tokens.value, self._load.value or 0.0
        self._demand.update(tokens, now)
        if self._season is not None:
            self._season.update(tokens, now)
        # Capacity = tokens/s per unit of saturation, from the two smoothed sums: learned only
        # while replicas are busy enough for throughput to say something about their limit, and
        # slowly, so one burst or one idle minute does not move it much. "Busy enough" means
        # near the utilization held, not merely busy: saturation grows faster than throughput
        # as a replica fills (each step takes longer with a bigger batch), so a lightly loaded
        # pool (the night) reads ~15 % more tokens per unit of saturation than a replica serves
        # at 0.65, and a forecast divided by that asks too few replicas at the start of a ramp.
        # Nor while overloaded: past saturation 1 the waiting queue (and with it saturation)
        # grows with the backlog while tokens/s stays at the replicas' limit; a burst's backlog
        # once taught a simulated pool a fifth of its real capacity, and the forecast then held
        # max_replicas all day (too idle to learn it back).
        in_band = cfg.capacity_min_saturation <= load / n_fresh <= cfg.capacity_max_saturation
        if load > 0 and tokens > 0 and in_band:
            est = tokens / load
            if self._capacity is None:
                self._capacity = est
            else:
                self._capacity += cfg.capacity_learn_rate * (est - self._capacity)

    def _forecast_replicas(self, now: float) -> int | None:
        if not self.cfg.forecast or not self._capacity or self._demand is None:
            return None
        # The daily profile once a whole day has been seen (it knows the ramp before it
        # starts, and does not carry a burst); until then Holt's damped trend.
        at = now + self.cfg.lead_time_s
        demand = None
        if self._season is not None:
            demand = self._season.forecast(at)
        self._by_profile = demand is not None
        if demand is None:
            demand = self._demand.forecast(self.cfg.lead_time_s)
        if demand is None:
            return None
        # What the pool serves now, or what it will serve at the lead time, whichever asks for
        # more, each at the utilization held at its own time.
        need = max(
            demand / self._utilization(at), (self._demand.level or 0.0) / self._utilization(now)
        )
        # Never more than max_replicas: placeholders for replicas that may not exist waste GPUs.
        return min(self.cfg.max_replicas, self._replicas(need))
