"""Every routing policy on hand-built fleets: each baseline behaves as its source, headroom as designed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.estimate import Estimator, RequestFeatures
from gateway.inflight import InFlight, InFlightLedger
from gateway.picker import (
    POLICY_NAMES,
    RateSeed,
    ReplicaView,
    make_policy,
    rate_seed_for,
    rate_seed_from_perf,
)
from kvpilot.signals import ReplicaState

EST = Estimator()
L4 = RateSeed(prefill_tokens_per_s=4_000, decode_step_s=0.060, decode_step_base_s=0.050)
H100 = RateSeed(prefill_tokens_per_s=30_000, decode_step_s=0.012, decode_step_base_s=0.008)


def req(
    rid: str = "q", prompt: int = 256, out: int = 128, hashes: tuple[int, ...] = ()
) -> RequestFeatures:
    return EST.features_from_tokens(rid, "m", prompt, hashes, max_tokens=out)


def state(
    rid: str,
    *,
    waiting: int = 0,
    running: int = 0,
    kv: float = 0.0,
    blocks: int = 10_000,
    at: float = 100.0,
    healthy: bool = True,
) -> ReplicaState:
    return ReplicaState(
        replica_id=rid,
        address=f"http://{rid}",
        pool="p",
        waiting=waiting,
        running=running,
        kv_usage=kv,
        kv_blocks_total=blocks,
        observed_at=at,
        healthy=healthy,
    )


def view(rid: str, inflight: InFlight | None = None, **kw) -> ReplicaView:
    profile = kw.pop("profile", None)
    ejected = kw.pop("ejected", False)
    return ReplicaView(rid, state(rid, **kw), inflight or InFlight(), ejected, profile)


def test_make_policy_knows_every_name_and_refuses_others() -> None:
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="headroom"):
        make_policy("fastest")


def test_no_replicas_gives_none() -> None:
    for name in POLICY_NAMES:
        d = make_policy(name).pick(req(), [], 100.0)
        assert d.replica_id is None and d.reason == "no-replicas"


# -- the classic balancers --------------------------------------------------------------------


def test_round_robin_cycles_over_usable_replicas() -> None:
    pol = make_policy("round-robin")
    views = [view("a"), view("b", ejected=True), view("c"), view("d", healthy=False)]
    picks = [pol.pick(req(), views, 100.0).replica_id for _ in range(6)]
    assert picks == ["a", "c", "a", "c", "a", "c"]


def test_random_is_seeded() -> None:
    views = [view(c) for c in "abcdefgh"]
    run1 = [make_policy("random", seed=7).pick(req(), views, 0).replica_id for _ in range(1)]
    p1, p2 = make_policy("random", seed=7), make_policy("random", seed=7)
    run1 = [p1.pick(req(), views, 0).replica_id for _ in range(20)]
    run2 = [p2.pick(req(), views, 0).replica_id for _ in range(20)]
    assert run1 == run2 and len(set(run1)) > 3


def test_least_request_picks_the_fewest_in_flight() -> None:
    pol = make_policy("least-request")
    views = [
        view("a", InFlight(requests=3)),
        view("b", InFlight(requests=1)),
        view("c", InFlight(requests=2)),
    ]
    assert pol.pick(req(), views, 0).replica_id == "b"


def test_power_of_two_keeps_the_lighter_of_its_two_samples() -> None:
    pol = make_policy("power-of-two", seed=3, debug=True)
    views = [
        view("a", InFlight(requests=9)),
        view("b", InFlight(requests=1)),
        view("c", InFlight(requests=5)),
    ]
    seen = set()
    for _ in range(200):
        d = pol.pick(req(), views, 0)
        assert d.scores is not None and len(d.scores) == 2
        assert d.replica_id in d.scores and d.scores[d.replica_id] == min(d.scores.values())
        seen.add(d.replica_id)
    assert seen == {"b", "c"}  # the heaviest can never win a pair


# -- gie ---------------------------------------------------------------------------------------


def test_gie_picks_the_highest_weighted_score() -> None:
    pol = make_policy("gie", debug=True)
    views = [
        view("a", waiting=0, kv=0.6),
        view("b", waiting=2, kv=0.1),
        view("c", waiting=4, kv=0.0),
    ]
    d = pol.pick(req(), views, 0)
    # queue min-max (x2): a 1, b 0.5, c 0; kv 1-usage (x2): 0.4, 0.9, 1.0; no prefix yet
    assert d.scores == pytest.approx({"a": 2.8, "b": 2.8, "c": 2.0})
    assert d.replica_id in ("a", "b") and d.reason == "highest-score"


def test_gie_saturation_filter_and_fail_open() -> None:
    pol = make_policy("gie")
    views = [
        view("a", waiting=0, kv=0.85),
        view("b", waiting=4, kv=0.5),
        view("c", waiting=7, kv=0.0),
    ]
    # a (KV >= 0.8) and c (queue >= 5) are filtered though they score best on one axis each
    assert pol.pick(req(), views, 0).replica_id == "b"
    saturated = [view("a", waiting=5, kv=0.2), view("b", waiting=9, kv=0.9)]
    d = pol.pick(req(), saturated, 0)
    assert d.replica_id == "a" and d.reason == "fail-open"


def test_gie_prefix_index_is_updated_with_each_pick() -> None:
    pol = make_policy("gie", seed=1)
    views = [view(c) for c in "abcd"]
    hashes = tuple(range(100, 120))
    first = pol.pick(req("1", 320, hashes=hashes), views, 0).replica_id
    for i in range(10):
        assert pol.pick(req(str(i), 320, hashes=hashes), views, 0).replica_id == first
    # a longer queue on the holder (min-max: 0 vs 1, x2) is outweighed by the prefix (1, x3)
    views = [view(c, waiting=3 if c == first else 0) for c in "abcd"]
    assert pol.pick(req("x", 320, hashes=hashes), views, 0).replica_id == first


def test_gie_ties_are_broken_at_random() -> None:
    pol = make_policy("gie", seed=5)
    views = [view(c) for c in "abcd"]
    assert len({pol.pick(req(str(i)), views, 0).replica_id for i in range(40)}) == 4


# -- cache-aware -------------------------------------------------------------------------------


def test_cache_aware_routes_to_the_prefix_holder_when_balanced() -> None:
    pol = make_policy("cache-aware")
    views = [view(c) for c in "abc"]
    hashes = tuple(range(10))
    first = pol.pick(req("1", 160, hashes=hashes), views, 0)
    assert first.reason == "smallest-tree"
    again = pol.pick(req("2", 160, hashes=hashes), views, 0)
    assert again.replica_id == first.replica_id and again.reason == "prefix-affinity"


def test_cache_aware_needs_30_percent_match_else_smallest_tree() -> None:
    pol = make_policy("cache-aware")
    views = [view(c) for c in "abc"]
    holder = pol.pick(req("1", 160, hashes=tuple(range(10))), views, 0).replica_id
    # 2 of 10 blocks shared (20 %): not enough, goes to an empty tree
    d = pol.pick(req("2", 160, hashes=(0, 1, *range(50, 58))), views, 0)
    assert d.replica_id != holder and d.reason == "smallest-tree"


def test_cache_aware_goes_least_loaded_when_imbalanced() -> None:
    pol = make_policy("cache-aware")
    hashes = tuple(range(10))
    views = [view("a"), view("b"), view("c")]
    holder = pol.pick(req("1", 160, hashes=hashes), views, 0).replica_id
    loads = {"a": 10, "b": 10, "c": 10}
    loads[holder] = 100  # 100 - 10 > 64 and 100 > 1.5 x 10
    views = [view(c, InFlight(requests=loads[c])) for c in "abc"]
    d = pol.pick(req("2", 160, hashes=hashes), views, 0)
    assert d.replica_id != holder and d.reason == "imbalanced"
    # the imbalanced pick still went into the tree: two holders now
    loads[holder] = 70  # 70 - 10 = 60: balanced again, the prefix wins
    views = [view(c, InFlight(requests=loads[c])) for c in "abc"]
    again = pol.pick(req("3", 160, hashes=hashes), views, 0)
    assert again.reason == "prefix-affinity"
    assert again.replica_id == d.replica_id  # the less loaded of the two holders


# -- headroom ----------------------------------------------------------------------------------


def test_headroom_avoids_a_replica_whose_kv_cannot_fit_the_request() -> None:
    pol = make_policy("headroom", debug=True)
    # a is idle but its cache is nearly full: 1000 blocks, 97 % used -> 30 free; the request
    # needs (2000 + 200) / 16 = 138 blocks
    views = [view("a", kv=0.97, blocks=1000), view("b", waiting=3, running=20, kv=0.3, blocks=1000)]
    d = pol.pick(req(prompt=2000, out=200), views, 100.0)
    assert d.replica_id == "b" and d.reason == "lowest-cost"


def test_headroom_counts_unacked_blocks_against_the_fit() -> None:
    pol = make_policy("headroom")
    views = [
        view("a", InFlight(requests=5, kv_blocks=600, unacked=5), kv=0.2, blocks=1000),
        view("b", waiting=2, kv=0.5, blocks=1000),
    ]
    assert pol.pick(req(prompt=2000, out=200), views, 100.0).replica_id == "b"


def test_headroom_fails_open_or_queues_when_nothing_fits() -> None:
    views = [view("a", kv=0.99, blocks=1000), view("b", kv=0.995, blocks=1000, waiting=4)]
    d = make_policy("headroom").pick(req(prompt=4000), views, 100.0)
    assert d.replica_id == "a" and d.reason == "fail-open"
    d = make_policy("headroom", queue_when_saturated=True).pick(req(prompt=4000), views, 100.0)
    assert d.replica_id is None and d.reason == "saturated"


def _warm_prefix(pol, rid: str, hashes: tuple[int, ...], prompt: int) -> None:
    only = [view(rid)]
    assert pol.pick(req("warm", prompt, hashes=hashes), only, 100.0).replica_id == rid


def test_headroom_prefers_the_prefix_holder_when_the_cache_saves_more_than_the_queue_costs() -> (
    None
):
    hashes = tuple(range(250))  # 4000 tokens in 16-token blocks
    pol = make_policy("headroom", debug=True)
    _warm_prefix(pol, "b", hashes, 4000)
    # b holds the 4000-token prefix; its small queue (1,500 tokens) costs less than the saving
    views = [view("a"), view("b", InFlight(requests=2, prefill_tokens=1500), running=4)]
    d = pol.pick(req("1", 4100, hashes=hashes), views, 100.0)
    assert d.replica_id == "b" and d.reason == "prefix-affinity"
    # a long queue on the holder outweighs the saving
    pol = make_policy("headroom")
    _warm_prefix(pol, "b", hashes, 4000)
    views = [view("a"), view("b", InFlight(requests=40, prompt_tokens=60_000, unacked=40))]
    assert pol.pick(req("2", 4100, hashes=hashes), views, 100.0).replica_id == "a"


def test_headroom_prefers_the_idle_h100_over_the_idle_l4_for_a_long_prompt() -> None:
    pol = make_policy("headroom", debug=True)
    for order in (["l4", "h100"], ["h100", "l4"]):
        seeds = {"l4": L4, "h100": H100}
        views = [view(n, profile=seeds[n]) for n in order]
        d = pol.pick(req(prompt=6000, out=64), views, 100.0)
        assert d.replica_id == "h100"


def test_headroom_lets_the_faster_replica_take_the_longer_queue() -> None:
    pol = make_policy("headroom")
    # the H100 has 4 requests of 2000 tokens queued (8000 tokens: 0.27 s), the L4 1 (0.5 s)
    views = [
        view("l4", InFlight(requests=1, prompt_tokens=2000, unacked=1), profile=L4),
        view("h100", InFlight(requests=4, prompt_tokens=8000, unacked=4), profile=H100),
    ]
    assert pol.pick(req(prompt=2000), views, 100.0).replica_id == "h100"


@pytest.mark.parametrize("vector_min_replicas", [160, 1])
def test_headroom_spreads_a_burst_thanks_to_the_ledger(vector_min_replicas: int) -> None:
    # one stale state says a is emptiest; the others each have a request waiting
    def fleet(led: InFlightLedger) -> list[ReplicaView]:
        return [
            ReplicaView(c, state(c, waiting=0 if c == "a" else 2, kv=0.1, at=100.0), led.get(c))
            for c in "abcdefgh"
        ]

    pol, led = make_policy("headroom", vector_min_replicas=vector_min_replicas), InFlightLedger()
    picks = []
    for i in range(8):
        r = req(str(i), prompt=1500)
        rid = pol.pick(r, fleet(led), 100.0).replica_id
        assert rid is not None
        led.start(rid, r, 100.0)
        picks.append(rid)
    assert len(set(picks)) >= 6
    # without the ledger every pick herds onto the emptiest-looking replica
    pol = make_policy("headroom", vector_min_replicas=vector_min_replicas)
    empty = InFlightLedger()
    herd = [pol.pick(req(str(i), prompt=1500), fleet(empty), 100.0).replica_id for i in range(8)]
    assert set(herd) == {"a"}


def test_headroom_drains_the_queue_of_an_old_state() -> None:
    pol = make_policy("headroom", debug=True)
    fresh = view("a", waiting=6, at=100.0)
    old = view("b", waiting=6, at=98.0)  # two seconds of prefill since then
    d = pol.pick(req(prompt=500), [fresh, old], 100.0)
    assert d.replica_id == "b" and d.scores["b"] < d.scores["a"]


def test_headroom_keeps_prefill_heavy_work_off_a_busy_decode_batch() -> None:
    pol = make_policy("headroom", debug=True)
    # same queue; a runs 120 decoding streams, b runs 8
    views = [view("a", running=120, kv=0.5), view("b", running=8, kv=0.5)]
    assert pol.pick(req(prompt=6000, out=32), views, 100.0).replica_id == "b"


def test_headroom_learns_a_slow_replica_from_observed_ttft() -> None:
    pol = make_policy("headroom")
    a, b = view("a"), view("b")
    for i in range(40):  # each served alone for a while: a 4x slower than its profile says, b not
        for v, slow in ((a, 4.0), (b, 1.0)):
            r = req(f"{v.replica_id}{i}", prompt=3000)
            assert pol.pick(r, [v], 100.0 + i).replica_id == v.replica_id
            pol.observe(v.replica_id, r, slow * pol._pending[r.request_id][1], None, 100.5 + i)
    k_a, _ = pol.correction("a")
    k_b, _ = pol.correction("b")
    # relative to the fleet's own bias, outside the deadband: a slower, b faster than the mean
    assert k_a > 1.5 and k_b < 1.0
    # now both idle: the learned-slow one loses; b is picked until its own queue outweighs it
    picks = []
    led = InFlightLedger()
    for i in range(6):
        r = req(f"z{i}", prompt=3000)
        views = [ReplicaView(v.replica_id, v.state, led.get(v.replica_id)) for v in (a, b)]
        rid = pol.pick(r, views, 200.0).replica_id
        assert rid is not None
        led.start(rid, r, 200.0)
        picks.append(rid)
    assert picks[0] == "b" and picks.count("b") >= 4


def test_a_headroom_worker_learns_what_another_observed() -> None:
    """Gateway workers share learning (gateway/peers.py): the increments of one policy's
    `learned()` given to another's `learn_from_peers` teach it the same corrections."""
    one, two = make_policy("headroom"), make_policy("headroom")
    a, b = view("a"), view("b")
    for i in range(40):  # only `one` sees answers: a 4x slower than its profile, b as profiled
        for v, slow in ((a, 4.0), (b, 1.0)):
            r = req(f"{v.replica_id}{i}", prompt=3000)
            one.pick(r, [v], 100.0 + i)
            one.observe(v.replica_id, r, slow * one._pending[r.request_id][1], None, 100.5 + i)
    assert two.correction("a") == (1.0, 1.0)
    two.learn_from_peers(one.learned())
    # as `one` learned them (up to when each last re-based on the fleet-wide bias)
    assert one.correction("a")[0] > 1.5 and two.correction("a")[0] > 1.5
    assert two.correction("a")[0] == pytest.approx(one.correction("a")[0], rel=0.05)
    assert two.correction("b")[0] <= 1.0
    assert two.learned() == {}  # what it was told is not its own to pass on
    picks = {two.pick(req(f"z{i}", prompt=3000), [a, b], 200.0).replica_id for i in range(3)}
    assert picks == {"b"}  # and it routes on it


def test_a_headroom_worker_takes_in_another_workers_picks_as_its_own() -> None:
    """What a pick teaches (where the prompt's blocks now live, how much of what goes to a
    replica is already cached there) reaches the other gateway workers through the index's
    journal: replaying one's journal into another leaves both with the same estimates."""
    one, two = make_policy("headroom"), make_policy("headroom")
    one.keep_journal()
    a, b = view("a"), view("b")
    doc = EST.features("seed", "m", "A shared document. " * 80, 16).prefix_hashes
    for i in range(12):
        one.pick(req(f"q{i}", prompt=3000, hashes=doc), [a, b], 100.0 + i)
    picks = one.drain_picks()
    assert len(picks) == 12 and all(len(note) == 3 for _, _, note in picks)
    for rid, hashes, note in picks:
        two.peer_picked(rid, hashes, note)
    assert two.index.match(doc) == one.index.match(doc) != {}
    for rid in {rid for rid, _, _ in picks}:
        mine, theirs = one._rep[rid], two._rep[rid]
        assert theirs.uncached_frac == pytest.approx(mine.uncached_frac) != 1.0
        assert theirs.mean_uncached == pytest.approx(mine.mean_uncached)
    assert two.drain_picks() == []  # peers' picks are not passed on again


def test_headroom_ignores_small_deviations_and_a_uniform_bias() -> None:
    pol = make_policy("headroom")
    a, b = view("a"), view("b")
    for i in range(60):  # the whole fleet 2x slower than profiled, a a little more (1.2x)
        for v, slow in ((a, 2.4), (b, 2.0)):
            r = req(f"{v.replica_id}{i}", prompt=3000)
            pol.pick(r, [v], 100.0 + i)
            pol.observe(v.replica_id, r, slow * pol._pending[r.request_id][1], None, 100.5 + i)
    assert pol.correction("a") == (1.0, 1.0) and pol.correction("b") == (1.0, 1.0)


def test_headroom_never_picks_ejected_and_avoids_unhealthy() -> None:
    pol = make_policy("headroom")
    views = [view("a", ejected=True), view("b", healthy=False), view("c", waiting=20, running=100)]
    assert pol.pick(req(), views, 100.0).replica_id == "c"


def test_headroom_without_any_state_uses_the_ledger() -> None:
    pol = make_policy("headroom")
    views = [
        ReplicaView("a", None, InFlight(requests=3, prompt_tokens=3000, unacked=3)),
        ReplicaView("b", None, InFlight(requests=1, prompt_tokens=200, unacked=1)),
    ]
    assert pol.pick(req(prompt=1000), views, 100.0).replica_id == "b"


# -- seeds from the GPU profile -----------------------------------------------------------------


class _Roofline:
    """A two-parameter stand-in for modelserver.perf.PerfModel: compute-bound prefill, memory-bound decode."""

    def __init__(self, flops: float, bandwidth: float) -> None:
        self.flops, self.bandwidth = flops, bandwidth

    def step_time(self, prefill: int, attended: int, seqs: int, context: int) -> float:
        weights = 16e9
        return (
            0.003
            + prefill * 16e9 / self.flops
            + (weights + context * 131072) / self.bandwidth * (seqs > 0)
        )

    def kv_bytes_per_token(self) -> float:
        return 131072.0

    def kv_cache_bytes(self, gpu_memory_utilization: float = 0.9) -> int:
        return int(10e9)


def test_rate_seed_from_a_perf_model() -> None:
    l4 = rate_seed_from_perf(_Roofline(60e12, 300e9))
    h100 = rate_seed_from_perf(_Roofline(500e12, 3e12))
    assert h100.prefill_tokens_per_s > 5 * l4.prefill_tokens_per_s
    assert l4.decode_step_s > l4.decode_step_base_s > 0
    assert h100.decode_step_s < l4.decode_step_s
    assert l4.kv_blocks_total == int(10e9 // (131072 * 16))


def test_rate_seed_for_real_profiles() -> None:
    perf = pytest.importorskip("modelserver.perf")
    if not hasattr(perf, "PerfModel"):
        pytest.skip("modelserver.perf is not written yet")
    l4, h100 = rate_seed_for("llama-3.1-8b", "l4"), rate_seed_for("llama-3.1-8b", "h100")
    assert h100.prefill_tokens_per_s > 2 * l4.prefill_tokens_per_s
    assert h100.decode_step_s < l4.decode_step_s
    assert l4.kv_blocks_total > 0


# -- properties over every policy ----------------------------------------------------------------

FLEETS = st.lists(
    st.tuples(
        st.booleans(),  # ejected
        st.integers(0, 30),  # waiting
        st.floats(0, 1),  # kv usage
        st.integers(0, 50),  # in flight
        st.booleans(),  # has a state
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=80, deadline=None)
@given(fleet=FLEETS, name=st.sampled_from(POLICY_NAMES), prompt=st.integers(1, 20_000))
def test_picks_are_always_among_non_ejected_replicas(fleet, name, prompt) -> None:
    views = [
        ReplicaView(
            f"r{i}",
            state(f"r{i}", waiting=w, kv=kv, blocks=2000) if has else None,
            InFlight(requests=n, unacked=n),
            ej,
        )
        for i, (ej, w, kv, n, has) in enumerate(fleet)
    ]
    pol = make_policy(name, seed=1)
    for k in range(3):
        d = pol.pick(req(str(k), prompt, hashes=tuple(range(prompt // 16 % 40))), views, 100.0)
        live = {v.replica_id for v in views if not v.ejected}
        if not live:
            assert d.replica_id is None
        else:
            assert (
                d.replica_id in live
            )  # every policy here fails open: never None with a live replica


def test_headroom_trusts_the_ledger_over_an_empty_looking_state() -> None:
    pol = make_policy("headroom")
    # a's state (acked) shows nothing waiting, but this gateway sent it 30k prompt tokens that
    # have not produced a first token yet
    views = [
        view("a", InFlight(requests=10, prefill_tokens=30_000), waiting=0),
        view("b", InFlight(requests=1, prefill_tokens=500), waiting=1),
    ]
    assert pol.pick(req(prompt=1000), views, 100.0).replica_id == "b"
    # without the ledger term (a proxy that cannot see first tokens) a looks emptiest
    pol = make_policy("headroom", ledger_queue=False)
    assert pol.pick(req(prompt=1000), views, 100.0).replica_id == "a"


@settings(max_examples=60, deadline=None)
@given(
    fleet=st.lists(
        st.tuples(
            st.booleans(),  # ejected
            st.integers(0, 12),  # waiting
            st.integers(0, 150),  # running
            st.floats(0, 0.99),  # kv usage
            st.integers(0, 20_000),  # ledger prefill tokens
            st.sampled_from([None, L4, H100]),
        ),
        min_size=1,
        max_size=20,
    ),
    prompts=st.lists(st.integers(1, 12_000), min_size=1, max_size=6),
)
def test_headroom_vectorised_scan_decides_like_the_loop(fleet, prompts) -> None:
    pytest.importorskip("numpy")
    loop = make_policy("headroom", vector_min_replicas=10**9)
    vec = make_policy("headroom", vector_min_replicas=1)
    views = [
        ReplicaView(
            f"r{i}",
            state(f"r{i}", waiting=w, running=r, kv=kv, blocks=3000, at=99.5),
            InFlight(requests=1, prefill_tokens=pf),
            ej,
            prof,
        )
        for i, (ej, w, r, kv, pf, prof) in enumerate(fleet)
    ]
    for k, prompt in enumerate(prompts):
        r = req(str(k), prompt, out=200, hashes=tuple(range(prompt // 16 % 50)))
        a, b = loop.pick(r, views, 100.0), vec.pick(r, views, 100.0)
        assert (a.replica_id, a.reason) == (b.replica_id, b.reason)


def test_headroom_correction_converges_to_the_observed_ratio() -> None:
    pol = make_policy("headroom", learn_relative=False, learn_deadband=0.0)
    views = [view("a", running=10)]
    for i in range(150):
        r = req(str(i), prompt=2000)
        pol.pick(r, views, 100.0)
        uncorrected = pol._pending[r.request_id][1]  # what the profile alone predicts
        pol.observe("a", r, 3.0 * uncorrected, None, 100.0)
    k, kd = pol.correction("a")
    assert k == pytest.approx(3.0, rel=0.02)
    assert kd == 1.0  # no TPOT was observed


# -- the prefix index ------------------------------------------------------------------------------

CHAINS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),  # replica
        st.lists(st.integers(0, 3), min_size=1, max_size=12),  # a path in a small prompt tree
    ),
    max_size=40,
)


def _chain(path: list[int]) -> tuple[int, ...]:
    # chained like real prefix hashes: block k's hash names the whole prefix up to k
    return tuple(hash(tuple(path[: k + 1])) for k in range(len(path)))


@settings(max_examples=120, deadline=None)
@given(
    ops=CHAINS, cap=st.integers(1, 30), probe=st.lists(st.integers(0, 3), min_size=1, max_size=12)
)
def test_prefix_index_match_equals_a_walk_of_each_replica_lru(ops, cap, probe) -> None:
    from gateway.prefix import PrefixIndex

    idx = PrefixIndex(cap)
    for rid, path in ops:
        idx.add(rid, _chain(path))
        assert idx.size(rid) <= cap
    hashes = _chain(probe)
    expect = {}
    for rid in idx.replicas():
        n = 0
        while n < len(hashes) and rid in idx.holders(hashes[n]):
            n += 1
        if n:
            expect[rid] = n
    assert idx.match(hashes) == expect


def test_prefix_index_evicts_least_recent_and_forgets_removed_replicas() -> None:
    from gateway.prefix import PrefixIndex

    idx = PrefixIndex(capacity_per_replica=6)
    idx.add("a", (1, 2, 3, 4))
    idx.add("b", (1, 2))
    idx.add("a", (1, 2, 9, 10))  # 3, 4 are now the least recent of a's
    assert idx.size("a") == 6 and idx.match((1, 2, 3, 4)) == {"a": 4, "b": 2}
    idx.add("a", (1, 20))  # one over: 4 goes first (a tail before its head)
    assert idx.match((1, 2, 3, 4)) == {"a": 3, "b": 2}
    idx.set_capacity("a", 2)  # the two most recent: 1 and 20
    assert idx.match((1, 2)) == {"a": 1, "b": 2}
    idx.remove("b")
    assert idx.match((1, 2)) == {"a": 1} and idx.holders(2) == set()


def test_headroom_counts_only_the_uncached_part_of_a_prefix_holders_queue() -> None:
    hashes = tuple(range(250))  # a 4000-token shared prefix
    pol = make_policy("headroom")
    for i in range(30):  # b has been serving this prefix: its requests cost it ~100 tokens each
        pol.pick(req(f"w{i}", 4100, hashes=hashes), [view("b")], 100.0)
    # eight of them are still queued there: 32,800 prompt tokens, but only ~800 uncached ones
    views = [view("a"), view("b", InFlight(requests=8, prefill_tokens=8 * 4100))]
    assert pol.pick(req("x", 4100, hashes=hashes), views, 100.0).replica_id == "b"


# -- holding at the gateway: real headroom, the queue's order, the projected KV demand -------


def test_headroom_holds_only_when_no_replica_has_real_headroom() -> None:
    """With the wait limit, a request is held (None) when every replica's predicted wait behind
    its queue is over it; a KV misfit alone, with hold_on_kv=False, fails open instead."""
    pol = make_policy("headroom", queue_when_saturated=True, max_wait_ratio=1.0)
    long_q = [view("a", waiting=40, running=10), view("b", waiting=40, running=10)]
    d = pol.pick(req(prompt=256), long_q, 100.0)
    assert d.replica_id is None and d.reason == "saturated"
    ok = [*long_q, view("c", waiting=0, running=10)]
    assert pol.pick(req(rid="q2", prompt=256), ok, 100.0).replica_id == "c"
    # a request too big for any free KV: held by default, sent to the lowest cost without
    # hold_on_kv (the engine queues it itself; it would block the gateway queue's head)
    full = [view("a", kv=0.8, blocks=100), view("b", kv=0.8, blocks=100)]
    assert pol.pick(req(rid="q3", prompt=900), full, 100.0).replica_id is None
    lax = make_policy("headroom", queue_when_saturated=True, hold_on_kv=False)
    assert lax.pick(req(rid="q4", prompt=900), full, 100.0).reason == "fail-open"


def test_headroom_queue_order_is_deadline_first_with_aging() -> None:
    pol = make_policy("headroom", slo_ttft_s=1.0, slo_ttft_per_token_s=0.001, queue_age_s=10.0)
    chat, doc = req(prompt=100), req(prompt=4000)
    # both can still make it: the earlier deadline first (the chat's, though it came later)
    assert pol.queue_key(chat, 100.5, 101.0) < pol.queue_key(doc, 100.0, 101.0)
    # the chat missed its deadline: it steps back behind the document that can still make it
    assert pol.queue_key(chat, 100.0, 101.5) > pol.queue_key(doc, 100.0, 101.5)
    # ... until it has waited queue_age_s: then it comes before a fresh request's deadline
    assert pol.queue_key(chat, 100.0, 110.5) < pol.queue_key(req(prompt=100), 110.4, 110.5)
    fifo = make_policy("headroom", queue_age_s=None)
    assert fifo.queue_key(doc, 100.0, 101.5) == 100.0


def test_ledger_demand_counts_every_in_flight_request_until_it_finishes() -> None:
    led = InFlightLedger()
    led.start("a", req(rid="x", prompt=160, out=160), 1.0, block_size=16)
    led.start("a", req(rid="y", prompt=320, out=64), 1.0, block_size=16)
    demand = led.get("a").demand_blocks
    assert demand == led.get("a").kv_blocks == 20 + 24
    led.observed("a", 2.0)  # acked: the unacked blocks go, the demand stays
    assert led.get("a").kv_blocks == 0 and led.get("a").demand_blocks == demand
    led.finish("a", "x", 3.0)
    assert led.get("a").demand_blocks == 24


def test_headroom_demand_max_avoids_a_replica_whose_decodes_will_fill_its_cache() -> None:
    """Two replicas look equally empty, but the gateway has long generations in flight on one:
    with demand_max its projected KV need counts, and the new request goes to the other."""
    pol = make_policy("headroom", demand_max=1.0)
    led = InFlightLedger()
    for i in range(8):
        led.start("a", req(rid=f"long{i}", prompt=100, out=2000), 1.0, block_size=16)
    led.observed("a", 2.0)
    views = [view("a", led.get("a"), blocks=1000), view("b", blocks=1000)]
    assert pol.pick(req(rid="new", prompt=500, out=500), views, 100.0).replica_id == "b"


def test_headroom_sees_the_wait_of_an_admission_blocked_replica() -> None:
    """A replica at its batch cap (or with a nearly full cache) admits a waiting request only
    as a running one finishes: its short prompts do not make its queue short."""
    seed = RateSeed(prefill_tokens_per_s=30_000, decode_step_s=0.02, decode_step_base_s=0.01,
                    max_num_seqs=32)  # fmt: skip
    pol = make_policy("headroom", max_wait_ratio=None)
    views = [
        view("capped", waiting=8, running=32, profile=seed),
        view("free", waiting=0, running=20, profile=L4),
    ]
    for i in range(3):  # the mean output it learns for the replicas: long generations
        pol.pick(req(rid=f"w{i}", prompt=100, out=1000), views, 100.0)
    d = pol.pick(
        req(rid="q", prompt=100, out=1000),
        views,
        100.0,
    )
    assert d.replica_id == "free"
    off = make_policy("headroom", max_wait_ratio=None, kv_blocked=None)
    assert off.pick(req(rid="q", prompt=100, out=1000), views, 100.0).replica_id == "capped"


def test_headroom_a_nearly_full_cache_blocks_only_prompts_it_cannot_hold() -> None:
    """The engine admits a waiting request once its prompt's blocks are free (decodes grow
    later): a cache at 90 % with room for the prompts queued there and this one is not
    admission-blocked, one whose queued prompts overflow its free blocks is."""

    def cost(waiting: int, by_fit: bool) -> float:
        pol = make_policy("headroom", debug=True, max_wait_ratio=None, blocked_by_fit=by_fit)
        v = [view("a", waiting=waiting, running=20, kv=0.9, blocks=1000, profile=L4)]
        scores = pol.pick(req(prompt=100, out=100), v, 100.0).scores
        assert scores is not None
        return scores["a"]

    # 1600 free tokens; the mean uncached prompt before any pick is 512
    assert cost(1, True) < cost(1, False)  # 2 x 512 fit: no wait for a finishing sequence
    assert cost(4, True) == pytest.approx(cost(4, False))  # 5 x 512 do not: blocked either way


def test_headroom_waits_a_whole_generation_share_per_request_behind_a_capped_batch() -> None:
    """At its batch cap a replica frees a slot as any sequence ends (Little's law over whole
    generations): each request waiting there adds running / (capped_output_share x mean
    expected output x decode step) seconds, not the shorter full-cache share."""
    seed = RateSeed(prefill_tokens_per_s=30_000, decode_step_s=0.02, decode_step_base_s=0.01,
                    max_num_seqs=32)  # fmt: skip

    def cost(waiting: int, **kw: float) -> float:
        pol = make_policy("headroom", debug=True, max_wait_ratio=None, **kw)
        v = [view("capped", waiting=waiting, running=32, profile=seed)]
        scores = pol.pick(req(prompt=100, out=100), v, 100.0).scores
        assert scores is not None
        return scores["capped"]

    step = seed.decode_step(32)
    per_tok = 1 / seed.prefill_tokens_per_s + step / seed.chunk_tokens
    # one more waiting request: its mean prompt (512 before any pick) plus one slot's wait, for
    # the default mean output before any pick (256 tokens)
    for share in (0.3, 0.65):
        extra = cost(5, capped_output_share=share) - cost(4, capped_output_share=share)
        assert extra == pytest.approx(512 * per_tok + share * 256 * step / 32)
