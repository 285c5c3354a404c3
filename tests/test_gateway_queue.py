"""The saturation queue on its own: priority order, bounded size, shedding, timeouts, wake-ups.

The picker is replaced by a tiny capacity counter (a pure function of plain data, like the real
one): it grants a replica while slots are free and takes a slot in the same step.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import GatewayError
from gateway.estimate import Estimator, RequestFeatures
from gateway.picker import Decision
from gateway.queue import PoolQueue


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
