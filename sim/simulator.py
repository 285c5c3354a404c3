"""A fleet in virtual time: real engines, the real gateway picker, stale agent signals.

Discrete events on one heap. Each replica is a `modelserver.scheduler.Engine` (the code behind the
emulated model server) stepped only while it has work: one event per engine step, whose outputs
are delivered when the step ends. The gateway is the real `Estimator`, `InFlightLedger` and
`Policy` from `gateway/`; it sees each replica through `ReplicaState`s built from `engine.stats()`
every `scrape_interval_s` and delivered `signal_delay_s` later, like an agent's. Requests cross a
network of `net_latency_s` each way, and wait in a FIFO at the gateway while the policy answers
`None` (every replica saturated).

Replicas may join and leave mid-run (`join`, `leave`): a leaving replica gets no new requests and
drops out once its last one finishes, as a terminating pod does behind a Service.

Small liberties, all of them microsecond-scale: the gateway's ledger hears of a first token and
a finish when the replica produces it (not one network hop later), and the client-side timings add
the hop back.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.estimate import Estimator, model_seed
from gateway.inflight import InFlightLedger
from kvpilot.signals import GpuStats, ReplicaState
from sim.fleets import ReplicaSpec
from sim.tokens import BLOCK_TOKENS, prefix_hashes, prompt_token_ids
from sim.traces import SimRequest

# event kinds, in tie-break order at equal times
_STATE, _STEP_END, _DELIVER, _ARRIVE, _SCRAPE, _JOIN, _LEAVE = range(7)


@dataclass(frozen=True)
class SimConfig:
    scrape_interval_s: float = 0.25  # the agent's default
    signal_delay_s: float = 0.05  # scrape -> state at the gateway (agent push over the network)
    net_latency_s: float = 0.0005  # one way, gateway <-> replica (same zone)
    client_latency_s: float = 0.0  # one way, client <-> gateway
    drain_s: float = 300.0  # after the last arrival, stop this much later at most
    gpu_memory_utilization: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class EarlyStop:
    """Stop a run once its goodput is certain to fall below `goodput_below`.

    A measured request (arrived at or after `warmup_s`) is a certain SLO miss once its TTFT
    target has passed without a first token, its first token came late, its TPOT came out over
    the target, or it failed. Goodput can then be at most (measured - misses) / measured; once
    that bound is under `goodput_below` the outcome of a pass/fail probe is decided and the rest
    of the run (often minutes of draining an overloaded fleet) is skipped. Exact by construction:
    a run stopped early would have ended below the bound too.
    """

    slo: object  # sim.slo.Slo (ttft_target(prompt_tokens), tpot_s)
    goodput_below: float
    warmup_s: float = 0.0


@dataclass(slots=True)
class RequestRecord:
    req: SimRequest
    replica: str | None = None
    dispatched_s: float | None = None
    first_token_s: float | None = None  # as the client sees it
    finish_s: float | None = None  # as the client sees it
    generated: int = 0
    cached_tokens: int = 0
    error: str | None = None
    features: object = None
    direct: bool = False  # sent straight to a replica, not through the gateway

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.req.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.finish_s is None or self.first_token_s is None:
            return None
        if self.generated <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.generated - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.req.arrival_s


@dataclass(slots=True)
class Replica:
    replica_id: str
    spec: ReplicaSpec
    engine: object  # modelserver.scheduler.Engine
    profile: object  # gateway.picker.RateSeed or None
    accelerator: str
    joined_s: float
    busy: bool = False
    pending: object = None  # the StepOutput whose end event is on the heap
    leaving: bool = False
    left_s: float | None = None
    live: dict[str, RequestRecord] = field(default_factory=dict)
    # what its agent derives between scrapes
    busy_s: float = 0.0
    mem_bw_s: float = 0.0
    ttft_sum: float = 0.0
    tpot_sum: float = 0.0
    ttft_n: int = 0
    tpot_n: int = 0
    last_scrape: tuple[float, int, int, int, int, float, float] | None = None
    kv_samples: int = 0
    kv_sum: float = 0.0
    kv_max: float = 0.0
    steps: int = 0


def _rate_seed(engine: object, spec: ReplicaSpec, gpu_memory_utilization: float) -> object:
    """The picker's per-replica prior from the engine's own performance model (what a real
    gateway derives from the replica's GPU and model profile)."""
    from gateway.picker import rate_seed_from_perf

    return rate_seed_from_perf(
        engine.perf,  # type: ignore[attr-defined]
        chunk_tokens=spec.max_num_batched_tokens,
        block_size=BLOCK_TOKENS,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_seqs=spec.max_num_seqs,
    )


class Simulation:
    """One run: a fleet, a policy, a trace. `run()` returns the per-request records."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        policy: object,
        config: SimConfig = SimConfig(),
        *,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.estimator = Estimator()
        self.ledger = InFlightLedger()
        self.replicas: dict[str, Replica] = {}
        self.states: dict[str, ReplicaState] = {}
        self.records: dict[str, RequestRecord] = {}
        self.queue: deque[RequestRecord] = deque()
        self.heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._on_progress = on_progress
        self.now = 0.0
        self.preemptions = 0
        self.retired: list[Replica] = []
        self._hash_seed: dict[str, int] = {}
        self.stopped_early = False  # run() ended by its EarlyStop
        self._stop: EarlyStop | None = None
        self._measured = 0
        self._missed: set[str] = set()
        self._deadlines: list[tuple[float, str]] = []
        for spec in replicas:
            self.join(spec, 0.0)

    # ------------------------------------------------------------------ fleet changes
    def join(self, spec: ReplicaSpec, at: float, replica_id: str | None = None) -> str:
        """A replica becomes ready at `at` (provisioning delays are the caller's)."""
        rid = replica_id or f"{spec.gpu}-{next(self._ids)}"
        self._push(at, _JOIN, (rid, spec))
        return rid

    def leave(self, replica_id: str, at: float) -> None:
        self._push(at, _LEAVE, replica_id)

    def _do_join(self, rid: str, spec: ReplicaSpec) -> None:
        from modelserver.profiles import resolve_gpu, resolve_model
        from modelserver.scheduler import Engine, EngineConfig

        gpu = resolve_gpu(spec.gpu)
        engine = Engine(
            EngineConfig(
                model=resolve_model(spec.model),
                gpu=gpu,
                num_gpus=spec.num_gpus,
                max_num_seqs=spec.max_num_seqs,
                max_num_batched_tokens=spec.max_num_batched_tokens,
                block_size=BLOCK_TOKENS,
                gpu_memory_utilization=self.config.gpu_memory_utilization,
                seed=self.config.seed,
            )
        )
        self.replicas[rid] = Replica(
            rid,
            spec,
            engine,
            _rate_seed(engine, spec, self.config.gpu_memory_utilization),
            gpu.label,
            self.now,
        )
        if len(self.replicas) == 1:  # the first replica starts the agents' scrape clock
            self._push(self.now + self.config.scrape_interval_s, _SCRAPE, None)
        self._scrape_one(self.replicas[rid], self.now, deliver_now=True)
        self._drain_queue()

    def _do_leave(self, rid: str) -> None:
        r = self.replicas.get(rid)
        if r is None or r.leaving:
            return
        r.leaving = True
        self.states.pop(rid, None)
        if not r.live:
            self._retire(r)

    def _retire(self, r: Replica) -> None:
        r.left_s = self.now
        self.replicas.pop(r.replica_id, None)
        self.ledger.forget(r.replica_id)
        forget = getattr(self.policy, "forget", None)
        if forget is not None:
            forget(r.replica_id)
        self.retired.append(r)

    # ------------------------------------------------------------------ main loop
    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self.heap, (t, kind, next(self._seq), payload))

    def run(
        self,
        trace: Sequence[SimRequest],
        direct: Sequence[tuple[str, SimRequest]] = (),
        *,
        stop: EarlyStop | None = None,
    ) -> list[RequestRecord]:
        """Route `trace` through the gateway; `direct` requests go straight to the named replica
        (traffic this gateway does not see: another gateway replica, a client on the pod IP).
        With `stop`, the run ends as soon as its goodput is certain to be under the bound
        (`stopped_early`); the records are then partial."""
        self._stop = stop
        for req in trace:
            rec = RequestRecord(req)
            self.records[req.request_id] = rec
            self._push(req.arrival_s + self.config.client_latency_s, _ARRIVE, rec)
            if stop is not None and req.arrival_s >= stop.warmup_s:
                self._measured += 1
                target = stop.slo.ttft_target(req.prompt_tokens)  # type: ignore[attr-defined]
                self._deadlines.append((req.arrival_s + target, req.request_id))
        heapq.heapify(self._deadlines)
        for rid, req in direct:
            rec = RequestRecord(req, replica=rid, direct=True)
            self.records[req.request_id] = rec
            self._push(req.arrival_s + self.config.net_latency_s, _DELIVER, rec)
        last = max((r.arrival_s for r in trace), default=0.0)
        last = max([last] + [r.arrival_s for _, r in direct])
        stop = last + self.config.drain_s
        self.end_s = last
        heap = self.heap
        pop = heapq.heappop
        next_progress = 0.0
        pending_requests = len(trace) + len(direct)
        self._pending = pending_requests
        while heap:
            t, kind, _, payload = pop(heap)
            if t > stop:
                self.now = stop
                break
            self.now = t
            if kind == _STEP_END:
                self._step_end(payload)  # type: ignore[arg-type]
                if self._pending == 0 and not self.queue:
                    # everything answered: only scrapes and idle replicas are left
                    break
            elif kind == _SCRAPE:
                self._scrape(t)
                if self._stop is not None and self._decided(t):
                    self.stopped_early = True
                    break
            elif kind == _STATE:
                self._state(payload)  # type: ignore[arg-type]
            elif kind == _ARRIVE:
                self._arrive(payload)  # type: ignore[arg-type]
            elif kind == _DELIVER:
                self._deliver(payload)  # type: ignore[arg-type]
            elif kind == _JOIN:
                self._do_join(*payload)  # type: ignore[misc]
            elif kind == _LEAVE:
                self._do_leave(payload)  # type: ignore[arg-type]
            if self._on_progress is not None and t >= next_progress:
                self._on_progress(min(t, last))
                next_progress = t + 10.0
        self.end_s = max(self.end_s, self.now)
        # requests never answered: censor at the end of the run
        return list(self.records.values())

    # ------------------------------------------------------------------ early stop
    def _miss(self, rec: RequestRecord) -> None:
        if not rec.direct and rec.req.arrival_s >= self._stop.warmup_s:  # type: ignore[union-attr]
            self._missed.add(rec.req.request_id)

    def _decided(self, now: float) -> bool:
        """True once the goodput bound is under the EarlyStop's (checked at every scrape)."""
        dl = self._deadlines
        records = self.records
        while dl and dl[0][0] < now:
            _, rid = heapq.heappop(dl)
            if records[rid].first_token_s is None:  # its first token can only come later
                self._missed.add(rid)
        n = self._measured
        stop = self._stop
        return n > 0 and (n - len(self._missed)) / n < stop.goodput_below  # type: ignore[union-attr]

    # ------------------------------------------------------------------ gateway
    def _views(self) -> list:
        from gateway.picker import ReplicaView

        get = self.ledger.get
        return [
            ReplicaView(rid, self.states.get(rid), get(rid), False, r.profile)
            for rid, r in self.replicas.items()
            if not r.leaving
        ]

    def _features(self, rec: RequestRecord) -> object:
        model = self._model
        seed = self._hash_seed.get(model)
        if seed is None:
            seed = self._hash_seed[model] = model_seed(model)
        ids = prompt_token_ids(rec.req)
        hashes = prefix_hashes(ids, seed=seed, max_blocks=self.estimator.max_prefix_blocks)
        feats = self.estimator.features_from_tokens(
            rec.req.request_id,
            model,
            len(ids),
            hashes,
            rec.req.max_tokens,
            block_tokens=BLOCK_TOKENS,
        )
        return feats, ids

    @property
    def _model(self) -> str:
        for r in self.replicas.values():
            return r.spec.model
        return "model"

    def _arrive(self, rec: RequestRecord) -> None:
        if self.queue or not self._try_dispatch(rec):
            self.queue.append(rec)

    def _try_dispatch(self, rec: RequestRecord) -> bool:
        if rec.features is None:
            rec.features = self._features(rec)
        feats, _ = rec.features  # type: ignore[misc]
        views = self._views()
        if not views:
            return False
        decision = self.policy.pick(feats, views, self.now)  # type: ignore[attr-defined]
        rid = decision.replica_id
        if rid is None:
            return False
        rec.replica = rid
        rec.dispatched_s = self.now
        self.ledger.start(rid, feats, self.now, BLOCK_TOKENS)
        self.replicas[rid].live[rec.req.request_id] = rec
        self._push(self.now + self.config.net_latency_s, _DELIVER, rec)
        return True

    def _drain_queue(self) -> None:
        """Offer freed capacity to held requests, as the gateway's queue does: the first in the
        policy's queue order (`queue_key`, else arrival), and stop at the first that still gets
        no replica (nobody behind it jumps ahead)."""
        q = self.queue
        key = getattr(self.policy, "queue_key", None)
        if key is None or len(q) <= 1:
            while q and self._try_dispatch(q[0]):
                q.popleft()
            return
        while q:
            now = self.now
            for rec in q:
                if rec.features is None:
                    rec.features = self._features(rec)
            i = min(range(len(q)), key=lambda j: key(q[j].features[0], q[j].req.arrival_s, now))
            if not self._try_dispatch(q[i]):
                return
            del q[i]

    # ------------------------------------------------------------------ replicas
    def _deliver(self, rec: RequestRecord) -> None:
        r = self.replicas.get(rec.replica or "")
        if r is None:  # the replica is gone (cannot happen: leaving replicas drain)
            rec.error = "replica gone"
            self._pending -= 1
            return
        req = rec.req
        if rec.direct:
            rec.dispatched_s = self.now
            r.live[req.request_id] = rec
            rec.features = (None, prompt_token_ids(req))
        _, ids = rec.features  # type: ignore[misc]
        try:
            r.engine.validate(len(ids), req.output_tokens)  # type: ignore[attr-defined]
            r.engine.add_request(  # type: ignore[attr-defined]
                req.request_id, ids, req.output_tokens, ignore_eos=True, arrival_time=self.now
            )
        except ValueError as e:
            rec.error = str(e)
            self._finished(r, rec, self.now)
            return
        rec.features = (rec.features[0], None)  # type: ignore[index]  # the engine has the ids now
        if not r.busy:
            self._step(r)

    def _step(self, r: Replica) -> None:
        out = r.engine.step(self.now)  # type: ignore[attr-defined]
        d = out.duration_s
        if d <= 0:
            r.busy = False
            r.pending = None
            return
        r.busy = True
        r.pending = out
        r.busy_s += d
        r.mem_bw_s += d * out.mem_bw_util
        r.steps += 1
        self._push(self.now + d, _STEP_END, r)

    def _step_end(self, r: Replica) -> None:
        out = r.pending
        now = self.now
        lat = self.config.net_latency_s + self.config.client_latency_s
        if out.preempted:  # type: ignore[attr-defined]
            self.preemptions += len(out.preempted)  # type: ignore[attr-defined]
        live = r.live
        for o in out.outputs:  # type: ignore[attr-defined]
            if o.index == 0:
                rec = live.get(o.request_id)
                if rec is None:
                    continue
                rec.first_token_s = now + lat
                rec.cached_tokens = o.num_cached_tokens
                stop = self._stop
                if stop is not None and now + lat - rec.req.arrival_s > stop.slo.ttft_target(  # type: ignore[attr-defined]
                    rec.req.prompt_tokens
                ):
                    self._miss(rec)
                self.ledger.first_token(r.replica_id, o.request_id, now)
                ttft = now - (rec.dispatched_s or now) - self.config.net_latency_s
                r.ttft_sum += ttft
                r.ttft_n += 1
            if o.finish_reason is not None:
                rec = live.get(o.request_id)
                if rec is not None:
                    rec.generated = o.index + 1
                    self._finished(r, rec, now)
        self._step(r)
        if r.leaving and not r.live and not r.busy:
            self._retire(r)

    def _finished(self, r: Replica, rec: RequestRecord, now: float) -> None:
        r.live.pop(rec.req.request_id, None)
        self._pending -= 1
        lat = self.config.net_latency_s + self.config.client_latency_s
        rec.finish_s = now + lat
        self.ledger.finish(r.replica_id, rec.req.request_id, now)
        feats = rec.features[0]  # type: ignore[index]
        rec.features = None  # keep memory flat over long runs
        if self._stop is not None and (
            rec.error is not None or (rec.tpot_s or 0.0) > self._stop.slo.tpot_s  # type: ignore[attr-defined]
        ):
            self._miss(rec)
        if rec.error is None and not rec.direct:
            tpot = rec.tpot_s
            if rec.generated > 1 and tpot is not None:
                r.tpot_sum += tpot
                r.tpot_n += 1
            # what the gateway measures: from sending it to the first token coming back
            ttft = (
                (rec.first_token_s or now)
                - self.config.client_latency_s
                - (rec.dispatched_s or now)
            )
            self.policy.observe(r.replica_id, feats, ttft, tpot, now)  # type: ignore[attr-defined]
            self.estimator.observe_usage(
                feats.model, feats.prompt_chars, feats.prompt_tokens, rec.generated
            )  # type: ignore[attr-defined]
        if self.queue:
            self._drain_queue()

    # ------------------------------------------------------------------ agents
    def _scrape(self, t: float) -> None:
        for r in list(self.replicas.values()):
            self._scrape_one(r, t)
        if self.replicas:
            self._push(t + self.config.scrape_interval_s, _SCRAPE, None)

    def _scrape_one(self, r: Replica, t: float, deliver_now: bool = False) -> None:
        s = r.engine.stats()  # type: ignore[attr-defined]
        prev = r.last_scrape
        busy, membw = r.busy_s, r.mem_bw_s
        if prev is None:
            dt = 0.0
            prompt_rate = gen_rate = 0.0
            hit = 0.0
            util = mem = 0.0
        else:
            dt = max(1e-9, t - prev[0])
            prompt_rate = (s.prompt_tokens_total - prev[1]) / dt
            gen_rate = (s.generation_tokens_total - prev[2]) / dt
            q = s.prefix_queries_tokens - prev[3]
            hit = (s.prefix_hits_tokens - prev[4]) / q if q > 0 else 0.0
            util = min(1.0, (busy - prev[5]) / dt)
            mem = min(1.0, (membw - prev[6]) / dt)
        r.last_scrape = (
            t,
            s.prompt_tokens_total,
            s.generation_tokens_total,
            s.prefix_queries_tokens,
            s.prefix_hits_tokens,
            busy,
            membw,
        )
        r.kv_samples += 1
        r.kv_sum += s.kv_usage
        r.kv_max = max(r.kv_max, s.kv_usage)
        n = r.spec.num_gpus
        perf = r.engine.perf  # type: ignore[attr-defined]
        total = perf.gpu.memory_bytes
        used = (
            min(total, int(perf.hbm_used_bytes(s.num_used_blocks, s.block_size)))
            if hasattr(perf, "hbm_used_bytes")
            else 0
        )
        gpus = tuple(
            GpuStats(f"GPU-{r.replica_id}-{i}", i, perf.gpu.product_name, used, total, util, mem)
            for i in range(n)
        )
        state = ReplicaState(
            replica_id=r.replica_id,
            address=f"sim://{r.replica_id}",
            pool="sim",
            models=(r.spec.model,),
            engine="kvpilot",
            node=f"node-{r.replica_id}",
            accelerator=r.accelerator,
            gpus=gpus,
            waiting=s.num_waiting,
            running=s.num_running,
            kv_usage=s.kv_usage,
            kv_blocks_total=s.num_gpu_blocks,
            kv_block_size=s.block_size,
            prefix_cache_hit_ratio=hit,
            prompt_tokens_per_s=prompt_rate,
            generation_tokens_per_s=gen_rate,
            ttft_s=r.ttft_sum / r.ttft_n if r.ttft_n else None,
            tpot_s=r.tpot_sum / r.tpot_n if r.tpot_n else None,
            preemptions_total=s.num_preemptions,
            observed_at=t,
        )
        r.ttft_sum = r.tpot_sum = 0.0
        r.ttft_n = r.tpot_n = 0
        if deliver_now:
            self._state(state)
        else:
            self._push(t + self.config.signal_delay_s, _STATE, state)

    def _state(self, state: ReplicaState) -> None:
        r = self.replicas.get(state.replica_id)
        if r is None or r.leaving:
            return
        self.states[state.replica_id] = state
        self.ledger.observed(state.replica_id, state.observed_at)
        if self.queue:
            self._drain_queue()

    # ------------------------------------------------------------------ results
    def all_replicas(self) -> list[Replica]:
        return list(self.replicas.values()) + self.retired
