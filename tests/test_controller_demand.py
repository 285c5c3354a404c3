"""controller/demand.py's pure part: what a gateway's /metrics says of each pool's demand."""

from __future__ import annotations

from controller.demand import GatewayReading, PoolDemand, parse_gateway_metrics, pool_demand

# The shape `kvpilot gateway` serves with two workers (multiprocess mode: a `pid` per gauge).
TEXT = """\
# HELP kvpilot_gateway_queue_length Requests waiting for a replica.
# TYPE kvpilot_gateway_queue_length gauge
kvpilot_gateway_queue_length{pid="11",pool="llama"} 2.0
kvpilot_gateway_queue_length{pid="12",pool="llama"} 1.0
kvpilot_gateway_queue_length{pid="11",pool="qwen"} 0.0
# HELP kvpilot_gateway_requests_total Requests answered.
# TYPE kvpilot_gateway_requests_total counter
kvpilot_gateway_requests_total{code="200",model="m",pool="llama",replica="r1"} 40.0
kvpilot_gateway_requests_total{code="429",model="m",pool="llama",replica=""} 2.0
kvpilot_gateway_requests_total{code="200",model="q",pool="qwen",replica="r9"} 5.0
kvpilot_gateway_requests_total{code="404",model="nope",pool="",replica=""} 7.0
# HELP kvpilot_gateway_pick_seconds Pick time.
# TYPE kvpilot_gateway_pick_seconds histogram
kvpilot_gateway_pick_seconds_bucket{le="+Inf",pool="llama",policy="headroom"} 42.0
"""


def test_parse_sums_over_workers_models_and_codes() -> None:
    r = parse_gateway_metrics(TEXT, at=10.0)
    assert r.held == {"llama": 3.0, "qwen": 0.0}
    assert r.answered == {"llama": 42.0, "qwen": 5.0}  # no pool: not a pool's demand
    assert r.at == 10.0


def test_rate_from_two_readings_and_held_summed_over_gateways() -> None:
    before = {"a": GatewayReading(0.0, {"llama": 0}, {"llama": 100})}
    now = {
        "a": GatewayReading(10.0, {"llama": 1}, {"llama": 150}),
        "b": GatewayReading(10.0, {"llama": 2}, {"llama": 999}),  # new: held counts, rate not yet
    }
    assert pool_demand(before, now) == {"llama": PoolDemand(held=3, arrival_rate_rps=5.0)}


def test_a_restarted_gateway_counts_from_zero() -> None:
    before = {"a": GatewayReading(0.0, {}, {"llama": 500})}
    now = {"a": GatewayReading(10.0, {}, {"llama": 20})}  # counter went down: a restart
    assert pool_demand(before, now)["llama"].arrival_rate_rps == 2.0


def test_first_reading_has_no_rate() -> None:
    now = {"a": GatewayReading(5.0, {"llama": 0}, {"llama": 3})}
    assert pool_demand({}, now) == {"llama": PoolDemand(held=0, arrival_rate_rps=None)}
