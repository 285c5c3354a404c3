"""The gateway's in-flight account per replica."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.estimate import Estimator, RequestFeatures
from gateway.inflight import InFlight, InFlightLedger

EST = Estimator()


def req(rid: str, prompt: int = 100, out: int = 60) -> RequestFeatures:
    return EST.features_from_tokens(rid, "m", prompt, (), max_tokens=out)


def test_start_counts_requests_prompt_and_blocks() -> None:
    led = InFlightLedger()
    assert led.get("a") == InFlight()
    led.start("a", req("1", 100, 60), now=1.0)  # 160 tokens -> 10 blocks of 16
    led.start("a", req("2", 20, 10), now=1.1)  # 30 tokens -> 2 blocks
    assert led.get("a") == InFlight(
        requests=2, prompt_tokens=120, kv_blocks=12, unacked=2, prefill_tokens=120
    )
    assert led.get("b") == InFlight()


def test_first_token_removes_prompt_work_but_not_the_request() -> None:
    led = InFlightLedger()
    led.start("a", req("1", 100, 60), now=1.0)
    led.first_token("a", "1", now=1.2)
    assert led.get("a") == InFlight(requests=1, prompt_tokens=0, kv_blocks=10, unacked=1)
    led.first_token("a", "1", now=1.3)  # twice is harmless
    assert led.get("a").prompt_tokens == 0 and led.get("a").prefill_tokens == 0


def test_observed_state_acks_requests_started_before_it() -> None:
    led = InFlightLedger()
    led.start("a", req("1", 100, 60), now=1.0)
    led.start("a", req("2", 50, 14), now=2.0)
    led.observed("a", observed_at=1.5)  # the state read at 1.5 shows request 1, not 2
    assert led.get("a") == InFlight(
        requests=2, prompt_tokens=50, kv_blocks=4, unacked=1, prefill_tokens=150
    )
    led.observed("a", observed_at=3.0)
    assert led.get("a") == InFlight(
        requests=2, prompt_tokens=0, kv_blocks=0, unacked=0, prefill_tokens=150
    )
    led.first_token("a", "1", now=3.5)  # acked: only the known-queued prefill work changes
    assert led.get("a") == InFlight(
        requests=2, prompt_tokens=0, kv_blocks=0, unacked=0, prefill_tokens=50
    )
    led.finish("a", "1", now=4.0)
    led.finish("a", "2", now=4.0)
    assert led.get("a") == InFlight()


def test_finish_before_any_state_and_unknown_ids() -> None:
    led = InFlightLedger()
    led.start("a", req("1"), now=1.0)
    led.finish("a", "1", now=2.0)
    assert led.get("a") == InFlight()
    led.finish("a", "nope", now=2.0)
    led.first_token("zz", "nope", now=2.0)
    led.observed("zz", 5.0)
    assert led.get("zz") == InFlight()


def test_a_retry_with_the_same_id_replaces_the_old_entry() -> None:
    led = InFlightLedger()
    led.start("a", req("1", 100, 60), now=1.0)
    led.start("a", req("1", 100, 60), now=1.5)
    assert led.get("a") == InFlight(
        requests=1, prompt_tokens=100, kv_blocks=10, unacked=1, prefill_tokens=100
    )


def test_snapshot_object_is_reused_until_something_changes() -> None:
    led = InFlightLedger()
    led.start("a", req("1"), now=1.0)
    s1 = led.get("a")
    assert led.get("a") is s1  # pickers may cache per snapshot identity
    led.observed("a", 0.5)  # nothing acked
    assert led.get("a") is s1
    led.observed("a", 1.5)
    assert led.get("a") is not s1


def test_no_state_ever_keeps_memory_bounded() -> None:
    led = InFlightLedger()
    for i in range(5000):
        led.start("a", req(str(i)), now=float(i))
        led.finish("a", str(i), now=float(i) + 0.5)
    assert led.get("a") == InFlight()
    assert len(led._acc["a"].pending) <= 70


OPS = st.lists(
    st.tuples(
        st.sampled_from(["start", "first", "finish", "observed"]),
        st.sampled_from(["a", "b"]),
        st.integers(0, 7),  # request id
        st.integers(1, 500),  # prompt tokens
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_aggregates_match_a_recount_from_scratch(ops: list[tuple[str, str, int, int]]) -> None:
    led = InFlightLedger()
    # the model: replica -> id -> [prompt, blocks, started_at, prefilled]
    model: dict[str, dict[str, list]] = {"a": {}, "b": {}}
    acked_before: dict[str, float] = {"a": -1.0, "b": -1.0}
    now = 0.0
    for op, rep, i, prompt in ops:
        now += 1.0
        rid = str(i)
        if op == "start":
            led.start(rep, req(rid, prompt, 20), now)
            model[rep][rid] = [prompt, -(-(prompt + 20) // 16), now, False]
        elif op == "first":
            led.first_token(rep, rid, now)
            if rid in model[rep]:
                model[rep][rid][3] = True
        elif op == "finish":
            led.finish(rep, rid, now)
            model[rep].pop(rid, None)
        else:
            obs = now - 1.5  # a state read a moment ago
            led.observed(rep, obs)
            acked_before[rep] = max(acked_before[rep], obs)
        for r in ("a", "b"):
            unacked = [e for e in model[r].values() if e[2] > acked_before[r]]
            expect = InFlight(
                requests=len(model[r]),
                prompt_tokens=sum(e[0] for e in unacked if not e[3]),
                kv_blocks=sum(e[1] for e in unacked),
                unacked=len(unacked),
                prefill_tokens=sum(e[0] for e in model[r].values() if not e[3]),
            )
            assert led.get(r) == expect
