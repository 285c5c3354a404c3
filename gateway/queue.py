"""The saturation queue: where requests wait when the picker finds no replica with room.

One bounded queue per pool, ordered by priority (higher first), then by the pool policy's
`queue_key(features, arrived_wall, now)` when it has one (headroom: earliest TTFT deadline while it
can still be met, then by age, the order the simulator releases held requests in), else by
arrival. Whenever capacity may have freed (a request finished, a new replica state arrived, a
replica came back), `drain()` asks the picker again for the first waiter in that order, and keeps
going while it gets replicas; when the first does not fit, nobody behind it jumps ahead. The picker call
passed in reserves the replica (starts it in the in-flight ledger) in the same synchronous step,
so two requests leaving the queue back to back never herd onto the same "empty" replica.

Shedding: a full queue evicts its lowest-priority waiter to admit a higher-priority arrival, else
refuses the arrival; a negative-priority request is queued only while the queue is under half
full (it is the first to go when the fleet is saturated); a wait past the limit is refused. Every
refusal is a 429 with Retry-After.

A request no replica offered can hold (the picker's `EXCEEDS_KV`: its KV need is larger than the
whole cache of each) is refused at once with the `too_large` error (400 `context_length_exceeded`)
when no replica the pool knows could hold it either (ejected, unhealthy, terminating and excluded
ones included): it would only wait until its timeout. When one of those could, the problem is
transient: it waits like a saturated request, but without holding back the requests behind it
(they fit replicas it cannot use). A request that excludes replicas (a retry) and that no other
replica can hold is refused at once (the caller answers it as the failure it is).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway import errors, metrics
from gateway.errors import CONTEXT_LENGTH_EXCEEDED, GatewayError
from gateway.estimate import RequestFeatures
from gateway.picker import Decision
from gateway.policy import EXCEEDS_KV

# Picks (and reserves) a replica for a request, given replica ids it must not use.
PickFn = Callable[[RequestFeatures, frozenset[str]], Decision]
# Hands back a reservation nobody will use (the waiter was cancelled as it was answered).
ReleaseFn = Callable[[RequestFeatures, Decision], None]
# The policy's release order within one priority: (features, arrived wall-clock s, now) -> key,
# lowest first; e.g. `Headroom.queue_key`.
QueueKeyFn = Callable[[RequestFeatures, float, float], float]
# The refusal of a request no replica the pool knows (whether offered or not) can ever hold, or
# None while some replica could.
TooLargeFn = Callable[[RequestFeatures], GatewayError | None]


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int]  # (-priority, arrival sequence): heap order
    features: RequestFeatures = field(compare=False)
    exclude: frozenset[str] = field(compare=False)
    future: asyncio.Future[Decision] = field(compare=False)
    enqueued_at: float = field(compare=False, default=0.0)  # monotonic: the wait's length
    arrived_wall: float = field(compare=False, default=0.0)  # time.time(): the clock picks use


class PoolQueue:
    def __init__(
        self,
        pool: str,
        pick: PickFn,
        release: ReleaseFn,
        *,
        size: int,
        timeout_s: float,
        queue_key: QueueKeyFn | None = None,
        too_large: TooLargeFn | None = None,
    ) -> None:
        self.pool = pool
        self.pick = pick
        self.release = release
        self.queue_key = queue_key
        self.too_large = too_large
        self.size = size
        self.timeout_s = timeout_s
        self._heap: list[_Waiter] = []
        self._live = 0  # waiters not yet answered (the heap also holds answered ones, lazily)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self._live

    async def acquire(
        self,
        req: RequestFeatures,
        exclude: frozenset[str] = frozenset(),
        picked: Decision | None = None,
    ) -> Decision:
        """A decision with a reserved replica, after waiting if the pool is saturated.

        `picked`: the caller's own pick for the request, one that placed nothing, made while
        nobody waited here (the pool is then not asked twice: one pick, one decision counted).
        Raises GatewayError(429) when the request is shed, GatewayError(400,
        `context_length_exceeded`) when no replica can ever hold it (see `unplaceable`).
        Cancelling the caller (the client went away) leaves the queue cleanly; a reservation
        made in the same instant is handed back through `release`.
        """
        if self._live:
            picked = None  # others wait first: the order decides, not that pick
        elif picked is None:
            picked = self.pick(req, exclude)
            if picked.replica_id is not None:
                return picked
        if picked is not None:
            if picked.reason == EXCEEDS_KV:
                err = self.unplaceable(req, exclude)
                if err is not None:
                    raise err
        elif self.too_large is not None:  # not picked (others wait first): check it apart
            err = self.too_large(req)
            if err is not None:
                raise err
        self._admit_or_shed(req.priority)
        loop = asyncio.get_running_loop()
        w = _Waiter(
            (-req.priority, next(self._seq)),
            req,
            exclude,
            loop.create_future(),
            time.monotonic(),
            time.time(),
        )
        heapq.heappush(self._heap, w)
        self._live += 1
        metrics.QUEUE_LENGTH.labels(self.pool).set(self._live)
        if picked is None:  # others waited first; it may go ahead of them (a pick would say)
            self.drain()
        try:
            async with asyncio.timeout(self.timeout_s):  # unlike wait_for, never eats a cancel
                return await asyncio.shield(w.future)
        except TimeoutError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                return w.future.result()  # answered in the same instant the wait ran out
            self._settle(
                w,
                errors.overloaded(
                    f"pool {self.pool!r} is saturated: waited {self.timeout_s:.0f}s for a replica",
                    self.retry_after_s(),
                    "queue_timeout",
                ),
            )
            metrics.SHED.labels(self.pool, "queue_timeout").inc()
            raise w.future.exception() from None  # type: ignore[misc]
        except asyncio.CancelledError:
            if not w.future.done():
                self._settle(w, None)
            elif not w.future.cancelled() and w.future.exception() is None:
                self.release(req, w.future.result())
            raise
        finally:
            metrics.QUEUE_WAIT.labels(self.pool).observe(time.monotonic() - w.enqueued_at)

    def drain(self) -> None:
        """Hand replicas to waiters, best first, for as long as the picker finds room."""
        if self.queue_key is not None:
            self._drain_keyed(self.queue_key)
            return
        passed: list[_Waiter] = []  # waiting for a replica that is away: others go past them
        try:
            while self._heap:
                w = self._heap[0]
                if w.future.done():
                    heapq.heappop(self._heap)
                    continue
                d = self.pick(w.features, w.exclude)
                if d.replica_id is None and d.reason != EXCEEDS_KV:
                    return  # head of line still does not fit: nobody behind it jumps ahead
                heapq.heappop(self._heap)
                out = d if d.replica_id is not None else self.unplaceable(w.features, w.exclude)
                if out is None:
                    passed.append(w)
                else:
                    self._answer(w, out)
        finally:
            for w in passed:
                heapq.heappush(self._heap, w)

    def _drain_keyed(self, queue_key: QueueKeyFn) -> None:
        """`drain` in the policy's order. The keys are taken once per drain at one `now`: they
        depend on the clock, not on the picks made in between, so one sort serves the pass."""
        live = [w for w in self._heap if not w.future.done()]
        if len(live) < len(self._heap):  # drop the answered ones the heap held lazily
            self._heap = live[:]
            heapq.heapify(self._heap)
        if not live:
            return
        now = time.time()
        order = sorted(
            live, key=lambda w: (w.key[0], queue_key(w.features, w.arrived_wall, now), w.key[1])
        )
        for w in order:
            d = self.pick(w.features, w.exclude)
            if d.replica_id is None and d.reason != EXCEEDS_KV:
                return  # the first in line still does not fit: nobody behind it jumps ahead
            out = d if d.replica_id is not None else self.unplaceable(w.features, w.exclude)
            if out is not None:  # (None: it waits for a replica that is away; others go past)
                self._answer(w, out)  # left in the heap, answered: dropped lazily

    def _answer(self, w: _Waiter, out: Decision | GatewayError) -> None:
        """A waiter leaves: with its replica, or refused."""
        self._live -= 1
        metrics.QUEUE_LENGTH.labels(self.pool).set(self._live)
        if isinstance(out, GatewayError):
            w.future.set_exception(out)
        else:
            w.future.set_result(out)

    def unplaceable(self, req: RequestFeatures, exclude: frozenset[str]) -> GatewayError | None:
        """The refusal of a request whose pick found no replica offered can hold it (the
        picker's EXCEEDS_KV), or None when it should wait.

        400 `context_length_exceeded` when no replica the pool knows can (`too_large`; without
        that check, every such pick is refused), or when the request excludes replicas (a
        retry: those that can hold it failed it or are away; its caller answers the failure,
        not the request's length). None while one that can is only away (ejected, unhealthy,
        terminating): a transient state, not the request's fault."""
        if self.too_large is not None:
            err = self.too_large(req)
            if err is not None or not exclude:
                return err
            detail = "it may still go to "
        else:
            detail = ""
        return errors.bad_request(
            f"This request needs more KV cache than any replica of pool {self.pool!r} "
            f"{detail}holds. Please reduce the length of the messages or completion.",
            None,
            CONTEXT_LENGTH_EXCEEDED,
        )

    def retry_after_s(self) -> float:
        return max(1.0, self.timeout_s / 4)

    def _admit_or_shed(self, priority: int) -> None:
        if priority < 0 and self._live >= self.size // 2:
            metrics.SHED.labels(self.pool, "low_priority").inc()
            raise errors.overloaded(
                f"pool {self.pool!r} is saturated; negative-priority requests are shed first",
                self.retry_after_s(),
                "shed_low_priority",
            )
        if self._live < self.size:
            return
        worst = max(
            (w for w in self._heap if not w.future.done()), key=lambda w: w.key, default=None
        )
        if worst is not None and -worst.key[0] < priority:
            self._settle(
                worst,
                errors.overloaded(
                    f"pool {self.pool!r} is saturated; evicted by a higher-priority request",
                    self.retry_after_s(),
                    "evicted",
                ),
            )
            metrics.SHED.labels(self.pool, "evicted").inc()
            return
        metrics.SHED.labels(self.pool, "queue_full").inc()
        raise errors.overloaded(
            f"pool {self.pool!r} is saturated and its queue of {self.size} is full",
            self.retry_after_s(),
            "queue_full",
        )

    def _settle(self, w: _Waiter, exc: BaseException | None) -> None:
        if w.future.done():
            return
        if exc is None:
            w.future.cancel()
        else:
            w.future.set_exception(exc)
        self._live -= 1
        metrics.QUEUE_LENGTH.labels(self.pool).set(self._live)
