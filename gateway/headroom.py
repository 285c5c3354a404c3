"""`headroom`, kvpilot's own policy: the replica with the lowest predicted cost that fits.

Cost = time to first token (prefill queued ahead plus the request's own uncached prefill at the
replica's learned rate) + the harm to its running decodes + KV pressure after admission, all in
seconds of TTFT; replicas that cannot fit the request's KV need, or are saturated, are dropped
first (failing open to the least costly). Rates are learned online per replica, seeded from its
GPU profile (`RateSeed`). docs/routing.md explains each term and how it was tuned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.estimate import RequestFeatures
from gateway.policy import (
    DEFAULT_SEED,
    EXCEEDS_KV,
    NO_REPLICAS,
    BasePolicy,
    Decision,
    RateSeed,
    ReplicaView,
)
from gateway.prefix import DEFAULT_CAPACITY, PrefixIndex
from kvpilot.signals import ReplicaState


class _Columns:
    """headroom's per-replica entries as rows of one float array, for the vectorised pick.

    Rows are slots (one per replica id); `by_view` maps id(view) -> slot for the view objects the
    entries hold (held, so an id cannot be reused while it is a key).
    """

    def __init__(self, np: Any) -> None:
        self.np = np
        self.rows = np.zeros((64, _NUM_FIELDS))
        self.slot: dict[str, int] = {}
        self.free: list[int] = []
        self.by_view: dict[int, int] = {}

    def put(self, rid: str, e: tuple[Any, ...], old: tuple[Any, ...] | None) -> None:
        if old is not None:
            self.by_view.pop(id(old[0]), None)
        s = self.slot.get(rid)
        if s is None:
            if self.free:
                s = self.free.pop()
            else:
                s = len(self.slot)
                if s >= len(self.rows):
                    grown = self.np.zeros((2 * len(self.rows), _NUM_FIELDS))
                    grown[: len(self.rows)] = self.rows
                    self.rows = grown
            self.slot[rid] = s
        self.rows[s] = e[1 : _NUM_FIELDS + 1]
        self.by_view[id(e[0])] = s

    def drop(self, rid: str, old: tuple[Any, ...] | None) -> None:
        if old is not None:
            self.by_view.pop(id(old[0]), None)
        s = self.slot.pop(rid, None)
        if s is not None:
            self.free.append(s)


# the numeric fields of a headroom entry (all but the view itself); see Headroom._entry
_NUM_FIELDS = 15


def _cache_tokens(e: tuple[Any, ...]) -> float:
    """A headroom entry's whole KV cache in tokens (infinite when its size is unknown)."""
    return 1.0 / (e[11] * e[12]) if e[11] > 0.0 and e[12] > 0.0 else math.inf


class _Learned:
    """What headroom has learned about one replica, and values derived from its latest state."""

    __slots__ = (
        "log_ttft",
        "log_tpot",
        "state",
        "profile",
        "derived",
        "preempt_total",
        "preempt_at",
        "preempt_rate",
        "uncached_frac",
        "kv_frac",
        "mean_uncached",
        "mean_output",
    )

    def __init__(self) -> None:
        self.log_ttft = 0.0  # log of observed/predicted TTFT (EWMA): corrects the prefill rate
        self.log_tpot = 0.0  # same for TPOT: corrects the decode step time
        self.state: ReplicaState | None = None
        self.profile: RateSeed | None = None
        self.derived: tuple[float, ...] = ()
        self.preempt_total: int | None = None
        self.preempt_at = 0.0
        self.preempt_rate = 0.0  # preemptions per second, EWMA over states
        # of the prompts sent here, the share not in its cache (EWMA): the ledger counts whole
        # prompts, the replica only prefills what it does not hold
        self.uncached_frac = 1.0
        self.kv_frac = 1.0  # the same for the KV blocks the ledger counts (prompt + output)
        self.mean_uncached: float | None = None  # uncached prompt tokens per request sent here
        self.mean_output: float | None = None  # expected output tokens per request sent here


class Headroom(BasePolicy):
    """kvpilot's policy: drop what cannot fit, then the lowest predicted cost.

    For each usable replica r and a request of p prompt and o expected output tokens:
      X_r     = p - the prompt tokens r's cache likely holds (its prefix index: what was routed
                there, LRU-bounded by r's KV cache): prefix affinity enters only here
      fit     : (X_r + o) tokens of new KV fit in r's free blocks less the unacked requests' blocks
      Q_r     = prefill tokens queued ahead: max(waiting x mean uncached prompt, drained at r's
                rate for the state's age, + unacked prompt tokens; the ledger's own
                not-yet-prefilled prompt tokens)
      TTFT_r  = k_r (Q_r + X_r) (1/F_r + D_r(R_r) / chunk): prefill at F_r tokens/s plus one
                decode step of the running batch per chunk (the decode-step interference)
      harm_r  = w_harm R_r k_r X_r / F_r / (harm_tokens x TPOT target): the stall this prefill
                puts on each of the R_r running streams, as a share of their TPOT budget (phase:
                a prefill-heavy request on a decode-heavy replica costs the most)
      tpot_r  = w_tpot k'_r D_r(R_r + 1) / TPOT target: its own decode speed there
      kv_r    = w_kv (u - knee)^2 / (1 - u) with u the KV usage after admission (steep as u -> 1)
                + w_preempt x recent preemptions per second
      cost_r  = TTFT_r + TTFT target x (harm_r + tpot_r + kv_r)   (seconds of TTFT)
    F_r, D_r come from r's RateSeed (its GPU profile; the default seed without one); k_r, k'_r
    are learned online from observed vs predicted TTFT and TPOT: a log-EWMA per replica with
    bounded steps, taken relative to the fleet-wide bias (which changes no ranking), and 1 inside
    a deadband (load-dependent noise would otherwise steer traffic by recent luck); TTFTs
    observed behind a long queue are not learned from. On an admission-blocked replica (batch
    cap, or KV >= kv_blocked with too few free blocks for the prompts waiting) Q_r also holds,
    per request waiting there, the time until a running sequence finishes. Unhealthy
    replicas, with `max_queue` those with that many waiting, with `max_wait_ratio` (1.0) those
    whose predicted wait behind their queue exceeds that share of the TTFT target, and with
    `demand_max` those whose projected KV demand overflows, count as not fitting (saturated).
    When no replica fits the pick fails open to the lowest cost, or with `queue_when_saturated`
    returns None so the gateway holds the request until capacity frees; `queue_key` says which
    held request to offer freed capacity first (earliest deadline while it can still be met,
    then by age). A request it would hold that exceeds every offered replica's whole KV cache
    (known sizes only) could not leave the queue while they are all it has: the pick says so
    (reason `EXCEEDS_KV`), and `exceeds_kv_capacity` says whether that holds for every replica
    the pool knows (then it never can).
    """

    name = "headroom"

    def __init__(
        self,
        seed: int = 0,
        debug: bool = False,
        *,
        slo_ttft_s: float = 1.0,
        slo_ttft_per_token_s: float = 0.0002,
        slo_tpot_s: float = 0.1,
        w_harm: float = 1.0,
        harm_tokens: float = 256.0,
        w_tpot: float = 1.0,
        tpot_power: float = 1.0,
        w_kv: float = 1.0,
        kv_knee: float = 0.85,
        w_preempt: float = 0.1,
        max_queue: int | None = None,
        max_wait_ratio: float | None = 1.0,
        ledger_queue: bool = True,
        queue_when_saturated: bool = False,
        hold_on_kv: bool = True,
        demand_max: float | None = None,
        queue_age_s: float | None = 12.0,
        kv_blocked: float | None = 0.85,
        blocked_output_share: float = 0.3,
        capped_output_share: float = 0.65,
        blocked_by_fit: bool = True,
        learn_rate: float = 0.1,
        learn_rate_tpot: float | None = None,  # None: the same as learn_rate
        learn_clip: float = 0.5,  # one observation moves log k toward at most +-this
        learn_max_queue: float = 1.0,  # learn TTFT only when queued work <= this x own prefill
        learn_relative: bool = True,  # corrections relative to the fleet-wide bias
        learn_deadband: float = 0.3,  # |log k| below this is noise: k = 1
        learn_bound: float = 1.5,  # |log k| <= this: k within [0.22, 4.5]
        mean_prompt_tokens: float = 512.0,
        default_seed: RateSeed = DEFAULT_SEED,
        index_capacity: int = DEFAULT_CAPACITY,
        max_pending: int = 100_000,
        vector_min_replicas: int = 160,
    ) -> None:
        super().__init__(seed, debug)
        self.slo_ttft_s = slo_ttft_s
        self.slo_ttft_per_token_s = slo_ttft_per_token_s
        self.slo_tpot_s = slo_tpot_s
        self.w_harm = w_harm
        self.harm_tokens = harm_tokens
        self.w_tpot = w_tpot
        self.tpot_power = tpot_power
        self.w_kv = w_kv
        self.kv_knee = kv_knee
        self.w_preempt = w_preempt
        self.max_queue = max_queue
        self.max_wait_ratio = max_wait_ratio
        self.ledger_queue = ledger_queue
        self.queue_when_saturated = queue_when_saturated
        # with max_wait_ratio: hold a request that fits no replica's KV cache (True), or only
        # when every replica's queue is too long, sending a KV misfit to the lowest cost (the
        # engine queues it until blocks free; holding it would block the gateway queue's head)
        self.hold_on_kv = hold_on_kv
        # the KV blocks everything in flight will hold at its end (prompt + expected output, the
        # ledger's demand) may exceed the cache by this factor; past it the replica would
        # preempt by recompute as its decodes grow, so it counts as saturated
        self.demand_max = demand_max
        self.queue_age_s = queue_age_s
        self.kv_blocked = kv_blocked
        self.blocked_output_share = blocked_output_share
        self.capped_output_share = capped_output_share
        self.blocked_by_fit = blocked_by_fit
        self._fast_at = -math.inf
        self._fast = 0.0
        self.learn_rate = learn_rate
        self.learn_rate_tpot = learn_rate if learn_rate_tpot is None else learn_rate_tpot
        self.learn_clip = learn_clip
        self.learn_bound = learn_bound
        self.mean_uncached = mean_prompt_tokens
        self.default_seed = default_seed
        self.index: PrefixIndex = PrefixIndex(index_capacity)
        self.max_pending = max_pending
        self._rep: dict[str, _Learned] = {}
        # replica id -> per-view values (see _entry), rebuilt when the view object changes
        self._entries: dict[str, tuple[Any, ...]] = {}
        # large fleets: the same arithmetic over numpy arrays (when numpy is installed)
        self.vector_min_replicas = vector_min_replicas
        # Made at the first pick over that many replicas, and kept up from then on: a smaller
        # pool never pays for copying each changed entry into the array.
        self._cols: _Columns | None = None
        self._np: Any = None
        try:
            import numpy

            self._np = numpy
        except ImportError:  # the gateway image may not ship numpy: the plain loop does it all
            self._np = None
        # request id -> (replica, predicted TTFT, predicted TPOT), for observe()
        self._pending: dict[str, tuple[str, float, float]] = {}
        self.learn_max_queue = learn_max_queue
        self.learn_relative = learn_relative
        self.learn_deadband = learn_deadband
        self._glob = [0.0, 0.0]  # fleet-wide log-ratio of observed to predicted (TTFT, TPOT)
        self._glob_used = (0.0, 0.0)  # the one the current entries were derived with
        # What this process's own observations moved, cumulative per replica ("": the
        # fleet-wide bias): other gateway workers add it to theirs (gateway/peers.py)
        self._own_deltas: dict[str, list[float]] = {}
        self._start = 0

    # -- learning -----------------------------------------------------------------------------

    def observe(
        self,
        replica_id: str,
        req: RequestFeatures,
        ttft_s: float | None,
        tpot_s: float | None,
        now: float,
    ) -> None:
        pred = self._pending.pop(req.request_id, None)
        if pred is None or pred[0] != replica_id:
            return
        lr = self._rep.get(replica_id)
        if lr is None:
            return
        _, ttft_pred, tpot_pred = pred
        b, c = self.learn_bound, self.learn_clip
        before = (lr.log_ttft, lr.log_tpot, self._glob[0], self._glob[1])
        if ttft_s is not None and ttft_s > 0 and ttft_pred > 1e-3:
            # predictions were stored uncorrected: this log-ratio is the whole correction; one
            # observation moves the estimate by at most learn_rate x learn_clip (an unlucky
            # queue is not a trend)
            x = math.log(ttft_s / ttft_pred)
            a = self.learn_rate
            lr.log_ttft += a * max(-c, min(c, x - lr.log_ttft))
            lr.log_ttft = max(-b, min(b, lr.log_ttft))
            self._glob[0] += a * max(-c, min(c, x - self._glob[0]))
        if tpot_s is not None and tpot_s > 0 and tpot_pred > 1e-4:
            x = math.log(tpot_s / tpot_pred)
            a = self.learn_rate_tpot
            lr.log_tpot += a * max(-c, min(c, x - lr.log_tpot))
            lr.log_tpot = max(-b, min(b, lr.log_tpot))
            self._glob[1] += a * max(-c, min(c, x - self._glob[1]))
        after = (lr.log_ttft, lr.log_tpot, self._glob[0], self._glob[1])
        if after != before:
            d = self._own_deltas.setdefault(replica_id, [0.0, 0.0])
            d[0] += after[0] - before[0]
            d[1] += after[1] - before[1]
            g = self._own_deltas.setdefault("", [0.0, 0.0])
            g[0] += after[2] - before[2]
            g[1] += after[3] - before[3]
            self._relearned(replica_id, lr)

    def learned(self) -> dict[str, tuple[float, float]]:
        """Cumulative corrections this process's own observations made (TTFT, TPOT log-ratios),
        per replica and under "" the fleet-wide bias: what it shares with other workers."""
        return {rid: (d[0], d[1]) for rid, d in self._own_deltas.items()}

    def learn_from_peers(self, deltas: dict[str, tuple[float, float]]) -> None:
        """Add what other workers learned since last time (increments of their `learned()`), so
        that every worker learns from all of the traffic, not its 1/N share."""
        b = self.learn_bound
        for rid, (d_ttft, d_tpot) in deltas.items():
            if rid == "":
                self._glob[0] += d_ttft
                self._glob[1] += d_tpot
                continue
            lr = self._learner(rid)
            lr.log_ttft = max(-b, min(b, lr.log_ttft + d_ttft))
            lr.log_tpot = max(-b, min(b, lr.log_tpot + d_tpot))
            self._relearned(rid, lr)
        self._check_bias()

    def _relearned(self, rid: str, lr: _Learned) -> None:
        """`rid`'s correction (or the fleet-wide one) changed: re-derive at the next pick."""
        self._check_bias()
        lr.derived = ()
        self._drop_entry(rid)

    def _check_bias(self) -> None:
        if self.learn_relative and (
            abs(self._glob[0] - self._glob_used[0]) > 0.05
            or abs(self._glob[1] - self._glob_used[1]) > 0.05
        ):
            # the fleet-wide bias moved: every replica's correction is relative to it
            self._glob_used = (self._glob[0], self._glob[1])
            for other in list(self._entries):
                self._drop_entry(other)
            for other in self._rep.values():
                other.derived = ()

    def forget(self, replica_id: str) -> None:
        self._rep.pop(replica_id, None)
        self._own_deltas.pop(replica_id, None)
        self._drop_entry(replica_id)
        self.index.remove(replica_id)

    def correction(self, replica_id: str) -> tuple[float, float]:
        """The learned (TTFT, TPOT) multipliers for `replica_id` (1.0 before any observation)."""
        lr = self._rep.get(replica_id)
        if lr is None:
            return (1.0, 1.0)
        return self._k(lr)

    def _k(self, lr: _Learned) -> tuple[float, float]:
        """The (TTFT, TPOT) multipliers applied to `lr`'s replica now."""
        g = self._glob_used if self.learn_relative else (0.0, 0.0)
        d = self.learn_deadband
        out = []
        for x in (lr.log_ttft - g[0], lr.log_tpot - g[1]):
            # within the deadband the profile is trusted: the load-dependent noise in observed
            # latencies would otherwise steer traffic by recent luck, with a lag
            out.append(math.exp(x - d) if x > d else math.exp(x + d) if x < -d else 1.0)
        return out[0], out[1]

    # -- per-state derivation (once per new state, not per pick) --------------------------------

    def _derive(self, lr: _Learned, v: ReplicaView, tpb: float) -> tuple[float, ...]:
        st = v.state
        seed = v.profile or self.default_seed
        k, kd = self._k(lr)
        if st is not None:
            running = float(st.running)
            waiting = float(st.waiting)
            blocks = st.kv_blocks_total or seed.kv_blocks_total
            bs = st.kv_block_size or seed.block_size
            used = st.kv_usage * blocks
            obs = st.observed_at
            if lr.preempt_total is not None and st.observed_at > lr.preempt_at:
                dt = st.observed_at - lr.preempt_at
                rate = max(0, st.preemptions_total - lr.preempt_total) / dt
                lr.preempt_rate = 0.7 * lr.preempt_rate + 0.3 * rate
            lr.preempt_total, lr.preempt_at = st.preemptions_total, st.observed_at
        else:
            running = waiting = 0.0
            blocks, bs, used, obs = seed.kv_blocks_total, seed.block_size, 0.0, 0.0
        rate = seed.prefill_tokens_per_s
        per_tok = k * (1.0 / rate + seed.decode_step(running) / seed.chunk_tokens)
        slot_tokens = 0.0
        if self.kv_blocked is not None and st is not None:
            # admission-blocked: a full batch (max_num_seqs) or a nearly full cache admits a
            # waiting request only when a running one finishes. Sequences finish at about
            # running / (a share of the mean output x decode step) per second; each request queued
            # there (and this one) waits 1/that, counted as prefill-equivalent tokens so the
            # cost, the wait limit and the queue's drain all see it
            u = st.kv_usage
            # a nearly full cache blocks admission only when its free blocks cannot hold the
            # prompts queued there and this one (the engine admits on a prompt's blocks; decodes
            # grow later): short prompts beside long decodes still go straight in
            prompt = lr.mean_uncached or self.mean_uncached
            kv_full = bool(blocks) and u >= self.kv_blocked
            if kv_full and self.blocked_by_fit:
                kv_full = (blocks - used) * bs < (waiting + 1) * prompt
            capped = running >= seed.max_num_seqs
            if capped or kv_full:
                out = lr.mean_output or 256.0
                step = kd * seed.decode_step(max(1.0, running))
                # at the batch cap a slot frees as any sequence ends: Little's law over whole
                # generations (mean ~0.65 x the p90 expected output); a full cache admits the
                # next prompt sooner (a finished sequence frees blocks for several short ones)
                share = self.capped_output_share if capped else self.blocked_output_share
                finish_rate = max(1.0, running) / max(1e-3, share * out * step)
                slot_tokens = 1.0 / finish_rate / per_tok
        # tokens/s the replica works off its queue since the state was read; a full cache blocks
        # admission, so a queue behind it does not drain
        usage = used / blocks if blocks else 0.0
        drain = rate / k * min(1.0, max(0.0, (0.95 - usage) / 0.25))
        queue0 = waiting * (lr.mean_uncached or self.mean_uncached) + (waiting + 1) * slot_tokens
        harm = self.w_harm * k / rate / (self.harm_tokens * self.slo_tpot_s)
        slope = (seed.decode_step_s - seed.decode_step_base_s) / max(1, seed.typical_batch - 1)
        tpot0 = kd * seed.decode_step(running + 1)  # seconds per output token
        tpot1 = kd * slope  # more per unacked request (it will join the batch)
        pre = self.w_preempt * lr.preempt_rate
        if blocks and tpb > 0:
            # the prefix index should forget what the replica's cache can no longer hold
            self.index.set_capacity(v.replica_id, blocks * bs / tpb)
        return (
            per_tok,
            drain,
            queue0,
            obs,
            harm,
            running,
            tpot0,
            tpot1,
            float(blocks),
            float(bs),
            used,
            pre,
            slot_tokens,
        )

    def _entry(self, v: ReplicaView, lr: _Learned, tpb: float) -> tuple[Any, ...]:
        """Everything about `v` a pick needs that depends on neither the request nor the time.

        Costs are compared in seconds of TTFT: the other terms are in SLO units, multiplied by
        the request's TTFT target (the same for every replica, so the ranking is unchanged).
        """
        st = v.state
        if lr.state is not st or lr.profile is not v.profile or not lr.derived:
            lr.state, lr.profile = st, v.profile
            lr.derived = self._derive(lr, v, tpb)
        (per_tok, drain, queue0, obs, harm, running, tpot0, tpot1, blocks, bs, used, pre, slot) = (
            lr.derived
        )
        inf = v.inflight
        ok = not v.ejected and (st is None or st.healthy)
        if ok and self.max_queue is not None:
            ok = (st.waiting if st else 0) + inf.unacked < self.max_queue

        frac = lr.uncached_frac
        unacked_tokens = inf.prompt_tokens * frac + inf.unacked * slot
        ledger_tokens = inf.prefill_tokens * frac if self.ledger_queue else 0.0
        if queue0 > 0.0 and drain == 0.0:  # a blocked queue that does not drain: a constant
            qd = max(queue0 + unacked_tokens, ledger_tokens)
            unacked_tokens = ledger_tokens = 0.0
        elif queue0 > 0.0:
            # queued prefill tokens at `now`: max(max(0, qd - now x drain) + unacked, ledger)
            qd = queue0 + obs * drain
        else:  # nothing to drain: the queue is a constant, folded so the hot loop skips the rest
            qd, drain = max(unacked_tokens, ledger_tokens), 0.0
            unacked_tokens = ledger_tokens = 0.0
        tpot = tpot0 + tpot1 * inf.unacked
        held = used + inf.kv_blocks * lr.kv_frac
        demand_room = math.inf
        if v.ejected:  # never fits: the hot loop drops it at the KV check
            knee_tokens = room_tokens = demand_room = -math.inf
        elif blocks > 0.0:
            knee_tokens = (self.kv_knee * blocks - held) * bs  # more new tokens: KV pressure
            room_tokens = (blocks - held) * bs  # more new tokens: does not fit
            if self.demand_max is not None:
                demand = max(held, inf.demand_blocks * lr.kv_frac)
                demand_room = (self.demand_max * blocks - demand) * bs
                room_tokens = min(room_tokens, demand_room)
        else:
            knee_tokens = room_tokens = math.inf
        return (
            v,
            v.ejected,
            qd,
            drain,
            per_tok,
            unacked_tokens,
            harm * (running + inf.unacked),
            self.w_tpot * (tpot / self.slo_tpot_s) ** self.tpot_power + pre,
            knee_tokens,
            room_tokens,
            held,
            1.0 / blocks if blocks > 0.0 else 0.0,
            1.0 / bs,
            ok and not v.ejected,
            tpot,
            ledger_tokens,
            st,  # 16-18: what the entry was built from, to reuse it for an equal new view
            inf,
            v.profile,
            demand_room,  # 19: new tokens before the projected KV demand overflows
        )

    def _refresh(self, v: ReplicaView, tpb: float) -> tuple[Any, ...]:
        rid = v.replica_id
        lr = self._learner(rid)
        old = self._entries.get(rid)
        if (
            old is not None
            and old[16] is v.state
            and old[17] is v.inflight
            and old[18] is v.profile
            and old[1] == v.ejected
        ):
            # a new view object of the same things (callers that rebuild views every pick)
            e = self._entries[rid] = (v, *old[1:])
        else:
            e = self._entries[rid] = self._entry(v, lr, tpb)
        if self._cols is not None:
            self._cols.put(rid, e, old)
        return e

    def _drop_entry(self, rid: str) -> None:
        old = self._entries.pop(rid, None)
        if self._cols is not None:
            self._cols.drop(rid, old)

    def _scan(
        self,
        order: Sequence[ReplicaView],
        p: float,
        o: float,
        tpb: float,
        matches: dict[str, int] | None,
        now: float,
        target: float,
    ) -> tuple[tuple[Any, ...] | None, float]:
        """The lowest-cost replica that fits, and its uncached prompt tokens (None if none fits)."""
        cache = self._entries
        w_kv, knee = self.w_kv * target, self.kv_knee
        limit = self._wait_limit(target)
        best = None
        best_cost = math.inf
        best_x = p
        po = p + o
        mget = matches.get if matches else None
        cache_get = cache.get
        # the hot loop: a few operations per replica (bench/picker.py); an ejected replica's
        # entry never fits, so the KV check drops it
        for v in order:
            rid = v.replica_id
            e = cache_get(rid)
            if e is None or e[0] is not v:
                e = self._refresh(v, tpb)
            x, xo = p, po
            if mget is not None:
                m = mget(rid)
                if m:  # its cache likely holds m blocks of the prompt
                    x = p - m * tpb
                    if x < 0.0:
                        x = 0.0
                    xo = x + o
            if e[3]:
                q = e[2] - now * e[3]  # queued prefill: what the state said, drained since
                q = (q if q > 0.0 else 0.0) + e[5]  # plus what was sent since
                if q < e[15]:
                    q = e[15]  # the ledger knows at least this much prefill is unfinished
            else:
                q = e[2]
            cost = (q + x) * e[4] + target * (x * e[6] + e[7])
            if xo > e[8]:  # past the knee of the KV cache (rare): pressure, and maybe no fit
                if xo > e[9]:
                    continue
                u = (e[10] + xo * e[12]) * e[11]
                cost += w_kv * (u - knee) ** 2 / (1.0 - u if u < 0.999 else 1e-3)
            if cost < best_cost and e[13] and q * e[4] <= limit:
                best, best_cost, best_x = e, cost, x
        return best, best_x

    def _scan_vector(
        self,
        order: Sequence[ReplicaView],
        p: float,
        o: float,
        tpb: float,
        matches: dict[str, int] | None,
        now: float,
        target: float,
    ) -> tuple[tuple[Any, ...] | None, float]:
        """`_scan` over numpy arrays: the same arithmetic, for large fleets."""
        cols = self._cols
        assert cols is not None
        np = cols.np
        vget = cols.by_view.get
        slots = [vget(id(v), -1) for v in order]
        i = -1
        while True:  # views not seen before (or changed since): rebuild their entries
            try:
                i = slots.index(-1, i + 1)  # a C-speed scan: usually only a few are new
            except ValueError:
                break
            v = order[i]
            self._refresh(v, tpb)
            slots[i] = cols.slot[v.replica_id]
        idx = np.array(slots, dtype=np.intp)
        rows = cols.rows
        if matches:
            xs = np.full(len(rows), p)
            for rid, m in matches.items():
                s = cols.slot.get(rid)
                if s is not None:
                    xs[s] = max(0.0, p - m * tpb)
            x = xs[idx]
        else:
            x = np.full(len(idx), p)
        g = rows[idx]  # one row per offered replica: the entry's fields 1..15
        q = np.maximum(g[:, 1] - now * g[:, 2], 0.0) + g[:, 4]
        q = np.maximum(q, g[:, 14])
        cost = (q + x) * g[:, 3] + target * (x * g[:, 5] + g[:, 6])
        xo = x + o
        over = xo > g[:, 7]
        if over.any():
            u = (g[:, 9] + xo * g[:, 11]) * g[:, 10]
            den = np.where(u < 0.999, 1.0 - u, 1e-3)
            kv = self.w_kv * target * (u - self.kv_knee) ** 2 / den
            cost = np.where(over, cost + kv, cost)
        ok = (g[:, 0] == 0.0) & (g[:, 12] != 0.0) & (xo <= g[:, 8])
        limit = self._wait_limit(target)
        if limit < math.inf:
            ok &= q * g[:, 3] <= limit
        cost = np.where(ok, cost, np.inf)
        i = int(np.argmin(cost))
        if not math.isfinite(cost[i]):
            return None, p
        return self._entries[order[i].replica_id], float(x[i])

    def _wait_limit(self, target: float) -> float:
        """The longest predicted wait behind a replica's queue before it counts as saturated."""
        r = self.max_wait_ratio
        return math.inf if r is None else r * target

    def _wait_ok(self, e: tuple[Any, ...], xo: float, now: float, target: float) -> bool:
        """Whether `e` has real headroom for a request of `xo` new KV tokens: its predicted wait
        behind its queue is within the limit and its projected KV demand leaves room."""
        q = max(max(0.0, e[2] - now * e[3]) + e[5], e[15])
        return bool(e[13]) and q * e[4] <= self._wait_limit(target) and xo <= e[19]

    def _cost(
        self, e: tuple[Any, ...], x: float, o: float, now: float, target: float
    ) -> tuple[float, bool]:
        """Entry `e`'s cost for a request with `x` uncached prompt tokens, and whether it fits
        (the hot loop of `pick`, spelled out)."""
        q = max(max(0.0, e[2] - now * e[3]) + e[5], e[15])
        cost = (q + x) * e[4] + target * (x * e[6] + e[7])
        xo = x + o
        fits = bool(e[13]) and xo <= e[9] and q * e[4] <= self._wait_limit(target)
        if xo > e[8]:
            u = (e[10] + xo * e[12]) * e[11]
            cost += self.w_kv * target * (u - self.kv_knee) ** 2 / max(1e-3, 1.0 - u)
        return cost, fits

    # -- the gateway queue's order -------------------------------------------------------------

    def queue_key(self, req: RequestFeatures, arrived_s: float, now: float) -> float:
        """Which held request the gateway's queue should offer a freed replica first (lowest).

        Earliest TTFT deadline first while a request can still meet it; one that has missed it
        is a miss whatever happens next, so it steps back behind those that can still be saved
        until it has waited `queue_age_s`, then comes first (its deadline is then the oldest):
        goodput from the deadline order, a bounded tail from the aging. Without `queue_age_s`,
        arrival order (FIFO).
        """
        if self.queue_age_s is None:
            return arrived_s
        deadline = arrived_s + self.slo_ttft_s + self.slo_ttft_per_token_s * req.prompt_tokens
        if self._fast_at != now:  # the fastest replica's prefill time per token, once per drain
            self._fast_at = now
            self._fast = min((e[4] for e in self._entries.values() if e[13]), default=0.0)
        if now + req.prompt_tokens * self._fast < deadline:  # it can still make it
            return deadline
        return arrived_s + self.queue_age_s

    # -- the pick -------------------------------------------------------------------------------

    def pick(self, req: RequestFeatures, replicas: Sequence[ReplicaView], now: float) -> Decision:
        n = len(replicas)
        if n == 0:
            return NO_REPLICAS
        p = float(req.prompt_tokens)
        o = float(req.expected_output_tokens)
        tpb = req.tokens_per_block
        hashes = req.prefix_hashes
        matches = self.index.match(hashes) if hashes else None
        target = self.slo_ttft_s + self.slo_ttft_per_token_s * p
        cache = self._entries
        start = self._start % n
        self._start += 1
        order = replicas[start:] + replicas[:start] if start else replicas  # fair ties
        if self._np is not None and n >= self.vector_min_replicas:
            if self._cols is None:  # every view is new to it: _scan_vector fills it
                self._cols = _Columns(self._np)
            best, best_x = self._scan_vector(order, p, o, tpb, matches, now, target)
        else:
            best, best_x = self._scan(order, p, o, tpb, matches, now, target)
        scores: dict[str, float] | None = None
        costs: list[tuple[float, float, tuple[Any, ...]]] = []
        if best is None or self.debug:
            # nothing fits (or debugging): every replica's cost with its real uncached prompt
            for v in order:
                e = cache[v.replica_id]
                if not e[1]:
                    m = matches.get(v.replica_id, 0) if matches else 0
                    x = max(0.0, p - m * tpb)
                    costs.append((self._cost(e, x, o, now, target)[0], x, e))
            if self.debug:
                scores = {e[0].replica_id: c for c, _, e in costs}
        if best is not None:
            reason = "prefix-affinity" if best_x < p else "lowest-cost"
        elif not costs:
            return NO_REPLICAS
        elif self.queue_when_saturated and (
            self.hold_on_kv or not any(self._wait_ok(e, x + o, now, target) for _, x, e in costs)
        ):
            if all(x + o > _cache_tokens(e) for _, x, e in costs):
                return Decision(None, EXCEEDS_KV, scores)  # holding it would be for ever
            return Decision(None, "saturated", scores)
        else:
            # fail open to the lowest cost, among healthy replicas while there are any
            healthy = [c for c in costs if c[2][16] is None or c[2][16].healthy]
            _, best_x, best = min(healthy or costs, key=lambda c: c[0])
            reason = "fail-open"
        rid = best[0].replica_id
        q = max(max(0.0, best[2] - now * best[3]) + best[5], best[15])
        ttft = (q + best_x) * best[4]
        self._record(req, rid, best_x, ttft, best[14], q <= best_x * self.learn_max_queue)
        return Decision(rid, reason, scores)

    def exceeds_kv_capacity(
        self, req: RequestFeatures, caches: Iterable[tuple[str, float]]
    ) -> float | None:
        """When the request's new KV tokens (its uncached prompt and expected output) exceed the
        whole cache of every replica in `caches` ((replica id, cache tokens; infinite when its
        size is unknown), all a pool knows, pickable or not): the largest of those caches, in
        tokens. None while some replica could hold it once empty, or has a cache of unknown
        size."""
        if not self.queue_when_saturated:
            return None  # it fails open: the engine answers for a request it cannot hold
        p = float(req.prompt_tokens)
        o = float(req.expected_output_tokens)
        tpb = req.tokens_per_block
        hashes = req.prefix_hashes
        matches = self.index.match(hashes) if hashes else None
        largest = -1.0
        for rid, total in caches:
            m = matches.get(rid, 0) if matches else 0
            if max(0.0, p - m * tpb) + o <= total:
                return None
            largest = max(largest, total)
        return largest if largest >= 0.0 else None

    def _learner(self, rid: str) -> _Learned:
        lr = self._rep.get(rid)
        if lr is None:
            lr = self._rep[rid] = _Learned()
            # a newcomer is assumed as far off its profile as the fleet is, until observed
            lr.log_ttft, lr.log_tpot = self._glob[0], self._glob[1]
        return lr

    def _sent(self, lr: _Learned, uncached: float, prompt_tokens: int, out: float) -> None:
        """A request went to `lr`'s replica: what it brings that is not cached there."""
        # the mean uncached prompt stands in for the unknown prompts of the waiting requests
        self.mean_uncached += 0.05 * (uncached - self.mean_uncached)
        lr.mean_uncached = uncached if lr.mean_uncached is None else lr.mean_uncached
        lr.mean_uncached += 0.1 * (uncached - lr.mean_uncached)
        lr.mean_output = (
            out if lr.mean_output is None else lr.mean_output + 0.1 * (out - lr.mean_output)
        )
        if prompt_tokens > 0:
            lr.uncached_frac += 0.1 * (uncached / prompt_tokens - lr.uncached_frac)
            whole = prompt_tokens + out
            lr.kv_frac += 0.1 * ((uncached + out) / whole - lr.kv_frac)

    def peer_picked(self, rid: str, hashes: tuple[int, ...], note: tuple[float, ...]) -> None:
        """Another gateway worker sent a request to `rid`: learn from it as from our own pick."""
        super().peer_picked(rid, hashes, note)  # the prefix index
        if len(note) != 3:
            return
        lr = self._learner(rid)
        # as after our own pick: its entry is re-derived once its (shared) in-flight totals move
        self._sent(lr, note[0], int(note[1]), note[2])

    def _record(
        self,
        req: RequestFeatures,
        rid: str,
        uncached: float,
        ttft: float,
        tpot: float,
        learn_ttft: bool,
    ) -> None:
        lr = self._rep[rid]
        out = float(req.expected_output_tokens)
        self._sent(lr, uncached, req.prompt_tokens, out)
        # other gateway workers learn the same from this pick (gateway/peers.py)
        self.index.add(rid, req.prefix_hashes, note=(uncached, req.prompt_tokens, out))
        pending = self._pending
        if len(pending) >= self.max_pending:
            del pending[next(iter(pending))]  # the oldest prediction never got an observation
        k, kd = self._k(self._rep[rid])
        # predictions without the learned correction, so observe() learns the model's own error
        # (a TTFT behind a long queue says more about the queue's luck than the replica's speed:
        # those are not learned from)
        pending[req.request_id] = (
            rid,
            ttft / k if learn_ttft else 0.0,
            tpot / kd,
        )
