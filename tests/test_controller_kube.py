"""controller/kube.py against kmock's KubernetesEmulator over real HTTP on 127.0.0.1.

`Cluster` adds the semantics the base emulator leaves out and that the controller relies on:
resourceVersions with 409 on a stale write (optimistic concurrency), the /scale subresource of
Deployments, StatefulSets and LeaderWorkerSets, PUT (replace), label selectors on pod lists, and
injectable faults (a status for the next matching request, or a hang past the client's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import kmock
import pytest
from kmock import KubernetesEmulator, KubernetesError
from kubernetes_asyncio.client.exceptions import ApiException

from controller.kube import (
    KubeError,
    KubeScaler,
    LeaderElector,
    Placeholders,
    Retry,
    SizeChanged,
    StateConfigMap,
    api_client,
)
from controller.loop import WorkloadSize

DEPLOY = "apps/v1/deployments"
STS = "apps/v1/statefulsets"
LWS = "leaderworkerset.x-k8s.io/v1/leaderworkersets"


class Cluster(KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(100)
        self.faults: list[tuple[Callable[[kmock.Request], bool], int | str]] = []
        self.scale_writes: list[tuple[str, int]] = []

    def fail(self, match: Callable[[kmock.Request], bool], what: int | str, times: int = 1) -> None:
        self.faults += [(match, what)] * times

    def next_rv(self) -> str:
        return str(next(self._rv))

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        for i, (match, what) in enumerate(self.faults):
            if match(request):
                del self.faults[i]
                if what == "hang":
                    await asyncio.sleep(1.0)
                    what = 504
                raise KubernetesError(status=int(what), reason="Injected", message="injected fault")
        if request.resource is not None and request.name and request.subresource == "scale":
            return await self._scale(request)
        if request.resource is not None and request.name and request.method == kmock.method.PUT:
            return await self._replace(request)
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE) and isinstance(
            request.data, dict
        ):
            request.data.setdefault("metadata", {})["resourceVersion"] = self.next_rv()
        if request.action == kmock.action.LIST and request.params.get("labelSelector"):
            return await self._list_selected(request)
        return await super()._handle(request)

    def _obj(self, request: kmock.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise KubernetesError(
                status=404, reason="NotFound", message=f"{request.name} not found"
            )
        return self.objects[key]

    def _check_rv(self, obj: Any, body: dict[str, Any]) -> None:
        sent = (body.get("metadata") or {}).get("resourceVersion")
        have = obj.raw.get("metadata", {}).get("resourceVersion")
        if sent and sent != have:
            raise KubernetesError(
                status=409, reason="Conflict", message="the object has been modified"
            )

    async def _scale(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        async with self._lock:
            obj = self._obj(request)
            if request.method in (kmock.method.PUT, kmock.method.PATCH):
                self._check_rv(obj, request.data)
                replicas = int(request.data["spec"]["replicas"])
                obj.patch(
                    {
                        "spec": {"replicas": replicas},
                        "metadata": {"resourceVersion": self.next_rv()},
                    }
                )
                self.scale_writes.append((request.name, replicas))
            raw = obj.raw
        labels = raw["spec"].get("selector", {}).get("matchLabels", {})
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return aiohttp.web.json_response(
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {
                    "name": request.name,
                    "namespace": request.namespace,
                    "resourceVersion": raw["metadata"]["resourceVersion"],
                },
                "spec": {"replicas": raw["spec"].get("replicas", 1)},
                "status": {
                    "replicas": raw.get("status", {}).get("replicas", 0),
                    # the API server serializes the workload's label selector here
                    **({"selector": selector} if selector else {}),
                },
            }
        )

    async def _replace(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        async with self._lock:
            obj = self._obj(request)
            self._check_rv(obj, request.data)
            new = dict(request.data)
            new["metadata"] = {**new.get("metadata", {}), "resourceVersion": self.next_rv()}
            obj.patch(new)
            raw = obj.raw
        return aiohttp.web.json_response(raw)

    async def _list_selected(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        want = dict(kv.split("=", 1) for kv in request.params["labelSelector"].split(","))
        items = []
        for (res, ns, _), obj in self.objects.items():
            if res == request.resource and ns == request.namespace and not obj.deleted:
                labels = obj.raw.get("metadata", {}).get("labels", {})
                if all(labels.get(k) == v for k, v in want.items()):
                    items.append(obj.raw)
        return aiohttp.web.json_response(
            {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        )


def workload(name: str, replicas: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml", "resourceVersion": "1"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas},
    }


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Cluster, Any]]:
    async with Cluster() as k8s, kmock.Server(k8s) as server:
        k8s.objects[DEPLOY, "ml", "llama"] = workload("llama", 2)
        k8s.objects[STS, "ml", "mixtral"] = workload("mixtral", 1)
        k8s.objects[LWS, "ml", "big"] = workload("big", 1)
        api = api_client(str(server.url).rstrip("/"))
        try:
            yield k8s, api
        finally:
            await api.close()


FAST = Retry(attempts=4, backoff_s=0.01, timeout_s=0.3)


@pytest.mark.parametrize(
    ("kind", "res", "name"),
    [
        ("Deployment", DEPLOY, "llama"),
        ("StatefulSet", STS, "mixtral"),
        ("LeaderWorkerSet", LWS, "big"),
    ],
)
async def test_scale_subresource_read_and_write(
    cluster: Any, kind: str, res: str, name: str
) -> None:
    k8s, api = cluster
    s = KubeScaler(api, FAST)
    before = await s.get_replicas(kind, "ml", name)
    assert await s.set_replicas(kind, "ml", name, 5) == before
    assert k8s.objects[res, "ml", name]["spec"]["replicas"] == 5
    assert await s.get_replicas(kind, "ml", name) == 5


def pod(
    name: str, phase: str, labels: dict[str, str], node: str = "", **meta: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml", "labels": labels, **meta},
        "spec": {
            "containers": [{"name": "m", "image": "m"}],
            **({"nodeName": node} if node else {}),
        },
        "status": {"phase": phase},
    }


async def test_size_counts_the_workloads_pending_pods(cluster: Any) -> None:
    """Pending pods (waiting for a node) are found through the selector /scale reports; pods of
    other workloads, running ones, ones being deleted and Pending ones already on a node (pulling
    their image) do not count."""
    k8s, api = cluster
    llama = k8s.objects[DEPLOY, "ml", "llama"]
    llama.patch({"spec": {"replicas": 4, "selector": {"matchLabels": {"app": "llama"}}}})
    mine = {"app": "llama"}
    for name, phase, labels, meta in [
        ("l-0", "Running", mine, {}),
        ("l-1", "Running", mine, {}),
        ("l-2", "Pending", mine, {}),
        ("l-3", "Pending", mine, {}),
        ("l-old", "Pending", mine, {"deletionTimestamp": "2026-11-26T00:00:00Z"}),
        ("other", "Pending", {"app": "mixtral"}, {}),
        ("l-pulling", "Pending", mine, {"node": "gke-l4-1"}),
    ]:
        k8s.objects["v1/pods", "ml", name] = pod(name, phase, labels, **meta)
    s = KubeScaler(api, FAST)
    assert await s.get_size("Deployment", "ml", "llama") == WorkloadSize(4, 2)
    # No selector on the workload: nothing to count by, none Pending as far as we know.
    assert await s.get_size("StatefulSet", "ml", "mixtral") == WorkloadSize(1, 0)
    # The pod list refused: the size still reads, Pending unknown (0: counted as missing).
    k8s.fail(lambda r: r.resource is not None and r.subresource is None and not r.name, 403)
    assert await s.get_size("Deployment", "ml", "llama") == WorkloadSize(4, 0)


def someone_writes_before_our_first_put(k8s: Cluster, spec: dict[str, Any] | None = None) -> None:
    """Another writer changes the llama Deployment between our read and our first PUT, which
    then carries a stale resourceVersion (409)."""
    state = {"n": 0}

    def first_put(r: kmock.Request) -> bool:
        if r.subresource == "scale" and r.method == kmock.method.PUT and state["n"] == 0:
            state["n"] = 1
            patch: dict[str, Any] = {"metadata": {"resourceVersion": "999"}}
            if spec is not None:
                patch["spec"] = spec
            k8s.objects[DEPLOY, "ml", "llama"].patch(patch)
        return False

    k8s.fail(first_put, 0)


async def test_conflict_rereads_and_retries(cluster: Any) -> None:
    k8s, api = cluster
    # Someone else writes between our read and our write: the first PUT carries a stale version.
    someone_writes_before_our_first_put(k8s)
    s = KubeScaler(api, FAST)
    await s.set_replicas("Deployment", "ml", "llama", 4)
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 4
    puts = [r for r in list(k8s) if r.subresource == "scale" and r.method == kmock.method.PUT]
    assert len(puts) == 2  # the 409, then the retry after a re-read


async def test_a_size_changed_since_the_decision_is_not_overwritten(cluster: Any) -> None:
    k8s, api = cluster
    # Someone scaled to 5 between our read (2) and our write, and our first PUT hits a 409:
    # the re-read shows 5, which the decision (2 -> 4) was not made from, so nothing is written.
    someone_writes_before_our_first_put(k8s, {"replicas": 5})
    with pytest.raises(SizeChanged, match="5 replicas now, decided from 2"):
        await KubeScaler(api, FAST).set_replicas("Deployment", "ml", "llama", 4, expect=2)
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 5


async def test_500_and_timeouts_are_retried_without_a_wrong_scale(cluster: Any) -> None:
    k8s, api = cluster
    is_put = lambda r: r.subresource == "scale" and r.method == kmock.method.PUT  # noqa: E731
    k8s.fail(is_put, 500)
    k8s.fail(is_put, "hang")
    s = KubeScaler(api, FAST)
    await s.set_replicas("Deployment", "ml", "llama", 3)
    assert k8s.scale_writes == [("llama", 3)]
    # Failing for good: an error goes up, and the size is untouched.
    k8s.fail(is_put, 503, times=10)
    with pytest.raises(Exception) as exc:
        await s.set_replicas("Deployment", "ml", "llama", 7)
    assert getattr(exc.value, "status", None) == 503
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 3


async def test_endless_conflicts_give_up(cluster: Any) -> None:
    k8s, api = cluster
    k8s.fail(lambda r: r.subresource == "scale" and r.method == kmock.method.PUT, 409, times=10)
    with pytest.raises(KubeError, match="conflicting"):
        await KubeScaler(api, FAST, conflict_retries=3).set_replicas("Deployment", "ml", "llama", 6)
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 2


async def test_event_per_decision(cluster: Any) -> None:
    k8s, api = cluster
    s = KubeScaler(api, FAST)
    await s.event("Deployment", "ml", "llama", reason="ScaledUp", message="2 -> 4: saturation 1.9")
    events = [o.raw for (res, _, _), o in k8s.objects.items() if res.plural == "events"]
    assert len(events) == 1
    assert events[0]["involvedObject"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llama",
        "namespace": "ml",
    }
    assert events[0]["reason"] == "ScaledUp" and "saturation" in events[0]["message"]


async def test_placeholder_pods_created_and_deleted(cluster: Any) -> None:
    k8s, api = cluster
    ph = Placeholders(api, "kvpilot-placeholders", retry=FAST)
    # An unrelated pod in the namespace is never touched.
    k8s.objects["v1/pods", "kvpilot-placeholders", "other"] = {
        "metadata": {"name": "other", "namespace": "kvpilot-placeholders", "labels": {"app": "x"}},
        "spec": {"containers": []},
    }
    wanted = [("llama", "nvidia-l4", 1, "")] * 3 + [("big", "nvidia-h100-80gb", 8, "h100")]
    assert await ph.reconcile(wanted) == (4, 0)
    pods = await ph.list()
    assert len(pods) == 4
    big = next(p for p in pods if p["metadata"]["labels"]["kvpilot.io/pool"] == "big")
    assert big["spec"]["priorityClassName"] == "kvpilot-placeholder"
    assert big["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert big["spec"]["nodeSelector"]["cloud.google.com/gke-nodepool"] == "h100"
    assert await ph.reconcile(wanted) == (0, 0)  # idempotent
    assert await ph.reconcile([("llama", "nvidia-l4", 1, "")]) == (0, 3)
    assert len(await ph.list()) == 1
    assert not k8s.objects["v1/pods", "kvpilot-placeholders", "other"].deleted


async def test_leader_election_one_acts_the_other_takes_over_after_expiry(cluster: Any) -> None:
    k8s, api = cluster
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    a = LeaderElector(
        api, "kvpilot", "ctl", "a", lease_duration_s=15, clock=clock, monotonic=clock, retry=FAST
    )
    b = LeaderElector(
        api, "kvpilot", "ctl", "b", lease_duration_s=15, clock=clock, monotonic=clock, retry=FAST
    )
    assert await a.try_acquire()
    assert not await b.try_acquire()
    for _ in range(3):  # a keeps renewing; b keeps waiting
        now[0] += 10
        assert await a.try_acquire()
        assert not await b.try_acquire()
    # a stops (crashed); once its lease expires, b takes over, and a can't come back.
    now[0] += 16
    assert await b.try_acquire()
    assert not await a.try_acquire()
    lease = k8s.objects["coordination.k8s.io/v1/leases", "kvpilot", "ctl"].raw
    assert lease["spec"]["holderIdentity"] == "b"
    assert lease["spec"]["leaseTransitions"] == 1


async def test_a_leader_that_cannot_renew_stops_acting_before_its_lease_expires(
    cluster: Any,
) -> None:
    k8s, api = cluster
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    a = LeaderElector(
        api, "kvpilot", "ctl", "a", lease_duration_s=15, clock=clock, monotonic=clock, retry=FAST
    )
    b = LeaderElector(
        api, "kvpilot", "ctl", "b", lease_duration_s=15, clock=clock, monotonic=clock, retry=FAST
    )
    assert await a.try_acquire() and await a.leader()
    assert not await b.try_acquire()  # b has seen a's record: it expires 15 s from now
    # The API fails for a's renewals: after the renew deadline (10 s of 15) a stops acting,
    # 5 s before b may take the lease over, so the two never act at once.
    k8s.fail(lambda r: r.resource is not None and r.resource.plural == "leases", 500, times=4)
    now[0] += 9
    with pytest.raises(ApiException):
        await a.try_acquire()
    assert await a.leader()
    now[0] += 2  # 11 s since the last renewal
    assert not await a.leader()
    now[0] += 5  # 16 s: expired
    assert await b.try_acquire() and await b.leader()


async def test_a_released_lease_is_taken_over_at_once_and_clock_skew_changes_nothing(
    cluster: Any,
) -> None:
    k8s, api = cluster
    now, skewed = [1000.0], [1000.0]
    a = LeaderElector(
        api, "kvpilot", "ctl", "a", clock=lambda: now[0], monotonic=lambda: now[0], retry=FAST
    )
    # b's wall clock runs 60 s ahead: by a's renewTime the lease looks long expired to it.
    b = LeaderElector(
        api, "kvpilot", "ctl", "b", clock=lambda: skewed[0] + 60, monotonic=lambda: skewed[0],
        retry=FAST,
    )  # fmt: skip
    assert await a.try_acquire()
    assert not await b.try_acquire()
    now[0] += 5
    skewed[0] += 5
    assert await a.try_acquire()
    assert not await b.try_acquire()  # renewed 0 s ago by what b saw, whatever the clocks say
    await a.release()  # shutting down: handed back
    assert not await a.leader()
    assert await b.try_acquire()
    lease = k8s.objects["coordination.k8s.io/v1/leases", "kvpilot", "ctl"].raw
    assert lease["spec"]["holderIdentity"] == "b"


async def test_the_elector_renews_in_the_background(cluster: Any) -> None:
    k8s, api = cluster
    a = LeaderElector(api, "kvpilot", "ctl", "a", lease_duration_s=2, retry=FAST)
    stop = asyncio.Event()
    task = asyncio.ensure_future(a.run(stop))
    try:
        for _ in range(100):
            if await a.leader():
                break
            await asyncio.sleep(0.02)
        first = k8s.objects["coordination.k8s.io/v1/leases", "kvpilot", "ctl"].raw["spec"]
        await asyncio.sleep(1.0)  # renewals every 0.4 s
        assert await a.leader()
        again = k8s.objects["coordination.k8s.io/v1/leases", "kvpilot", "ctl"].raw["spec"]
        assert again["renewTime"] > first["renewTime"]
    finally:
        stop.set()
        await task


async def test_two_candidates_racing_for_an_expired_lease_one_wins(cluster: Any) -> None:
    _, api = cluster
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    a, b, c = (
        LeaderElector(
            api, "kvpilot", "ctl", x, lease_duration_s=15, clock=clock, monotonic=clock, retry=FAST
        )
        for x in "abc"
    )
    assert await a.try_acquire()
    # New candidates judge expiry on their own clock from when they first saw the record
    # (client-go): a lease that looks 20 s old by its renewTime is still waited out once.
    now[0] += 20
    assert not await b.try_acquire() and not await c.try_acquire()
    now[0] += 16
    won = await asyncio.gather(b.try_acquire(), c.try_acquire())
    assert sorted(won) == [False, True]


# --- the control loop on top, against the same emulator ---------------------------------------

from prometheus_client import REGISTRY  # noqa: E402

from controller.actuators import KubeActuator, PlaceholderNodes  # noqa: E402
from controller.loop import Controller  # noqa: E402
from controller.loop import targets as targets_of  # noqa: E402
from controller.nodepools import spare_replicas  # noqa: E402
from kvpilot.config import parse_config  # noqa: E402
from kvpilot.signals import ReplicaState  # noqa: E402


def loop_config(**controller: Any) -> Any:
    return parse_config(
        {
            "pools": [
                {
                    "name": "llama",
                    "models": ["llama-3.1-8b"],
                    "namespace": "ml",
                    "accelerator": "nvidia-l4",
                }
            ],
            "controller": {
                # Plain HPA arithmetic (no utilisation target, no margin) keeps the sizes readable.
                "pools": {
                    "llama": {
                        "min_replicas": 1,
                        "max_replicas": 10,
                        "forecast": False,
                        "target_utilization": 1.0,
                        "scale_up_margin": 0.0,
                    }
                },
                **controller,
            },
        }
    )


def busy(n: int, now: float, waiting: int = 8) -> list[ReplicaState]:
    return [
        ReplicaState(
            replica_id=f"ml/llama-{i}", address="", pool="llama", waiting=waiting, observed_at=now
        )
        for i in range(n)
    ]


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def kube_controller(api: Any, now: float, *, cfg: Any = None, states: Any = None, **kw: Any) -> Any:
    """The loop on the real KubeScaler (kmock) at a fixed clock; two busy replicas unless told."""
    return Controller(
        cfg or loop_config(),
        KubeActuator(KubeScaler(api, FAST)),
        states or (lambda: busy(2, now)),
        clock=lambda: now,
        **kw,
    )


async def test_loop_scales_records_an_event_and_exports(cluster: Any) -> None:
    k8s, api = cluster
    now = 5000.0
    ctl = kube_controller(api, now)
    ds = await ctl.tick()
    assert ds["llama"].desired == 4  # saturation 2.0 over 2 replicas
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 4
    events = [o.raw for (res, _, _), o in k8s.objects.items() if res.plural == "events"]
    assert [e["reason"] for e in events] == ["ScaledUp"]
    assert "2 -> 4" in events[0]["message"]
    assert gauge("kvpilot_controller_desired_replicas", pool="llama") == 4


async def test_loop_exports_the_demand_level_once_a_day_is_seen(cluster: Any) -> None:
    k8s, api = cluster
    now = 5000.0
    forecasting = {"llama": {"min_replicas": 1, "max_replicas": 10, "target_utilization": 1.0}}
    ctl = kube_controller(api, now, cfg=loop_config(pools=forecasting))
    await ctl.tick()
    # No day seen yet: the forecast is the trend's, and no demand level is exported.
    assert gauge("kvpilot_controller_demand_level", pool="llama") is None
    profile = ctl.autoscalers["llama"]._season
    assert profile is not None
    for t in range(int(now) - 86400 - 900, int(now), 300):  # a whole day seen
        profile.update(100.0, float(t))
    await ctl.tick()
    assert gauge("kvpilot_controller_demand_level", pool="llama") == pytest.approx(1.0)


CM = "v1/configmaps"


def _learned_a_day(ctl: Any, now: float, level: float = 100.0) -> None:
    profile = ctl.autoscalers["llama"]._season
    assert profile is not None
    for t in range(int(now) - 86400 - 900, int(now), 300):  # a whole day seen
        profile.update(level, float(t))


async def test_a_new_leader_goes_on_from_the_daily_profile_the_last_one_saved(
    cluster: Any,
) -> None:
    """The leader saves each pool's daily profile in a ConfigMap (every save_every_s); the next
    leader (a rollout, a failover) reads it at the start of its term: its forecast is the
    profile's from its first tick, not after a day of learning."""
    k8s, api = cluster
    clock = [5000.0]
    forecasting = {"llama": {"min_replicas": 1, "max_replicas": 10, "target_utilization": 1.0}}
    cfg = loop_config(pools=forecasting)
    store = StateConfigMap(api, "kvpilot", "kvpilot-controller-state", FAST)
    leading = [True]

    async def leader() -> bool:
        return leading[0]

    def controller() -> Controller:
        return Controller(
            cfg,
            KubeActuator(KubeScaler(api, FAST)),
            lambda: busy(2, clock[0]),
            clock=lambda: clock[0],
            leader=leader,
            store=store,
        )

    first = controller()
    await first.tick()  # nothing saved yet: learns anew, and saves what it has (no day yet)
    assert k8s.objects[CM, "kvpilot", "kvpilot-controller-state"]["data"]["profiles.json"]
    assert (await store.load())["llama"]["profile"][0] is None
    _learned_a_day(first, clock[0])
    clock[0] += 60
    await first.tick()  # within save_every_s of the last save: not yet
    assert (await store.load())["llama"]["profile"][0] is None
    clock[0] += 300
    await first.tick()
    assert (await store.load())["llama"]["profile"][0] == pytest.approx(100.0)

    second = controller()
    await second.tick()
    assert second.autoscalers["llama"]._season is not None
    assert second.autoscalers["llama"]._season.ready
    assert gauge("kvpilot_controller_demand_level", pool="llama") == pytest.approx(1.0)

    # The first one loses the lease, and takes it back later: it reads the profile again (what
    # the other leader learned meanwhile), not its own stale copy.
    leading[0] = False
    await first.tick()
    assert first.autoscalers["llama"]._season.ready
    leading[0] = True
    _learned_a_day(second, clock[0], level=250.0)
    clock[0] += 300
    await second.tick()
    await first.tick()
    restored = first.autoscalers["llama"]._season
    assert restored is not None and restored.state() == second.autoscalers["llama"]._season.state()


async def test_a_saved_profile_that_does_not_fit_is_left_and_dry_run_saves_nothing(
    cluster: Any,
) -> None:
    k8s, api = cluster
    now = 5000.0
    store = StateConfigMap(api, "kvpilot", "kvpilot-controller-state", FAST)
    # Another day's length (season_s changed since it was saved), and a broken file: both left,
    # the pool learns anew; nothing is written in dry-run.
    for saved in ('{"version": 1, "pools": {"llama": {"period_s": 3600, "bins": 96}}}', "{]"):
        k8s.objects[CM, "kvpilot", "kvpilot-controller-state"] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kvpilot-controller-state", "namespace": "kvpilot"},
            "data": {"profiles.json": saved},
        }
        forecasting = {"llama": {"min_replicas": 1, "max_replicas": 10}}
        ctl = kube_controller(
            api, now, cfg=loop_config(pools=forecasting, dry_run=True), store=store
        )
        await ctl.tick()
        assert ctl.last["llama"].desired >= 1
        assert not ctl.autoscalers["llama"]._season.ready
        stored = k8s.objects[CM, "kvpilot", "kvpilot-controller-state"]["data"]
        assert stored["profiles.json"] == saved  # not overwritten in dry-run


async def test_a_failed_read_of_the_saved_profile_never_overwrites_it(cluster: Any) -> None:
    """A new leader that cannot read the saved state (a slow API server in a failover) must not
    save its own empty profile over the last leader's day: it reads again first, later."""
    k8s, api = cluster
    clock = [5000.0]
    forecasting = {"llama": {"min_replicas": 1, "max_replicas": 10, "target_utilization": 1.0}}
    store = StateConfigMap(api, "kvpilot", "kvpilot-controller-state", FAST)
    first = kube_controller(api, clock[0], cfg=loop_config(pools=forecasting), store=store)
    _learned_a_day(first, clock[0])
    await first.tick()
    saved = k8s.objects[CM, "kvpilot", "kvpilot-controller-state"]["data"]["profiles.json"]

    def reads(r: Any) -> bool:
        return r.resource is not None and r.resource.plural == "configmaps" and r.method == "GET"

    k8s.fail(reads, 500, times=4)  # every retry of the first read
    second = Controller(
        loop_config(pools=forecasting),
        KubeActuator(KubeScaler(api, FAST)),
        lambda: busy(2, clock[0]),
        clock=lambda: clock[0],
        store=store,
    )
    await second.tick()
    assert second.last["llama"].desired >= 1  # the tick went on
    assert not second.autoscalers["llama"]._season.ready
    assert k8s.objects[CM, "kvpilot", "kvpilot-controller-state"]["data"]["profiles.json"] == saved
    clock[0] += 300  # one interval on: read again (now it works), restore, and only then save
    await second.tick()
    assert second.autoscalers["llama"]._season.ready
    assert (await store.load())["llama"]["profile"][0] == pytest.approx(100.0)


async def test_a_saved_profile_with_numbers_json_allows_but_floats_refuse_is_left(
    cluster: Any,
) -> None:
    k8s, api = cluster
    store = StateConfigMap(api, "kvpilot", "kvpilot-controller-state", FAST)
    forecasting = {"llama": {"min_replicas": 1, "max_replicas": 10}}
    first = kube_controller(api, 5000.0, cfg=loop_config(pools=forecasting), store=store)
    _learned_a_day(first, 5000.0)
    await first.tick()
    cm = k8s.objects[CM, "kvpilot", "kvpilot-controller-state"]
    cm.patch(
        {
            "data": {
                "profiles.json": cm["data"]["profiles.json"].replace('"n": ', '"n": 1e400, "x": ')
            }
        }
    )
    second = kube_controller(api, 5000.0, cfg=loop_config(pools=forecasting), store=store)
    for _ in range(2):  # every tick decides: the bad profile is left once, not retried forever
        await second.tick()
        assert second.last["llama"].desired >= 1
    assert not second.autoscalers["llama"]._season.ready


async def test_loop_dry_run_only_decides(cluster: Any) -> None:
    k8s, api = cluster
    now = 5000.0
    cfg = loop_config(dry_run=True)
    before = (
        gauge(
            "kvpilot_controller_scale_actions_total", pool="llama", direction="up", dry_run="true"
        )
        or 0
    )
    ctl = kube_controller(api, now, cfg=cfg)
    assert (await ctl.tick())["llama"].desired == 4
    assert k8s.scale_writes == []
    after = gauge(
        "kvpilot_controller_scale_actions_total", pool="llama", direction="up", dry_run="true"
    )
    assert after == before + 1


async def test_loop_holds_when_agents_are_down_or_the_api_fails(cluster: Any) -> None:
    k8s, api = cluster
    now = 5000.0
    states: list[ReplicaState] = []
    ctl = kube_controller(api, now, states=lambda: states)
    assert (await ctl.tick())["llama"].desired == 2  # no states at all: hold
    # Reads fail for good: the pool is skipped, nothing is written.
    k8s.fail(lambda r: r.subresource == "scale", 500, times=8)
    states[:] = busy(2, now)
    assert "llama" not in await ctl.tick()
    assert k8s.scale_writes == []
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 2


async def test_only_the_leader_acts(cluster: Any) -> None:
    k8s, api = cluster
    now = [5000.0]
    clock = lambda: now[0]  # noqa: E731

    def make(identity: str) -> Controller:
        el = LeaderElector(
            api,
            "kvpilot",
            "ctl",
            identity,
            lease_duration_s=15,
            clock=clock,
            monotonic=clock,
            retry=FAST,
        )
        return Controller(
            loop_config(),
            KubeActuator(KubeScaler(api, FAST)),
            lambda: busy(2, now[0]),
            clock=clock,
            leader=el.try_acquire,
        )

    a, b = make("a"), make("b")
    assert (await a.tick())["llama"].desired == 4
    assert await b.tick() == {}
    assert k8s.scale_writes == [("llama", 4)]


async def test_an_ex_leader_stops_exporting_its_decisions(cluster: Any) -> None:
    _, api = cluster
    now = [5000.0]
    leading = [True]

    async def leader() -> bool:
        return leading[0]

    ctl = Controller(
        loop_config(),
        KubeActuator(KubeScaler(api, FAST)),
        lambda: busy(2, now[0]),
        clock=lambda: now[0],
        leader=leader,
    )
    await ctl.tick()
    assert gauge("kvpilot_controller_desired_replicas", pool="llama") == 4
    leading[0] = False
    assert await ctl.tick() == {}
    assert gauge("kvpilot_controller_desired_replicas", pool="llama") is None


async def test_the_lease_is_checked_again_before_writing(cluster: Any) -> None:
    k8s, api = cluster
    now = [5000.0]
    answers = iter([True, False])  # leader at the start of the tick, not at the write

    async def leader() -> bool:
        return next(answers, False)

    ctl = Controller(
        loop_config(),
        KubeActuator(KubeScaler(api, FAST)),
        lambda: busy(2, now[0]),
        clock=lambda: now[0],
        leader=leader,
    )
    assert (await ctl.tick())["llama"].desired == 4
    assert k8s.scale_writes == []


async def test_a_new_term_starts_from_a_fresh_window(cluster: Any) -> None:
    """A standby that led before, hours ago, must not act on that term's window when it leads
    again: it waits out a fresh one, like a controller that has just started."""
    k8s, api = cluster
    k8s.objects[DEPLOY, "ml", "llama"] = workload("llama", 10)
    now = [5000.0]
    leading = [True]
    load = [1.0]  # waiting per replica / queue target 4: saturation

    async def leader() -> bool:
        return leading[0]

    ctl = Controller(
        loop_config(),
        KubeActuator(KubeScaler(api, FAST)),
        lambda: busy(10, now[0], waiting=round(4 * load[0])),
        clock=lambda: now[0],
        leader=leader,
    )
    assert (await ctl.tick())["llama"].desired == 10
    leading[0] = False
    now[0] += 7200  # two hours as the standby
    assert await ctl.tick() == {}
    leading[0], load[0] = True, 0.25
    d = (await ctl.tick())["llama"]
    assert d.desired == 10 and "stabilizing" in d.reason
    assert k8s.scale_writes == []


async def test_an_ex_leader_drops_every_gauge_it_exported(cluster: Any) -> None:
    k8s, api = cluster
    now = 5000.0
    leading = [True]

    async def leader() -> bool:
        return leading[0]

    ctl = kube_controller(
        api,
        now,
        cfg=loop_config(node_actuator="placeholders"),
        leader=leader,
        nodes=PlaceholderNodes(Placeholders(api, "kvpilot-placeholders", retry=FAST)),
    )
    await ctl.tick()
    assert gauge("kvpilot_controller_gpus_needed", accelerator="nvidia-l4") is not None
    # The last leading tick cannot read the pool's size: it is missing from that tick's
    # decisions, yet its gauges from before must go too.
    k8s.fail(lambda r: r.subresource == "scale", 500, times=4)
    await ctl.tick()
    leading[0] = False
    await ctl.tick()
    assert gauge("kvpilot_controller_desired_replicas", pool="llama") is None
    assert gauge("kvpilot_controller_gpus_needed", accelerator="nvidia-l4") is None


async def test_a_slow_event_neither_fails_nor_uncounts_a_done_scale(cluster: Any) -> None:
    """The Event is recorded after the write, outside its lease bound: an Event API that hangs
    past the bound leaves a scale that happened counted as one, not as a failed write."""
    k8s, api = cluster
    now = 5000.0
    k8s.fail(lambda r: r.resource is not None and r.resource.plural == "events", "hang", times=4)

    async def leader() -> bool:
        return True

    ctl = kube_controller(
        api,
        now,
        leader=leader,
        lease_left=lambda: 0.5,  # the Event's retries take longer than this
    )
    errors = gauge("kvpilot_controller_errors_total", pool="llama", op="write") or 0
    actions = (
        gauge(
            "kvpilot_controller_scale_actions_total", pool="llama", direction="up", dry_run="false"
        )
        or 0
    )
    await ctl.tick()
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 4
    assert (gauge("kvpilot_controller_errors_total", pool="llama", op="write") or 0) == errors
    assert (
        gauge(
            "kvpilot_controller_scale_actions_total", pool="llama", direction="up", dry_run="false"
        )
        == actions + 1
    )


async def test_a_new_term_makes_the_node_actuator_forget_its_cache(cluster: Any) -> None:
    _, api = cluster
    now = 5000.0
    leading = [True]

    async def leader() -> bool:
        return leading[0]

    class Nodes:
        resets = 0

        async def apply(self, plans: Any, targets: Any) -> None:
            pass

        def reset(self) -> None:
            self.resets += 1

    nodes = Nodes()
    ctl = kube_controller(api, now, leader=leader, nodes=nodes)
    await ctl.tick()  # the first term
    await ctl.tick()
    assert nodes.resets == 1
    leading[0] = False
    await ctl.tick()
    leading[0] = True
    await ctl.tick()  # a new term: another leader may have resized the node pools meanwhile
    assert nodes.resets == 2


async def test_a_write_is_cut_off_at_the_renew_deadline(cluster: Any) -> None:
    k8s, api = cluster
    now = 5000.0
    is_put = lambda r: r.subresource == "scale" and r.method == kmock.method.PUT  # noqa: E731
    k8s.fail(is_put, "hang", times=4)  # each try hangs past the client's 0.3 s timeout

    async def leader() -> bool:
        return True

    ctl = kube_controller(
        api,
        now,
        leader=leader,
        lease_left=lambda: 0.5,  # the retries would take > 1 s
    )
    before = gauge("kvpilot_controller_errors_total", pool="llama", op="write") or 0
    await ctl.tick()
    assert gauge("kvpilot_controller_errors_total", pool="llama", op="write") == before + 1
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 2


async def test_loop_placeholders_for_headroom(cluster: Any) -> None:
    k8s, api = cluster
    now = 5000.0
    cfg = parse_config(
        {
            "pools": [
                {
                    "name": "llama",
                    "models": ["llama-3.1-8b"],
                    "namespace": "ml",
                    "accelerator": "nvidia-l4",
                }
            ],
            "controller": {"pools": {"llama": {"headroom_gpus": 2, "forecast": False}}},
        }
    )
    ph = Placeholders(api, "kvpilot-placeholders", retry=FAST)
    ctl = kube_controller(
        api,
        now,
        cfg=cfg,
        states=lambda: busy(2, now, waiting=4),
        nodes=PlaceholderNodes(ph),
    )
    await ctl.tick()
    pods = await ph.list()
    assert len(pods) == 2
    assert {p["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] for p in pods} == {
        "nvidia-l4"
    }
    assert gauge("kvpilot_controller_placeholder_gpus", accelerator="nvidia-l4") == 2


async def test_a_spike_above_the_profile_takes_the_placeholders_already_on_nodes(
    cluster: Any,
) -> None:
    """Three times the demand the daily profile expects: the loop reads which of the pool's
    placeholders are Running on a node, and scales onto those at once; no replica that would
    need a new node until the spike has lasted spike_hold_s."""
    k8s, api = cluster
    now = 5000.0
    pools = {
        "llama": {
            "min_replicas": 1,
            "max_replicas": 10,
            "target_utilization": 1.0,
            "profile_utilization": 1.0,
            "peak_utilization": 1.0,
            "capacity_tokens_per_s": 100.0,
        }
    }
    ph = Placeholders(api, "kvpilot-placeholders", retry=FAST)
    await ph.reconcile([("llama", "nvidia-l4", 1, "")] * 3)
    # Two are on nodes; the third still waits for one.
    for name in sorted(p["metadata"]["name"] for p in await ph.list())[:2]:
        key = ("v1/pods", "kvpilot-placeholders", name)
        pod = dict(k8s.objects[key].raw)
        pod["spec"] = {**pod["spec"], "nodeName": f"gke-l4-{name[-4:]}"}
        pod["status"] = {"phase": "Running"}
        k8s.objects[key] = pod

    def spiking() -> list[ReplicaState]:  # saturation 3, 600 tokens/s: 6 replicas' worth
        return [
            dataclasses.replace(s, generation_tokens_per_s=300.0) for s in busy(2, now, waiting=12)
        ]

    ctl = kube_controller(
        api,
        now,
        cfg=loop_config(pools=pools, node_actuator="placeholders"),
        states=spiking,
        nodes=PlaceholderNodes(ph),
    )
    _learned_a_day(ctl, now, level=200.0)  # the profile expects 2 replicas' worth
    d = (await ctl.tick())["llama"]
    assert d.desired == 4 and "above the daily profile" in d.reason  # 2 + 2 spare
    assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 4

    # Without placeholders (node actuator none) nothing says what is warm: no cap, as the HPA.
    k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] = 2
    plain = kube_controller(api, now, cfg=loop_config(pools=pools), states=spiking)
    _learned_a_day(plain, now, level=200.0)
    assert (await plain.tick())["llama"].desired == 6


def spare_of(warm: Any, t: Any) -> int | None:
    return spare_replicas(warm, t.name, t.pool.gpus_per_replica)


def test_spare_replicas_fit_whole_on_one_node() -> None:
    """A 2-GPU replica fits on a node whose placeholders hold 2 GPUs, not on two nodes with
    one each; without placeholders kept, spare is unknown (None), not zero."""
    cfg = parse_config(
        {
            "pools": [
                {
                    "name": "big",
                    "models": ["llama-3.1-8b"],
                    "namespace": "ml",
                    "endpoints": ["http://127.0.0.1:1"],
                    "gpus_per_replica": 2,
                }
            ]
        }
    )
    (t,) = targets_of(cfg)
    assert spare_of({"big": {"n1": 2, "n2": 1, "n3": 1, "n4": 5}}, t) == 3
    assert spare_of({}, t) == 0
    assert spare_of(None, t) is None


# --- scale from zero: the gateway holds a request, the controller reads it from the gateway ----

from controller.demand import GatewayDemand, PoolDemand  # noqa: E402
from gateway.app import apply_config, start_gateway  # noqa: E402
from tests.modelservers import start_modelserver, stop  # noqa: E402


def zero_config(endpoints: list[str]) -> Any:
    return parse_config(
        {
            "pools": [
                {
                    "name": "llama",
                    "models": ["llama-3.1-8b"],
                    "namespace": "ml",
                    "endpoints": endpoints,
                }
            ],
            "gateway": {"queue_timeout_s": 20, "scrape_fallback": False},
            "controller": {
                "pools": {"llama": {"min_replicas": 0, "max_replicas": 4, "scale_to_zero": True}}
            },
        }
    )


async def test_held_request_scales_a_pool_up_from_zero_and_is_served(cluster: Any) -> None:
    k8s, api = cluster
    k8s.objects[DEPLOY, "ml", "llama"] = workload("llama", 0)
    cfg = zero_config([])  # no replica: the gateway holds what arrives
    runner, base = await start_gateway(cfg, port=0)
    server = None
    async with aiohttp.ClientSession() as s:
        root = base.removesuffix("/v1")
        demand = GatewayDemand([root], s)
        ctl = Controller(cfg, KubeActuator(KubeScaler(api, FAST)), list, demand=demand)
        # Nothing held, nothing answered: a pool at zero stays at zero.
        d = (await ctl.tick())["llama"]
        assert (d.current, d.desired) == (0, 0)
        body = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 4}
        held = asyncio.create_task(s.post(f"{base}/completions", json=body))
        try:
            for _ in range(100):  # bounded: until the gateway reports the request held
                if (await demand()).get("llama", PoolDemand()).held:
                    break
                await asyncio.sleep(0.05)
            d = (await ctl.tick())["llama"]
            assert (d.current, d.desired) == (0, 1) and "from zero" in d.reason
            assert k8s.objects[DEPLOY, "ml", "llama"]["spec"]["replicas"] == 1
            # The replica the Deployment now runs comes up (a real modelserver) and the gateway
            # learns of it (here by a config reload; in a cluster, its EndpointSlice): the
            # request it held all along is answered.
            server, url = start_modelserver()
            await apply_config(runner.app, zero_config([url]))
            r = await asyncio.wait_for(held, 20)
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 4
        finally:
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held
            if server is not None:
                stop(server)
            await runner.cleanup()


async def test_gateways_that_do_not_answer_leave_the_controller_on_agent_states(
    cluster: Any,
) -> None:
    k8s, api = cluster
    now = 5000.0
    async with aiohttp.ClientSession() as s:
        demand = GatewayDemand(["http://127.0.0.1:9"], s, timeout_s=0.5)  # nothing listens
        ctl = kube_controller(api, now, demand=demand)
        assert (await ctl.tick())["llama"].desired == 4  # as without gateways
