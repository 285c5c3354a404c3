"""The alert rules and the dashboard: promtool accepts and unit-tests the rules, the rendered
Kubernetes objects carry exactly the source rules, and every series a rule or a panel queries is
one the code exports (or a rule records), so a renamed metric cannot silently blank a panel.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OBS = ROOT / "manifests" / "observability"
RULES = OBS / "rules" / "kvpilot.rules.yml"
RULES_TEST = OBS / "rules" / "kvpilot.rules.test.yml"
DASHBOARD = OBS / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
CODE_DIRS = ("agent", "gateway", "controller", "kvpilot", "modelserver")
BUILTIN_SERIES = {"up"}  # what Prometheus itself records for every target

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus; scripts/debian-deps.sh)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent
    )


def render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_rules", ROOT / "scripts" / "render-rules.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def source_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


# ---- promtool ---------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    out = promtool("check", "rules", RULES.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    out = promtool("test", "rules", RULES_TEST.name)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation fails, so the passing run above means something."""
    tests = yaml.safe_load(RULES_TEST.read_text())
    tests["rule_files"] = [str(RULES)]
    alert_tests = [t for t in tests["tests"] if t.get("alert_rule_test")]
    case = alert_tests[0]["alert_rule_test"][-1]
    case["exp_alerts"] = []  # this alert does fire at that time
    bad = tmp_path / "bad.test.yml"
    bad.write_text(yaml.safe_dump(tests))
    out = promtool("test", "rules", str(bad))
    assert out.returncode != 0
    assert case["alertname"] in out.stdout + out.stderr


def test_every_alert_fires_in_a_unit_test_and_a_look_alike_does_not() -> None:
    alerts = {r["alert"] for r in source_rules() if "alert" in r}
    fired, quiet = set(), set()
    for t in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts - fired == set(), "alerts no unit test fires"
    assert quiet, "no test checks that an alert stays quiet"
    assert {
        "KvpilotReplicaKVCacheNearFull", "KvpilotQueueGrowing", "KvpilotTTFTBudgetBurn",
        "KvpilotAgentScrapeErrors", "KvpilotReplicaStale", "KvpilotGateway5xxRatio",
        "KvpilotRequestsShed", "KvpilotControllerAtMaxReplicas", "KvpilotConfigReloadRejected",
    } <= alerts  # fmt: skip


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    anchors = {_anchor(h) for h in re.findall(r"^#+\s+(.+)$", OPERATIONS.read_text(), re.M)}
    for r in source_rules():
        if "alert" not in r:
            continue
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        doc, _, anchor = r["annotations"]["runbook"].partition("#")
        assert doc == "docs/operations.md" and anchor in anchors, (r["alert"], anchor)


def _anchor(heading: str) -> str:
    """GitHub's heading slug: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# ---- one source of truth ----------------------------------------------------------------------


def test_rendered_files_are_current() -> None:
    mod = render_module()
    stale = [str(p.relative_to(ROOT)) for p in mod.stale(mod.render())]
    assert stale == [], "out of date; run scripts/render-rules.py"


def test_rendered_objects_carry_exactly_the_source_groups() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    pr = yaml.safe_load((OBS / "prometheus-rules.yaml").read_text())
    assert (pr["apiVersion"], pr["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert pr["spec"]["groups"] == groups
    gmp = yaml.safe_load((OBS / "gmp-rules.yaml").read_text())
    assert (gmp["apiVersion"], gmp["kind"]) == ("monitoring.googleapis.com/v1", "ClusterRules")
    assert gmp["spec"]["groups"] == groups


def test_render_check_reports_a_stale_file(tmp_path: Path) -> None:
    mod = render_module()
    files = mod.render()
    target = next(iter(files))
    copy = tmp_path / target.name
    copy.write_text(files[target] + "# edited by hand\n")
    assert mod.stale({copy: files[target]}) == [copy]
    assert mod.stale({copy: files[target] + "# edited by hand\n"}) == []


# ---- every queried series exists --------------------------------------------------------------

_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
_KEYWORDS = {"and", "or", "unless", "bool", "group_left", "group_right", "inf", "nan"}


def _base_name(name: str) -> str:
    for s in _SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords and label names left out)."""
    s = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables: $pool, $__rate_interval
    s = re.sub(r'"(?:[^"\\]|\\.)*"', " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][-+]?\d+)?", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function
        if m.group().lower() not in _KEYWORDS:
            names.add(m.group())
    return names


def exported_names() -> set[str]:
    """Metric names string literals in the code define, normalised to their base name."""
    pattern = re.compile(r"""["']((?:kvpilot_|DCGM_FI_|vllm:)[A-Za-z0-9_:]+)["']""")
    found = set()
    for d in CODE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            found.update(_base_name(n) for n in pattern.findall(path.read_text()))
    return found


def recorded_names() -> set[str]:
    return {r["record"] for r in source_rules() if "record" in r}


def dashboard_exprs(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                yield p["title"], t["expr"]
            yield from walk(p.get("panels", []))

    yield from walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            yield f"variable {var['name']}", inner.group(1) if inner else q


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (pool, le) (rate(kvpilot_gateway_ttft_seconds_bucket"
        '{pool=~"$pool", le="2.5"}[$__rate_interval]))) / on (pool) group_left '
        "pool:kvpilot_gateway_requests:rate5m > 1e-3 and time() - up offset 5m"
    )
    assert metric_names(expr) == {
        "kvpilot_gateway_ttft_seconds_bucket",
        "pool:kvpilot_gateway_requests:rate5m",
        "up",
    }
    assert "kvpilot_gateway_requests" in exported_names()
    assert "DCGM_FI_DEV_FB_USED" in exported_names()


def test_rules_query_only_series_that_exist() -> None:
    known = exported_names() | recorded_names() | BUILTIN_SERIES
    for r in source_rules():
        for name in metric_names(r["expr"]):
            assert _base_name(name) in known or name in known, (r.get("record") or r["alert"], name)


def test_dashboard_parses_and_queries_only_series_that_exist() -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = exported_names() | recorded_names() | BUILTIN_SERIES
    exprs = list(dashboard_exprs(dash))
    assert len(exprs) >= 20
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, (title, expr)
        for name in names:
            assert _base_name(name) in known or name in known, (title, name)


def test_dashboard_has_the_panels_operators_need() -> None:
    dash = json.loads(DASHBOARD.read_text())
    queried = {n for _, e in dashboard_exprs(dash) for n in metric_names(e)}
    for name in (
        "kvpilot_replica_kv_cache_usage_ratio",
        "pool:kvpilot_gateway_queue_length:sum",
        "kvpilot_gateway_ttft_seconds_bucket",
        "kvpilot_gateway_tpot_seconds_bucket",
        "kvpilot_gateway_requests_total",
        "kvpilot_gateway_decisions_total",
        "kvpilot_gpu_memory_used_bytes",
        "kvpilot_gpu_utilization_ratio",
        "kvpilot_controller_desired_replicas",
        "kvpilot_controller_current_replicas",
    ):
        assert name in queried, name
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert any(v["name"] == "datasource" for v in dash["templating"]["list"])
