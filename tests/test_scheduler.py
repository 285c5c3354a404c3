"""The vLLM-like engine: batching bounds, chunked prefill, paged KV with prefix caching,
preemption, aborts and determinism — driven in virtual time, as the simulator drives it."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelserver.profiles import resolve_gpu, resolve_model
from modelserver.scheduler import Engine, EngineConfig, StepOutput, TokenOutput

LLAMA = resolve_model("llama-3.1-8b")
H100 = resolve_gpu("h100")


def engine(**kw: object) -> Engine:
    return Engine(EngineConfig(model=LLAMA, gpu=H100, **kw))  # type: ignore[arg-type]


def prompt(n: int, start: int = 0) -> list[int]:
    return [(start + i) % 251 for i in range(n)]


def run(e: Engine, max_steps: int = 100_000) -> tuple[list[StepOutput], float]:
    """Step until idle; returns the steps and the virtual time it took."""
    steps, now = [], 0.0
    while e.has_unfinished():
        out = e.step(now)
        now += out.duration_s
        steps.append(out)
        assert len(steps) < max_steps, "engine made no progress"
    return steps, now


def tokens_by_request(steps: list[StepOutput]) -> dict[str, list[TokenOutput]]:
    by: dict[str, list[TokenOutput]] = defaultdict(list)
    for s in steps:
        for o in s.outputs:
            by[o.request_id].append(o)
    return by


def test_block_budget_comes_from_the_perf_model() -> None:
    e = engine()
    assert e.num_gpu_blocks == e.perf.kv_cache_bytes(0.9) // e.perf.kv_bytes_per_block(16)
    assert e.num_gpu_blocks > 20_000  # ~54 GiB of KV at 2 MiB a block
    assert engine(gpu_memory_utilization=0.5).num_gpu_blocks < e.num_gpu_blocks
    s = engine(num_gpu_blocks_override=64).stats()
    assert (s.num_gpu_blocks, s.num_used_blocks, s.kv_usage, s.block_size) == (64, 0, 0.0, 16)
    assert s.kv_bytes_per_block == 16 * 131072 and s.weight_bytes == LLAMA.weight_bytes()


def test_running_batch_respects_max_num_seqs_and_token_budget() -> None:
    e = engine(max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(10):
        e.add_request(f"r{i}", prompt(100, i), 5, ignore_eos=True)
    now, seen_running = 0.0, 0
    while e.has_unfinished():
        out = e.step(now)
        now += out.duration_s
        st_ = e.stats()
        assert st_.num_running <= 4
        assert out.num_prefill_tokens + out.num_decode_seqs <= 64
        seen_running = max(seen_running, st_.num_running)
    assert seen_running == 4
    assert e.stats().generation_tokens_total == 50


def test_queue_time_is_arrival_to_first_schedule() -> None:
    e = engine(max_num_seqs=1)
    e.add_request("first", prompt(32), 8, ignore_eos=True, arrival_time=0.0)
    e.add_request("second", prompt(32, 7), 8, ignore_eos=True, arrival_time=0.0)
    steps, _ = run(e)
    firsts = {o.request_id: o for s in steps for o in s.outputs if o.index == 0}
    assert firsts["first"].queue_time_s == 0.0
    # "second" waits for the only slot: scheduled in the step after "first" finished.
    first_done = next(s for s in steps if any(o.finish_reason for o in s.outputs))
    assert firsts["second"].queue_time_s == pytest.approx(first_done.start + first_done.duration_s)
    assert all(o.queue_time_s == 0.0 for s in steps for o in s.outputs if o.index > 0)


def test_chunked_prefill_splits_a_long_prompt_and_decodes_go_first() -> None:
    e = engine(max_num_batched_tokens=256, enable_prefix_caching=False)
    e.add_request("long", prompt(1000), 3, ignore_eos=True)
    chunks = [e.step(0.0) for _ in range(4)]
    assert [c.num_prefill_tokens for c in chunks] == [256, 256, 256, 232]
    assert [len(c.outputs) for c in chunks] == [0, 0, 0, 1]  # first token after the last chunk
    assert chunks[-1].outputs[0].index == 0
    # A decoding request is scheduled before a new prompt's chunk, within the same budget.
    e.add_request("next", prompt(1000, 7), 3, ignore_eos=True)
    mixed = e.step(0.0)
    assert mixed.num_decode_seqs == 1 and mixed.num_prefill_tokens == 255
    assert [o.request_id for o in mixed.outputs] == ["long"]
    # Prefill time is charged: the chunked step costs more than a pure decode step.
    assert mixed.duration_s > e.perf.step_time(0, 0, 1, 1001)


def test_prefix_cache_hits_on_a_shared_prompt() -> None:
    e = engine()
    shared = prompt(100)
    e.add_request("a", shared, 2, ignore_eos=True)
    run(e)
    e.add_request("b", shared + [7, 8, 9], 2, ignore_eos=True)
    steps, _ = run(e)
    first = tokens_by_request(steps)["b"][0]
    assert first.num_cached_tokens == 96  # six full blocks of 16
    s = e.stats()
    assert s.prefix_hits_tokens == 96
    assert s.prefix_queries_tokens == 100 + 103
    assert s.prompt_tokens_total == 203 and s.num_used_blocks == 0
    # A prompt entirely in the cache still computes its last token (its logits are needed).
    e.add_request("c", shared[:96], 1, ignore_eos=True)
    steps, _ = run(e)
    assert tokens_by_request(steps)["c"][0].num_cached_tokens == 80
    # Without prefix caching nothing is found.
    off = engine(enable_prefix_caching=False)
    off.add_request("a", shared, 1, ignore_eos=True)
    run(off)
    off.add_request("b", shared, 1, ignore_eos=True)
    steps, _ = run(off)
    assert tokens_by_request(steps)["b"][0].num_cached_tokens == 0
    assert off.stats().prefix_queries_tokens == 0


def test_cached_prefill_is_faster_than_cold_prefill() -> None:
    e = engine()
    e.add_request("cold", prompt(4000), 1, ignore_eos=True)
    _, cold = run(e)
    e.add_request("warm", prompt(4000), 1, ignore_eos=True)
    _, warm = run(e)
    assert warm < cold / 5


def test_lru_eviction_keeps_the_most_recently_freed_prefixes() -> None:
    e = engine(num_gpu_blocks_override=12)
    a, b = prompt(64, 0), prompt(64, 100)  # four full blocks each
    for rid, p in (("a", a), ("b", b)):
        e.add_request(rid, p, 1, ignore_eos=True)
        run(e)
    # Both prompts sit cached in free blocks. An 80-token prompt needs 5 blocks: the 4 never-used
    # blocks go first, then the least recently freed cached block — a's, not b's.
    e.add_request("c", prompt(80, 200), 1, ignore_eos=True)
    run(e)
    e.add_request("b2", b, 1, ignore_eos=True)
    steps, _ = run(e)
    # b is whole: 3 blocks, the most a 64-token prompt may take (its last token is computed).
    assert tokens_by_request(steps)["b2"][0].num_cached_tokens == 48
    e.add_request("a2", a, 1, ignore_eos=True)
    steps, _ = run(e)
    assert tokens_by_request(steps)["a2"][0].num_cached_tokens < 48  # a was evicted first
    assert e.stats().num_used_blocks == 0


def test_preemption_when_blocks_run_out_and_recovery() -> None:
    e = engine(num_gpu_blocks_override=20, max_num_batched_tokens=512)
    for i in range(4):
        e.add_request(f"r{i}", prompt(40, 30 * i), 60, ignore_eos=True)
    steps, _ = run(e)
    preempted = [rid for s in steps for rid in s.preempted]
    assert preempted, "4 x 100 tokens cannot fit in 20 x 16 slots at once"
    # The newest running request is the one that gives way.
    assert preempted[0] == "r3"
    assert e.stats().num_preemptions == len(preempted)
    by = tokens_by_request(steps)
    assert sorted(by) == ["r0", "r1", "r2", "r3"]
    for rid, outs in by.items():
        assert [o.index for o in outs] == list(range(60)), rid
        assert outs[-1].finish_reason == "length"
    # Recompute produces the same tokens as an uncontended run.
    calm = engine()
    calm.add_request("r3", prompt(40, 90), 60, ignore_eos=True)
    ref = tokens_by_request(run(calm)[0])["r3"]
    assert [o.token_id for o in by["r3"]] == [o.token_id for o in ref]
    assert e.stats().num_used_blocks == 0


def test_abort_frees_blocks_at_once() -> None:
    e = engine(num_gpu_blocks_override=100)
    e.add_request("a", prompt(300), 50, ignore_eos=True)
    e.add_request("b", prompt(300, 5), 50, ignore_eos=True)
    e.add_request("w", prompt(30, 9), 5, ignore_eos=True)
    e.step(0.0)
    assert e.stats().num_used_blocks > 0
    assert e.abort_request("a") and e.abort_request("w")
    assert not e.abort_request("a") and not e.abort_request("nope")
    assert e.stats().num_running == 1
    assert e.abort_request("b")
    s = e.stats()
    assert (s.num_used_blocks, s.num_running, s.num_waiting) == (0, 0, 0)
    assert not e.has_unfinished()


def test_natural_stop_respects_min_and_max_tokens() -> None:
    e = engine()
    for i in range(40):
        e.add_request(f"n{i}", prompt(20, i), 4000, min_tokens=10)
    e.add_request("short", prompt(20), 3)
    by = tokens_by_request(run(e)[0])
    lengths = [len(by[f"n{i}"]) for i in range(40)]
    assert min(lengths) >= 10 and max(lengths) < 4000
    assert 80 < sorted(lengths)[20] < 500  # median near 200
    assert all(by[f"n{i}"][-1].finish_reason == "stop" for i in range(40))
    assert len(by["short"]) <= 3


def test_deterministic_for_a_seed() -> None:
    def trace(seed: int) -> list[tuple[float, tuple[tuple[str, int, int, str | None], ...]]]:
        e = engine(seed=seed, num_gpu_blocks_override=40, max_num_batched_tokens=256)
        for i in range(8):
            e.add_request(f"r{i}", prompt(50 + 13 * i, i), 30)
        out = []
        for s in run(e)[0]:
            toks = tuple((o.request_id, o.index, o.token_id, o.finish_reason) for o in s.outputs)
            out.append((s.duration_s, toks))
        return out

    assert trace(1) == trace(1)
    assert trace(1) != trace(2)


def test_validate_errors() -> None:
    e = engine(max_model_len=2048)
    with pytest.raises(ValueError, match="maximum context length is 2048"):
        e.validate(2000, 100)
    with pytest.raises(ValueError, match="at least one token"):
        e.validate(0, 10)
    with pytest.raises(ValueError, match="max_tokens"):
        e.add_request("x", prompt(10), 0)
    small = engine(num_gpu_blocks_override=4)
    with pytest.raises(ValueError, match="cache"):
        small.validate(60, 10)
    small.validate(50, 10)
    e.add_request("dup", prompt(10), 5)
    with pytest.raises(ValueError, match="already"):
        e.add_request("dup", prompt(10), 5)
    with pytest.raises(ValueError, match="min_tokens"):
        e.add_request("m", prompt(10), 5, min_tokens=6)
    for bad in (
        {"max_num_seqs": 0},
        {"max_num_seqs": 512, "max_num_batched_tokens": 256},
        {"block_size": 15},
        {"gpu_memory_utilization": 1.2},
        {"max_model_len": 10**7},
        {"dtype": "fp4"},
    ):
        with pytest.raises(ValueError):
            engine(**bad)
    with pytest.raises(ValueError, match="no room for a KV cache"):
        Engine(EngineConfig(resolve_model("llama-3.1-70b"), H100))


# ----------------------------------------------------------------------------- invariants
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(1, 90),  # prompt length
            st.integers(0, 3),  # which shared prefix
            st.integers(1, 40),  # max_tokens
            st.booleans(),  # ignore_eos
        ),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(
    ops=ops,
    blocks=st.integers(12, 40),
    budget=st.sampled_from([32, 64, 512]),
    caching=st.booleans(),
)
def test_blocks_never_leak(ops: list[tuple], blocks: int, budget: int, caching: bool) -> None:
    e = engine(
        num_gpu_blocks_override=blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=8,
        enable_prefix_caching=caching,
    )
    added, now = 0, 0.0
    produced: dict[str, int] = defaultdict(int)
    limit: dict[str, int] = {}
    for op in ops:
        if op[0] == "add":
            _, n, prefix, max_tokens, ignore = op
            rid = f"r{added}"
            added += 1
            toks = prompt(n, 1000 * prefix)
            try:
                e.add_request(rid, toks, max_tokens, ignore_eos=ignore)
            except ValueError:
                continue  # larger than the whole cache: refused up front
            limit[rid] = max_tokens
        elif op[0] == "abort":
            e.abort_request(f"r{op[1]}")
        else:
            for _ in range(op[1]):
                out = e.step(now)
                now += out.duration_s
                for o in out.outputs:
                    assert o.index == produced[o.request_id]
                    produced[o.request_id] += 1
                    assert produced[o.request_id] <= limit[o.request_id]
        s = e.stats()
        assert 0 <= s.num_used_blocks <= s.num_gpu_blocks
        assert s.num_running <= 8
        held = [b for r in e._requests.values() for b in r.blocks]
        # Every held block is counted once per holder; shared prefix blocks are shared.
        assert len(set(held)) == s.num_used_blocks
    for rid in list(e._requests)[::2]:
        e.abort_request(rid)
    run(e)
    s = e.stats()
    assert s.num_used_blocks == 0 and s.num_running == 0 and s.num_waiting == 0
    assert sum(e.pool.ref) == 0
