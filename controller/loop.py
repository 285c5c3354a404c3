"""The control loop: replica states in, one decision per pool, actuators out.

Everything that decides is in replicas.py, nodepools.py and planner.py; this module only gathers
inputs, calls them, exports what they decided and hands the result to an actuator (Kubernetes
/scale, or local modelserver processes). A failed read or write is logged and counted and the
pool keeps its size until the next tick: nothing here ever guesses a size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter, Gauge

from controller.demand import PoolDemand
from controller.nodepools import (
    AcceleratorInventory,
    PoolGpuDemand,
    accelerator_label,
    plan_accelerators,
    spare_replicas,
)
from controller.replicas import Decision, PoolObservation, ReplicaAutoscaler
from kvpilot.config import Config, PoolConfig, PoolScalingConfig
from kvpilot.signals import ReplicaState

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often the leader saves the pools' daily profiles (a bin of a day is 15 min: a new leader
# loses at most part of one).
SAVE_EVERY_S = 300.0

DESIRED = Gauge("kvpilot_controller_desired_replicas", "Replicas the controller wants.", ["pool"])
CURRENT = Gauge("kvpilot_controller_current_replicas", "The workload's spec.replicas.", ["pool"])
SATURATION = Gauge(
    "kvpilot_controller_saturation_ratio", "Mean replica saturation (1 = at targets).", ["pool"]
)
FORECAST = Gauge(
    "kvpilot_controller_forecast_replicas", "Replicas the demand forecast asks for.", ["pool"]
)
PANIC = Gauge("kvpilot_controller_panic", "1 while the pool is in panic mode.", ["pool"])
LEVEL = Gauge(
    "kvpilot_controller_demand_level",
    "Today's demand against the daily profile (1 = as on the days learned); absent until a "
    "whole day has been seen, while the forecast is the trend's.",
    ["pool"],
)
SCALE_ACTIONS = Counter(
    "kvpilot_controller_scale_actions_total",
    "Scaling decisions applied (or, in dry-run, that would have been).",
    ["pool", "direction", "dry_run"],
)
ERRORS = Counter(
    "kvpilot_controller_errors_total", "Ticks where a pool's read or write failed.", ["pool", "op"]
)
GPUS_NEEDED = Gauge(
    "kvpilot_controller_gpus_needed", "GPUs needed per accelerator.", ["accelerator"]
)
GPUS_SHORT = Gauge(
    "kvpilot_controller_gpus_short",
    "GPUs needed beyond those allocatable on Ready nodes (nodes must still come).",
    ["accelerator"],
)
GPUS_UNREQUESTED = Gauge(
    "kvpilot_controller_gpus_unrequested",
    "The GPUs short that no Pending pod asks nodes for yet.",
    ["accelerator"],
)
PLACEHOLDER_GPUS = Gauge(
    "kvpilot_controller_placeholder_gpus", "GPUs held by placeholder pods.", ["accelerator"]
)


@dataclass(frozen=True)
class PoolTarget:
    pool: PoolConfig
    scaling: PoolScalingConfig

    @property
    def name(self) -> str:
        return self.pool.name

    @property
    def workload(self) -> str:
        return self.scaling.target or self.pool.name


@dataclass(frozen=True)
class WorkloadSize:
    replicas: int  # spec.replicas
    pending: int = 0  # of its pods, those in phase Pending (no node yet)


class Actuator(Protocol):
    async def get_size(self, t: PoolTarget) -> WorkloadSize: ...

    async def set_replicas(self, t: PoolTarget, replicas: int, d: Decision) -> bool:
        """Scale; False when nothing was written (the size moved since the decision, or is
        already the target). Optional: `async def record(t, d)`, say why once it was written
        (a Kubernetes Event), outside the write's lease bound."""
        ...


class StateStore(Protocol):
    """Where the leader keeps what took long to learn (each pool's daily profile), so that the
    next leader (a rollout, a failover) goes on from it: a ConfigMap (controller/kube.py)."""

    async def load(self) -> dict[str, dict]: ...

    async def save(self, profiles: dict[str, dict]) -> None: ...


class NodeActuator(Protocol):
    async def apply(self, plans: dict, targets: Sequence[PoolTarget]) -> None: ...

    # Optional: `async def inventory() -> dict[str, AcceleratorInventory] | None`, the cluster's
    # GPU nodes and Pending GPU pods (see _nodes_inventory); `async def warm() -> dict[str,
    # dict[str, int]]`, GPUs per pool and node its placeholders hold on nodes that are up (see
    # _warm_gpus); `def reset()`, forget what it cached of the cluster (a new leadership term).


def planned_accelerator(t: PoolTarget) -> str:
    """The accelerator a pool grows on: with several `accelerators`, the planner's cheapest per
    output token (controller/planner.py), else its `accelerator`. Raises for a model the planner
    does not know (the loop falls back, see _nodes_accelerator)."""
    if t.scaling.accelerators:
        from controller.planner import cheapest_accelerator

        chosen = cheapest_accelerator(
            t.pool.models[0], t.scaling.accelerators, t.pool.gpus_per_replica
        )
        return chosen or t.pool.accelerator
    return t.pool.accelerator


def targets(cfg: Config) -> list[PoolTarget]:
    return [PoolTarget(p, cfg.controller.pools.get(p.name, PoolScalingConfig())) for p in cfg.pools]


class Controller:
    def __init__(
        self,
        cfg: Config,
        actuator: Actuator,
        states: Callable[[], Iterable[ReplicaState]],
        *,
        nodes: NodeActuator | None = None,
        leader: Callable[[], Awaitable[bool]] | None = None,
        lease_left: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.time,
        accelerator_for: Callable[[PoolTarget], str] | None = None,
        demand: Callable[[], Awaitable[dict[str, PoolDemand]]] | None = None,
        store: StateStore | None = None,
        save_every_s: float = SAVE_EVERY_S,
    ) -> None:
        self.actuator = actuator
        self.store = store
        self.save_every_s = save_every_s
        self._saved_at: float | None = None  # clock() of the last save (or try) this term
        self._restored = False  # the saved state was read this term (so it may be written)
        self.states = states
        self.demand = demand  # the gateways' held requests and request rate (controller/demand.py)
        self.nodes = nodes
        self.leader = leader
        # Seconds the leader may still act (to its renew deadline): bounds each write, so a
        # write retried past the lease cannot land after another controller took over.
        self.lease_left = lease_left
        self._led = False  # whether the last tick led: a new term starts from fresh autoscalers
        self._exported: set[str] = set()  # pools with gauges
        self._exported_accs: set[str] = set()  # accelerators with gauges
        self.clock = clock
        self.accelerator_for = accelerator_for or (lambda t: t.pool.accelerator)
        self.autoscalers: dict[str, ReplicaAutoscaler] = {}
        self.last: dict[str, Decision] = {}
        # Each pool's last GPU demand: a pool whose size could not be read this tick keeps its
        # share, so a failed read never deletes its placeholders or shrinks a node pool under its
        # running replicas.
        self._node_demands: dict[str, PoolGpuDemand] = {}
        self._accelerator_errors: dict[str, str] = {}  # pool -> last error logged
        self.apply_config(cfg)

    def apply_config(self, cfg: Config) -> None:
        """Take a new (already validated) config; a pool whose scaling settings did not change
        keeps its autoscaler (stabilization window and forecast), one whose settings changed
        keeps its scaling history (`ReplicaAutoscaler.with_settings`)."""
        self.cfg = cfg
        self.targets = targets(cfg)
        kept = {}
        for t in self.targets:
            old = self.autoscalers.get(t.name)
            if old is None:
                kept[t.name] = ReplicaAutoscaler(t.scaling)
            else:
                kept[t.name] = old if old.cfg == t.scaling else old.with_settings(t.scaling)
        self.autoscalers = kept
        for pool in self._exported - kept.keys():  # a pool the new config dropped
            self._unexport(pool)
            self._exported.discard(pool)

    async def tick(self) -> dict[str, Decision]:
        if not await self._leading():
            if self._led:
                self._step_down()
            return {}
        if not self._led:
            if self.leader is not None:
                # A new term: what this controller learned while it last led (its window, its
                # idle clock) is stale; start as a fresh one, which waits out the window.
                self.autoscalers = {t.name: ReplicaAutoscaler(t.scaling) for t in self.targets}
                self._node_demands.clear()
                reset = getattr(self.nodes, "reset", None)
                if reset is not None:
                    reset()
            self._saved_at = None
            if not await self._restore():
                self._saved_at = self.clock()  # read again (and only then save) one interval on
        self._led = True
        # One tick on one config: a reload during an await here must not mix old and new.
        tick_targets, autoscalers = self.targets, self.autoscalers
        now = self.clock()
        by_pool: dict[str, list[ReplicaState]] = {}
        for s in self.states():
            by_pool.setdefault(s.pool, []).append(s)
        demand: dict[str, PoolDemand] = {}
        if self.demand is not None:
            try:
                demand = await self.demand()
            except Exception as e:  # decide on the agents' states alone
                ERRORS.labels("*", "demand").inc()
                log.error("cannot read the gateways' demand: %s", e)
        warm = await self._warm_gpus()
        decisions: dict[str, Decision] = {}
        for t in tick_targets:
            try:
                size = await self.actuator.get_size(t)
            except Exception as e:
                ERRORS.labels(t.name, "read").inc()
                log.error("pool %s: cannot read its size, holding: %s", t.name, e)
                continue
            pd = demand.get(t.name, PoolDemand())
            d = autoscalers[t.name].decide(
                PoolObservation(
                    size.replicas,
                    by_pool.get(t.name, ()),
                    pd.held,
                    pd.arrival_rate_rps,
                    pending_replicas=size.pending,
                    spare_replicas=spare_replicas(warm, t.name, t.pool.gpus_per_replica),
                ),
                now,
            )
            decisions[t.name] = d
            self._export(t.name, d)
            if d.changed:
                await self._apply(t, d)
        self.last = decisions
        if self.nodes is not None and await self._leading():
            await self._nodes(decisions)
        await self._save(now)
        return decisions

    async def _restore(self) -> bool:
        """Each pool's daily profile as the last leader saved it; whether the saved state could
        be read (nothing saved counts as read). A profile of other settings, or one that does
        not parse, is logged and that pool learns anew. Until a read succeeds this term nothing
        is saved (`_save` reads again first), so a failed read never overwrites a day of
        learning with an empty profile."""
        self._restored = False
        if self.store is None:
            return True
        try:
            saved = await self._bounded(self.store.load())
        except Exception as e:
            ERRORS.labels("*", "state_load").inc()
            log.error("cannot read the saved daily profiles (will read again): %s", e)
            return False
        self._restored = True
        for name, state in saved.items():
            a = self.autoscalers.get(name)
            if a is None:
                continue  # a pool no longer in the config
            try:
                a.restore_season(state)
            except Exception as e:  # anything in the file: never a failed tick
                log.warning("pool %s: saved daily profile not used (%s)", name, e)
            else:
                log.info("pool %s: daily profile restored", name)
        return True

    async def _save(self, now: float) -> None:
        """Every `save_every_s` while leading, the pools' daily profiles. Never in dry-run: a
        dry-run controller beside a live one must not overwrite what the live one learned."""
        if self.store is None or self.cfg.controller.dry_run:
            return
        if self._saved_at is not None and now - self._saved_at < self.save_every_s:
            return
        if not await self._leading():
            return
        self._saved_at = now  # a failed read or write is tried again one interval on
        if not self._restored and not await self._restore():
            return
        profiles = {}
        for name, a in self.autoscalers.items():
            st = a.season_state()
            if st is not None:
                profiles[name] = st
        if not profiles:
            return
        try:
            await self._bounded(self.store.save(profiles))
        except Exception as e:
            ERRORS.labels("*", "state_save").inc()
            log.error("cannot save the daily profiles, will retry: %s", e)

    async def _leading(self) -> bool:
        # Asked again before every write: a tick (API retries, GKE backoff) can outlast a lease.
        return self.leader is None or await self.leader()

    def _step_down(self) -> None:
        """An ex-leader exports nothing it no longer decides."""
        self._led = False
        self.last = {}
        for pool in self._exported:
            self._unexport(pool)
        for acc in self._exported_accs:
            for g in (GPUS_NEEDED, PLACEHOLDER_GPUS, GPUS_SHORT, GPUS_UNREQUESTED):
                with contextlib.suppress(KeyError):
                    g.remove(acc)
        self._exported.clear()
        self._exported_accs.clear()

    async def _bounded(self, write: Awaitable[T]) -> T:
        """A write cut off at the leader's renew deadline (TimeoutError), never after it."""
        left = self.lease_left() if self.lease_left is not None else None
        async with asyncio.timeout(left):
            return await write

    async def _apply(self, t: PoolTarget, d: Decision) -> None:
        direction = "up" if d.desired > d.current else "down"
        dry = self.cfg.controller.dry_run
        if dry:
            SCALE_ACTIONS.labels(t.name, direction, "true").inc()
            log.info(
                "dry-run: pool %s would scale %d -> %d (%s)", t.name, d.current, d.desired, d.reason
            )
            return
        if not await self._leading():
            log.warning(
                "pool %s: lost the lease before scaling to %d; not written", t.name, d.desired
            )
            return
        log.info("pool %s: scale %d -> %d (%s)", t.name, d.current, d.desired, d.reason)
        try:
            wrote = await self._bounded(self.actuator.set_replicas(t, d.desired, d))
        except Exception as e:
            ERRORS.labels(t.name, "write").inc()
            log.error(
                "pool %s: scaling to %d failed, will retry next tick: %s", t.name, d.desired, e
            )
            return
        if wrote:
            SCALE_ACTIONS.labels(t.name, direction, "false").inc()
            record = getattr(self.actuator, "record", None)
            if record is not None:
                await record(t, d)

    async def _nodes(self, decisions: dict[str, Decision]) -> None:
        held = self._node_demands
        for gone in set(held) - {t.name for t in self.targets}:
            del held[gone]
        demands = []
        for t in self.targets:
            d = decisions.get(t.name)
            if d is None:
                if t.name in held:
                    demands.append(held[t.name])
                continue
            acc = self._nodes_accelerator(t)
            if not acc:
                held.pop(t.name, None)
                continue
            held[t.name] = PoolGpuDemand(
                pool=t.name,
                accelerator=accelerator_label(acc),
                gpus_per_replica=t.pool.gpus_per_replica,
                current_replicas=d.desired if not self.cfg.controller.dry_run else d.current,
                desired_replicas=d.desired,
                forecast_replicas=d.forecast,
                headroom_gpus=t.scaling.headroom_gpus,
                node_pool=t.scaling.node_pool,
            )
            demands.append(held[t.name])
        plans = plan_accelerators(demands, await self._nodes_inventory())
        for acc, p in plans.items():
            self._exported_accs.add(acc)
            GPUS_NEEDED.labels(acc).set(p.gpus_needed)
            PLACEHOLDER_GPUS.labels(acc).set(p.placeholder_gpus)
            GPUS_SHORT.labels(acc).set(p.shortfall_gpus)
            GPUS_UNREQUESTED.labels(acc).set(p.unrequested_gpus)
        if self.cfg.controller.dry_run or self.nodes is None:
            return
        if not await self._leading():  # the inventory read may have taken a while
            log.warning("lost the lease before the node actions; not applied")
            return
        try:
            await self._bounded(self.nodes.apply(plans, self.targets))
        except Exception as e:
            ERRORS.labels("*", "nodes").inc()
            log.error("node actuator failed, will retry next tick: %s", e)

    def _nodes_accelerator(self, t: PoolTarget) -> str:
        """The accelerator `_nodes` plans the pool on. When choosing among its `accelerators`
        fails (e.g. a model the planner does not know), its `accelerator` (or none: the pool is
        left out), logged once per pool and error, counted every tick; the other pools go on."""
        failed = self._accelerator_errors
        try:
            acc = self.accelerator_for(t)
        except Exception as e:
            ERRORS.labels(t.name, "accelerator").inc()
            if failed.get(t.name) != str(e):
                failed[t.name] = str(e)
                log.error(
                    "pool %s: cannot choose among its accelerators (%s); planning GPU nodes on %s",
                    t.name,
                    e,
                    repr(t.pool.accelerator) if t.pool.accelerator else "none (pool left out)",
                )
            return t.pool.accelerator
        failed.pop(t.name, None)
        return acc

    async def _nodes_inventory(self) -> dict[str, AcceleratorInventory] | None:
        """GPU nodes and Pending GPU pods from the node actuator, when it can read them. A
        failed read: the tick plans without them."""
        return await self._read_nodes("inventory", "GPU nodes and Pending pods", failed=None)

    async def _warm_gpus(self) -> dict[str, dict[str, int]] | None:
        """GPUs per pool and node that placeholders hold on nodes that are up, from the node
        actuator when it keeps placeholders; None when it does not (none, gke): spare replicas
        unknown, no spike cap. A failed read counts as none spare: a spike then waits for its
        hold, never over-orders."""
        return await self._read_nodes("warm", "the placeholders", failed={})

    async def _read_nodes(self, op: str, what: str, *, failed: Any) -> Any:
        """The node actuator's optional read `op` (None without one, or in local mode, where
        there are no nodes); `failed` when it raises, counted in the errors metric."""
        read = getattr(self.nodes, op, None)
        if read is None or self.cfg.controller.mode == "local":
            return None
        try:
            return await read()
        except Exception as e:
            ERRORS.labels("*", op).inc()
            log.error("cannot read %s, deciding without them: %s", what, e)
            return failed

    @staticmethod
    def _unexport(pool: str) -> None:
        for g in (DESIRED, CURRENT, SATURATION, FORECAST, PANIC, LEVEL):
            with contextlib.suppress(KeyError):
                g.remove(pool)

    def _export(self, pool: str, d: Decision) -> None:
        self._exported.add(pool)
        DESIRED.labels(pool).set(d.desired)
        CURRENT.labels(pool).set(d.current)
        if d.saturation is not None:
            SATURATION.labels(pool).set(d.saturation)
        if d.forecast is not None:
            FORECAST.labels(pool).set(d.forecast)
        PANIC.labels(pool).set(1 if d.panic else 0)
        if d.demand_level is not None:
            LEVEL.labels(pool).set(d.demand_level)
        else:
            with contextlib.suppress(KeyError):
                LEVEL.remove(pool)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:
                log.exception("controller tick failed")
            wait = max(0.0, self.cfg.controller.interval_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
