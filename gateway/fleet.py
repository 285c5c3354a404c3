"""The gateway's view of the fleet: which replicas exist, what state they are in, what it sent them.

Three inputs meet here: discovery (static endpoints or EndpointSlices) says which replicas exist
and which are terminating; agents' watch streams (or a direct scrape when no agent reports a
replica) say what state each is in; and the gateway's own in-flight ledger says what it has sent
each replica since that state was observed. `views()` turns them into the picker's `ReplicaView`s.

Everything here is synchronous and cheap: the request path calls it per pick. The tasks that feed
it (agent watches, scrapes) live in `StateFeeds` at the bottom.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp

from gateway import metrics
from gateway.estimate import RequestFeatures
from gateway.inflight import InFlight, InFlightLedger, add
from gateway.peers import PeerAccounts
from gateway.picker import RateSeed, ReplicaView
from kvpilot.signals import NodeState, ReplicaState
from kvpilot.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    return url.rstrip("/")


@dataclass(frozen=True)
class Endpoint:
    """One replica as discovery sees it."""

    replica_id: str
    url: str
    terminating: bool = False


@dataclass
class Replica:
    """Mutable per-replica record; only the fleet changes it."""

    replica_id: str
    url: str
    pool: str
    terminating: bool = False
    state: ReplicaState | None = None
    state_source: str = ""  # "agent" or "scrape"
    failures: int = 0  # consecutive failures before the first byte
    ejected_until: float = 0.0
    inflight: int = 0
    started: set[str] = field(default_factory=set)


@dataclass
class _PoolViews:
    """A pool's views as the last pick saw them. Between picks only the replicas something
    happened to (a state, a request started or ended, an ejection) are looked at again, so a
    pick over a large pool does not rebuild every replica's view."""

    views: dict[str, ReplicaView | None]  # replica id -> its view; None while not pickable
    built_at: float
    valid_until: float  # the first moment a state goes stale or an ejection ends
    profile: RateSeed | None
    dirty: set[str] = field(default_factory=set)


class Fleet:
    """Replicas per pool, their latest states and the in-flight ledger.

    A replica listed by two pools (one model server serving the models of both) has one record
    per pool: its failures, ejection, in-flight count and metric series are that pool's own. Its
    state and its ledger account belong to the server and are shared: a state describes the whole
    server, and what one pool sends it loads it for the other pool too. The request-path methods
    take the pool; without one they act on the replica's first record.
    """

    def __init__(
        self,
        *,
        eject_after: int = 3,
        eject_for_s: float = 10.0,
        stale_after_s: float = 5.0,
        on_change: Callable[[str], None] | None = None,
        on_leave: Callable[[str, str], None] | None = None,
    ) -> None:
        self.pools: dict[str, dict[str, Replica]] = {}
        # replica URL / id -> its records, one per pool that lists it (almost always one)
        self.by_address: dict[str, tuple[Replica, ...]] = {}
        self.by_id: dict[str, tuple[Replica, ...]] = {}
        self.ledger = InFlightLedger()
        self.eject_after = eject_after
        self.eject_for_s = eject_for_s
        self.stale_after_s = stale_after_s
        self.on_change = on_change
        self.on_leave = on_leave  # (pool, replica id): it left that pool (its policy forgets it)
        self.synced: set[str] = set()  # pools whose discovery has reported at least once
        self.profiles: dict[str, RateSeed | None] = {}  # pool -> speed seed for its replicas
        # (pool, accelerator a replica's state reports) -> its speed seed, for pools that mix
        # GPU types; it must hand back the same object for the same pair (views compare by
        # identity). Set by the gateway; None: the pool's seed for every replica.
        self.seed_for: Callable[[str, str], RateSeed | None] | None = None
        self._views: dict[str, _PoolViews] = {}
        # With several gateway workers: the others' in-flight totals (gateway/peers.py), and per
        # replica the (own, peers', summed) totals last handed out, so a view's InFlight stays the
        # same object while neither part changed.
        self.peers: PeerAccounts | None = None
        self._summed: dict[str, tuple[InFlight, InFlight, InFlight]] = {}

    # ---- discovery -------------------------------------------------------------------------

    def set_endpoints(self, pool: str, endpoints: Iterable[Endpoint]) -> None:
        """Replace a pool's replicas; known ones keep their state, failures and in-flight count.

        A replica that left has its metric series dropped and its pool told (`on_leave`); its
        ledger account goes once no pool lists it."""
        old = self.pools.get(pool, {})
        old_urls = {r.url for r in old.values()}  # before known records take their new URLs
        new: dict[str, Replica] = {}
        for ep in endpoints:
            r = old.get(ep.replica_id)
            if r is None:
                r = Replica(ep.replica_id, normalize_url(ep.url), pool)
            r.url = normalize_url(ep.url)
            r.terminating = ep.terminating
            new[ep.replica_id] = r
        self.pools[pool] = new
        # Re-index what this pool had or has; the other pools' records stay where they are.
        by_url: dict[str, list[Replica]] = {}
        for r in new.values():
            by_url.setdefault(r.url, []).append(r)
        _reindex(self.by_id, pool, {rid: [r] for rid, r in new.items()}, old.keys())
        _reindex(self.by_address, pool, by_url, old_urls)
        left = [rid for rid in old if rid not in new]
        if left:
            metrics.forget_replicas(pool, left)
            for rid in left:
                if self.on_leave is not None:
                    self.on_leave(pool, rid)
                if rid not in self.by_id:  # no pool lists it any more
                    self.ledger.forget(rid)
                    self._summed.pop(rid, None)
        self._views.pop(pool, None)
        self.synced.add(pool)
        self._publish_counts(pool, time.time())
        self._changed(pool)

    def drop_pool(self, pool: str) -> None:
        self.set_endpoints(pool, ())
        self.pools.pop(pool, None)
        self.synced.discard(pool)

    # ---- states ----------------------------------------------------------------------------

    def observe_state(self, state: ReplicaState, source: str = "agent") -> bool:
        """Take a replica state (from an agent or a scrape); False when it matches no replica."""
        recs = self.by_address.get(normalize_url(state.address)) or self.by_id.get(state.replica_id)
        if not recs:
            return False
        for r in recs:  # one per pool that lists the replica
            if r.state is not None and state.observed_at < r.state.observed_at:
                continue  # older than what we have (two agents, or a scrape racing an agent)
            # An agent's state wins over a scrape until it goes stale.
            if source == "scrape" and r.state_source == "agent" and not self._stale(r.state):
                continue
            r.state = state
            r.state_source = source
            self.ledger.observed(r.replica_id, state.observed_at)
            self._ledger_changed()
            self._touch_all(r.replica_id)
            self._changed(r.pool)
        return True

    def _stale(self, state: ReplicaState | None, now: float | None = None) -> bool:
        if state is None:
            return True
        return state.age(time.time() if now is None else now) > self.stale_after_s

    def needs_scrape(self, now: float) -> list[Replica]:
        """Replicas no agent reports freshly: the scrape fallback reads these directly."""
        due: dict[str, Replica] = {}  # by URL: a replica two pools list is scraped once
        for reps in self.pools.values():
            for r in reps.values():
                if not r.terminating and (r.state_source != "agent" or self._stale(r.state, now)):
                    due.setdefault(r.url, r)
        return list(due.values())

    # ---- the picker's view -----------------------------------------------------------------

    def views(
        self, pool: str, now: float, exclude: frozenset[str] = frozenset()
    ) -> list[ReplicaView]:
        """Pickable replicas of a pool (terminating, ejected, unhealthy and excluded ones left out)."""
        if self.peers is not None:
            self.peers_touched(self.peers.refresh(now))
        profile = self.profiles.get(pool)
        c = self._views.get(pool)
        reps = self.pools.get(pool, {})
        if c is None or not c.built_at <= now < c.valid_until or c.profile is not profile:
            # In the pool's order; the previous views stay candidates for reuse (see _view).
            old = c.views if c is not None else {}
            c = self._views[pool] = _PoolViews(
                {r: old.get(r) for r in reps}, now, math.inf, profile
            )
            c.dirty.update(reps)
        if c.dirty:
            for rid in c.dirty:
                r = reps.get(rid)
                if r is not None:
                    c.views[rid], until = self._view(r, now, profile, c.views.get(rid))
                    c.valid_until = min(c.valid_until, until)
            c.dirty.clear()
        if exclude:
            return [v for v in c.views.values() if v is not None and v.replica_id not in exclude]
        return [v for v in c.views.values() if v is not None]

    def _view(
        self, r: Replica, now: float, profile: RateSeed | None, v: ReplicaView | None
    ) -> tuple[ReplicaView | None, float]:
        """`r`'s view at `now` (None: not pickable) and until when it holds without news; `v`,
        its previous view, is handed out again while its parts are the same (headroom then
        reuses its entry for the replica)."""
        if r.terminating:
            return None, math.inf
        if r.ejected_until > now:
            return None, r.ejected_until
        state, until = r.state, math.inf
        if state is not None:
            until = state.observed_at + self.stale_after_s
            if until <= now:
                state, until = None, math.inf  # too old to trust: route on in-flight counts alone
            elif not state.healthy:
                return None, until  # its agent says it stopped answering
        profile = self._seed(r.pool, state, profile)
        inflight = self._inflight(r.replica_id)
        if (
            v is None
            or v.state is not state
            or v.inflight is not inflight
            or v.profile is not profile
        ):
            v = ReplicaView(r.replica_id, state, inflight, False, profile)
        return v, until

    def _inflight(self, replica_id: str) -> InFlight:
        own = self.ledger.get(replica_id)
        peers = self.peers.totals.get(replica_id) if self.peers is not None else None
        if peers is None:
            return own
        last = self._summed.get(replica_id)
        if last is not None and last[0] is own and last[1] is peers:
            return last[2]
        summed = add(own, peers)
        self._summed[replica_id] = (own, peers, summed)
        return summed

    def _ledger_changed(self) -> None:
        if self.peers is not None:
            self.peers.changed()

    def peers_touched(self, replica_ids: Iterable[str]) -> None:
        """The peers' totals for these replicas changed: rebuild their views."""
        for rid in replica_ids:
            self._touch_all(rid)

    def _touch(self, r: Replica) -> None:
        c = self._views.get(r.pool)
        if c is not None:
            c.dirty.add(r.replica_id)

    def _touch_all(self, replica_id: str) -> None:
        """The replica's ledger account or state changed: every pool listing it looks again."""
        for r in self.by_id.get(replica_id, ()):
            c = self._views.get(r.pool)
            if c is not None:
                c.dirty.add(replica_id)

    def replica(self, replica_id: str, pool: str | None = None) -> Replica | None:
        """The replica's record in `pool` (None: its first record)."""
        if pool is not None:
            return self.pools.get(pool, _NONE).get(replica_id)
        return _record(self.by_id.get(replica_id, ()), None)

    def known(self, pool: str) -> int:
        return len(self.pools.get(pool, {}))

    def kv_caches(self, pool: str) -> Iterator[tuple[str, float]]:
        """(replica id, whole KV cache in tokens) of every replica the pool knows, pickable or
        not (ejected, unhealthy; not terminating ones, which never come back): from its latest
        state however old (a cache's size does not age), else its speed profile; infinite where
        neither says. What decides that a request can never fit, as opposed to not now (lazily:
        the first that fits ends it)."""
        profile = self.profiles.get(pool)
        for r in self.pools.get(pool, _NONE).values():
            if r.terminating:
                continue  # never coming back: a replacement shows as a new endpoint
            st = r.state
            seed = self._seed(pool, st, profile)
            blocks = (st.kv_blocks_total if st is not None else 0) or (
                seed.kv_blocks_total if seed is not None else 0
            )
            size = (st.kv_block_size if st is not None else 0) or (
                seed.block_size if seed is not None else 0
            )
            yield r.replica_id, float(blocks * size) if blocks > 0 and size > 0 else math.inf

    def _seed(
        self, pool: str, state: ReplicaState | None, profile: RateSeed | None
    ) -> RateSeed | None:
        """A replica's speed seed: from the GPU its state reports when the gateway knows one
        (pools mixing GPU types), else the pool's."""
        if state is not None and state.accelerator and self.seed_for is not None:
            return self.seed_for(pool, state.accelerator) or profile
        return profile

    def signal_lost(self, replica_id: str, pool: str, now: float) -> bool:
        """Whether the replica had a state and none came within `stale_after_s` since: its agent
        (or the scrape) no longer hears from it, as when its node died. Without any state ever
        there is nothing to tell a dead replica from a slow one."""
        r = self.pools.get(pool, _NONE).get(replica_id)
        return r is not None and r.state is not None and self._stale(r.state, now)

    # ---- the request path ------------------------------------------------------------------

    def start(
        self, replica_id: str, req: RequestFeatures, now: float, pool: str | None = None
    ) -> None:
        recs = self.by_id.get(replica_id, ())
        r = _record(recs, pool) if pool is None else self.pools.get(pool, _NONE).get(replica_id)
        block = r.state.kv_block_size if r is not None and r.state is not None else 16
        self.ledger.start(replica_id, req, now, block_size=block or 16)
        self._ledger_changed()
        for x in recs:
            self._touch(x)
        if r is not None:
            r.inflight += 1
            r.started.add(req.request_id)
            metrics.child(metrics.INFLIGHT, r.pool, replica_id).inc()

    def first_token(self, replica_id: str, request_id: str, now: float) -> None:
        self.ledger.first_token(replica_id, request_id, now)
        self._ledger_changed()
        for x in self.by_id.get(replica_id, ()):
            self._touch(x)

    def finish(self, replica_id: str, request_id: str, now: float, pool: str | None = None) -> None:
        self.ledger.finish(replica_id, request_id, now)
        self._ledger_changed()
        recs = self.by_id.get(replica_id, ())
        for x in recs:
            self._touch(x)
        r = _record(recs, pool) if pool is None else self.pools.get(pool, _NONE).get(replica_id)
        if r is not None and request_id in r.started:
            r.started.discard(request_id)
            r.inflight -= 1
            metrics.child(metrics.INFLIGHT, r.pool, replica_id).dec()
            for x in recs:  # the server has room again for every pool that lists it
                self._changed(x.pool)

    def succeeded(self, replica_id: str, pool: str | None = None) -> None:
        r = self.replica(replica_id, pool)
        if r is not None:
            r.failures = 0

    def failed(self, replica_id: str, now: float, pool: str | None = None) -> bool:
        """Count a failure; True when it ejected the replica.

        At most half of a pool's replicas (rounded down) are out at once: past that the failures
        are more likely the requests' or the network's than every replica's, and ejecting more
        would pile the whole load onto the few left (a pool of one never ejects its replica)."""
        r = self.replica(replica_id, pool)
        if r is None:
            return False
        r.failures += 1
        if r.failures >= self.eject_after and r.ejected_until <= now:
            live = [x for x in self.pools.get(r.pool, {}).values() if not x.terminating]
            out = sum(1 for x in live if x.ejected_until > now)
            if out + 1 > len(live) // 2:
                # Said once per run of failures (a dead replica of a pool of one fails every
                # request sent to it); a success starts the count over.
                log.log(
                    logging.INFO if r.failures == self.eject_after else logging.DEBUG,
                    "replica %s of pool %s keeps failing; not ejected (%d of %d are out already)",
                    replica_id,
                    r.pool,
                    out,
                    len(live),
                )
                return False
            r.ejected_until = now + self.eject_for_s
            self._touch(r)
            r.failures = 0
            metrics.child(metrics.EJECTIONS, r.pool, replica_id).inc()
            log.warning(
                "ejected replica %s of pool %s for %.0fs", replica_id, r.pool, self.eject_for_s
            )
            self._publish_counts(r.pool, now)
            return True
        return False

    def tick(self, now: float) -> None:
        """Periodic: bring back replicas whose ejection ran out, refresh gauges, wake queues."""
        for pool in self.pools:
            self._publish_counts(pool, now)
            self._changed(pool)

    def _publish_counts(self, pool: str, now: float) -> None:
        reps = self.pools.get(pool, {}).values()
        terminating = sum(1 for r in reps if r.terminating)
        ejected = sum(1 for r in reps if not r.terminating and r.ejected_until > now)
        metrics.REPLICAS.labels(pool, "terminating").set(terminating)
        metrics.REPLICAS.labels(pool, "ejected").set(ejected)
        metrics.REPLICAS.labels(pool, "ready").set(len(reps) - terminating - ejected)

    def _changed(self, pool: str) -> None:
        if self.on_change is not None:
            self.on_change(pool)


_NONE: dict[str, Replica] = {}  # the replicas of a pool that is not there


def _record(recs: tuple[Replica, ...], pool: str | None) -> Replica | None:
    """The record of `pool` among a replica's records (None: the first)."""
    for r in recs:
        if pool is None or r.pool == pool:
            return r
    return None


def _reindex(
    index: dict[str, tuple[Replica, ...]],
    pool: str,
    now: dict[str, list[Replica]],
    before: Iterable[str],
) -> None:
    """Point `index`'s keys at `pool`'s records `now` has for them, keeping other pools' ones."""
    for key in set(before) | now.keys():
        recs = tuple(x for x in index.get(key, ()) if x.pool != pool) + tuple(now.get(key, ()))
        if recs:
            index[key] = recs
        else:
            index.pop(key, None)


# ---- feeds: agents' watch streams and the direct scrape ------------------------------------


class StateFeeds:
    """Background tasks that keep the fleet's states fresh."""

    def __init__(
        self,
        fleet: Fleet,
        session: aiohttp.ClientSession,
        agents: Sequence[str],
        *,
        scrape_interval_s: float = 0.5,
        scrape_timeout_s: float = 1.0,
        scrape: bool = True,
        engines: dict[str, str] | None = None,
    ) -> None:
        self.fleet = fleet
        self.session = session
        self.agents = tuple(agents)
        self.scrape_interval_s = scrape_interval_s
        self.scrape_timeout_s = scrape_timeout_s
        self.scrape = scrape
        self.engines = engines or {}  # pool -> engine name for the metrics adapter
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self.agents:
            from agent.client import AgentSet

            agents = AgentSet(self.agents, self.session, on_state=self._observe_node)
            self._tasks.append(asyncio.create_task(agents.run(), name="agents"))
        if self.scrape:
            self._tasks.append(asyncio.create_task(self._scrape_loop(), name="scrape"))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()

    def _observe_node(self, node: NodeState) -> None:
        for state in node.replicas:
            self.fleet.observe_state(state, "agent")

    async def _scrape_loop(self) -> None:
        while True:
            now = time.time()
            due = self.fleet.needs_scrape(now)
            if due:
                await asyncio.gather(*(self._scrape_one(r) for r in due))
            await asyncio.sleep(self.scrape_interval_s)

    async def _scrape_one(self, r: Replica) -> None:
        from agent.adapters import MetricsFormatError, read_metrics

        timeout = aiohttp.ClientTimeout(total=self.scrape_timeout_s)
        try:
            async with self.session.get(f"{r.url}/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
            reading = read_metrics(text, self.engines.get(r.pool, "auto"))
        except (aiohttp.ClientError, TimeoutError, MetricsFormatError, UnicodeDecodeError):
            return  # no signal: the picker routes this replica on in-flight counts
        state = reading.onto(
            ReplicaState(
                replica_id=r.replica_id, address=r.url, pool=r.pool, observed_at=time.time()
            )
        )
        self.fleet.observe_state(state, "scrape")
