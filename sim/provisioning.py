"""GPU nodes and replica pods in virtual time: what stands between "scale to N" and N serving.

One replica per node (one GPU each). A pod the autoscaler asks for is Pending until a node is
free; Cluster Autoscaler adds a node for each Pending pod that no free or coming node covers, and
the node is Ready after a seeded 5-10 min. A replica pod on a node loads its model (seeded
60-180 s), then serves. Placeholder pods (kvpilot's node headroom) take nodes the same way, and
a Pending replica preempts one at once, so its node is warm. Scale-down deletes Pending pods
first, then loading ones, then serving ones (newest first, as a ReplicaSet does); a serving
replica drains (no new requests, in-flight ones finish) before its node is free. A node left
empty for `unneeded_s` is removed (Cluster Autoscaler's scale-down-unneeded-time, 10 min by
default). GPU-hours run from a node's creation to its removal.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProvisioningConfig:
    node_min_s: float = 300.0
    node_max_s: float = 600.0
    load_min_s: float = 60.0
    load_max_s: float = 180.0
    unneeded_s: float = 600.0
    gpus_per_node: int = 1


@dataclass
class Node:
    node_id: str
    created_s: float
    ready_s: float
    pod: Pod | None = None
    empty_since: float | None = None
    released_s: float | None = None


@dataclass
class Pod:
    pod_id: str
    kind: str  # "replica" | "placeholder"
    created_s: float
    state: str = "pending"  # pending | loading | ready | draining | gone
    node: Node | None = None
    ready_s: float | None = None  # when loading ends


@dataclass
class Cluster:
    config: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    seed: int = 0
    nodes: list[Node] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    nodes_created: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        # Node and load delays come from their own streams so that policies asking for the same
        # number of nodes get the same delays.
        self._node_rng = random.Random(f"nodes-{self.seed}")
        self._load_rng = random.Random(f"loads-{self.seed}")

    # ---- views -------------------------------------------------------------------------------
    def replicas(self, state: str | None = None) -> list[Pod]:
        return [
            p
            for p in self.pods
            if p.kind == "replica" and p.state != "gone" and (state is None or p.state == state)
        ]

    def count(self, state: str) -> int:
        return len(self.replicas(state))

    def spec_replicas(self) -> int:
        """Replica pods that are not being deleted."""
        return sum(1 for p in self.replicas() if p.state != "draining")

    def placeholders(self) -> list[Pod]:
        return [p for p in self.pods if p.kind == "placeholder" and p.state != "gone"]

    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.released_s is None]

    # ---- start -------------------------------------------------------------------------------
    def seed_ready(self, n: int, now: float) -> list[Pod]:
        """`n` replicas already serving at `now` on nodes that exist (the run's starting fleet)."""
        out = []
        for _ in range(n):
            node = Node(f"node-{next(self._ids)}", now, now)
            self.nodes.append(node)
            self.nodes_created += 1
            pod = Pod(f"replica-{next(self._ids)}", "replica", now, "ready", node, now)
            node.pod = pod
            self.pods.append(pod)
            out.append(pod)
        return out

    # ---- what the autoscaler asks for --------------------------------------------------------
    def scale(self, replicas: int, placeholders: int, now: float) -> list[Pod]:
        """Set the replica and placeholder counts; returns serving replicas to drain."""
        drain: list[Pod] = []
        have = [p for p in self.replicas() if p.state != "draining"]
        if replicas > len(have):
            for _ in range(replicas - len(have)):
                self.pods.append(Pod(f"replica-{next(self._ids)}", "replica", now))
        elif replicas < len(have):
            order = {"pending": 0, "loading": 1, "ready": 2}
            # reversed: among equals, the most recently created pod goes first
            victims = sorted(reversed(have), key=lambda p: (order[p.state], -p.created_s))
            for p in victims[: len(have) - replicas]:
                if p.state == "ready":
                    p.state = "draining"
                    drain.append(p)
                else:
                    self._delete(p, now)
        ph = self.placeholders()
        if placeholders > len(ph):
            for _ in range(placeholders - len(ph)):
                self.pods.append(Pod(f"placeholder-{next(self._ids)}", "placeholder", now))
        elif placeholders < len(ph):
            victims = sorted(reversed(ph), key=lambda p: (p.state != "pending", -p.created_s))
            for p in victims[: len(ph) - placeholders]:
                self._delete(p, now)
        self._schedule(now)
        return drain

    def drained(self, pod: Pod, now: float) -> None:
        """A draining replica finished its last request."""
        self._delete(pod, now)
        self._schedule(now)

    # ---- time passes ------------------------------------------------------------------------
    def advance(self, now: float) -> list[Pod]:
        """Nodes become ready, models finish loading, idle nodes go. Returns replicas that are
        ready to serve from now on."""
        self._schedule(now)
        ready = []
        for p in self.pods:
            if p.state == "loading" and p.ready_s is not None and p.ready_s <= now:
                p.state = "ready"
                ready.append(p)
        for n in self.nodes:
            if (
                n.released_s is None
                and n.pod is None
                and n.empty_since is not None
                and now - n.empty_since >= self.config.unneeded_s
            ):
                n.released_s = now
        return ready

    def gpu_hours(self, until: float, since: float = 0.0) -> float:
        """GPU-hours billed between `since` and `until`."""
        s = 0.0
        for n in self.nodes:
            end = min(until, n.released_s if n.released_s is not None else until)
            s += max(0.0, end - max(since, n.created_s))
        return s * self.config.gpus_per_node / 3600.0

    # ---- internals ---------------------------------------------------------------------------
    def _delete(self, p: Pod, now: float) -> None:
        p.state = "gone"
        if p.node is not None:
            p.node.pod = None
            p.node.empty_since = now
            p.node = None
        self.pods.remove(p)

    def _bind(self, p: Pod, n: Node, now: float) -> None:
        n.pod, n.empty_since = p, None
        p.node = n
        if p.kind == "replica":
            p.state = "loading"
            cfg = self.config
            p.ready_s = now + self._load_rng.uniform(cfg.load_min_s, cfg.load_max_s)
        else:
            p.state = "ready"

    def _schedule(self, now: float) -> None:
        pending = [p for p in self.pods if p.state == "pending"]
        pending.sort(key=lambda p: (p.kind != "replica", p.created_s))  # replicas first
        free = [
            n for n in self.nodes if n.released_s is None and n.pod is None and n.ready_s <= now
        ]
        for p in pending:
            if free:
                self._bind(p, free.pop(0), now)
            elif p.kind == "replica":
                # preempt a placeholder: its node is warm, the placeholder goes back to Pending
                victim = next(
                    (n for n in self.nodes if n.pod is not None and n.pod.kind == "placeholder"),
                    None,
                )
                if victim is not None:
                    ph = victim.pod
                    assert ph is not None
                    ph.state, ph.node = "pending", None
                    victim.pod = None
                    self._bind(p, victim, now)
        # Cluster Autoscaler: a node for every Pending pod no coming node covers.
        still = sum(1 for p in self.pods if p.state == "pending")
        coming = sum(
            1 for n in self.nodes if n.released_s is None and n.pod is None and n.ready_s > now
        )
        cfg = self.config
        for _ in range(still - coming):
            delay = self._node_rng.uniform(cfg.node_min_s, cfg.node_max_s)
            # empty until a pod binds: if the pod that asked for it is gone, it idles out
            self.nodes.append(
                Node(f"node-{next(self._ids)}", now, now + delay, empty_since=now + delay)
            )
            self.nodes_created += 1
