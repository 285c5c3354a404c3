"""Which replica serves a request: every routing policy behind one interface, by name.

Policies (docs/routing.md says how each decides):
- round-robin, random, least-request, power-of-two: the classic load balancers;
- gie: the Gateway API Inference Extension endpoint picker's default profile;
- cache-aware: the SGLang / vLLM router's cache-aware policy;
- headroom: kvpilot's own, a predicted-cost minimiser over TTFT, decode harm and KV pressure.

The interface and the data a pick reads are in `gateway/policy.py`, the published policies in
`gateway/baselines.py`, headroom in `gateway/headroom.py`. All are pure code: no I/O, no asyncio,
no wall clock, so the gateway, the tests and the simulator run exactly the same picks. A pick is
O(replicas) (plus O(log prefix blocks) per replica that holds the request's first prefix block).
"""

from __future__ import annotations

from typing import Any

from gateway.baselines import (
    CacheAware,
    GieDefault,
    LeastRequest,
    PowerOfTwo,
    RandomPick,
    RoundRobin,
)
from gateway.headroom import Headroom
from gateway.policy import (
    Decision,
    Policy,
    RateSeed,
    ReplicaView,
    rate_seed_for,
    rate_seed_from_perf,
)

__all__ = [
    "POLICY_NAMES",
    "CacheAware",
    "Decision",
    "GieDefault",
    "Headroom",
    "LeastRequest",
    "Policy",
    "PowerOfTwo",
    "RandomPick",
    "RateSeed",
    "ReplicaView",
    "RoundRobin",
    "make_policy",
    "rate_seed_for",
    "rate_seed_from_perf",
]

POLICY_NAMES = (
    "round-robin",
    "random",
    "least-request",
    "power-of-two",
    "gie",
    "cache-aware",
    "headroom",
)

_POLICIES: dict[str, type] = {
    "round-robin": RoundRobin,
    "random": RandomPick,
    "least-request": LeastRequest,
    "power-of-two": PowerOfTwo,
    "gie": GieDefault,
    "cache-aware": CacheAware,
    "headroom": Headroom,
}


def make_policy(name: str, seed: int = 0, **options: Any) -> Policy:
    """A fresh policy by name; `options` are its keyword settings (e.g. headroom's weights)."""
    cls = _POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; expected one of {list(POLICY_NAMES)}")
    return cls(seed, **options)  # type: ignore[no-any-return]
