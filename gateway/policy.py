"""The interface every routing policy implements, and the plain data a pick reads.

No I/O, no asyncio, no wall clock: time comes in as `now`, so the gateway, the tests and the
simulator run exactly the same policies. `gateway/picker.py` names them and makes them;
`gateway/baselines.py` holds the published ones, `gateway/headroom.py` kvpilot's own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.estimate import RequestFeatures
from gateway.inflight import EMPTY, InFlight
from gateway.prefix import PrefixIndex
from kvpilot.signals import ReplicaState


@dataclass(frozen=True, slots=True)
class RateSeed:
    """A replica's speed before anything was measured: from its GPU and model profile."""

    prefill_tokens_per_s: float = 10_000.0
    decode_step_s: float = 0.025  # one decode step with `typical_batch` sequences running
    decode_step_base_s: float = 0.015  # one decode step with a single sequence
    typical_batch: int = 32
    chunk_tokens: int = 8192  # tokens per engine step (vLLM max_num_batched_tokens)
    kv_blocks_total: int = 0  # 0: unknown (the state says)
    block_size: int = 16
    max_num_seqs: int = 256  # the engine's batch cap (vLLM max_num_seqs)

    def decode_step(self, batch: float) -> float:
        """Decode step time at `batch` sequences, linear through the two measured points."""
        slope = (self.decode_step_s - self.decode_step_base_s) / max(1, self.typical_batch - 1)
        return self.decode_step_base_s + slope * max(0.0, batch - 1)


DEFAULT_SEED = RateSeed()


def rate_seed_from_perf(
    perf: Any,
    *,
    typical_batch: int = 32,
    typical_context: int = 1024,
    prefill_probe_tokens: int = 2048,
    chunk_tokens: int = 8192,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    max_num_seqs: int = 256,
) -> RateSeed:
    """Build a RateSeed from a `modelserver.perf.PerfModel` (the roofline model of a GPU+model).

    The prefill rate is a probe prompt's tokens over its step time; decode step times are for one
    sequence and for `typical_batch` sequences at `typical_context` tokens each.
    """
    p = prefill_probe_tokens
    prefill_s = perf.step_time(p, p, 0, 0)
    base = perf.step_time(0, 0, 1, typical_context)
    typical = perf.step_time(0, 0, typical_batch, typical_batch * typical_context)
    kv_blocks = 0
    try:
        per_token = float(perf.kv_bytes_per_token())
        if per_token > 0:
            kv_blocks = int(perf.kv_cache_bytes(gpu_memory_utilization) // (per_token * block_size))
    except (AttributeError, TypeError):
        kv_blocks = 0
    return RateSeed(
        prefill_tokens_per_s=p / prefill_s if prefill_s > 0 else DEFAULT_SEED.prefill_tokens_per_s,
        decode_step_s=typical,
        decode_step_base_s=base,
        typical_batch=typical_batch,
        chunk_tokens=chunk_tokens,
        kv_blocks_total=kv_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
    )


def rate_seed_for(model: str, gpu: str, num_gpus: int = 1, dtype: str = "bf16") -> RateSeed:
    """The seed for a model on a GPU type (alias or GKE label), from modelserver's profiles."""
    from modelserver.perf import PerfModel  # lazy: the gateway image need not load it otherwise
    from modelserver.profiles import resolve_gpu, resolve_model

    perf = PerfModel(
        model=resolve_model(model), gpu=resolve_gpu(gpu), num_gpus=num_gpus, dtype=dtype
    )
    return rate_seed_from_perf(perf)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    replica_id: str
    state: ReplicaState | None  # latest agent/scraped state; None when no signal at all
    inflight: InFlight = EMPTY
    ejected: bool = False  # consecutive failures / terminating: never picked
    profile: RateSeed | None = None  # speed seed from modelserver.perf for its GPU and model


@dataclass(frozen=True, slots=True)
class Decision:
    replica_id: str | None  # None: every replica saturated -> the caller queues (or sheds)
    reason: str
    scores: dict[str, float] | None = None  # with debug=True: each candidate's score or cost


class Policy(Protocol):
    name: str

    def pick(
        self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float
    ) -> Decision: ...

    def observe(
        self,
        replica_id: str,
        req: RequestFeatures,
        ttft_s: float | None,
        tpot_s: float | None,
        now: float,
    ) -> None: ...

    def learned(self) -> dict[str, tuple[float, float]]: ...

    def learn_from_peers(self, deltas: dict[str, tuple[float, float]]) -> None: ...

    def keep_journal(self) -> None: ...

    def drain_picks(self) -> list[tuple[str, tuple[int, ...], tuple[float, ...]]]: ...

    def peer_picked(self, rid: str, hashes: tuple[int, ...], note: tuple[float, ...]) -> None: ...


NO_REPLICAS = Decision(None, "no-replicas")
# The reason of a pick that places nothing because the request's KV need exceeds the whole cache
# of every replica offered: it would wait forever, so the gateway refuses it (400) instead.
EXCEEDS_KV = "exceeds-kv-capacity"


def usable(replicas: Sequence[ReplicaView]) -> list[ReplicaView]:
    """Non-ejected replicas whose state does not say unhealthy; unhealthy ones only if nothing else."""
    ok = [v for v in replicas if not v.ejected and (v.state is None or v.state.healthy)]
    if ok:
        return ok
    return [v for v in replicas if not v.ejected]


class BasePolicy:
    """What every policy shares: a seeded random source, `debug`, and no-op learning hooks."""

    name = ""
    # Which replica holds which prompt blocks: set by the policies that route by prefix affinity
    # (cache-aware, gie, headroom); what gateway workers share of their picks goes through it.
    index: PrefixIndex | None = None

    def __init__(self, seed: int = 0, debug: bool = False) -> None:
        self.rng = random.Random(seed)
        self.debug = debug

    def observe(
        self,
        replica_id: str,
        req: RequestFeatures,
        ttft_s: float | None,
        tpot_s: float | None,
        now: float,
    ) -> None:
        return None

    def forget(self, replica_id: str) -> None:
        """The replica left the pool."""
        return None

    def learned(self) -> dict[str, tuple[float, float]]:
        """What this process learned, cumulative, for other gateway workers (gateway/peers.py)."""
        return {}

    def learn_from_peers(self, deltas: dict[str, tuple[float, float]]) -> None:
        """Take what other gateway workers learned since last time."""
        return None

    # Picks shared between gateway workers (gateway/peers.py), through the policy's prefix
    # index, where it has one: its journal holds this worker's own picks.

    def keep_journal(self) -> None:
        if self.index is not None:
            self.index.keep_journal()

    def drain_picks(self) -> list[tuple[str, tuple[int, ...], tuple[float, ...]]]:
        """(replica, block hashes, what a peer learns from it) of this worker's picks since."""
        return self.index.drain() if self.index is not None else []

    def peer_picked(self, rid: str, hashes: tuple[int, ...], note: tuple[float, ...]) -> None:
        """Another gateway worker sent a request with these block hashes to `rid`."""
        if hashes and self.index is not None:
            self.index.add(rid, hashes, from_peer=True)
