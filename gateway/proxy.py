"""The request path: validate, pick (or queue), forward, relay, retry, account.

One `Gateway` per process holds the shared upstream aiohttp ClientSession (keep-alive pools, made
in the app's `cleanup_ctx`), the fleet view, one policy and one saturation queue per pool, and the
request-feature estimator. The body is parsed once (orjson) for what the picker needs and
forwarded as the client sent it, byte for byte.

Failure rules: anything that goes wrong before the client has received a byte (refused or reset
connection, timeout, 502/503/504 from the replica, a stream that breaks before its first chunk) is
retried on another replica, bounded by `max_retries` and a retry budget; after the first streamed
byte the stream is ended with an SSE error event, so the client sees a well-formed failure. One
exception: a non-streaming request whose body the replica has taken whole and that gets no answer
within `first_byte_timeout_s` is answered 504 and not retried (vLLM sends a non-streamed answer's
headers only with the finished answer: a long generation is slow, not failed, and running it
again elsewhere would only double the work); it counts against the replica only when the
replica's state has gone stale as well (a node that died silently).

A model listed by several pools spills over: each request goes to the first pool (config order)
whose policy places it without queueing; only when none can does it wait, in the first saturated
pool's queue, else in that of the first pool whose replicas could ever hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.payload import BytesPayload

from gateway import errors, metrics
from gateway.body import parse_body
from gateway.deadline import Deadline
from gateway.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    SHUTTING_DOWN,
    GatewayError,
    context_length_exceeded,
    shutting_down,
    upstream_timeout,
)
from gateway.estimate import Estimator, RequestFeatures, prompt_text
from gateway.fleet import Fleet
from gateway.headers import downstream_headers, upstream_headers
from gateway.picker import Decision, Policy, RateSeed, make_policy, rate_seed_for
from gateway.policy import EXCEEDS_KV
from gateway.queue import PoolQueue
from kvpilot.config import Config, GatewayConfig, PoolConfig

log = logging.getLogger(__name__)

PRIORITY_HEADER = "x-kvpilot-priority"
RETRIABLE_STATUS = frozenset({502, 503, 504})


class UpstreamFailed(Exception):
    """A failure before the client received anything: safe to send the request elsewhere."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UpstreamTimedOut(Exception):
    """A non-streaming request the replica took whole and did not answer in time: 504, not a
    failure of the replica (a long generation) and not to be run again elsewhere."""


class RoutedError(Exception):
    """A refusal once the request's pool was chosen: counted under that pool (and replica)."""

    def __init__(self, error: GatewayError, pool: str, replica: str = "") -> None:
        super().__init__(error.message)
        self.error = error
        self.pool = pool
        self.replica = replica


class _SentBody(BytesPayload):
    """The request body, noting when it has been written whole (aiohttp writes it apart from
    the headers): from then on the replica has the request, and `then` runs (the peer work the
    pick left for after it, gateway/peers.py)."""

    sent = False
    then: Callable[[], None] | None = None

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        await BytesPayload.write_with_length(self, writer, content_length)
        self.sent = True
        if self.then is not None:
            self.then()


class RequestIds:
    """Random 128-bit request ids from the OS, read 256 at a time: os.urandom per request is a
    system call each (costly under gVisor), and Python's own generator is predictable from its
    output (a client could guess, and reuse, another user's next id)."""

    def __init__(self) -> None:
        self._buf = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._buf):
            self._buf, self._at = os.urandom(4096), 0
        at = self._at
        self._at = at + 16
        return self._buf[at : at + 16].hex()


class RetryBudget:
    """Retries may add at most `ratio` of the request rate plus `min_per_s` (Finagle/Envoy style),
    so a sick fleet is not buried under a retry storm."""

    def __init__(self, ratio: float, min_per_s: float) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.cap = max(10.0, min_per_s * 10)
        self.tokens = self.cap
        self.last = time.monotonic()

    def on_request(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (now - self.last) * self.min_per_s)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class PoolRuntime:
    config: PoolConfig
    policy_name: str
    policy: Policy
    queue: PoolQueue
    budget: RetryBudget
    options: Mapping[str, Any]  # make_policy's keyword settings (a change makes a new policy)


@dataclass
class _Outcome:
    status: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    usage: Mapping[str, Any] | None = None
    broken: bool = False  # a stream that ended with an SSE error event (not a success)
    # a whole answer that reports usage: parsed for it once the answer has been sent
    answer: bytes | None = None

    def reported_usage(self) -> Mapping[str, Any] | None:
        if self.answer is None:
            return self.usage
        try:
            parsed = orjson.loads(self.answer)
        except orjson.JSONDecodeError:
            return None
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        return usage if isinstance(usage, dict) else None


class Gateway:
    def __init__(self, cfg: Config, fleet: Fleet, estimator: Estimator | None = None) -> None:
        self.fleet = fleet
        self.estimator = estimator or Estimator()
        self.session: aiohttp.ClientSession | None = None  # set by the app's lifecycle
        # The loop the session runs on, set with it: asyncio.get_running_loop() asks getpid() (a
        # system call) each time, and the request path needs the loop for its deadlines.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pools: dict[str, PoolRuntime] = {}
        # model -> the pools that list it, in config order (spill-over goes down the list)
        self.model_pools: dict[str, tuple[PoolRuntime, ...]] = {}
        self.cfg = cfg
        self.gw: GatewayConfig = cfg.gateway
        self._seq = itertools.count()
        self._ids = RequestIds()
        self.sharing = False  # other gateway workers read what this one routes (gateway/peers.py)
        # Shutdown: the handler tasks of the requests being handled (their requests), and, once
        # the shutdown began, set whenever none is left.
        self._active: dict[asyncio.Task[Any], web.Request] = {}
        self._idle: asyncio.Event | None = None
        self.stopping = False  # the shutdown grace ran out: requests still running are ended
        fleet.on_leave = self._replica_left
        self.configure(cfg)

    # ---- configuration -----------------------------------------------------------------------

    def configure(self, cfg: Config) -> None:
        """Apply a (new) config: pools, policies, queues; kept runtimes keep their learned state."""
        self.cfg = cfg
        self.gw = cfg.gateway
        old = self.pools
        self.pools = {}
        for i, pool in enumerate(cfg.pools):
            name = pool.policy or cfg.gateway.policy
            options = policy_options(name, cfg.gateway)
            prev = old.get(pool.name)
            if prev is not None and prev.policy_name == name and prev.options == options:
                prev.config = pool
                prev.queue.size = cfg.gateway.queue_size
                prev.queue.timeout_s = cfg.gateway.queue_timeout_s
                self.pools[pool.name] = prev
                continue
            policy = make_policy(name, seed=i, **options)
            rt = PoolRuntime(
                pool,
                name,
                policy,
                None,  # type: ignore[arg-type]  # set just below: the queue's pick needs rt
                RetryBudget(cfg.gateway.retry_budget_ratio, cfg.gateway.retry_budget_min_per_s),
                options,
            )
            pick = lambda req, exclude, rt=rt: self._pick(rt, req, exclude)  # noqa: E731
            # Held requests leave in the policy's order (headroom: earliest TTFT deadline), as in
            # the simulator; without one, by priority then arrival.
            queue_key = getattr(policy, "queue_key", None)
            # Policies that hold requests for KV room say which requests no replica can ever hold.
            too_large = None
            if hasattr(policy, "exceeds_kv_capacity"):
                too_large = lambda req, rt=rt: self._too_large(rt, req)  # noqa: E731
            if prev is not None:  # a new policy: the requests waiting in the pool stay queued
                rt.queue = prev.queue
                rt.queue.pick, rt.queue.queue_key = pick, queue_key
                rt.queue.too_large = too_large
                rt.queue.size = cfg.gateway.queue_size
                rt.queue.timeout_s = cfg.gateway.queue_timeout_s
            else:
                release = lambda req, d, p=pool.name: self._release(p, req, d)  # noqa: E731
                rt.queue = PoolQueue(
                    pool.name,
                    pick,
                    release,
                    size=cfg.gateway.queue_size,
                    timeout_s=cfg.gateway.queue_timeout_s,
                    queue_key=queue_key,
                    too_large=too_large,
                )
            if self.sharing:
                rt.policy.keep_journal()
            self.pools[pool.name] = rt
        self.fleet.profiles = {p.name: pool_profile(p) for p in cfg.pools}
        self._seeds: dict[tuple[str, str], RateSeed | None] = {}
        self.fleet.seed_for = self._seed_for
        listed: dict[str, list[PoolRuntime]] = {}
        for pool in cfg.pools:
            for m in pool.models:
                listed.setdefault(m, []).append(self.pools[pool.name])
        self.model_pools = {m: tuple(rts) for m, rts in listed.items()}
        # Every pool's queue length from the start (0 is a reading; a missing series is not).
        for name, rt in self.pools.items():
            metrics.QUEUE_LENGTH.labels(name).set(len(rt.queue))
        for name in old.keys() - self.pools.keys():
            metrics.forget_pool(name)

    def models(self) -> list[str]:
        return list(self.model_pools)

    def _seed_for(self, pool: str, accelerator: str) -> RateSeed | None:
        """The speed seed of a replica whose state reports its GPU (a pool may mix L4s and
        H100s): once per pool and GPU type, None where the pool's accelerator already says it
        or no profile is known (the pool's seed then stands)."""
        key = (pool, accelerator)
        if key not in self._seeds:
            rt = self.pools.get(pool)
            seed = None
            if rt is not None and rt.config.accelerator != accelerator:
                seed = pool_profile(dataclasses.replace(rt.config, accelerator=accelerator))
            self._seeds[key] = seed
        return self._seeds[key]

    def _replica_left(self, pool: str, replica_id: str) -> None:
        """The fleet dropped a replica from a pool: its policy forgets what it held about it."""
        rt = self.pools.get(pool)
        if rt is not None:
            rt.policy.forget(replica_id)

    # ---- what other gateway workers learn (gateway/peers.py) ---------------------------------

    def learned(self) -> dict[str, tuple[int, dict[str, tuple[float, float]]]]:
        """Per pool: its policy's identity (a new policy starts over) and what it learned."""
        return {name: (id(rt.policy), rt.policy.learned()) for name, rt in self.pools.items()}

    def policy_epoch(self, pool: str) -> int | None:
        rt = self.pools.get(pool)
        return None if rt is None else id(rt.policy)

    def learn_from_peers(self, pool: str, deltas: dict[str, tuple[float, float]]) -> None:
        rt = self.pools.get(pool)
        if rt is not None:
            rt.policy.learn_from_peers(deltas)

    def share_with_peers(self) -> None:
        """Other workers read our picks: the policies journal them (new policies too)."""
        self.sharing = True
        for rt in self.pools.values():
            rt.policy.keep_journal()

    def drain_picks(self) -> list[tuple[str, str, tuple[int, ...], tuple[float, ...]]]:
        """(pool, replica, block hashes, the policy's note) of this worker's picks since last time."""
        return [
            (name, rid, hashes, note)
            for name, rt in self.pools.items()
            for rid, hashes, note in rt.policy.drain_picks()
        ]

    def peer_picked(
        self, pool: str, entries: list[tuple[str, tuple[int, ...], tuple[float, ...]]]
    ) -> None:
        """Another worker's picks: each pool's policy takes them in as its own."""
        rt = self.pools.get(pool)
        if rt is not None:
            for replica_id, hashes, note in entries:
                rt.policy.peer_picked(replica_id, hashes, note)

    def wake(self, pool: str) -> None:
        """Capacity may have changed in a pool: let its queue try again."""
        rt = self.pools.get(pool)
        if rt is not None and len(rt.queue):
            rt.queue.drain()

    # ---- picking -----------------------------------------------------------------------------

    def _pick(self, rt: PoolRuntime, req: RequestFeatures, exclude: frozenset[str]) -> Decision:
        """Pick and reserve in one synchronous step (see gateway/queue.py for why)."""
        now = time.time()
        views = self.fleet.views(rt.config.name, now, exclude)
        if not views:
            return Decision(None, "no-replicas")
        t0 = time.perf_counter()
        d = rt.policy.pick(req, views, now)
        child = metrics.child
        child(metrics.PICK, rt.config.name, rt.policy_name).observe(time.perf_counter() - t0)
        child(metrics.DECISIONS, rt.config.name, rt.policy_name, d.reason).inc()
        if d.replica_id is not None:
            self.fleet.start(d.replica_id, req, now, rt.config.name)
        return d

    def _release(self, pool: str, req: RequestFeatures, d: Decision) -> None:
        if d.replica_id is not None:
            self.fleet.finish(d.replica_id, req.request_id, time.time(), pool)

    def _too_large(self, rt: PoolRuntime, req: RequestFeatures) -> GatewayError | None:
        """400 `context_length_exceeded` when the request's KV need exceeds the whole cache of
        every replica the pool knows, whether it is offered now or not (an ejected, unhealthy,
        terminating or already tried one may be the one that holds it: a transient state, not
        the request's fault); it could only wait forever."""
        exceeds = getattr(rt.policy, "exceeds_kv_capacity", None)
        if exceeds is None:
            return None
        largest = exceeds(req, self.fleet.kv_caches(rt.config.name))
        if largest is None:
            return None
        return context_length_exceeded(req, rt.config.name, largest)

    # ---- the request handlers ----------------------------------------------------------------

    async def handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        """POST /v1/completions or /v1/chat/completions."""
        task = request.task
        active = self._active
        active[task] = request  # first: the shutdown's grace covers reading the body (drain)
        t0 = time.monotonic()
        rid = request.headers.get("x-request-id")
        if rid:
            # Clients reuse ids (a retry while the first try still runs, a fixed header): the
            # in-flight account needs a key of its own per request.
            key = f"{rid}#{next(self._seq)}"
        else:
            rid = key = self._ids.next()
        pool_name = model = ""
        try:
            self.check_auth(request)
            raw = await self._read_body(request)
            body = parse_body(raw, endpoint)
            model = body["model"]
            pools = self.model_pools.get(model)
            if pools is None:
                err = errors.unknown_model(model)
                model = ""  # a label per name a client made up would grow without bound
                raise err
            pool_name = pools[0].config.name
            priority = self._priority(request, model)
            max_tokens = body.get("max_tokens")
            if max_tokens is None:
                max_tokens = body.get("max_completion_tokens")
            try:
                text = prompt_text(body)
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                raise errors.bad_request(f"cannot read the prompt: {e}", "messages") from None
            req = self.estimator.features(key, model, text, max_tokens, priority)
            stream = body.get("stream") is True
            resp, pool_name = await self._route(request, pools, req, raw, endpoint, stream, rid)
        except GatewayError as e:
            metrics.child(metrics.REQUESTS, pool_name, model, "", str(e.status)).inc()
            return e.response(rid)
        except RoutedError as e:
            metrics.child(metrics.REQUESTS, e.pool, model, e.replica, str(e.error.status)).inc()
            return e.error.response(rid)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            task.uncancel()  # ended by the shutdown before the client got a byte: say so
            err = shutting_down()
            metrics.child(metrics.REQUESTS, pool_name, model, "", str(err.status)).inc()
            return err.response(rid)
        finally:
            del active[task]
            if self._idle is not None:  # shutting down: no next request on this connection
                request.protocol.close()
                if not active:
                    self._idle.set()
        metrics.child(metrics.E2E, pool_name, model).observe(time.monotonic() - t0)
        return resp

    async def _spill(
        self, pools: tuple[PoolRuntime, ...], req: RequestFeatures
    ) -> tuple[PoolRuntime, Decision]:
        """A model several pools list: the first pool (config order) whose policy places the
        request now; else it waits in the first saturated pool, or after those in the first
        pool that could ever hold it (one whose replicas that can hold it are away for now).
        A refusal is counted under the pool that refused it."""
        none: frozenset[str] = frozenset()
        saturated: list[tuple[PoolRuntime, Decision | None]] = []
        too_small: list[tuple[PoolRuntime, Decision | None]] = []  # no replica offered holds it
        for rt in pools:
            if len(rt.queue):  # saturated: the requests already waiting there go first
                saturated.append((rt, None))
                continue
            d = rt.queue.pick(req, none)
            if d.replica_id is not None:
                return rt, d
            (too_small if d.reason == EXCEEDS_KV else saturated).append((rt, d))
        refusal: RoutedError | None = None
        for rt, d in saturated + too_small:
            # `d`: the pool's pick above, not asked for again (one pick per pool and request).
            # After a wait in an earlier pool it is older: a queue with waiters ignores it, an
            # empty one holds the request until its next wake-up (a finish, a state, a tick).
            try:
                return rt, await rt.queue.acquire(req, none, d)
            except GatewayError as e:
                if e.code != CONTEXT_LENGTH_EXCEEDED:
                    raise RoutedError(e, rt.config.name) from None
                refusal = refusal or RoutedError(e, rt.config.name)
        assert refusal is not None
        raise refusal

    async def _route(
        self,
        request: web.Request,
        pools: tuple[PoolRuntime, ...],
        req: RequestFeatures,
        raw: bytes,
        endpoint: str,
        stream: bool,
        rid: str,
    ) -> tuple[web.StreamResponse, str]:
        """Send the request until a replica answers; the answer and the pool that served it."""
        headers = upstream_headers(request.headers, rid, strip_auth=bool(self.gw.api_keys))
        tried: frozenset[str] = frozenset()
        attempt = 0
        if len(pools) == 1:
            rt = pools[0]
            d = await rt.queue.acquire(req, tried)
        else:
            rt, d = await self._spill(pools, req)
        pool = rt.config.name
        rt.budget.on_request()
        while True:  # retries stay in the pool the request went to
            replica_id = d.replica_id
            assert replica_id is not None
            replica = self.fleet.replica(replica_id, pool)
            started = time.time()
            try:
                if replica is None:
                    raise UpstreamFailed("gone", f"replica {replica_id} left the pool")
                url = f"{replica.url}/v1/{endpoint}"
                if stream:
                    resp, out = await self._relay_stream(
                        request, url, raw, headers, rid, rt, req, replica_id
                    )
                else:
                    resp, out = await self._forward(url, raw, headers, rid)
                now = time.time()
                if not resp.prepared:  # a whole answer: on the wire before the accounting below
                    await self._answer(request, resp)
            except UpstreamFailed as e:
                now = time.time()
                self.fleet.finish(replica_id, req.request_id, now, pool)
                self.fleet.failed(replica_id, now, pool)
                tried = tried | {replica_id}
                attempt += 1
                log.info("request %s failed on %s before the first byte: %s", rid, replica_id, e)
                if attempt > self.gw.max_retries or not self.fleet.views(pool, now, tried):
                    raise RoutedError(
                        errors.upstream_failed(
                            f"no replica of pool {pool!r} answered ({attempt} tried; last: {e})"
                        ),
                        pool,
                    ) from None
                if not rt.budget.try_spend():
                    metrics.RETRY_BUDGET_EXHAUSTED.labels(pool).inc()
                    raise RoutedError(
                        errors.upstream_failed(
                            f"replica {replica_id} failed ({e}) and the retry budget is spent"
                        ),
                        pool,
                    ) from None
                metrics.RETRIES.labels(pool, e.reason).inc()
                try:
                    d = await rt.queue.acquire(req, tried)
                except GatewayError as g:
                    if g.code == CONTEXT_LENGTH_EXCEEDED:  # only tried replicas can hold it
                        g = errors.upstream_failed(
                            f"no replica of pool {pool!r} answered ({attempt} tried; last: {e}) "
                            "and no other can hold this request"
                        )
                    raise RoutedError(g, pool) from None
                continue
            except UpstreamTimedOut:
                # Slow, not failed: no retry. Held against the replica only when its state has
                # gone stale too (no agent or scrape hears from it): then it is likely dead.
                now = time.time()
                self.fleet.finish(replica_id, req.request_id, now, pool)
                if self.fleet.signal_lost(replica_id, pool, now):
                    self.fleet.failed(replica_id, now, pool)
                log.warning(
                    "request %s: no answer from %s within first_byte_timeout_s (%g s)",
                    rid,
                    replica_id,
                    self.gw.first_byte_timeout_s,
                )
                raise RoutedError(
                    upstream_timeout(self.gw.first_byte_timeout_s), pool, replica_id
                ) from None
            except BaseException:
                # The client went away (cancellation) or the stream broke after its first byte.
                self.fleet.finish(replica_id, req.request_id, time.time(), pool)
                raise
            self.fleet.finish(replica_id, req.request_id, now, pool)
            if not out.broken:  # a stream that broke was counted as the replica's failure
                self.fleet.succeeded(replica_id, pool)
            self._learn(rt, replica_id, req, out, started, now)
            metrics.child(metrics.REQUESTS, pool, req.model, replica_id, str(out.status)).inc()
            self._settle()  # the answer is out: the peers learn of its end and what it taught
            return resp, pool

    def _learn(
        self,
        rt: PoolRuntime,
        replica_id: str,
        req: RequestFeatures,
        out: _Outcome,
        t0: float,
        now: float,
    ) -> None:
        pool, model = rt.config.name, req.model
        if out.ttft_s is not None:
            metrics.child(metrics.TTFT, pool, model).observe(out.ttft_s)
        if out.tpot_s is not None:
            metrics.child(metrics.TPOT, pool, model).observe(out.tpot_s)
        if out.status != 200:
            return
        usage = out.reported_usage()
        if usage:
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(pt, int) and isinstance(ct, int):
                self.estimator.observe_usage(model, req.prompt_chars, pt, ct)
        rt.policy.observe(replica_id, req, out.ttft_s, out.tpot_s, now)
        if self.fleet.peers is not None:
            self.fleet.peers.changed(learned=True)

    # ---- forwarding ---------------------------------------------------------------------------

    async def _answer(self, request: web.Request, resp: web.StreamResponse) -> None:
        """Send a whole answer now. aiohttp would send it once the handler returns, after the
        request's accounting, learning and metrics: that work would add to every hop's
        latency. While draining it says Connection: close (as app.py's `closing` does for the
        answers the handler returns)."""
        if self.draining:
            resp.force_close()
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; aiohttp's finish_response meets the same and logs it

    async def _open(
        self, url: str, raw: bytes | BytesPayload, headers: list[tuple[str, str]]
    ) -> aiohttp.ClientResponse:
        """Send the request; the caller's Deadline bounds the wait for the response headers."""
        assert self.session is not None
        try:
            # A 3xx goes back to the client as it came: following it would send the request
            # wherever the replica points, outside the pool.
            resp = await self.session.post(url, data=raw, headers=headers, allow_redirects=False)
        except aiohttp.ClientConnectorError as e:
            raise UpstreamFailed("connect", str(e)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamFailed("connection", repr(e)) from None
        if resp.status in RETRIABLE_STATUS:
            resp.close()
            raise UpstreamFailed(f"status_{resp.status}", f"HTTP {resp.status}")
        return resp

    def _loop(self) -> asyncio.AbstractEventLoop:
        return self.loop or asyncio.get_running_loop()

    def _settle(self) -> None:
        """Where a request has left or been answered: the peer work due runs here, in a step the
        event loop takes anyway (gateway/peers.py, `settle`)."""
        peers = self.fleet.peers
        if peers is not None:
            peers.settle()

    def _body(self, raw: bytes) -> _SentBody:
        body = _SentBody(raw)
        body.then = self._settle  # the request has left: a settle point
        return body

    async def _forward(
        self, url: str, raw: bytes, headers: list[tuple[str, str]], rid: str
    ) -> tuple[web.Response, _Outcome]:
        gw = self.gw
        resp = None
        body = self._body(raw)
        try:
            with Deadline(self._loop(), gw.first_byte_timeout_s) as deadline:
                resp = await self._open(url, body, headers)
                if not resp.content.is_eof():  # (a small answer comes whole with its headers)
                    deadline.push(gw.idle_timeout_s)  # headers are in: the body must not stall
                try:
                    data = await resp.read()
                except (aiohttp.ClientError, OSError) as e:
                    raise UpstreamFailed("body", repr(e)) from None
        except TimeoutError:
            if resp is None:
                if body.sent:  # the replica has it: generating (vLLM answers when done)
                    raise UpstreamTimedOut() from None
                raise UpstreamFailed("timeout", "no response headers in time") from None
            raise UpstreamFailed("idle_timeout", "body stalled") from None
        finally:
            if resp is not None:
                resp.release()
        out = web.Response(status=resp.status, body=data, headers=downstream_headers(resp, rid))
        # parsed only for what the estimator learns from, and only after it was sent
        answer = data if resp.status == 200 and b'"usage"' in data else None
        return out, _Outcome(resp.status, answer=answer)

    async def _relay_stream(
        self,
        request: web.Request,
        url: str,
        raw: bytes,
        headers: list[tuple[str, str]],
        rid: str,
        rt: PoolRuntime,
        req: RequestFeatures,
        replica_id: str,
    ) -> tuple[web.StreamResponse, _Outcome]:
        t_sent = time.monotonic()
        gw = self.gw
        resp = None
        try:
            # Until the first chunk has come the request may still go elsewhere: one deadline
            # for the headers and that chunk.
            with Deadline(self._loop(), gw.first_byte_timeout_s) as deadline:
                resp = await self._open(url, self._body(raw), headers)
                if resp.status != 200:  # an error answer (4xx): pass it on whole, it is small
                    deadline.push(gw.idle_timeout_s)
                    try:
                        data = await resp.read()
                    except (aiohttp.ClientError, OSError) as e:
                        raise UpstreamFailed("body", repr(e)) from None
                    resp.release()
                    out = web.Response(
                        status=resp.status, body=data, headers=downstream_headers(resp, rid)
                    )
                    return out, _Outcome(resp.status)
                content = resp.content
                try:
                    first = await content.readany()
                except (aiohttp.ClientError, OSError) as e:
                    raise UpstreamFailed("body", repr(e)) from None
        except TimeoutError:
            if resp is not None:
                resp.close()
            raise UpstreamFailed("timeout", "no first byte in time") from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        try:
            if not first:
                raise UpstreamFailed("empty", "stream ended before its first byte")
            t_first = time.monotonic()
            self.fleet.first_token(replica_id, req.request_id, time.time())
            client = web.StreamResponse(status=200, headers=downstream_headers(resp, rid))
            try:
                return await self._pump(
                    request, client, content, first, rt, replica_id, t_sent, t_first
                )
            except ConnectionResetError:  # the client went away: stop reading upstream
                return client, _Outcome(499, t_first - t_sent)
        finally:
            resp.close()  # drops the upstream connection if we stop early: the server aborts

    async def _pump(
        self,
        request: web.Request,
        client: web.StreamResponse,
        content: aiohttp.StreamReader,
        first: bytes,
        rt: PoolRuntime,
        replica_id: str,
        t_sent: float,
        t_first: float,
    ) -> tuple[web.StreamResponse, _Outcome]:
        """Relay the stream chunk by chunk (whatever has arrived, never the whole body); a break
        ends it with an SSE error event."""
        rid = client.headers.get("x-request-id", "")
        events = first.count(b"data: ")
        usage = _sse_usage(first)
        t_last = t_first
        idle = self.gw.idle_timeout_s
        writing = True  # what the relay waits on: the client (writing) or the replica
        try:
            await client.prepare(request)
            await client.write(first)
            writing = False
            # One deadline for the whole relay, pushed back per chunk: no timer per chunk.
            with Deadline(self._loop(), idle) as deadline:
                while True:
                    chunk = await content.readany()
                    if not chunk:  # end of the stream
                        break
                    t_last = time.monotonic()
                    writing = True
                    await client.write(chunk)
                    writing = False
                    deadline.push(idle)
                    events += chunk.count(b"data: ")
                    if b'"usage":{' in chunk:
                        usage = _sse_usage(chunk) or usage
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            if isinstance(e, ConnectionResetError):  # the client went away, not the replica
                raise
            if writing:  # the client stopped reading: not the replica's fault, nobody to tell
                log.info("stream %s: the client read nothing for %.0f s; closing it", rid, idle)
                if request.transport is not None:
                    request.transport.close()
                return client, _Outcome(499, t_first - t_sent)
            metrics.STREAM_ERRORS.labels(rt.config.name).inc()
            log.warning("stream %s from %s broke after its first byte: %r", rid, replica_id, e)
            await client.write(
                errors.sse_error_event(f"the model server failed mid-stream: {type(e).__name__}")
            )
            await client.write_eof()
            self.fleet.failed(replica_id, time.time(), rt.config.name)
            return client, _Outcome(200, t_first - t_sent, None, None, broken=True)
        except asyncio.CancelledError:
            if not self.stopping or not client.prepared:
                raise  # the client went away (or the shutdown came before any byte: 503)
            # The shutdown's grace ran out: end the stream well-formed, not cut off.
            request.task.uncancel()
            log.info("stream %s ended by the gateway's shutdown", rid)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await client.write(
                        errors.sse_error_event(
                            "The gateway is shutting down; the stream was ended early.",
                            "server_error",
                            SHUTTING_DOWN,
                        )
                    )
                    await client.write_eof()
            return client, _Outcome(200, t_first - t_sent, None, None, broken=True)
        await client.write_eof()
        tokens = max(0, events - 2)  # minus the first token's event and [DONE]
        tpot = (t_last - t_first) / tokens if tokens > 0 else None
        return client, _Outcome(200, t_first - t_sent, tpot, usage)

    # ---- shutdown ------------------------------------------------------------------------------

    async def drain(
        self, grace_s: float, end_s: float = 5.0, connections: Iterable[Any] = ()
    ) -> None:
        """Let the requests being handled finish for up to `grace_s`, then end the rest: a stream
        with an SSE error event, a request not answered yet with a 503 (and wait `end_s` for
        them). Called once the server stopped listening, before aiohttp closes its
        `connections` (RequestHandlers): a closed one reads nothing more, so a request whose body
        is still arriving could never finish. Here the connections without a request in a
        handler (idle keep-alive ones; an answer already handed to the socket is still sent)
        are closed at once, so their clients reconnect elsewhere; the others after their answer
        (see `handle`)."""
        self._idle = asyncio.Event()
        busy = {r.protocol for r in self._active.values()}
        for conn in connections:
            if conn not in busy and _parked(conn):
                conn.force_close()
        if await self._until_idle(grace_s):
            return
        log.warning(
            "shutdown: %d requests still running after %.0f s; ending them",
            len(self._active),
            grace_s,
        )
        self.stopping = True
        for task in list(self._active):
            task.cancel()
        await self._until_idle(end_s)

    @property
    def draining(self) -> bool:
        return self._idle is not None

    async def _until_idle(self, timeout_s: float) -> bool:
        """Wait until no request is being handled, for at most `timeout_s`; whether none is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._active:
            left = deadline - loop.time()
            if left <= 0:
                return False
            # A fresh event each round: one set when the requests ran out may be out of date
            # (another came in on an open connection since).
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), left)
        return True

    # ---- small request helpers ---------------------------------------------------------------

    def check_auth(self, request: web.Request) -> None:
        keys = self.gw.api_keys
        if not keys:
            return
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        # An empty token never matches (the config refuses empty keys; this holds regardless).
        if (
            scheme.lower() != "bearer"
            or not token
            or not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys if k)
        ):
            raise errors.unauthorized()

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.gw.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise errors.too_large(limit)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise errors.too_large(limit) from None

    def _priority(self, request: web.Request, model: str) -> int:
        value = request.headers.get(PRIORITY_HEADER)
        if value is None:
            return self.gw.model_priority.get(model, 0)
        try:
            return int(value)
        except ValueError:
            raise errors.bad_request(
                f"header {PRIORITY_HEADER}: {value!r} is not an integer", PRIORITY_HEADER
            ) from None


def policy_options(name: str, gw: GatewayConfig) -> dict[str, Any]:
    """`make_policy` keyword settings from the config: headroom's SLO and whether it holds
    requests when no replica can meet them; the other policies take none."""
    if name != "headroom":
        return {}
    return {
        "slo_ttft_s": gw.ttft_target_s,
        "slo_ttft_per_token_s": gw.ttft_per_1k_tokens_s / 1000.0,
        "slo_tpot_s": gw.tpot_target_s,
        "queue_when_saturated": gw.queue_when_saturated,
    }


def pool_profile(pool: PoolConfig) -> RateSeed | None:
    """The speed seed for a pool's replicas from its accelerator and first model, when known."""
    if not pool.accelerator or not pool.models:
        return None
    try:
        return rate_seed_for(pool.models[0], pool.accelerator, pool.gpus_per_replica)
    except (KeyError, ValueError, ImportError) as e:
        log.info(
            "no speed profile for pool %s (%s on %s): %s",
            pool.name,
            pool.models[0],
            pool.accelerator,
            e,
        )
        return None


def _parked(conn: Any) -> bool:
    """Whether an aiohttp connection is waiting for its next request (nothing read and not yet
    handled: closing it loses nothing). A request read but whose handler has not run yet is not
    in `_active` and must not be cut. aiohttp exposes no public test for this: its read loop
    parks on `_waiter`; without that attribute (another aiohttp) no connection is cut early."""
    waiter = getattr(conn, "_waiter", None)
    return waiter is not None and not waiter.done()


def _sse_usage(chunk: bytes) -> dict[str, Any] | None:
    """The usage object of the stream's final chunk (sent with stream_options.include_usage)."""
    if b'"usage":{' not in chunk:
        return None
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            try:
                usage = orjson.loads(line[6:]).get("usage")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(usage, dict):
                return usage
    return None
