"""Rates and recent means from cumulative counters: the pure arithmetic in agent/rates.py."""

from __future__ import annotations

import pytest

from agent.rates import RateWindow, Totals, counter_rate, histogram_mean, hit_ratio


def test_counter_rate_is_delta_over_time() -> None:
    assert counter_rate(100.0, 300.0, 2.0) == 100.0


def test_counter_reset_counts_the_new_total_as_the_increase() -> None:
    # the server restarted: 1000 -> 40 means 40 new tokens, never a negative rate
    assert counter_rate(1000.0, 40.0, 1.0) == 40.0


def test_counter_rate_unknown_without_both_readings_or_time() -> None:
    assert counter_rate(None, 5.0, 1.0) is None
    assert counter_rate(1.0, 5.0, 0.0) is None


def test_histogram_mean_of_new_observations_only() -> None:
    # before: 10 requests totalling 5 s; after: 12 totalling 8 s -> the 2 new ones averaged 1.5 s
    assert histogram_mean(5.0, 10, 8.0, 12) == pytest.approx(1.5)
    assert histogram_mean(5.0, 10, 5.0, 10) is None  # nothing new
    assert histogram_mean(5.0, 10, 0.9, 3) == pytest.approx(0.3)  # reset: all since restart


def test_hit_ratio_from_query_and_hit_deltas() -> None:
    assert hit_ratio(100, 50, 300, 200) == pytest.approx(0.75)
    assert hit_ratio(100, 50, 100, 50) is None


def test_window_rates_span_the_window_and_keep_latency_when_idle() -> None:
    w = RateWindow(window_s=2.0)
    w.add(Totals(at=0.0, generation_tokens=0, ttft_sum=0, ttft_count=0))
    r = w.add(Totals(at=1.0, generation_tokens=100, ttft_sum=0.4, ttft_count=2))
    assert r.generation_tokens_per_s == pytest.approx(100.0)
    assert r.ttft_s == pytest.approx(0.2)
    for t in (2.0, 3.0, 4.0):  # idle: no tokens, no finished requests
        r = w.add(Totals(at=t, generation_tokens=100, ttft_sum=0.4, ttft_count=2))
    assert r.generation_tokens_per_s == 0.0
    assert r.ttft_s == pytest.approx(0.2)  # the last known mean stands


def test_window_forgets_readings_older_than_the_window() -> None:
    w = RateWindow(window_s=1.0)
    w.add(Totals(at=0.0, prompt_tokens=0))
    w.add(Totals(at=10.0, prompt_tokens=10_000))  # a burst long ago
    r = w.add(Totals(at=11.0, prompt_tokens=10_050))
    assert r.prompt_tokens_per_s == pytest.approx(50.0)


def test_clock_going_back_restarts_the_window() -> None:
    w = RateWindow(window_s=5.0)
    w.add(Totals(at=10.0, prompt_tokens=0))
    r = w.add(Totals(at=9.0, prompt_tokens=10))
    assert r.prompt_tokens_per_s == 0.0
