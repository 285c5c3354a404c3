"""Demand as the gateways see it: requests held per pool, and the request rate.

Replica states come from the agents, but a pool scaled to zero has no replica and so no state: the
only sign that someone wants it is the gateways' saturation queue, where requests wait for a
replica. Every gateway publishes that queue (`kvpilot_gateway_queue_length{pool}`) and counts the
requests it answered (`kvpilot_gateway_requests_total{pool,...}`) on its /metrics; the controller
reads every gateway each tick (`controller.gateways`: a headless Service name resolves to one
address per gateway pod, as for the agents) and hands the sums to the replica policy
(`PoolObservation.held_requests`, `.arrival_rate_rps`): held requests scale a pool up from zero.

`parse_gateway_metrics` and `pool_demand` are pure; `GatewayDemand` is the HTTP edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from agent.client import Resolver, expand_url, resolve_addresses

log = logging.getLogger(__name__)

HELD = "kvpilot_gateway_queue_length"
ANSWERED = "kvpilot_gateway_requests_total"


@dataclass(frozen=True)
class GatewayReading:
    """One gateway's /metrics at one time: per pool, requests held now and answered so far."""

    at: float  # monotonic seconds
    held: Mapping[str, float]
    answered: Mapping[str, float]


@dataclass(frozen=True)
class PoolDemand:
    held: int = 0  # requests the gateways hold for the pool right now
    arrival_rate_rps: float | None = None  # requests/s answered since the previous reading


def parse_gateway_metrics(text: str, at: float) -> GatewayReading:
    """Sum a gateway's held and answered requests per pool (over workers, models, codes)."""
    held: dict[str, float] = {}
    answered: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            pool = s.labels.get("pool")
            if not pool:  # e.g. a request refused before its model named a pool
                continue
            if s.name == HELD:
                held[pool] = held.get(pool, 0.0) + s.value
            elif s.name == ANSWERED:
                answered[pool] = answered.get(pool, 0.0) + s.value
    return GatewayReading(at, held, answered)


def pool_demand(
    before: Mapping[str, GatewayReading], now: Mapping[str, GatewayReading]
) -> dict[str, PoolDemand]:
    """Held requests summed over the gateways read now; the rate from each gateway read both times.

    A gateway whose counter went down restarted: its count since the restart is its new value. A
    gateway read for the first time adds to `held` but not yet to the rate.
    """
    pools = {p for r in now.values() for p in (*r.held, *r.answered)}
    out: dict[str, PoolDemand] = {}
    for pool in sorted(pools):
        held = sum(r.held.get(pool, 0.0) for r in now.values())
        rate: float | None = None
        for gw, r in now.items():
            prev = before.get(gw)
            if prev is None or r.at <= prev.at:
                continue
            a, b = prev.answered.get(pool, 0.0), r.answered.get(pool, 0.0)
            delta = b - a if b >= a else b
            rate = (rate or 0.0) + delta / (r.at - prev.at)
        out[pool] = PoolDemand(int(round(held)), rate)
    return out


class GatewayDemand:
    """Reads every gateway's /metrics (URLs re-resolved each time) and returns `pool_demand`.

        demand = GatewayDemand(["http://kvpilot-gateway-pods.kvpilot.svc:8080"], session)
        by_pool = await demand()   # {pool: PoolDemand}

    A gateway that does not answer is left out of this reading (logged); when none answers the
    result is empty and the replica policy decides on the agents' states alone.
    """

    def __init__(
        self,
        urls: Sequence[str],
        session: aiohttp.ClientSession,
        *,
        timeout_s: float = 2.0,
        resolver: Resolver = resolve_addresses,
    ) -> None:
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.resolver = resolver
        self.last: dict[str, GatewayReading] = {}

    async def __call__(self) -> dict[str, PoolDemand]:
        targets: list[str] = []
        for url in self.urls:
            # a name that resolves to nothing is tried as it is (and logged when it fails)
            targets += await expand_url(url, self.resolver) or [url]
        readings = await asyncio.gather(*(self._read(u) for u in targets))
        now = {u: r for u, r in zip(targets, readings, strict=True) if r is not None}
        out = pool_demand(self.last, now)
        self.last = now
        return out

    async def _read(self, url: str) -> GatewayReading | None:
        try:
            async with self.session.get(f"{url}/metrics", timeout=self.timeout) as r:
                r.raise_for_status()
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("gateway %s: cannot read its metrics: %r", url, e)
            return None
        try:
            return parse_gateway_metrics(text, time.monotonic())
        except ValueError as e:
            log.warning("gateway %s: unreadable metrics: %s", url, e)
            return None
