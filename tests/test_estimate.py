"""Request features: calibration, prefix hashes, chat rendering, phase."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.estimate import Estimator, model_seed, prefix_hashes, prompt_text

TEXT = st.text(alphabet=string.ascii_letters + " .,é中", min_size=0, max_size=700)


def test_calibration_converges_to_the_reported_ratio() -> None:
    est = Estimator()
    assert est.tokens_per_char("m") == 0.25  # the prior before any usage
    for _ in range(300):
        est.observe_usage("m", prompt_chars=3000, prompt_tokens=1000, completion_tokens=50)
    assert abs(est.tokens_per_char("m") - 1 / 3) < 1e-6
    f = est.features("r", "m", "x" * 3000, max_tokens=64)
    assert f.prompt_tokens == 1000
    # per model: another model keeps the prior
    assert est.tokens_per_char("other") == 0.25


def test_calibration_follows_a_change_in_the_tokenizer_ratio() -> None:
    est = Estimator()
    for _ in range(100):
        est.observe_usage("m", 4000, 1000, 10)
    for _ in range(400):
        est.observe_usage("m", 2000, 1000, 10)
    assert abs(est.tokens_per_char("m") - 0.5) < 0.01


@settings(max_examples=60, deadline=None)
@given(a=TEXT, b=TEXT, c=TEXT)
def test_prefix_hashes_chain(a: str, b: str, c: str) -> None:
    ha, hab, hac = prefix_hashes(a), prefix_hashes(a + b), prefix_hashes(a + c)
    whole = len(a) // 64
    # the same prefix gives the same leading hashes
    assert ha[:whole] == hab[:whole] == hac[:whole]
    assert len(hab) == (len(a) + len(b)) // 64


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="abc", min_size=64 * 6, max_size=64 * 10), k=st.integers(0, 5))
def test_a_change_in_block_k_changes_every_hash_from_k(text: str, k: int) -> None:
    pos = k * 64 + 10
    changed = text[:pos] + ("z" if text[pos] != "z" else "y") + text[pos + 1 :]
    h1, h2 = prefix_hashes(text), prefix_hashes(changed)
    assert h1[:k] == h2[:k]
    assert all(x != y for x, y in zip(h1[k:], h2[k:], strict=True))


@settings(max_examples=60, deadline=None)
@given(ascii_part=st.text(alphabet=string.printable, max_size=400), rest=TEXT, seed=st.integers(0))
def test_prefix_hashes_follow_their_definition_for_ascii_and_other_text(
    ascii_part: str, rest: str, seed: int
) -> None:
    """Block i's hash is xxh3 of its characters' UTF-8 seeded with block i-1's, whichever path
    (one encoding for ASCII text, a block at a time otherwise) computed it."""
    import xxhash

    for text in (ascii_part, ascii_part + rest):
        h, want = seed & 0xFFFFFFFFFFFFFFFF, []
        for i in range(min(len(text) // 64, 256)):
            h = xxhash.xxh3_64_intdigest(text[i * 64 : (i + 1) * 64].encode(), seed=h)
            want.append(h)
        assert prefix_hashes(text, seed=seed) == tuple(want)


def test_prefix_hashes_are_separated_by_model_and_bounded() -> None:
    text = "q" * 64 * 300
    assert (
        prefix_hashes(text, seed=model_seed("a"))[0] != prefix_hashes(text, seed=model_seed("b"))[0]
    )
    assert len(prefix_hashes(text)) == 256  # the GIE's MaxPrefixBlocksToMatch
    assert prefix_hashes("short") == ()


def test_chat_rendering_is_stable_across_turns() -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    turn1 = [system, {"role": "user", "content": "What is a KV cache?"}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": [{"type": "text", "text": "It stores keys and values."}]},
        {"role": "user", "content": "And a prefix cache?"},
    ]
    t1 = prompt_text({"messages": turn1})
    t2 = prompt_text({"messages": turn2})
    assert t2.startswith(t1)
    assert prompt_text({"messages": turn1}) == t1  # deterministic
    h1, h2 = prefix_hashes(t1), prefix_hashes(t2)
    assert h1 and h2[: len(h1)] == h1
    assert "KV cache" in t1 and "prefix cache" in t2


def test_completions_prompt_forms() -> None:
    assert prompt_text({"prompt": "hello"}) == "hello"
    assert prompt_text({"prompt": ["a", "b"]}) == "ab"
    assert len(prompt_text({"prompt": [1, 22, 333, 4444, 55555]})) == 20  # ~4 chars per token id
    assert prompt_text({}) == ""


def test_expected_output_is_bounded_by_the_learned_distribution() -> None:
    est = Estimator()
    assert est.features("r", "m", "hi", max_tokens=4096).expected_output_tokens == 1024
    assert est.features("r", "m", "hi", max_tokens=50).expected_output_tokens == 50
    assert est.features("r", "m", "hi", max_tokens=None).expected_output_tokens == 256
    for i in range(200):
        est.observe_usage("m", 100, 25, completion_tokens=100 + (i % 100))  # 100..199
    bound = est.output_bound("m")
    assert bound is not None and 185 <= bound <= 199  # the 90th percentile
    assert est.features("r", "m", "hi", max_tokens=4096).expected_output_tokens == bound
    assert est.features("r", "m", "hi", max_tokens=20).expected_output_tokens == 20
    assert est.features("r", "m", "hi", max_tokens=None).expected_output_tokens == bound


def test_phase() -> None:
    est = Estimator()
    long_prompt = est.features_from_tokens("a", "m", 6000, (), max_tokens=100)
    chatty = est.features_from_tokens("b", "m", 200, (), max_tokens=1000)
    assert long_prompt.phase == "prefill"
    assert chatty.phase == "decode"
    assert est.phase(400, 100) == "prefill" and est.phase(399, 100) == "decode"


def test_features_from_tokens_counts_blocks_in_tokens() -> None:
    est = Estimator()
    f = est.features_from_tokens("a", "m", 100, (1, 2, 3, 4, 5, 6), max_tokens=10, block_tokens=16)
    assert f.prompt_chars == 100 and f.block_chars == 16
    assert f.tokens_per_block == 16
    assert f.prompt_blocks == 6
    g = est.features("b", "m", "y" * 640, max_tokens=10)
    assert g.prompt_blocks == 10 and len(g.prefix_hashes) == 10
    assert g.tokens_per_block == 64 * g.prompt_tokens / 640
