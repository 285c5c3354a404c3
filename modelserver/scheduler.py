"""A vLLM-like engine as pure code: the caller owns the clock.

``Engine.step(now)`` plans one iteration the way vLLM V1's scheduler does and "runs" it through
:class:`modelserver.perf.PerfModel`, returning how long it took and the tokens it produced. The
live server sleeps that long (scaled) in wall time; the simulator adds it to virtual time. Both
run this same code.

Scheduling, as in vLLM V1 (``vllm/v1/core/sched/scheduler.py``):

1. Running requests first, in order: each gets the tokens it still lacks (1 for a decode, the
   rest of its prompt for a chunked prefill) up to the step's token budget
   (``max_num_batched_tokens``). When the KV cache has no block for it, the *newest* running
   request is preempted (recompute: its blocks are freed and it goes back to the front of the
   waiting queue, to be prefilled again with the tokens it has produced so far).
2. Then, if nothing was preempted, waiting requests in FCFS order while there is token budget, a
   free slot (``max_num_seqs``) and KV blocks: each first takes the longest prefix of its blocks
   found in the prefix cache, then a chunk of the rest of its prompt.

A request's first token comes out of the step that computes the last token of its prompt; after
that each step gives it one token. Generated tokens are a deterministic function of
(seed, request id); without ``ignore_eos`` a request stops at a natural length drawn from the same
seed (lognormal, median 200 tokens), bounded by ``min_tokens`` and ``max_tokens``.

Work per step is O(requests in the batch): one cheap update per scheduled request, a block
allocation every ``block_size`` tokens, one hash when a block fills.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from modelserver.kvcache import ROOT_HASH, BlockPool, block_hash
from modelserver.perf import PerfModel
from modelserver.profiles import GpuProfile, ModelProfile, check_dtype

NATURAL_LEN_MEDIAN = 200  # tokens: the median natural answer length without ignore_eos
NATURAL_LEN_SIGMA = 0.8  # lognormal shape: ~90 % of answers between 56 and 720 tokens
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX = 0xBF58476D1CE4E5B9


@dataclass(frozen=True)
class EngineConfig:
    model: ModelProfile
    gpu: GpuProfile
    num_gpus: int = 1
    dtype: str = "bf16"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # defaults to the model's context length
    num_gpu_blocks_override: int | None = None
    seed: int = 0

    @property
    def model_len(self) -> int:
        return self.max_model_len if self.max_model_len is not None else self.model.context_length

    def validate(self) -> None:
        """ValueError naming the field, its value and what was expected."""
        check_dtype(self.dtype)

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

        need(isinstance(self.num_gpus, int) and self.num_gpus >= 1, "num_gpus", "an integer >= 1")
        need(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1")
        need(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "max_num_batched_tokens",
            f">= max_num_seqs ({self.max_num_seqs}), so every running sequence can decode",
        )
        need(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", "a power of 2 <= 128")
        need(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "a value in (0, 1]")
        if self.max_model_len is not None:
            need(
                1 <= self.max_model_len <= self.model.context_length,
                "max_model_len",
                f"between 1 and {self.model.name}'s context length {self.model.context_length}",
            )
        if self.num_gpu_blocks_override is not None:
            need(self.num_gpu_blocks_override >= 1, "num_gpu_blocks_override", "an integer >= 1")


@dataclass(frozen=True, slots=True)
class TokenOutput:
    request_id: str
    token_id: int
    index: int  # 0 for the first generated token
    finish_reason: str | None  # None while running; "length" | "stop" on the last token
    num_cached_tokens: int = 0  # on the first token: prompt tokens served from the prefix cache
    queue_time_s: float = 0.0  # on the first token: arrival to first scheduled (vLLM's queue time)


@dataclass(frozen=True)
class StepOutput:
    start: float
    duration_s: float  # 0.0 when there was nothing to do
    outputs: tuple[TokenOutput, ...]
    num_prefill_tokens: int
    num_decode_seqs: int
    preempted: tuple[str, ...]  # request ids preempted (recompute) in this step
    compute_util: float  # 0-1, from PerfModel.utilisation
    mem_bw_util: float


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int  # includes preempted requests waiting to recompute
    num_gpu_blocks: int
    num_used_blocks: int  # blocks held by requests (free cached blocks not counted)
    block_size: int
    kv_usage: float  # num_used_blocks / num_gpu_blocks, like vllm:kv_cache_usage_perc
    prefix_queries_tokens: int  # cumulative, like vllm:prefix_cache_queries
    prefix_hits_tokens: int  # cumulative, like vllm:prefix_cache_hits
    num_preemptions: int  # cumulative
    prompt_tokens_total: int  # cumulative: prompt length of each request at its first token
    generation_tokens_total: int  # cumulative
    weight_bytes: int
    kv_bytes_per_block: int


class _Request:
    """Mutable engine-side state of one request (never leaves this module)."""

    __slots__ = (
        "request_id",
        "tokens",
        "prompt_len",
        "target",
        "finish_reason",
        "num_computed",
        "blocks",
        "hashes",
        "num_hashed",
        "num_output",
        "num_cached_tokens",
        "arrival_time",
        "queue_time",
        "state",
    )

    def __init__(
        self,
        request_id: str,
        tokens: list[int],
        target: int,
        finish_reason: str,
        arrival_time: float,
        state: int,
    ) -> None:
        self.request_id = request_id
        self.tokens = tokens  # prompt, then generated tokens
        self.prompt_len = len(tokens)
        self.target = target  # generated tokens at which it finishes
        self.finish_reason = finish_reason  # the reason it will finish with at target
        self.num_computed = 0  # tokens whose KV is in the cache
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # chained hashes of its full blocks, as far as known
        self.num_hashed = 0  # leading blocks registered in the prefix cache
        self.num_output = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 before it
        self.arrival_time = arrival_time
        self.queue_time = 0.0  # arrival to first admission into the running batch
        self.state = state  # token-id generator state


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.perf = PerfModel(config.model, config.gpu, config.num_gpus, config.dtype)
        self.perf.validate(config.gpu_memory_utilization)
        bs = config.block_size
        self._kv_bytes_per_block = self.perf.kv_bytes_per_block(bs)
        if config.num_gpu_blocks_override is not None:
            self.num_gpu_blocks = config.num_gpu_blocks_override
        else:
            kv = self.perf.kv_cache_bytes(config.gpu_memory_utilization)
            self.num_gpu_blocks = kv // self._kv_bytes_per_block
        if self.num_gpu_blocks < 1:
            raise ValueError(
                f"{config.model.name} on {config.num_gpus} x {config.gpu.alias}: the KV cache "
                f"has room for no block of {bs} tokens ({self._kv_bytes_per_block} bytes)"
            )
        self.pool = BlockPool(self.num_gpu_blocks)
        self.max_model_len = config.model_len
        self._vocab = config.model.vocab_size
        self._requests: dict[str, _Request] = {}
        self._running: list[_Request] = []
        self._waiting: deque[_Request] = deque()
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._preemptions = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0

    # ------------------------------------------------------------------------- requests
    def validate(self, prompt_len: int, max_tokens: int) -> None:
        """ValueError with an OpenAI-style message when the request can never be served."""
        if prompt_len < 1:
            raise ValueError("The prompt must contain at least one token.")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({prompt_len} in the messages, {max_tokens} in "
                "the completion). Please reduce the length of the messages or completion."
            )
        blocks = -(-total // self.config.block_size)
        if blocks > self.num_gpu_blocks:
            raise ValueError(
                f"This request needs {total} tokens of KV cache ({blocks} blocks of "
                f"{self.config.block_size}), more than this server's whole cache holds "
                f"({self.num_gpu_blocks * self.config.block_size} tokens). Please reduce the "
                "length of the messages or completion."
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        arrival_time: float = 0.0,
        sample_key: str | None = None,
    ) -> None:
        """Queue a request. Its tokens and natural length are drawn from (seed, sample_key),
        sample_key defaulting to the request id: equal keys give equal answers, like greedy
        decoding of the same prompt."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        self.validate(len(prompt_token_ids), max_tokens)
        if min_tokens < 0 or min_tokens > max_tokens:
            raise ValueError(f"min_tokens must be between 0 and max_tokens, got {min_tokens}.")
        key = request_id if sample_key is None else sample_key
        seed = xxhash.xxh64_intdigest(key.encode(), seed=self.config.seed & _MASK64)
        target, reason = max_tokens, "length"
        if not ignore_eos:
            natural = random.Random(seed).lognormvariate(
                math.log(NATURAL_LEN_MEDIAN), NATURAL_LEN_SIGMA
            )
            natural = max(1, min_tokens, round(natural))
            if natural < max_tokens:
                target, reason = natural, "stop"
        req = _Request(request_id, list(prompt_token_ids), target, reason, arrival_time, seed)
        self._requests[request_id] = req
        self._waiting.append(req)

    def abort_request(self, request_id: str) -> bool:
        """Forget a request at once, freeing its KV blocks. True if it was known."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req.blocks:
            self.pool.free_blocks(req.blocks)
            req.blocks = []
        try:
            self._running.remove(req)
        except ValueError:
            self._waiting.remove(req)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    def stats(self) -> EngineStats:
        used = self.pool.num_used
        return EngineStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_gpu_blocks=self.num_gpu_blocks,
            num_used_blocks=used,
            block_size=self.config.block_size,
            kv_usage=used / self.num_gpu_blocks,
            prefix_queries_tokens=self._prefix_queries,
            prefix_hits_tokens=self._prefix_hits,
            num_preemptions=self._preemptions,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            weight_bytes=self.perf.weight_bytes,
            kv_bytes_per_block=self._kv_bytes_per_block,
        )

    # ------------------------------------------------------------------------- the step
    def step(self, now: float) -> StepOutput:
        """Plan and "run" one iteration starting at ``now``; the caller advances its clock by
        ``duration_s`` and delivers the outputs at ``now + duration_s``."""
        cfg = self.config
        bs = cfg.block_size
        pool = self.pool
        running = self._running
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[_Request, int]] = []
        preempted: list[str] = []
        prefill_tokens = attended = decode_seqs = decode_ctx = 0

        # 1. Running requests, oldest first.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            nc = req.num_computed
            num_new = len(req.tokens) - nc
            if num_new > budget:
                num_new = budget
            need = (nc + num_new + bs - 1) // bs - len(req.blocks)
            if need > 0:
                while need > pool.num_free and running[-1] is not req:
                    victim = running.pop()  # the newest request gives its blocks back
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                if need > pool.num_free:  # nothing newer left to take from: req waits itself
                    running.pop()
                    self._preempt(req)
                    preempted.append(req.request_id)
                    break
                req.blocks += pool.allocate(need)
            scheduled.append((req, num_new))
            budget -= num_new
            if num_new == 1:
                decode_seqs += 1
                decode_ctx += nc + 1
            else:
                prefill_tokens += num_new
                attended += num_new * nc + num_new * (num_new + 1) // 2
            i += 1

        # 2. Waiting requests, FCFS, unless this step had to preempt.
        if not preempted:
            waiting = self._waiting
            caching = cfg.enable_prefix_caching
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                req = waiting[0]
                num_tokens = len(req.tokens)
                hit: list[int] = []
                if caching:
                    self._extend_hashes(req, num_tokens // bs)
                    # Always leave the last token to compute: its logits give the next token.
                    hit = pool.lookup(req.hashes, (num_tokens - 1) // bs)
                nc = len(hit) * bs
                num_new = num_tokens - nc
                if num_new > budget:
                    num_new = budget
                need = (nc + num_new + bs - 1) // bs - len(hit)
                if need > pool.num_free_after_touch(hit):
                    break
                pool.touch(hit)
                req.blocks = hit + pool.allocate(need)
                req.num_computed = nc
                req.num_hashed = len(hit)
                if caching:
                    self._prefix_queries += num_tokens
                    self._prefix_hits += nc
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = nc
                    req.queue_time = max(0.0, now - req.arrival_time)
                waiting.popleft()
                running.append(req)
                scheduled.append((req, num_new))
                budget -= num_new
                if num_new == 1:
                    decode_seqs += 1
                    decode_ctx += nc + 1
                else:
                    prefill_tokens += num_new
                    attended += num_new * nc + num_new * (num_new + 1) // 2

        if not scheduled:
            return StepOutput(now, 0.0, (), 0, 0, tuple(preempted), 0.0, 0.0)

        # 3. "Execute": advance each scheduled request; sample where its tokens are all computed.
        outputs: list[TokenOutput] = []
        finished = False
        caching = cfg.enable_prefix_caching
        vocab = self._vocab
        for req, num_new in scheduled:
            nc = req.num_computed = req.num_computed + num_new
            if caching and nc // bs > req.num_hashed:
                self._cache_full_blocks(req, nc // bs)
            if nc < len(req.tokens):
                continue  # a prefill chunk that did not reach the end
            k = req.num_output
            state = (req.state + (k + 1) * _GOLDEN) & _MASK64
            token = ((state ^ (state >> 31)) * _MIX & _MASK64) % vocab
            req.tokens.append(token)
            req.num_output = k + 1
            cached = 0
            queued = 0.0
            if k == 0:
                self._prompt_tokens += req.prompt_len
                cached = req.num_cached_tokens
                queued = req.queue_time
            if k + 1 >= req.target:
                outputs.append(
                    TokenOutput(req.request_id, token, k, req.finish_reason, cached, queued)
                )
                pool.free_blocks(req.blocks)
                req.blocks = []
                del self._requests[req.request_id]
                req.num_computed = -1  # marks it finished for the sweep below
                finished = True
            else:
                outputs.append(TokenOutput(req.request_id, token, k, None, cached, queued))
        self._generation_tokens += len(outputs)
        if finished:
            self._running = [r for r in running if r.num_computed >= 0]

        duration = self.perf.step_time(prefill_tokens, attended, decode_seqs, decode_ctx)
        compute, memory = self.perf.utilisation(prefill_tokens, attended, decode_seqs, decode_ctx)
        return StepOutput(
            now,
            duration,
            tuple(outputs),
            prefill_tokens,
            decode_seqs,
            tuple(preempted),
            compute,
            memory,
        )

    # ------------------------------------------------------------------------- helpers
    def _preempt(self, req: _Request) -> None:
        """Recompute preemption: free everything, back to the front of the waiting queue."""
        self.pool.free_blocks(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_hashed = 0
        self._waiting.appendleft(req)
        self._preemptions += 1

    def _extend_hashes(self, req: _Request, num_blocks: int) -> None:
        """Compute chained hashes of ``req``'s first ``num_blocks`` full blocks (once each)."""
        hashes, tokens, bs = req.hashes, req.tokens, self.config.block_size
        parent = hashes[-1] if hashes else ROOT_HASH
        for b in range(len(hashes), num_blocks):
            parent = block_hash(parent, tokens[b * bs : (b + 1) * bs])
            hashes.append(parent)

    def _cache_full_blocks(self, req: _Request, num_full: int) -> None:
        """Register ``req``'s newly full blocks in the prefix cache."""
        self._extend_hashes(req, num_full)
        pool, blocks, hashes = self.pool, req.blocks, req.hashes
        for b in range(req.num_hashed, num_full):
            pool.cache(blocks[b], hashes[b])
        req.num_hashed = num_full
