"""The published routing policies kvpilot is measured against, each faithful to its source.

- round-robin, random, least-request, power-of-two: the classic load balancers;
- gie: the Gateway API Inference Extension endpoint picker's default profile;
- cache-aware: the SGLang / vLLM router's cache-aware policy.
docs/routing.md says how each decides and where it comes from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.estimate import RequestFeatures
from gateway.policy import NO_REPLICAS, BasePolicy, Decision, ReplicaView, usable
from gateway.prefix import DEFAULT_CAPACITY, PrefixIndex


class RoundRobin(BasePolicy):
    name = "round-robin"

    def __init__(self, seed: int = 0, debug: bool = False) -> None:
        super().__init__(seed, debug)
        self._next = 0

    def pick(self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = usable(replicas)
        if not cands:
            return NO_REPLICAS
        v = cands[self._next % len(cands)]
        self._next += 1
        return Decision(v.replica_id, "round-robin")


class RandomPick(BasePolicy):
    name = "random"

    def pick(self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = usable(replicas)
        if not cands:
            return NO_REPLICAS
        return Decision(self.rng.choice(cands).replica_id, "random")


class LeastRequest(BasePolicy):
    """Fewest requests in flight from this gateway (Envoy LEAST_REQUEST over all hosts); ties random."""

    name = "least-request"

    def pick(self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = usable(replicas)
        if not cands:
            return NO_REPLICAS
        best = min(v.inflight.requests for v in cands)
        ties = [v for v in cands if v.inflight.requests == best]
        v = ties[0] if len(ties) == 1 else self.rng.choice(ties)
        return Decision(v.replica_id, "least-request")


class PowerOfTwo(BasePolicy):
    """Sample two distinct replicas, keep the one with fewer requests in flight."""

    name = "power-of-two"

    def pick(self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = usable(replicas)
        if not cands:
            return NO_REPLICAS
        if len(cands) == 1:
            return Decision(cands[0].replica_id, "power-of-two")
        a, b = self.rng.sample(cands, 2)
        v = b if b.inflight.requests < a.inflight.requests else a
        scores = (
            {a.replica_id: a.inflight.requests, b.replica_id: b.inflight.requests}
            if self.debug
            else None
        )
        return Decision(v.replica_id, "power-of-two", scores)


class GieDefault(BasePolicy):
    """The Inference Gateway (GIE) endpoint picker's default scheduling profile.

    Saturation filter (waiting >= 5 or KV usage >= 0.8), failing open to all replicas when every
    one is saturated; then queue scorer x2 (waiting queue, min-max normalised: shortest 1, longest
    0, all equal 1), KV-cache utilisation scorer x2 (1 - usage), prefix-cache scorer x3 (matched
    leading 64-char blocks / the request's blocks, from an LRU index per server updated with every
    pick); max-score picker with random tie-break (it shuffles, then takes the highest).
    Only the replicas' scraped metrics are used: the GIE keeps no in-flight account.
    """

    name = "gie"

    def __init__(
        self,
        seed: int = 0,
        debug: bool = False,
        *,
        queue_weight: float = 2.0,
        kv_weight: float = 2.0,
        prefix_weight: float = 3.0,
        queue_threshold: int = 5,
        kv_threshold: float = 0.8,
        lru_capacity_per_server: int = DEFAULT_CAPACITY,
    ) -> None:
        super().__init__(seed, debug)
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self.prefix_weight = prefix_weight
        self.queue_threshold = queue_threshold
        self.kv_threshold = kv_threshold
        self.index: PrefixIndex = PrefixIndex(lru_capacity_per_server)

    def pick(self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = usable(replicas)
        if not cands:
            return NO_REPLICAS
        qt, kt = self.queue_threshold, self.kv_threshold
        ok = [
            v for v in cands if v.state is None or (v.state.waiting < qt and v.state.kv_usage < kt)
        ]
        reason = "highest-score"
        if not ok:
            ok, reason = cands, "fail-open"
        queues = [v.state.waiting if v.state is not None else 0 for v in ok]
        qmin, qmax = min(queues), max(queues)
        qspan = qmax - qmin
        hashes = req.prefix_hashes
        matches = self.index.match(hashes) if hashes else {}
        total = len(hashes)
        wq, wk, wp = self.queue_weight, self.kv_weight, self.prefix_weight
        best: ReplicaView | None = None
        best_score = -math.inf
        ties = 0
        scores: dict[str, float] | None = {} if self.debug else None
        rng = self.rng
        for v, q in zip(ok, queues, strict=True):
            qs = 1.0 if qspan == 0 else (qmax - q) / qspan
            ks = 1.0 - (v.state.kv_usage if v.state is not None else 0.0)
            ps = matches.get(v.replica_id, 0) / total if total else 0.0
            s = wq * qs + wk * ks + wp * ps
            if scores is not None:
                scores[v.replica_id] = s
            if s > best_score + 1e-12:
                best, best_score, ties = v, s, 1
            elif s >= best_score - 1e-12:
                ties += 1  # reservoir sampling: a uniform choice among equal scores
                if rng.random() * ties < 1.0:
                    best = v
        assert best is not None
        if hashes:
            self.index.add(best.replica_id, hashes)
        return Decision(best.replica_id, reason, scores)

    def forget(self, replica_id: str) -> None:
        self.index.remove(replica_id)


class CacheAware(BasePolicy):
    """The SGLang router's cache-aware policy (also vLLM's router's).

    When the load (requests in flight from the router) is imbalanced — max - min > 64 and
    max > 1.5 x min — the least-loaded replica. Otherwise the replica whose approximate radix
    tree (here: the block-hash index of what was routed to it) matches the longest prefix, if the
    match covers more than 30 % of the prompt; else the replica with the smallest tree (the most
    free cache). The chosen replica's tree gets the prompt either way. Never returns None.
    """

    name = "cache-aware"

    def __init__(
        self,
        seed: int = 0,
        debug: bool = False,
        *,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        cache_threshold: float = 0.3,
        max_tree_chars: int = 2**26,
        block_chars: int = 64,
    ) -> None:
        super().__init__(seed, debug)
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.cache_threshold = cache_threshold
        self.index: PrefixIndex = PrefixIndex(max(1, max_tree_chars // block_chars))

    def pick(self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = usable(replicas)
        if not cands:
            return NO_REPLICAS
        loads = [v.inflight.requests for v in cands]
        lo, hi = min(loads), max(loads)
        hashes = req.prefix_hashes
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            v = cands[loads.index(lo)]
            reason = "imbalanced"
        else:
            matches = self.index.match(hashes) if hashes else {}
            v = None
            if matches:
                ids = {c.replica_id: c for c in cands}
                # the longest match; among equal matches the less loaded holder
                blocks, _, rid = max(
                    ((n, -ids[r].inflight.requests, r) for r, n in matches.items() if r in ids),
                    default=(0, 0, None),
                )
                rate = blocks * req.block_chars / req.prompt_chars if req.prompt_chars else 0.0
                if rid is not None and rate > self.cache_threshold:
                    v = ids[rid]
            if v is not None:
                reason = "prefix-affinity"
            else:
                size = self.index.size
                v = min(cands, key=lambda c: (size(c.replica_id), c.inflight.requests))
                reason = "smallest-tree"
        if hashes:
            self.index.add(v.replica_id, hashes)
        return Decision(v.replica_id, reason)

    def forget(self, replica_id: str) -> None:
        self.index.remove(replica_id)
