"""The agent's manifests render with kustomize and validate against the Kubernetes schemas."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.kustomize import K8S_VERSION, MANIFESTS, render


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render(MANIFESTS / "base" / "agent")


def by_kind(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind)


def test_every_document_validates_strictly(docs: list[dict]) -> None:
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    assert sorted(d["kind"] for d in docs) == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Service"]
    )
    assert all(
        d["metadata"].get("namespace") == "kvpilot"
        for d in docs
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding")
    )


def test_rbac_reads_pods_only(docs: list[dict]) -> None:
    assert by_kind(docs, "ClusterRole")["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    subject = by_kind(docs, "ClusterRoleBinding")["subjects"][0]
    sa = by_kind(docs, "ServiceAccount")["metadata"]
    assert (subject["name"], subject["namespace"]) == (sa["name"], sa["namespace"])


def test_daemonset_runs_on_gpu_nodes_with_what_the_agent_reads(docs: list[dict]) -> None:
    spec = by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expr = term["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert (expr["key"], expr["operator"]) == ("cloud.google.com/gke-accelerator", "Exists")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    c = spec["containers"][0]
    assert c["args"][:3] == ["agent", "--config", "/etc/kvpilot/kvpilot.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["pod-resources"]["mountPath"] == "/var/lib/kubelet/pod-resources"
    assert all(m.get("readOnly") for m in mounts.values())
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # the agent reads every GPU without ever being granted one
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert not spec.get("hostNetwork") and not spec.get("hostPID")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_headless_service_selects_the_agents(docs: list[dict]) -> None:
    svc = by_kind(docs, "Service")["spec"]
    labels = by_kind(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["clusterIP"] == "None"
    assert svc["selector"].items() <= labels.items()
    assert svc["ports"][0]["port"] == 9100
