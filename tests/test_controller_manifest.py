"""manifests/base/controller builds with kustomize and every object validates against the API schema."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.kustomize import K8S_VERSION, MANIFESTS, render


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(MANIFESTS / "base" / "controller")


def test_every_object_validates(objects: list[dict]) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_controller_deployment_runs_two_replicas_with_a_service_account(
    objects: list[dict],
) -> None:
    dep = next(o for o in objects if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "kvpilot-controller"
    assert spec["containers"][0]["args"][:1] == ["controller"]


def test_rbac_covers_scale_placeholders_events_and_leases(objects: list[dict]) -> None:
    def rules(kind: str, name: str) -> list[dict]:
        return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)[
            "rules"
        ]

    cluster = rules("ClusterRole", "kvpilot-controller")
    scale = {r for rule in cluster for r in rule["resources"] if "update" in rule["verbs"]}
    assert {"deployments/scale", "statefulsets/scale", "leaderworkersets/scale"} <= scale
    assert any("events" in r["resources"] and "create" in r["verbs"] for r in cluster)
    ph = rules("Role", "kvpilot-controller-placeholders")
    assert {"create", "delete"} <= set(ph[0]["verbs"])
    ph_role = next(o for o in objects if o["metadata"]["name"] == "kvpilot-controller-placeholders")
    assert ph_role["metadata"]["namespace"] == "kvpilot-placeholders"
    lease = rules("Role", "kvpilot-controller-leader")
    assert lease[0]["resources"] == ["leases"] and "update" in lease[0]["verbs"]


def test_placeholder_priority_class_is_below_zero(objects: list[dict]) -> None:
    pc = next(o for o in objects if o["kind"] == "PriorityClass")
    assert pc["metadata"]["name"] == "kvpilot-placeholder" and pc["value"] == -10
