"""manifests/: what `kubectl kustomize` renders is valid Kubernetes, and its parts fit together.

Core objects are validated against the Kubernetes JSON schemas (kubernetes_validate, strict: an
unknown field fails); custom resources (PodMonitoring, ServiceMonitor, PrometheusRule, ...) have no
schema there, so they are only checked for shape. The cross-checks catch drift between files that
different people edit: a pod that mounts a ConfigMap or uses a ServiceAccount the render lacks, a
namespace nobody creates, a monitor whose selector or port matches no pod, a config that points at
a Service or port that does not exist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvpilot.config import load_config, parse_listen
from tests.kustomize import K8S_VERSION, render

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "manifests" / "base"
OBS = ROOT / "manifests" / "observability"
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "ClusterRules",
    "CustomResourceDefinition", "StorageClass",
}  # fmt: skip
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet"}

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed (scripts/debian-deps.sh installs it)",
)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def is_core(obj: dict[str, Any]) -> bool:
    """Kinds the Kubernetes schemas know: the built-in API groups."""
    group = obj["apiVersion"].rpartition("/")[0]
    return group == "" or group.endswith(".k8s.io") or group in {"apps", "batch", "policy"}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (scripts/debian-deps.sh installs it)")
    return render(BASE)


@pytest.fixture(scope="module")
def observability() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (scripts/debian-deps.sh installs it)")
    objs = render(OBS)
    # The Prometheus Operator flavour is applied as plain files (docs/operations.md).
    for name in ("servicemonitors.yaml", "prometheus-rules.yaml"):
        objs += load_yaml_docs(OBS / name)
    return objs


# ---- the base: valid objects ----------------------------------------------------------------


@needs_kubectl
def test_base_renders_the_namespace_config_and_components(base: list[dict[str, Any]]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in base}
    assert ("Namespace", "kvpilot") in kinds
    assert ("ConfigMap", "kvpilot-config") in kinds
    for component in ("agent", "gateway", "controller"):
        if (BASE / component / "kustomization.yaml").exists():
            assert any(
                o["kind"] in WORKLOADS and o["metadata"]["name"] == f"kvpilot-{component}"
                for o in base
            ), f"manifests/base/{component} exists but kvpilot-{component} is not rendered"


@needs_kubectl
def test_every_core_object_validates_against_the_kubernetes_schema(
    base: list[dict[str, Any]],
) -> None:
    checked = 0
    for obj in base:
        assert {"apiVersion", "kind", "metadata"} <= obj.keys(), obj
        if not is_core(obj):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 3


def test_schema_validation_catches_a_bad_object() -> None:
    """The validator is strict: an unknown field and a wrong type both fail (so the test above can)."""
    bad = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "x", "labelz": {}},
        "data": {"a": 1},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# ---- the base: parts that must fit together -------------------------------------------------


@needs_kubectl
def test_every_namespace_used_is_created_by_the_render(base: list[dict[str, Any]]) -> None:
    created = {o["metadata"]["name"] for o in find(base, "Namespace")}
    for obj in base:
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], f"{obj['kind']} is cluster-scoped"
            continue
        ns = obj["metadata"].get("namespace")
        assert ns, f"{obj['kind']}/{obj['metadata']['name']} has no namespace"
        assert ns in created, f"{obj['kind']}/{obj['metadata']['name']}: namespace {ns} not created"


@needs_kubectl
def test_pods_find_their_configmaps_and_service_accounts(base: list[dict[str, Any]]) -> None:
    have = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in base}
    workloads = [o for o in base if o["kind"] in WORKLOADS]
    assert workloads
    for w in workloads:
        ns, spec = w["metadata"]["namespace"], pod_spec(w)
        sa = spec.get("serviceAccountName", "default")
        if sa != "default":
            assert ("ServiceAccount", ns, sa) in have, f"{w['metadata']['name']}: no SA {ns}/{sa}"
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                cm = vol["configMap"]["name"]
                assert ("ConfigMap", ns, cm) in have, (
                    f"{w['metadata']['name']}: no ConfigMap {ns}/{cm}"
                )


@needs_kubectl
def test_role_bindings_name_service_accounts_that_exist(base: list[dict[str, Any]]) -> None:
    have = {
        (o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in find(base, "ServiceAccount")
    }
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in base}
    for b in find(base, "RoleBinding") + find(base, "ClusterRoleBinding"):
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], ns, ref["name"]) in roles, f"{b['metadata']['name']}: no {ref}"
        for s in b["subjects"]:
            if s["kind"] == "ServiceAccount":
                assert (s["namespace"], s["name"]) in have, f"{b['metadata']['name']}: no SA {s}"


@needs_kubectl
def test_every_image_is_pinned(base: list[dict[str, Any]]) -> None:
    for w in (o for o in base if o["kind"] in WORKLOADS):
        for c in pod_spec(w)["containers"]:
            image = c["image"]
            assert "/" in image and ":" in image.rsplit("/", 1)[1], image
            assert not image.endswith(":latest"), image


# ---- kvpilot.yaml: our own loader, and what it points at ---------------------------------------


def test_in_cluster_config_passes_the_loader() -> None:
    cfg = load_config(BASE / "kvpilot.yaml")
    assert cfg.pools and all(p.selector and not p.endpoints for p in cfg.pools)
    assert cfg.agent.gpus == "nvml" and cfg.agent.kubernetes
    assert cfg.gateway.kubernetes and cfg.gateway.policy == "headroom"
    assert cfg.controller.mode == "kubernetes"
    assert set(cfg.controller.pools) <= {p.name for p in cfg.pools}


@needs_kubectl
def test_configmap_carries_kvpilot_yaml_verbatim(base: list[dict[str, Any]]) -> None:
    for cm in find(base, "ConfigMap", "kvpilot-config"):
        assert cm["data"]["kvpilot.yaml"] == (BASE / "kvpilot.yaml").read_text()


def _container_port(objs: list[dict[str, Any]], workload: str) -> dict[str, int]:
    ports: dict[str, int] = {}
    for w in objs:
        if w["kind"] in WORKLOADS and w["metadata"]["name"] == workload:
            for c in pod_spec(w)["containers"]:
                ports.update({p["name"]: p["containerPort"] for p in c.get("ports", [])})
    return ports


@needs_kubectl
def test_config_addresses_match_the_manifests(base: list[dict[str, Any]]) -> None:
    cfg = load_config(BASE / "kvpilot.yaml")
    for component, listen in (
        ("agent", cfg.agent.listen),
        ("gateway", cfg.gateway.listen),
        ("controller", cfg.controller.listen),
    ):
        ports = _container_port(base, f"kvpilot-{component}")
        if ports:
            assert parse_listen(listen)[1] in ports.values(), f"{component}.listen vs {ports}"
    services = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): {p["port"] for p in s["spec"]["ports"]}
        for s in find(base, "Service")
    }
    if find(base, "DaemonSet", "kvpilot-agent"):
        for url in cfg.gateway.agents:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            name, ns = host.split(".")[:2]
            assert int(port) in services.get((ns, name), set()), f"gateway.agents: {url}"
    namespaces = {o["metadata"]["name"] for o in find(base, "Namespace")}
    if find(base, "Deployment", "kvpilot-controller"):
        lease_ns = cfg.controller.lease_namespace
        assert lease_ns in namespaces
        lease_roles = {
            r["metadata"]["name"]
            for r in find(base, "Role")
            if r["metadata"]["namespace"] == lease_ns
            and any("leases" in rule.get("resources", []) for rule in r["rules"])
        }
        bound = [
            b
            for b in find(base, "RoleBinding")
            if b["metadata"]["namespace"] == lease_ns and b["roleRef"]["name"] in lease_roles
            and any(s["name"] == "kvpilot-controller" for s in b["subjects"])
        ]  # fmt: skip
        assert bound, (
            f"controller.lease_namespace {lease_ns}: no Role lets the controller hold Leases"
        )
        if cfg.controller.node_actuator == "placeholders":
            assert cfg.controller.placeholder_namespace in namespaces
            assert find(base, "PriorityClass", cfg.controller.placeholder_priority_class)


# ---- observability --------------------------------------------------------------------------


@needs_kubectl
def test_observability_objects_parse_and_core_ones_validate(
    observability: list[dict[str, Any]],
) -> None:
    kinds = {o["kind"] for o in observability}
    assert {
        "PodMonitoring",
        "ClusterRules",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    } <= kinds
    for obj in observability:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace"), obj["metadata"]["name"]
        if is_core(obj):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        else:
            assert isinstance(obj.get("spec"), dict) and obj["spec"], obj["metadata"]["name"]


@needs_kubectl
def test_dashboard_configmap_is_for_the_grafana_sidecar(
    observability: list[dict[str, Any]],
) -> None:
    (cm,) = find(observability, "ConfigMap", "kvpilot-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert json.loads(text) == json.loads((OBS / "grafana-dashboard.json").read_text())


def _monitors(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[str]]]:
    """(monitor, port names it scrapes) for every PodMonitoring, ServiceMonitor and PodMonitor."""
    out = []
    for m in objs:
        if m["kind"] in ("PodMonitoring", "ServiceMonitor"):
            out.append((m, [e["port"] for e in m["spec"]["endpoints"]]))
        elif m["kind"] == "PodMonitor":
            out.append((m, [e["port"] for e in m["spec"]["podMetricsEndpoints"]]))
    return out


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@needs_kubectl
def test_monitors_select_the_component_pods_and_ports(
    base: list[dict[str, Any]], observability: list[dict[str, Any]]
) -> None:
    workloads = [o for o in base if o["kind"] in WORKLOADS]
    services = find(base, "Service")
    monitors = _monitors(observability)
    assert len(monitors) == 6
    for m, ports in monitors:
        name, ns = m["metadata"]["name"], m["metadata"]["namespace"]
        component = name.removeprefix("kvpilot-")
        if not (BASE / component).is_dir():
            continue  # that component's manifests are not in this tree yet
        sel = m["spec"]["selector"]["matchLabels"]
        if m["kind"] == "ServiceMonitor":
            targets = [s for s in services if s["metadata"]["namespace"] == ns]
            hits = [s for s in targets if _matches(sel, s["metadata"].get("labels", {}))]
            have = {p.get("name") for s in hits for p in s["spec"]["ports"]}
        else:
            targets = [w for w in workloads if w["metadata"]["namespace"] == ns]
            hits = [
                w for w in targets if _matches(sel, w["spec"]["template"]["metadata"]["labels"])
            ]
            have = {
                p.get("name") for w in hits for c in pod_spec(w)["containers"] for p in c["ports"]
            }
        assert hits, f"{m['kind']} {ns}/{name} selects nothing in namespace {ns}"
        assert set(ports) <= have, f"{m['kind']} {ns}/{name} scrapes {ports}; pods have {have}"
