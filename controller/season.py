"""The demand's daily shape, learned: yesterday's curve without its bursts, scaled to today.

Serving demand follows the day. A trend alone reads the morning ramp late (it must first see the
rise) and a burst as a ramp (it carries it over the whole lead time); GPU nodes take minutes, so
both cost either latency or GPUs. Once a whole period (`season_s`, a day by default) has been
seen, the pool's demand at the same time of the last periods says where it is going:

- the period is cut into `bins` (96: a quarter of an hour of a day); each bin keeps the mean
  demand seen in it, blended over days (`day_weight` for the newest day);
- the profile read back is a running median over `smooth_bins` neighbouring bins, so a burst
  yesterday (minutes long, at a random time) is not ordered again today;
- today's level against the profile (the median ratio of the last `recent_bins` bins to the
  same bins of the profile as it stood when the current period began; bins below 5 % of the
  profile's peak left out) scales the forecast, so a busier or quieter day than the last is
  followed, but not one burst.

Pure: fed plain numbers and `now` (seconds on any clock that advances with real time; the live
controller's wall clock puts bin 0 at 00:00 UTC). `state()` and `from_state()` carry it as plain
JSON-able data: the controller keeps it in a ConfigMap, so a new leader (a rollout, a failover)
goes on from it instead of learning a day again.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any

# A bin's reference below this share of the profile's largest bin gives no level ratio.
REF_FLOOR = 0.05
# A daily peak this far above the daily mean (a quarter) or more is a whole peak (peakness).
PEAK_RISE = 0.25


@dataclass
class DailyProfile:
    period_s: float = 86400.0
    bins: int = 96
    # Odd: the bin and 10 on each side (5 h of a day). A running median drops a bump narrower
    # than half its window: a burst plus its catch-up, ~10 bins where a day is compressed into
    # an hour as in `kvpilot sim autoscale`; at a real day's scale far less. It lowers a
    # cosine's peak by ~2 %, which the reactive size covers.
    smooth_bins: int = 21
    recent_bins: int = 24  # today's level: the median ratio over these many bins (6 h of a day)
    day_weight: float = 0.5  # the newest period's weight in a bin's blend
    ratio_bounds: tuple[float, float] = (0.5, 2.0)
    _profile: list[float | None] = field(default_factory=list)
    _smoothed: list[float] | None = None  # cache of the running median, None when stale
    # The profile's raw bins as of the start of the current period: today's level is read
    # against them, so today's bins never enter their own reference (raw, not smoothed: a
    # running median sits above a trough and below a peak; a burst on either day is one
    # outlier among `recent_bins` ratios).
    _reference: list[float | None] | None = None
    _first: int | None = None  # absolute index of the first bin ever closed: periods count from it
    _ref_period: int = 0  # the period the reference was taken at (0: none yet)
    _bin: int | None = None  # absolute index of the bin being accumulated
    _sum: float = 0.0
    _n: int = 0
    _ratios: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.bins < 1:
            raise ValueError("period_s must be > 0 and bins >= 1")
        self._profile = [None] * self.bins
        self._ratios = deque(maxlen=self.recent_bins)

    @property
    def bin_s(self) -> float:
        return self.period_s / self.bins

    @property
    def ready(self) -> bool:
        """A whole period has been seen (every bin has a value)."""
        return all(v is not None for v in self._profile)

    def update(self, value: float, now: float) -> None:
        """One demand sample (e.g. tokens/s) at `now`."""
        k = math.floor(now / self.bin_s)
        if self._bin is not None and k < self._bin:
            return  # the clock went back: ignore rather than corrupt a bin
        if self._bin is not None and k != self._bin:
            self._close()
        if self._bin != k:
            self._bin, self._sum, self._n = k, 0.0, 0
        self._sum += value
        self._n += 1

    def _close(self) -> None:
        assert self._bin is not None
        if self._n == 0:
            return
        mean = self._sum / self._n
        i = self._bin % self.bins
        if self._first is None:
            self._first = self._bin
        period = (self._bin - self._first) // self.bins
        if period > self._ref_period and self.ready:
            # The first bin closed in a new period (whichever: bins can be skipped while the
            # controller sees no replica) takes the reference for the period.
            self._reference, self._ref_period = list(self._profile), period
        ref = self._reference[i] if self._reference is not None else None
        if ref is not None and ref > REF_FLOOR * max(v or 0.0 for v in self._reference or ()):
            # Bins near zero (a quiet night, a pool at zero) say nothing about today's level:
            # one tail of a decaying average over another is any ratio at all.
            self._ratios.append(mean / ref)
        old = self._profile[i]
        self._profile[i] = mean if old is None else old + self.day_weight * (mean - old)
        self._smoothed = None

    def smoothed(self) -> list[float]:
        """The profile through a circular running median (bursts out, the day's shape kept)."""
        if self._smoothed is None:
            vals = [v or 0.0 for v in self._profile]
            h = self.smooth_bins // 2
            n = self.bins
            self._smoothed = [median(vals[(i + j) % n] for j in range(-h, h + 1)) for i in range(n)]
        return self._smoothed

    def level(self) -> float:
        """Today's demand against the profile: 1.0 = as on the days learned."""
        if not self._ratios:
            return 1.0
        lo, hi = self.ratio_bounds
        return min(hi, max(lo, median(self._ratios)))

    def forecast(self, at: float) -> float | None:
        """Demand expected at time `at`, or None until a whole period has been seen."""
        if not self.ready:
            return None
        return self._at(self.smoothed(), at) * self.level()

    def peakness(self, at: float) -> float:
        """Where the profile stands at time `at` between its daily mean (0) and its peak (1);
        0 at or below the mean, and until a whole period has been seen. A peak less than
        `PEAK_RISE` above the mean counts for that much less (a near-flat day has no peak to
        guard, and rounding on a flat one must not make one)."""
        if not self.ready:
            return 0.0
        s = self.smoothed()
        mean, peak = sum(s) / len(s), max(s)
        rise = peak - mean
        if rise <= 0:
            return 0.0
        weight = min(1.0, rise / (PEAK_RISE * mean))
        return weight * min(1.0, max(0.0, (self._at(s, at) - mean) / rise))

    def _at(self, s: list[float], at: float) -> float:
        """The smoothed profile `s` at time `at`, between the two nearest bins."""
        x = at / self.bin_s - 0.5  # bin values sit at their bins' middles
        i = math.floor(x)
        frac = x - i
        return s[i % self.bins] * (1 - frac) + s[(i + 1) % self.bins] * frac

    # ---- carried across controllers (a ConfigMap, controller/kube.py) -------------------------

    def state(self) -> dict[str, Any]:
        """Everything learned, as JSON-able data (the settings too, to check on the way back)."""
        return {
            "period_s": self.period_s,
            "bins": self.bins,
            "profile": list(self._profile),
            "reference": self._reference,
            "first": self._first,
            "ref_period": self._ref_period,
            "bin": self._bin,
            "sum": self._sum,
            "n": self._n,
            "ratios": list(self._ratios),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], period_s: float) -> DailyProfile:
        """A profile of `period_s` from `state()`; ValueError when it is not one, or one of
        another period or bin count (a changed `season_s` starts over: its bins would mean other
        times of day)."""
        p = cls(period_s)
        try:
            if float(d["period_s"]) != p.period_s or int(d["bins"]) != p.bins:
                raise ValueError(
                    f"a profile of {d['period_s']} s in {d['bins']} bins, not "
                    f"{p.period_s} s in {p.bins}"
                )
            profile = [_opt_float(v) for v in d["profile"]]
            ref = d["reference"]
            reference = None if ref is None else [_opt_float(v) for v in ref]
            if len(profile) != p.bins or (reference is not None and len(reference) != p.bins):
                raise ValueError("a profile with the wrong number of bins")
            p._profile, p._reference = profile, reference
            p._first = None if d["first"] is None else _int(d["first"])
            p._ref_period = _int(d["ref_period"])
            p._bin = None if d["bin"] is None else _int(d["bin"])
            p._sum, p._n = _float(d["sum"]), _int(d["n"])
            p._ratios.extend(_float(r) for r in d["ratios"])
        except (KeyError, TypeError, OverflowError) as e:
            raise ValueError(f"not a daily profile: {e!r}") from None
        return p


def _float(v: Any) -> float:
    """A finite number >= 0 (json.loads reads 1e400, Infinity and NaN too)."""
    x = float(v)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"a value of {v!r} in a saved profile")
    return x


def _opt_float(v: Any) -> float | None:
    return None if v is None else _float(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} where a saved profile has whole numbers")
    return v
