"""The gateway's manifests render with kustomize and validate against the Kubernetes schemas."""

from __future__ import annotations

import kubernetes_validate
import pytest

from kvpilot.config import load_config
from tests.kustomize import K8S_VERSION, MANIFESTS, render


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render(MANIFESTS / "base" / "gateway")


def test_every_document_validates_strictly(docs: list[dict]) -> None:
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "Service",
            "PodDisruptionBudget",
        ]
    )


def test_rbac_reads_endpointslices_only(docs: list[dict]) -> None:
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == sa["metadata"]["namespace"]


def test_deployment_serves_what_the_service_and_pdb_select(docs: list[dict]) -> None:
    dep = next(d for d in docs if d["kind"] == "Deployment")
    svc = next(d for d in docs if d["kind"] == "Service")
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for sel in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert sel.items() <= pod_labels.items()
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][0] == "gateway" and "--config" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "kvpilot-gateway"
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


def test_the_controller_reads_every_gateway_pod(docs: list[dict]) -> None:
    """controller.gateways names a headless Service that selects the gateway pods on their port."""
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pods = next(d for d in docs if d["metadata"]["name"] == "kvpilot-gateway-pods")
    assert pods["spec"]["clusterIP"] == "None"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pods["spec"]["selector"].items() <= pod_labels.items()
    port = dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert pods["spec"]["ports"][0]["port"] == port
    (url,) = load_config(MANIFESTS / "base" / "kvpilot.yaml").controller.gateways
    ns = pods["metadata"]["namespace"]
    assert url == f"http://kvpilot-gateway-pods.{ns}.svc.cluster.local:{port}"


def test_the_controller_reads_unready_gateways_but_clients_only_ready_ones(
    docs: list[dict],
) -> None:
    """The requests gateways hold are what scales a pool up from zero: the controller's headless
    Service lists gateway pods whether or not they are ready (one still starting, or whose
    discovery has not synced, may already hold requests)."""
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["kvpilot-gateway-pods"]["spec"]["publishNotReadyAddresses"] is True
    assert not services["kvpilot-gateway"]["spec"].get("publishNotReadyAddresses", False)


def test_a_read_only_root_still_leaves_workers_a_writable_tmp(docs: list[dict]) -> None:
    """gateway.workers > 1: the supervisor keeps the workers' shared files under /tmp."""
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume and not mount.get("readOnly", False)
