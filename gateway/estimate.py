"""Request features: what the picker knows about a request before it is sent anywhere.

Pure code. The gateway calls `Estimator.features` on each request's prompt text; the simulator,
which knows exact token counts, calls `Estimator.features_from_tokens`. Both learn online from the
`usage` that responses report: the prompt's tokens per character (per model) and the distribution
of real completion lengths that bounds `max_tokens`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import xxhash

DEFAULT_BLOCK_CHARS = 64  # the GIE prefix plugin's default: vLLM's 16-token block at ~4 chars/token
DEFAULT_MAX_PREFIX_BLOCKS = 256  # the GIE default: prompts beyond 16k characters share a hash tail
DEFAULT_TOKENS_PER_CHAR = 0.25  # ~4 characters per token for English under Llama-like tokenizers


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    request_id: str
    model: str
    prompt_chars: int
    prompt_tokens: int  # estimated (calibrated), or exact in the simulator
    max_tokens: int | None
    expected_output_tokens: int  # max_tokens bounded by the learned per-model distribution
    prefix_hashes: tuple[int, ...]  # chained xxhash over fixed-size character blocks of the prompt
    block_chars: int  # characters per prefix block (tokens per block from features_from_tokens)
    phase: str  # "prefill" | "decode"
    priority: int = 0

    @property
    def tokens_per_block(self) -> float:
        """Prompt tokens one prefix block stands for, to turn matched blocks into cached tokens."""
        if self.prompt_chars <= 0:
            return 0.0
        return self.block_chars * self.prompt_tokens / self.prompt_chars

    @property
    def prompt_blocks(self) -> int:
        """Whole prefix blocks in the prompt (may exceed len(prefix_hashes) when truncated)."""
        return self.prompt_chars // self.block_chars if self.block_chars > 0 else 0


def prefix_hashes(
    text: str,
    block_chars: int = DEFAULT_BLOCK_CHARS,
    *,
    seed: int = 0,
    max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
) -> tuple[int, ...]:
    """Chained hashes of the prompt's whole `block_chars`-character blocks.

    Block i's hash is seeded with block i-1's, so equal leading hashes mean an equal prefix and a
    change in block k changes every hash from k on. The trailing partial block is not hashed (a
    model server cannot reuse a partial block either). `seed` separates models.
    """
    n = min(len(text) // block_chars, max_blocks)
    out = []
    h = seed & 0xFFFFFFFFFFFFFFFF
    digest = xxhash.xxh3_64_intdigest
    end = n * block_chars
    if text.isascii():
        # one byte a character: slices of one encoding are the blocks' encodings (the same
        # hashes at ~0.6x the cost of a str slice and an encode per block; a long prompt has 256)
        data = text[:end].encode()
        for i in range(0, end, block_chars):
            h = digest(data[i : i + block_chars], h)
            out.append(h)
        return tuple(out)
    for i in range(0, end, block_chars):
        block = text[i : i + block_chars]
        h = digest(block.encode("utf-8", "surrogatepass"), h)
        out.append(h)
    return tuple(out)


def model_seed(model: str) -> int:
    """The first block's seed for `model`, so different models never share prefix hashes."""
    return xxhash.xxh3_64_intdigest(model.encode())


def prompt_text(body: dict[str, Any]) -> str:
    """The request's prompt as one string: completions' prompt, or chat messages rendered in order.

    Each message renders independently of the ones after it, so turn n+1's rendering starts with
    turn n's and multi-turn conversations keep a matching prefix.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            role = m.get("role", "")
            name = m.get("name")
            head = f"<|{role}|>" if not name else f"<|{role}:{name}|>"
            parts.append(f"{head}\n{_content_text(m.get('content'))}")
            calls = m.get("tool_calls")
            if isinstance(calls, list):
                for c in calls:
                    fn = c.get("function", {}) if isinstance(c, dict) else {}
                    parts.append(f"<|call|>{fn.get('name', '')}({fn.get('arguments', '')})")
            parts.append("\n")
        return "".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if all(isinstance(p, int) for p in prompt):
            # token ids: ~4 characters each keeps the calibrated estimate in range
            return "".join(f"{p:>4}"[-4:] for p in prompt)
        return "".join(p if isinstance(p, str) else str(p) for p in prompt)
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text":
                    out.append(str(part.get("text", "")))
                else:
                    out.append(f"<|{part.get('type', 'part')}|>")
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    return "" if content is None else str(content)


class _ModelStats:
    """Per-model calibration: decayed sums of usage, and recent completion lengths."""

    __slots__ = ("tokens", "chars", "completions", "bound", "since_bound")

    def __init__(self, window: int) -> None:
        self.tokens = 0.0
        self.chars = 0.0
        self.completions: deque[int] = deque(maxlen=window)
        self.bound: int | None = None
        self.since_bound = 0


class Estimator:
    """Per-model online calibration; one per gateway (or simulation).

    - tokens per character: the ratio of decayed sums of reported `usage.prompt_tokens` to the
      characters of those prompts (so it converges to the tokenizer's real ratio for the traffic);
    - output length: `max_tokens` bounded by a high quantile of recent real completion lengths
      (clients often ask for far more than they use; the KV need should not assume the worst);
    - phase: "prefill" when the prompt's work dominates the expected output.
    """

    def __init__(
        self,
        *,
        block_chars: int = DEFAULT_BLOCK_CHARS,
        max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
        tokens_per_char: float = DEFAULT_TOKENS_PER_CHAR,
        decay: float = 0.98,
        output_window: int = 512,
        output_quantile: float = 0.9,
        default_output_tokens: int = 256,
        max_output_guess: int = 1024,
        prefill_ratio: float = 4.0,
        min_samples: int = 8,
    ) -> None:
        self.block_chars = block_chars
        self.max_prefix_blocks = max_prefix_blocks
        self.prior_tokens_per_char = tokens_per_char
        self.decay = decay
        self.output_window = output_window
        self.output_quantile = output_quantile
        self.default_output_tokens = default_output_tokens
        self.max_output_guess = max_output_guess
        self.prefill_ratio = prefill_ratio
        self.min_samples = min_samples
        self._models: dict[str, _ModelStats] = {}
        self._seeds: dict[str, int] = {}

    def _stats(self, model: str) -> _ModelStats:
        s = self._models.get(model)
        if s is None:
            s = self._models[model] = _ModelStats(self.output_window)
        return s

    def tokens_per_char(self, model: str) -> float:
        s = self._models.get(model)
        if s is None or s.chars <= 0:
            return self.prior_tokens_per_char
        return s.tokens / s.chars

    def output_bound(self, model: str) -> int | None:
        """The learned high quantile of completion lengths, None before any usage was seen."""
        s = self._models.get(model)
        return None if s is None else s.bound

    def expected_output(self, model: str, max_tokens: int | None) -> int:
        bound = self.output_bound(model)
        if bound is None:
            guess = self.default_output_tokens if max_tokens is None else max_tokens
            return max(1, min(guess, self.max_output_guess))
        if max_tokens is None:
            return max(1, bound)
        return max(1, min(max_tokens, bound))

    def phase(self, uncached_prompt_tokens: float, expected_output_tokens: int) -> str:
        return (
            "prefill"
            if uncached_prompt_tokens >= self.prefill_ratio * expected_output_tokens
            else "decode"
        )

    def features(
        self,
        request_id: str,
        model: str,
        prompt_text: str,
        max_tokens: int | None,
        priority: int = 0,
    ) -> RequestFeatures:
        chars = len(prompt_text)
        tokens = max(1, round(chars * self.tokens_per_char(model)))
        seed = self._seeds.get(model)
        if seed is None:
            seed = self._seeds[model] = model_seed(model)
        hashes = prefix_hashes(
            prompt_text, self.block_chars, seed=seed, max_blocks=self.max_prefix_blocks
        )
        out = self.expected_output(model, max_tokens)
        return RequestFeatures(
            request_id=request_id,
            model=model,
            prompt_chars=chars,
            prompt_tokens=tokens,
            max_tokens=max_tokens,
            expected_output_tokens=out,
            prefix_hashes=hashes,
            block_chars=self.block_chars,
            phase=self.phase(tokens, out),
            priority=priority,
        )

    def features_from_tokens(
        self,
        request_id: str,
        model: str,
        prompt_tokens: int,
        prefix_hashes: tuple[int, ...],
        max_tokens: int | None,
        priority: int = 0,
        *,
        block_tokens: int = 16,
    ) -> RequestFeatures:
        """Features from exact lengths: `prefix_hashes` are over `block_tokens`-token blocks.

        Characters are counted as tokens here (`prompt_chars == prompt_tokens`,
        `block_chars == block_tokens`), so the picker's block-to-token arithmetic holds unchanged.
        """
        out = self.expected_output(model, max_tokens)
        return RequestFeatures(
            request_id=request_id,
            model=model,
            prompt_chars=prompt_tokens,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            expected_output_tokens=out,
            prefix_hashes=tuple(prefix_hashes),
            block_chars=block_tokens,
            phase=self.phase(prompt_tokens, out),
            priority=priority,
        )

    def observe_usage(
        self, model: str, prompt_chars: int, prompt_tokens: int, completion_tokens: int
    ) -> None:
        s = self._stats(model)
        if prompt_chars > 0 and prompt_tokens > 0:
            s.tokens = s.tokens * self.decay + prompt_tokens
            s.chars = s.chars * self.decay + prompt_chars
        if completion_tokens > 0:
            s.completions.append(completion_tokens)
            s.since_bound += 1
            n = len(s.completions)
            # a few samples before trusting the distribution; then re-sort every 16 observations
            # so the cost stays amortised O(log n)
            if n >= self.min_samples and (n < 64 or s.since_bound >= 16):
                s.since_bound = 0
                ordered = sorted(s.completions)
                k = min(len(ordered) - 1, math.ceil(self.output_quantile * len(ordered)) - 1)
                s.bound = ordered[max(0, k)]
