"""The fleet simulator: seeded traces, determinism, the real engine and picker inside, load
calibration, capacity search, and the `kvpilot sim` command line."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from gateway.picker import make_policy
from sim.calibrate import fleet_saturation_rate, replica_saturation_rate
from sim.cli import main
from sim.fleets import ReplicaSpec, parse_fleet
from sim.metrics import summarise
from sim.routing import find_capacity, mean_over_seeds
from sim.simulator import SimConfig, Simulation
from sim.slo import Slo, load_slos, slo_for
from sim.tokens import prefix_hashes, prompt_token_ids
from sim.traces import WORKLOADS, SimRequest, load_azure_csv, make_trace, rate_curve

FIXTURE = Path(__file__).parent / "fixtures" / "sim" / "azure_sample.csv"


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPILOT_SIM_CACHE", str(tmp_path / "calibration.json"))


# ---- traces -----------------------------------------------------------------------------


@pytest.mark.parametrize("workload", WORKLOADS)
def test_traces_are_seeded(workload: str) -> None:
    a = make_trace(workload, 4.0, 120, 7, trace_file=FIXTURE)
    b = make_trace(workload, 4.0, 120, 7, trace_file=FIXTURE)
    c = make_trace(workload, 4.0, 120, 8, trace_file=FIXTURE)
    assert a == b
    assert len(a) > 100
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:], strict=False))
    assert all(0 <= r.arrival_s < 120 for r in a)
    if workload != "azure":  # a replay is the file's, whatever the seed
        assert a != c
    assert 0.6 * 4.0 * 120 < len(a) < 1.4 * 4.0 * 120


def test_trace_shapes() -> None:
    pre = make_trace("prefill-heavy", 5, 200, 1)
    assert all(1024 <= r.prompt_tokens <= 8192 and r.output_tokens <= 128 for r in pre)
    dec = make_trace("decode-heavy", 5, 200, 1)
    assert all(r.prompt_tokens <= 256 and 500 <= r.output_tokens <= 2000 for r in dec)
    chat = make_trace("sharegpt", 5, 200, 1)
    prompts = sorted(r.prompt_tokens for r in chat)
    assert statistics.median(prompts) < statistics.mean(prompts)  # lognormal: a long tail
    mixed = make_trace("mixed-bursty", 5, 600, 1)
    assert {r.kind for r in mixed} == {"chat", "prefill", "decode"}
    # bursts: 30-second windows vary far more than a Poisson process's would
    counts = [sum(1 for r in mixed if i * 30 <= r.arrival_s < (i + 1) * 30) for i in range(20)]
    assert statistics.pvariance(counts) > 3 * statistics.mean(counts)
    curve = rate_curve(600, 1)
    assert abs(statistics.mean(curve(t + 0.5) for t in range(600)) - 1.0) < 0.05


def test_a_slower_rate_has_the_same_requests() -> None:
    fast = make_trace("sharegpt", 10, 100, 3)
    slow = make_trace("sharegpt", 5, 200, 3)
    n = min(len(fast), len(slow))
    assert [r.segments for r in fast[:n]] == [r.segments for r in slow[:n]]


def test_shared_prefix_shares_token_ids_and_hashes() -> None:
    trace = make_trace("shared-prefix", 5, 300, 1)
    by_group: dict[int, list[SimRequest]] = {}
    for r in trace:
        by_group.setdefault(r.segments[0][0], []).append(r)
    # more distinct system prompts than one L4's KV cache holds (~27k tokens for Llama-3.1-8B)
    distinct = {r.segments[0] for r in trace}
    assert sum(n for _, n in distinct) > 100_000
    group = max(by_group.values(), key=len)
    a, b = group[0], group[1]
    ia, ib = prompt_token_ids(a), prompt_token_ids(b)
    shared = a.segments[0][1]
    assert ia[:shared] == ib[:shared] and ia[shared : shared + 16] != ib[shared : shared + 16]
    ha, hb = prefix_hashes(ia), prefix_hashes(ib)
    assert ha[: shared // 16] == hb[: shared // 16]
    assert ha[shared // 16 + 1] != hb[shared // 16 + 1]
    # a later turn of a session extends its earlier prompt
    turns = [r for r in trace if len(r.segments) > 2]
    later = turns[0]
    earlier = next(
        r for r in trace if r.segments == later.segments[: len(r.segments)] and r is not later
    )
    assert prompt_token_ids(later)[: earlier.prompt_tokens] == prompt_token_ids(earlier)
    # unrelated prompts share no block
    other = next(r for r in trace if r.segments[0] != a.segments[0])
    assert prefix_hashes(prompt_token_ids(other))[0] != ha[0]


def test_azure_replay() -> None:
    rows = load_azure_csv(FIXTURE)
    assert len(rows) == 200 and rows[0].t == 0.0
    trace = make_trace("azure", 4.0, 100, 1, trace_file=FIXTURE)
    assert [r.prompt_tokens for r in trace[:5]] == [row.context_tokens for row in rows[:5]]
    assert [r.output_tokens for r in trace[:5]] == [row.generated_tokens for row in rows[:5]]
    with pytest.raises(ValueError, match="trace file"):
        make_trace("azure", 1.0, 10, 1)


def test_fleet_specs(tmp_path: Path) -> None:
    f = parse_fleet("6xl4+2xh100")
    assert [r.gpu for r in f.replicas] == ["l4"] * 6 + ["h100"] * 2
    assert parse_fleet("2xh100*2").replicas[0].num_gpus == 2
    y = tmp_path / "fleet.yaml"
    y.write_text(
        "model: llama-3.1-8b\nreplicas:\n  - {gpu: nvidia-l4, count: 3}\n  - {gpu: h100}\n"
    )
    assert [r.gpu for r in parse_fleet(str(y)).replicas] == ["l4", "l4", "l4", "h100"]
    with pytest.raises(ValueError, match="COUNTxGPU"):
        parse_fleet("eight l4")


def test_slo_targets(tmp_path: Path) -> None:
    s = Slo(ttft_s=1.0, ttft_per_1k_s=0.5, tpot_s=0.1)
    assert s.ttft_target(4000) == pytest.approx(3.0)
    assert "TTFT <= 1 s" in s.describe()
    p = tmp_path / "slo.yaml"
    p.write_text("sharegpt: {tpot_s: 0.2}\n")
    assert load_slos(p)["sharegpt"].tpot_s == 0.2
    assert load_slos(p)["sharegpt"].ttft_s == slo_for("sharegpt").ttft_s
    p.write_text("sharegpt: {tpot: 0.2}\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_slos(p)


# ---- the simulation ---------------------------------------------------------------------


def _run(
    policy: str,
    fleet: str = "4xl4",
    workload: str = "sharegpt",
    rate: float = 3.0,
    duration: float = 60,
    seed: int = 1,
):
    sim = Simulation(
        parse_fleet(fleet).replicas, make_policy(policy, seed=seed), SimConfig(seed=seed)
    )
    recs = sim.run(make_trace(workload, rate, duration, seed))
    return sim, recs


def test_small_simulation_is_deterministic() -> None:
    _, a = _run("power-of-two")
    _, b = _run("power-of-two")
    key = [(r.replica, r.first_token_s, r.finish_s, r.generated) for r in a]
    assert key == [(r.replica, r.first_token_s, r.finish_s, r.generated) for r in b]
    assert all(r.finish_s is not None and r.generated == r.req.output_tokens for r in a)
    assert len({r.replica for r in a}) == 4


def test_picks_follow_the_real_policy_and_engine_state() -> None:
    """One replica's KV cache is filled by traffic the gateway does not route: headroom (which
    reads KV usage) sends it far fewer requests than round-robin (which does not)."""
    hog = [
        SimRequest(f"hog{i}", 0.01 * i, ((5_000_000 + i, 3000),), 2000, None, "decode")
        for i in range(8)
    ]
    counts = {}
    for policy in ("round-robin", "headroom"):
        sim = Simulation(
            parse_fleet("4xl4").replicas, make_policy(policy, seed=1), SimConfig(seed=1)
        )
        trace = make_trace("sharegpt", 3.0, 40, 2)
        recs = sim.run(trace, direct=[("l4-0", h) for h in hog])
        routed = [r for r in recs if not r.direct]
        counts[policy] = sum(1 for r in routed if r.replica == "l4-0") / len(routed)
        kv = max(r.kv_max for r in sim.all_replicas() if r.replica_id == "l4-0")
        assert kv > 0.9  # the hog really filled the cache
    assert counts["round-robin"] == pytest.approx(0.25, abs=0.02)
    assert counts["headroom"] < 0.5 * counts["round-robin"]


def test_replicas_join_and_leave_mid_run() -> None:
    sim = Simulation(parse_fleet("2xl4").replicas, make_policy("round-robin"), SimConfig())
    new = sim.join(ReplicaSpec("h100"), at=20.0)
    sim.leave("l4-0", at=30.0)
    recs = sim.run(make_trace("sharegpt", 3.0, 60, 1))
    to_new = [r for r in recs if r.replica == new]
    assert to_new and min(r.dispatched_s for r in to_new) >= 20.0
    assert all(r.dispatched_s < 30.0 for r in recs if r.replica == "l4-0")
    assert all(r.finish_s is not None for r in recs)  # the leaving replica drained
    assert "l4-0" not in sim.replicas


def test_gateway_queues_when_the_policy_says_saturated() -> None:
    class Stingy:
        name = "stingy"

        def __init__(self) -> None:
            self.inner = make_policy("least-request")

        def pick(self, req, replicas, now):  # type: ignore[no-untyped-def]
            from gateway.picker import Decision

            busy = [v for v in replicas if v.inflight.requests >= 2]
            if len(busy) == len(replicas):
                return Decision(None, "saturated")
            return self.inner.pick(req, [v for v in replicas if v not in busy], now)

        def observe(self, *args: object) -> None:
            pass

    sim = Simulation(parse_fleet("2xl4").replicas, Stingy(), SimConfig())
    recs = sim.run(make_trace("sharegpt", 2.0, 20, 1))
    waited = [r.dispatched_s - r.req.arrival_s for r in recs]
    assert max(waited) > 1.0  # some requests waited at the gateway
    assert all(r.finish_s is not None for r in recs)


def test_load_calibration_is_per_replica_kind_and_cached(tmp_path: Path) -> None:
    l4 = replica_saturation_rate(ReplicaSpec("l4"), "sharegpt", completions=100, warmup=30)
    h100 = replica_saturation_rate(ReplicaSpec("h100"), "sharegpt", completions=100, warmup=30)
    assert h100 > 3 * l4 > 0
    one = fleet_saturation_rate(parse_fleet("1xl4"), "decode-heavy", completions=100)
    three = fleet_saturation_rate(parse_fleet("3xl4"), "decode-heavy", completions=100)
    assert three == pytest.approx(3 * one)
    cache = json.loads((tmp_path / "calibration.json").read_text())
    assert any("decode-heavy" in k for k in cache)
    # load 0.5 of it is served with room to spare; load 2 of it is not
    sat = fleet_saturation_rate(parse_fleet("2xl4"), "decode-heavy", completions=100)
    half = _run("least-request", "2xl4", "decode-heavy", 0.5 * sat, 300)
    double = _run("least-request", "2xl4", "decode-heavy", 2.0 * sat, 300)
    slo = slo_for("decode-heavy")
    assert summarise(*half, slo, 30).goodput_ratio > 0.9
    assert summarise(*double, slo, 30).goodput_ratio < 0.6


def test_capacity_bisection_on_a_toy() -> None:
    true_capacity = {"a": 0.73, "b": 1.9, "c": 0.0}
    calls = []

    def goodput(probes: list[tuple[str, float]]) -> dict[tuple[str, float], float]:
        calls.append(len(probes))
        return {(p, x): (1.0 if x <= true_capacity[p] else 0.5) for p, x in probes}

    caps = find_capacity(["a", "b", "c"], goodput, tolerance=0.02)
    assert caps["a"] == pytest.approx(0.73, abs=0.03) and caps["a"] <= 0.73
    assert caps["b"] == pytest.approx(1.9, abs=0.06) and caps["b"] <= 1.9
    assert caps["c"] == 0.0
    assert max(calls) == 3  # policies probe in lock step


def test_mean_over_seeds() -> None:
    rows = [
        {
            "workload": "w",
            "fleet": "f",
            "policy": "p",
            "load": 0.5,
            "seed": s,
            "goodput_ratio": g,
            "ttft_p99_s": t,
        }
        for s, g, t in ((1, 0.8, 2.0), (2, 1.0, 4.0))
    ]
    (row,) = mean_over_seeds(rows)
    assert row["goodput_ratio"] == pytest.approx(0.9) and row["ttft_p99_s"] == pytest.approx(3.0)
    assert row["seeds"] == [1, 2]


# ---- the command line -------------------------------------------------------------------


def test_cli_routing_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    rc = main(
        [
            "routing", "--workload", "sharegpt", "--fleet", "2xl4",
            "--policies", "round-robin,headroom", "--load", "0.3,0.6", "--seeds", "1,2",
            "--duration", "30", "--find-capacity", "--json", str(out), "--plot", str(png),
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "SLO: TTFT <=" in text and "| headroom |" in text
    doc = json.loads(out.read_text())
    loads = [r for r in doc["rows"] if r["kind"] == "load"]
    assert {(r["policy"], r["load"]) for r in loads} == {
        (p, x) for p in ("round-robin", "headroom") for x in (0.3, 0.6)
    }
    for r in loads:
        for k in (
            "workload",
            "fleet",
            "policy",
            "load",
            "goodput_ratio",
            "ttft_p99_s",
            "tpot_p99_s",
            "throughput_tok_s",
        ):
            assert r[k] is not None, k
        assert r["seeds"] == [1, 2]
    caps = [r for r in doc["rows"] if r["kind"] == "capacity"]
    assert {r["policy"] for r in caps} == {"round-robin", "headroom"}
    assert all(r["capacity_load"] >= 0 for r in caps)
    assert doc["meta"]["slo"]["tpot_s"] == slo_for("sharegpt").tpot_s
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["autoscale", "--help"])  # the autoscaling benchmark answers under `kvpilot sim`
    assert e.value.code == 0
    assert "kvpilot sim autoscale" in capsys.readouterr().out
    assert main(["routing", "--workload", "azure", "--policies", "gie"]) == 2
    assert main(["routing", "--workload", "sharegpt", "--fleet", "3 x l4 and more"]) == 2
    with pytest.raises(SystemExit):
        main(["routing", "--workload", "sharegpt", "--policies", "fastest"])


# ---- capacity probes stop early, with the same outcome ------------------------------------


def test_early_stop_gives_the_same_pass_fail_as_the_full_run() -> None:
    """An overloaded probe stops long before its drain ends, and only when the full run also
    ends under the bound; a comfortable probe runs to the end exactly as without the stop."""
    from sim.routing import Scenario, run_one, seed_stop_bound

    sc = Scenario("sharegpt", parse_fleet("2xl4"), slo_for("sharegpt"), duration_s=40.0)
    bound = seed_stop_bound(0.9, 3)
    assert bound == pytest.approx(0.7)
    for policy, load in (("round-robin", 2.0), ("headroom", 1.6), ("headroom", 0.4)):
        full = run_one(sc, policy, load, 1)
        fast = run_one(sc, policy, load, 1, bound)
        assert not full["stopped_early"]
        assert (full["goodput_ratio"] < bound) == fast["stopped_early"]
        if fast["stopped_early"]:
            # the bound it stopped at is an upper bound on the full run's goodput
            assert full["goodput_ratio"] <= fast["goodput_ratio"] < bound
            assert fast["sim_end_s"] < 40.0 + 300.0
        else:
            assert fast["goodput_ratio"] == full["goodput_ratio"]
            assert fast["ttft_p99_s"] == full["ttft_p99_s"]
    overloaded = run_one(sc, "round-robin", 2.0, 1, bound)
    assert overloaded["stopped_early"] and overloaded["sim_end_s"] < 40.0


def test_gateway_queue_releases_in_the_policys_queue_order() -> None:
    """Held requests go out in the policy's `queue_key` order (here newest first), as the
    gateway's queue does; without a key, in arrival order."""

    class OneAtATime:
        name = "one-at-a-time"

        def __init__(self, lifo: bool) -> None:
            self.inner = make_policy("least-request")
            if lifo:
                self.queue_key = lambda req, arrived, now: -arrived

        def pick(self, req, replicas, now):  # type: ignore[no-untyped-def]
            from gateway.picker import Decision

            if all(v.inflight.requests >= 1 for v in replicas):
                return Decision(None, "saturated")
            return self.inner.pick(req, replicas, now)

        def observe(self, *args: object) -> None:
            pass

    trace = [SimRequest(f"r{i}", 0.01 * i, ((100 + i, 100),), 50, None, "chat") for i in range(4)]
    for lifo, order in ((True, ["r0", "r3", "r2", "r1"]), (False, ["r0", "r1", "r2", "r3"])):
        sim = Simulation(parse_fleet("1xl4").replicas, OneAtATime(lifo), SimConfig())
        recs = sim.run(trace)
        assert [r.req.request_id for r in sorted(recs, key=lambda r: r.dispatched_s)] == order
        assert all(r.finish_s is not None for r in recs)
