"""The saturation queue on its own: priority order, bounded size, shedding, timeouts, wake-ups.

The picker is replaced by a tiny capacity counter (a pure function of plain data, like the real
one): it grants a replica while slots are free and takes a slot in the same step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import pytest

from gateway import errors
from gateway.errors import GatewayError
from gateway.estimate import Estimator, RequestFeatures
from gateway.fleet import Fleet
from gateway.picker import Decision, Headroom, ReplicaView, make_policy
from gateway.policy import EXCEEDS_KV
from gateway.proxy import Gateway
from gateway.queue import PoolQueue
from kvpilot.config import ConfigError, GatewayConfig, parse_config
from kvpilot.signals import ReplicaState


class Slots:
    def __init__(self, free: int) -> None:
        self.free = free
        self.granted: list[str] = []
        self.released: list[str] = []

    def pick(self, req: RequestFeatures, exclude: frozenset[str]) -> Decision:
        if self.free <= 0:
            return Decision(None, "saturated")
        self.free -= 1
        self.granted.append(req.request_id)
        return Decision("r1", "lowest-cost")

    def release(self, req: RequestFeatures, d: Decision) -> None:
        self.released.append(req.request_id)
        self.free += 1


EST = Estimator()


def feat(rid: str, priority: int = 0) -> RequestFeatures:
    return EST.features(rid, "m", "hello world", 16, priority)


async def test_free_capacity_is_granted_without_queueing() -> None:
    slots = Slots(2)
    q = PoolQueue("p", slots.pick, slots.release, size=4, timeout_s=5)
    d = await q.acquire(feat("a"))
    assert d.replica_id == "r1" and len(q) == 0


async def test_waiters_leave_by_priority_then_arrival_as_capacity_frees() -> None:
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=8, timeout_s=5)
    order = [("low", 0), ("high", 5), ("low2", 0), ("mid", 1)]
    tasks = {rid: asyncio.create_task(q.acquire(feat(rid, pr))) for rid, pr in order}
    await asyncio.sleep(0)
    assert len(q) == 4 and not slots.granted
    for _ in order:
        slots.free += 1
        q.drain()
        await asyncio.sleep(0)
    assert slots.granted == ["high", "mid", "low", "low2"]
    for t in tasks.values():
        assert (await t).replica_id == "r1"
    assert len(q) == 0


async def test_new_arrivals_do_not_jump_the_queue() -> None:
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=8, timeout_s=5)
    first = asyncio.create_task(q.acquire(feat("first")))
    await asyncio.sleep(0)
    slots.free = 1  # capacity frees but nobody told the queue yet; a newcomer arrives
    second = asyncio.create_task(q.acquire(feat("second")))
    await asyncio.sleep(0)
    assert slots.granted == ["first"]
    assert (await first).replica_id == "r1"
    assert not second.done()
    second.cancel()


async def test_full_queue_refuses_equal_priority_and_evicts_lower() -> None:
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=2, timeout_s=5)
    a = asyncio.create_task(q.acquire(feat("a", 0)))
    b = asyncio.create_task(q.acquire(feat("b", 1)))
    await asyncio.sleep(0)
    with pytest.raises(GatewayError) as full:
        await q.acquire(feat("c", 0))
    assert full.value.status == 429 and full.value.code == "queue_full"
    assert int(full.value.headers["Retry-After"]) >= 1
    d = asyncio.create_task(q.acquire(feat("d", 3)))  # outranks "a": "a" is evicted
    await asyncio.sleep(0)
    with pytest.raises(GatewayError) as evicted:
        await a
    assert evicted.value.status == 429 and evicted.value.code == "evicted"
    assert len(q) == 2
    slots.free = 2
    q.drain()
    assert (await d).replica_id == "r1" and (await b).replica_id == "r1"
    assert slots.granted == ["d", "b"]


async def test_negative_priority_is_shed_first() -> None:
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=4, timeout_s=5)
    lows = [asyncio.create_task(q.acquire(feat(f"n{i}", -1))) for i in range(2)]
    await asyncio.sleep(0)
    assert len(q) == 2  # allowed while the queue is under half full
    with pytest.raises(GatewayError) as shed:
        await q.acquire(feat("n2", -1))
    assert shed.value.code == "shed_low_priority"
    normal = asyncio.create_task(q.acquire(feat("x", 0)))
    await asyncio.sleep(0)
    assert len(q) == 3
    for t in [*lows, normal]:
        t.cancel()


async def test_wait_past_the_limit_is_429_and_leaves_the_queue() -> None:
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=4, timeout_s=0.05)
    with pytest.raises(GatewayError) as late:
        await q.acquire(feat("a"))
    assert late.value.status == 429 and late.value.code == "queue_timeout"
    assert len(q) == 0
    slots.free = 1
    q.drain()
    assert slots.granted == []  # the timed-out waiter got nothing


async def test_cancelled_waiter_leaves_and_hands_back_a_fresh_grant() -> None:
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=4, timeout_s=5)
    t = asyncio.create_task(q.acquire(feat("a")))
    await asyncio.sleep(0)
    slots.free = 1
    q.drain()  # granted (and reserved) ...
    t.cancel()  # ... but the client left in the same instant
    with pytest.raises(asyncio.CancelledError):
        await t
    assert slots.granted == ["a"] and slots.released == ["a"] and slots.free == 1
    slots.free = 0
    t2 = asyncio.create_task(q.acquire(feat("b")))
    await asyncio.sleep(0)
    t2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t2
    assert len(q) == 0


# ---- release order from the pool policy's queue_key (headroom: earliest TTFT deadline) ---------


def sized(rid: str, prompt_tokens: int, priority: int = 0) -> RequestFeatures:
    return dataclasses.replace(feat(rid, priority), prompt_tokens=prompt_tokens)


async def queued(q: PoolQueue, reqs: list[RequestFeatures]) -> dict[str, asyncio.Task[Decision]]:
    tasks = {}
    for r in reqs:
        tasks[r.request_id] = asyncio.create_task(q.acquire(r))
        await asyncio.sleep(0)  # enqueue in this order
    return tasks


async def test_headroom_queue_key_releases_earliest_deadline_first() -> None:
    # TTFT target 1 s + 0.2 ms per prompt token: a 100k-token prompt has ~21 s, a short one ~1 s,
    # so the short one that came later leaves first; priority still comes before the deadline.
    policy = make_policy("headroom")
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=8, timeout_s=30, queue_key=policy.queue_key)
    reqs = [
        sized("long", 100_000),
        sized("short", 10),
        sized("mid", 20_000),
        sized("vip", 90_000, 3),
    ]
    tasks = await queued(q, reqs)
    assert len(q) == 4 and not slots.granted
    for _ in reqs:
        slots.free += 1
        q.drain()
        await asyncio.sleep(0)
    assert slots.granted == ["vip", "short", "mid", "long"]
    for t in tasks.values():
        assert (await t).replica_id == "r1"
    assert len(q) == 0


async def test_without_queue_key_the_order_stays_arrival() -> None:
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=8, timeout_s=30)
    tasks = await queued(q, [sized("long", 100_000), sized("short", 10)])
    slots.free = 2
    q.drain()
    await asyncio.gather(*tasks.values())
    assert slots.granted == ["long", "short"]


async def test_keyed_drain_keeps_head_of_line_blocking() -> None:
    policy = make_policy("headroom")
    blocked = {"short"}  # the earliest deadline, but its pick finds no replica (e.g. KV need)

    def pick(req: RequestFeatures, exclude: frozenset[str]) -> Decision:
        if req.request_id in blocked:
            return Decision(None, "saturated")
        return slots.pick(req, exclude)

    slots = Slots(0)
    q = PoolQueue("p", pick, slots.release, size=8, timeout_s=30, queue_key=policy.queue_key)
    tasks = await queued(q, [sized("long", 100_000), sized("short", 10)])
    slots.free = 2
    q.drain()
    await asyncio.sleep(0)
    assert slots.granted == [] and len(q) == 2  # "long" does not jump ahead of "short"
    blocked.clear()
    q.drain()
    await asyncio.gather(*tasks.values())
    assert slots.granted == ["short", "long"] and len(q) == 0


async def test_keyed_queue_still_sheds_negative_priority_first_and_skips_cancelled() -> None:
    policy = make_policy("headroom")
    slots = Slots(0)
    q = PoolQueue("p", slots.pick, slots.release, size=4, timeout_s=30, queue_key=policy.queue_key)
    tasks = await queued(q, [sized("a", 10), sized("b", 10), sized("gone", 5)])
    with pytest.raises(GatewayError) as e:
        await q.acquire(sized("batch", 10, -1))  # the queue is at half its size: shed
    assert e.value.status == 429
    tasks.pop("gone").cancel()
    await asyncio.sleep(0)
    assert len(q) == 2
    slots.free = 5
    q.drain()
    await asyncio.gather(*tasks.values())
    assert slots.granted == ["a", "b"] and len(q) == 0


# ---- wiring: the gateway hands each pool's queue its policy's order and the config's SLO -------


def gateway_config(**gw: Any) -> Any:
    return parse_config(
        {
            "pools": [
                {"name": "fast", "models": ["m"], "endpoints": ["http://127.0.0.1:9"]},
                {
                    "name": "rr",
                    "models": ["m2"],
                    "endpoints": ["http://127.0.0.1:9"],
                    "policy": "round-robin",
                },
            ],
            "gateway": {"policy": "headroom", "scrape_fallback": False, **gw},
        }
    )


def test_configure_passes_queue_key_and_slo_to_headroom() -> None:
    cfg = gateway_config(ttft_target_s=2.5, ttft_per_1k_tokens_s=0.5, tpot_target_s=0.05)
    g = Gateway(cfg, Fleet())
    rt = g.pools["fast"]
    assert isinstance(rt.policy, Headroom)
    assert (rt.policy.slo_ttft_s, rt.policy.slo_ttft_per_token_s, rt.policy.slo_tpot_s) == (
        2.5,
        0.0005,
        0.05,
    )
    assert rt.policy.queue_when_saturated
    assert rt.queue.queue_key == rt.policy.queue_key  # the bound method of this pool's policy
    # Its deadline follows the configured target: 2.5 s + 0.5 ms x 1000 tokens.
    assert rt.queue.queue_key(sized("x", 1000), 100.0, 100.0) == pytest.approx(103.0)
    assert g.pools["rr"].queue.queue_key is None  # no queue_key: priority, then arrival

    # A new SLO makes a new policy, but the pool's waiters stay in the same queue.
    queue = rt.queue
    g.configure(gateway_config(ttft_target_s=4.0))
    rt2 = g.pools["fast"]
    assert rt2.policy is not rt.policy and rt2.policy.slo_ttft_s == 4.0
    assert rt2.queue is queue and queue.queue_key == rt2.policy.queue_key
    g.configure(gateway_config(ttft_target_s=4.0))
    assert g.pools["fast"].policy is rt2.policy  # unchanged settings keep the learned state


def test_slo_defaults_match_the_picker_and_bad_values_are_refused() -> None:
    h = make_policy("headroom")
    gw = GatewayConfig()
    assert gw.ttft_target_s == h.slo_ttft_s and gw.tpot_target_s == h.slo_tpot_s
    assert gw.ttft_per_1k_tokens_s / 1000 == pytest.approx(h.slo_ttft_per_token_s)
    for key, bad in (("ttft_target_s", 0), ("tpot_target_s", -1), ("ttft_per_1k_tokens_s", -0.1)):
        with pytest.raises(ConfigError, match=f"gateway.{key}"):
            gateway_config(**{key: bad})


# ---- a request no replica can ever hold is refused, not queued ---------------------------------


def kv_views(n: int, blocks: int = 2000, at: float = 1_000.0) -> list[ReplicaView]:
    """Idle replicas with a KV cache of `blocks` x 16 tokens (32,000 by default)."""
    return [
        ReplicaView(
            f"r{i}",
            ReplicaState(
                replica_id=f"r{i}",
                address=f"http://r{i}",
                pool="p",
                kv_blocks_total=blocks,
                kv_block_size=16,
                observed_at=at,
            ),
        )  # fmt: skip
        for i in range(n)
    ]


def caches(views: list[ReplicaView]) -> list[tuple[str, float]]:
    """What Fleet.kv_caches says of these replicas: (id, whole cache in tokens; inf: unknown)."""
    return [
        (v.replica_id, float(v.state.kv_blocks_total * 16) if v.state.kv_blocks_total else math.inf)
        for v in views
        if v.state is not None
    ]


def test_headroom_says_when_a_request_exceeds_every_whole_cache() -> None:
    h = Headroom(queue_when_saturated=True)
    views = kv_views(3)
    huge = EST.features("huge", "m", "x" * 200_000, 16)  # ~50k tokens > 32k of cache anywhere
    assert huge.prompt_tokens + huge.expected_output_tokens > 32_000
    d = h.pick(huge, views, 1_000.0)
    assert d.replica_id is None and d.reason == EXCEEDS_KV
    assert h.exceeds_kv_capacity(huge, caches(views)) == 32_000
    # One replica with a cache that holds it (when empty): it waits for room as before.
    bigger = views[:2] + kv_views(1, blocks=8000)[:1]
    bigger[2] = dataclasses.replace(bigger[2], replica_id="big")
    assert h.exceeds_kv_capacity(huge, caches(bigger)) is None
    small = EST.features("small", "m", "hello", 16)
    assert h.pick(small, views, 1_000.0).replica_id is not None
    assert h.exceeds_kv_capacity(small, caches(views)) is None
    # A cache of unknown size may hold it: never refused on a guess.
    assert h.exceeds_kv_capacity(huge, caches(kv_views(2, blocks=0))) is None


async def test_a_request_too_large_for_every_replica_is_refused_at_once_not_queued() -> None:
    """The audit's repro: the huge request sat at the head of the queue until its timeout and
    held back every small request behind it. Now it is answered 400 at once, whether it arrives
    to an empty queue or behind waiters, or is found at the head by a drain."""
    h = Headroom(queue_when_saturated=True)
    replicas = kv_views(3)
    busy = {"on": False}

    def pick(req: RequestFeatures, exclude: frozenset[str]) -> Decision:
        if busy["on"] and req.request_id.startswith("s"):
            return Decision(None, "saturated")
        return h.pick(req, replicas, 1_000.0)

    def too_large(req: RequestFeatures) -> GatewayError | None:
        largest = h.exceeds_kv_capacity(req, caches(replicas))
        return (
            None
            if largest is None
            else errors.bad_request("too long", None, "context_length_exceeded")
        )

    q = PoolQueue("p", pick, lambda r, d: None, size=8, timeout_s=30, too_large=too_large)
    huge = EST.features("huge", "m", "x" * 200_000, 16)
    with pytest.raises(GatewayError) as e:
        await q.acquire(huge)  # the queue is empty: the pick itself says so
    assert (e.value.status, e.value.code) == (400, "context_length_exceeded") and len(q) == 0
    busy["on"] = True
    small = asyncio.create_task(q.acquire(EST.features("s1", "m", "hello", 16)))
    await asyncio.sleep(0)
    assert len(q) == 1
    with pytest.raises(GatewayError) as e:
        await q.acquire(huge)  # behind a waiter: checked apart, not queued
    assert e.value.code == "context_length_exceeded" and len(q) == 1
    busy["on"] = False
    q.drain()
    assert (await small).replica_id is not None

    # Without the check on arrival (a plain queue) a drain that finds it refuses it and goes
    # on to the requests behind it.
    q2 = PoolQueue("p", pick, lambda r, d: None, size=8, timeout_s=30)
    busy["on"] = True
    first = asyncio.create_task(q2.acquire(EST.features("s0", "m", "hello", 16)))
    await asyncio.sleep(0)
    stuck = asyncio.create_task(q2.acquire(huge))
    behind = asyncio.create_task(q2.acquire(EST.features("s2", "m", "hello", 16)))
    await asyncio.sleep(0)
    assert len(q2) == 3
    busy["on"] = False
    q2.drain()
    assert (await first).replica_id is not None and (await behind).replica_id is not None
    with pytest.raises(GatewayError) as e:
        await stuck
    assert e.value.code == "context_length_exceeded" and len(q2) == 0


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_request_only_an_away_replica_can_hold_waits_without_holding_back_others(
    keyed: bool,
) -> None:
    """Only a replica that is away for now (ejected, unhealthy, terminating) could hold the huge
    request: it waits for that replica rather than being refused as too long, and the requests
    behind it that fit the replicas there go past it meanwhile. A retry that excludes that
    replica is refused at once (its caller answers 502: see test_gateway_pools.py)."""
    h = Headroom(queue_when_saturated=True)
    small = kv_views(2)  # 32k tokens each
    big = dataclasses.replace(kv_views(1, blocks=8000)[0], replica_id="big")  # 128k
    now = {"big_back": False, "busy": True}

    def pick(req: RequestFeatures, exclude: frozenset[str]) -> Decision:
        if now["busy"] and req.request_id.startswith("s"):
            return Decision(None, "saturated")
        offered = small + [big] if now["big_back"] else small
        return h.pick(req, [v for v in offered if v.replica_id not in exclude], 1_000.0)

    def too_large(req: RequestFeatures) -> GatewayError | None:
        largest = h.exceeds_kv_capacity(req, caches(small + [big]))  # the pool knows big
        return None if largest is None else errors.bad_request("too long", None, "x")

    key = (lambda f, arrived, t: arrived) if keyed else None
    q = PoolQueue("p", pick, lambda r, d: None, size=8, timeout_s=30, too_large=too_large)
    q.queue_key = key
    huge = asyncio.create_task(q.acquire(EST.features("huge", "m", "x" * 200_000, 16)))
    await asyncio.sleep(0)
    behind = [asyncio.create_task(q.acquire(EST.features(f"s{i}", "m", "hi", 16))) for i in (1, 2)]
    await asyncio.sleep(0)
    assert len(q) == 3 and not huge.done()
    now["busy"] = False
    q.drain()
    assert {(await t).replica_id for t in behind} <= {"r0", "r1"}
    assert len(q) == 1 and not huge.done()
    now["big_back"] = True
    q.drain()
    assert (await huge).replica_id == "big"
    with pytest.raises(GatewayError) as e:
        await q.acquire(EST.features("huge2", "m", "x" * 200_000, 16), frozenset({"big"}))
    assert e.value.code == "context_length_exceeded" and len(q) == 0
