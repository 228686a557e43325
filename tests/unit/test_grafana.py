"""The Grafana dashboard queries only what the supervisor exports, the way Grafana expects.

These lint tests need no root: they read grafana/ and a private metrics registry. The root
test (tests/system/test_grafana.py) scrapes a real supervisor after real execs and finds
every metric the dashboard queries.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from warmexec.supervisor.cri_metrics import CriMetrics
from warmexec.supervisor.metrics import Metrics

from ..conftest import REPO

GRAFANA = os.path.join(REPO, "grafana")
DASHBOARD = os.path.join(GRAFANA, "dashboards", "warmexec.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Overview", "Latency", "Exit codes", "Errors", "Workers", "Probes", "Hooks", "CRI"]
METRIC = re.compile(r"warmexec_[a-z_]+")
SELECTOR = re.compile(r"(warmexec_[a-z_]+)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
RANGE_FUNCS = re.compile(r"\b(?:rate|irate|increase)\(")
# Chained: a namespace narrows the pods offered, a namespace and pod narrow the containers.
FILTERS = {
    "namespace": "label_values(warmexec_exec_exits_total, namespace)",
    "pod": 'label_values(warmexec_exec_exits_total{namespace=~"$namespace"}, pod)',
    "container": 'label_values(warmexec_exec_exits_total{namespace=~"$namespace",pod=~"$pod"}, container)',
}


# ---- helpers ---------------------------------------------------------------------
def load() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(dash: dict) -> Iterator[dict]:
    """Every panel, rows included, with the panels of collapsed rows."""
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def data_panels(dash: dict) -> list[dict]:
    return [p for p in all_panels(dash) if p["type"] != "row"]


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in data_panels(dash) for t in p.get("targets", [])]


def queried_metrics(dash: dict) -> set[str]:
    names = {m for e in exprs(dash) for m in METRIC.findall(e)}
    for var in dash["templating"]["list"]:
        q = var.get("query")
        names |= set(METRIC.findall(q["query"] if isinstance(q, dict) else str(q)))
    return names


def call_args(expr: str, start: int) -> str:
    """The text between the parenthesis at expr[start] and its match (quotes respected)."""
    depth, quote = 0, None
    for i in range(start, len(expr)):
        ch = expr[i]
        if quote:
            if ch == "\\":
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return expr[start + 1:i]
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from a private registry after one call of every recorder
    (the supervisor's and warmexec cri's, which a real Prometheus scrapes as two targets).

    Labelled metrics have no samples until a child exists, so each is touched once; the
    result is cross-checked against the families' declared types so nothing is missed.
    """
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.watch(lambda: ())
    ex = SimpleNamespace(req=SimpleNamespace(container="c1"))
    m.spawned("c1", 0.001)
    m.finished(ex, {"ok": True, "exit_code": 137, "signal": 9, "timings": {"total": 1500},
                    "timed_out": True, "oom_killed": True})
    m.finished(ex, {"ok": False, "error": {"code": "BAD_CWD"}})
    m.error("NO_SUCH_CONTAINER")
    m.worker_restart()
    m.warmup(0.01)
    m.hook("start")
    m.hook("exit", "timeout")
    m.hook_duration("start", 0.2)
    m.request(120)
    m.watch_probes(lambda: [("alive", "c1", True, "healthy")])
    m.probe_result("alive", "c1", "success", 0.002, 0.0001)
    m.probe_transition("alive", "c1", "healthy")
    m.probe_skip("alive", "running")
    cri = CriMetrics(registry)  # warmexec cri's own registry, here beside the supervisor's
    cri.execsync("warm", "served", 0.001, "c1")
    cri.upstream_kind("containerd")
    names: dict[str, set[str]] = {}
    declared: set[str] = set()
    for family in registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        declared |= {family.name + s for s in suffixes}
        for s in family.samples:
            names.setdefault(s.name, set()).update(s.labels)
    assert set(names) == declared, "a recorder was not exercised: update exported()"
    return names


# ---- lint (no root) --------------------------------------------------------------
def test_dashboard_identity_and_variables():
    dash = load()
    assert dash["uid"] == "warmexec-overview" and dash["title"] == "warmexec"
    assert dash["schemaVersion"] == 39 and dash.get("id") is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert list(variables) == ["datasource", *FILTERS]
    for name, query in FILTERS.items():
        v = variables[name]
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        assert q == query and v["definition"] == query, name
        assert v["type"] == "query" and v["datasource"] == DS, name
        # All is ".*", which also matches the empty pod/namespace of non-Kubernetes containers
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", name
    assert [p["title"] for p in dash["panels"] if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_uses_the_datasource_variable_and_a_unit():
    dash = load()
    panels = data_panels(dash)
    assert len(panels) >= 15
    for p in all_panels(dash):
        if p["type"] == "row":
            assert p.get("datasource", DS) == DS, p["title"]
            continue
        assert p["datasource"] == DS, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        assert p["targets"], f"{p['title']}: no query"
        for t in p["targets"]:
            assert t.get("datasource", DS) == DS, p["title"]
            assert t["expr"].strip(), p["title"]
    # panels in collapsed rows are checked too: make sure there are some
    assert any(p.get("panels") for p in dash["panels"] if p["type"] == "row")


def test_every_rate_uses_rate_interval():
    """rate() over $__rate_interval everywhere; the one exception is a stat's count over the
    dashboard's range, increase(...[$__range]) in an instant query (e.g. events dropped)."""
    for p in data_panels(load()):
        for t in p["targets"]:
            expr = t["expr"]
            whole_range = p["type"] == "stat" and t.get("instant") and not t.get("range")
            calls = list(RANGE_FUNCS.finditer(expr))
            for call in calls:
                args = call_args(expr, call.end() - 1).rstrip()
                if whole_range and call.group(0) == "increase(" and args.endswith("[$__range]"):
                    continue
                assert args.endswith("[$__rate_interval]"), \
                    f"{call.group(0)} without $__rate_interval: {expr}"
            ranges = re.findall(r"\[([^\]]*)\]", expr)
            allowed = {"$__rate_interval", "$__range"} if whole_range else {"$__rate_interval"}
            assert all(r in allowed for r in ranges), expr
            assert len(ranges) == len(calls), f"a range vector outside rate(): {expr}"


def test_dashboard_queries_only_exported_metrics_and_labels():
    dash = load()
    names = exported()
    used = queried_metrics(dash)
    assert used, "no metric found in the dashboard"
    assert used <= set(names), f"not exported by the supervisor or the CRI proxy: {sorted(used - set(names))}"
    # every warmexec metric is on the dashboard (the _sum/_count of histograms aside; the
    # standard process_*/python_* collectors are for generic process dashboards)
    wanted = {n for n in names if n.startswith("warmexec_") and not n.endswith(("_sum", "_count"))}
    assert wanted <= used, f"exported but not on the dashboard: {sorted(wanted - used)}"
    for p in data_panels(dash):
        for t in p["targets"]:
            expr = t["expr"]
            for metric, body in SELECTOR.findall(expr):
                for label in MATCHER.findall(body):
                    assert label in names[metric], f"{p['title']}: {metric} has no label {label!r}"
            metrics_here = set(METRIC.findall(expr))
            available = set().union(*(names[m] for m in metrics_here))
            grouped = {x.strip() for group in BY.findall(expr) for x in group.split(",") if x.strip()}
            assert grouped <= available, f"{p['title']}: grouping by {sorted(grouped - available)}"
            legend = set(LEGEND.findall(t.get("legendFormat", "")))
            assert legend <= grouped, f"{p['title']}: legend {sorted(legend - grouped)} not in by()"
            # the container, pod and namespace filters apply wherever the metric carries the label
            for metric in metrics_here:
                for label in FILTERS:
                    if label not in names[metric]:
                        continue
                    selectors = re.findall(re.escape(metric) + r"\{([^}]*)\}", expr)
                    assert selectors and all(f'{label}=~"${label}"' in sel for sel in selectors), \
                        f"{p['title']}: {metric} not filtered by ${label}"
    # the variables' own queries only use exported labels
    for query in FILTERS.values():
        (metric, body), = SELECTOR.findall(query) or [("warmexec_exec_exits_total", "")]
        label = re.search(r",\s*([a-z_]+)\)$", query).group(1)
        assert {label, *MATCHER.findall(body)} <= names[metric], query


def test_quantiles_aggregate_buckets_by_le():
    for expr in exprs(load()):
        for call in re.finditer(r"histogram_quantile\(", expr):
            args = call_args(expr, call.end() - 1)
            assert re.search(r"sum by \(le(, [a-z]+)?\) \(rate\(warmexec_[a-z_]+_bucket", args), expr


def test_provisioning_files():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(GRAFANA, "provisioning", "datasources", "warmexec.yaml")) as f:
        ds = yaml.safe_load(f)
    (source,) = ds["datasources"]
    assert ds["apiVersion"] == 1
    assert (source["type"], source["uid"]) == ("prometheus", "prometheus")
    assert source["url"] == "http://localhost:9090"
    with open(os.path.join(GRAFANA, "provisioning", "dashboards", "warmexec.yaml")) as f:
        dp = yaml.safe_load(f)
    (provider,) = dp["providers"]
    assert dp["apiVersion"] == 1 and provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/warmexec"
