"""The Prometheus rules, the exposition format and the dashboard, through real Prometheus tools.

- promtool checks the rules and runs their unit tests (no root): tests/unit/test_prometheus.py.
- promtool lints a real scrape of the session supervisor after real execs (root).
- A real Prometheus scrapes the hooked session supervisor (the hook panels need hook samples)
  every second and evaluates the rules; every query of every dashboard panel, every variable
  and every rule is then run through its HTTP API and must succeed with data of the expected
  shape (root).

Debian's package `prometheus` provides both binaries. Outside CI a missing binary skips these
tests; in CI (CI set in the environment) it fails them.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

from bench.harness import free_port
from warmexec.protocol.errors import WarmexecError

from ..unit.test_grafana import data_panels, load
from ..unit.test_prometheus import ALERT, RECORD, RULES, SEVERITIES, binary
from .conftest import wait_for, wait_ready
from .crifront import exec_sync, proxy_with_a_container

# What the dashboard's variables and ranges stand for in the queries sent to Prometheus.
RATE_INTERVAL = "1m"  # the whole test fits in it: every exec below is inside every window
RANGE = "1m"
ALL = {"container": ".*", "pod": ".*", "namespace": ".*"}
# Panels whose metrics this test does not exercise: their queries may return nothing.
MAY_BE_EMPTY = {"OOM kills", "Hook failures by kind / reason"}
K8S = {"pod": "probe-0", "namespace": "monitoring"}


# ---- a real scrape (root) ----------------------------------------------------------
@pytest.mark.root
def test_promtool_check_metrics_accepts_a_real_scrape(supervisor, client, container):
    promtool = binary("promtool")
    assert client.exec(container, ["true"])["exit_code"] == 0
    assert client.exec(container, ["sh", "-c", "exit 3"])["exit_code"] == 3
    with pytest.raises(WarmexecError):
        client.exec("no-such-container", ["true"])
    url = f"http://127.0.0.1:{supervisor.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read()
    assert b"warmexec_exec_exits_total{" in text and b"warmexec_exec_errors_total{" in text
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    problems = (lint.stdout + lint.stderr).decode()
    assert lint.returncode == 0 and not problems.strip(), problems


# ---- a real Prometheus (root) ------------------------------------------------------
class Prometheus:
    """`prometheus` on a free loopback port and a private TSDB, scraping one supervisor
    (job warmexec) and, given its port, one warmexec cri (job warmexec-cri)."""

    def __init__(self, workdir: str, metrics_port: int, scrape_configs: str | None = None,
                 cri_port: int | None = None) -> None:
        """scrape_configs: the YAML of the list under `scrape_configs:` (default: one job
        scraping the supervisor's /metrics, and one scraping warmexec cri's with cri_port)."""
        self.started = time.monotonic()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n"
                    "  scrape_interval: 1s\n"
                    "  scrape_timeout: 1s\n"
                    "  evaluation_interval: 1s\n"
                    f"rule_files:\n  - {RULES}\n"
                    "scrape_configs:\n"
                    + (scrape_configs or "  - job_name: warmexec\n"
                                         "    static_configs:\n"
                                         f"      - targets: ['127.0.0.1:{metrics_port}']\n")
                    + ("  - job_name: warmexec-cri\n"
                       "    static_configs:\n"
                       f"      - targets: ['127.0.0.1:{cri_port}']\n" if cri_port else ""))
        self.log_path = os.path.join(workdir, "prometheus.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self._ready, 30, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.read_log()}")
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def read_log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-5000:]

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/PATH; the "data" of a successful answer (an error fails the test)."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query, with Prometheus' reason
            body = json.load(e)
        assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def query_range(self, expr: str, seconds: int) -> dict:
        end = time.time()
        return self.api("query_range", query=expr, start=f"{end - seconds:.3f}", end=f"{end:.3f}", step="1")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cri_proxy(box, supervisor, client):
    """warmexec cri and a CRI container it serves: the dashboard's CRI panels."""
    with proxy_with_a_container(box, supervisor, client, "prom-cri") as front_and_cid:
        yield front_and_cid


@pytest.fixture
def prometheus(hooked_supervisor, cri_proxy, tmp_path) -> Iterator[Prometheus]:
    """Scraping the hooked supervisor (the dashboard's hook panels need hook samples) and
    the CRI proxy."""
    prom = Prometheus(str(tmp_path), hooked_supervisor.metrics_port, cri_port=cri_proxy[0].metrics_port)
    try:
        yield prom
    finally:
        prom.stop()


def substitute(expr: str, **variables: str) -> str:
    """What Grafana sends for a dashboard query: its variables and intervals filled in."""
    values = {**ALL, **variables}
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RANGE)
    return re.sub(r"\$\{?(container|pod|namespace)\}?", lambda m: values[m.group(1)], expr)


def values(result: list[dict]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def label_values(prom: Prometheus, query: str) -> list[str]:
    """Grafana's label_values(SELECTOR, LABEL): Prometheus' label values API, matched."""
    selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", query).groups()
    return prom.api(f"label/{label}/values", **{"match[]": selector})


def exercise(client, container: str, k8s: str, cri=None) -> None:
    """One round of execs with every outcome the dashboard shows, bar OOM kills and hook
    failures; and, given (front, container id), ExecSyncs through warmexec cri both ways."""
    if cri is not None:
        front, cid = cri
        for _ in range(3):
            assert exec_sync(front.channel, cid, ["true"])[2] == 0
        assert exec_sync(front.channel, "no-such-container", ["true"])[2] == 42  # the runtime's
    for _ in range(3):
        assert client.exec(container, ["true"])["exit_code"] == 0
    assert client.exec(container, ["sh", "-c", "exit 3"])["exit_code"] == 3
    assert client.exec(container, ["sleep", "5"], timeout=0.2)["timed_out"]
    with pytest.raises(WarmexecError) as e:
        client.exec("no-such-container", ["true"])
    assert e.value.code == "NO_SUCH_CONTAINER"
    with pytest.raises(WarmexecError) as e:
        client.exec(container, ["true"], cwd="/does/not/exist")
    assert e.value.code == "BAD_CWD"
    # the Kubernetes container's probe mostly fails: 3 in 4
    for _ in range(3):
        assert client.exec(k8s, ["sh", "-c", "exit 1"])["exit_code"] == 1
    assert client.exec(k8s, ["true"])["exit_code"] == 0


@pytest.mark.root
def test_prometheus_evaluates_every_dashboard_query_and_rule(box, hooked_client, hooked_container,
                                                              dashboard_probed, cri_proxy, prometheus):
    cfg = box.config()
    cfg["annotations"] = {"io.kubernetes.cri.sandbox-name": K8S["pod"],
                          "io.kubernetes.cri.sandbox-namespace": K8S["namespace"]}
    k8s = box.run("prom-probe", cfg)
    try:
        wait_ready(hooked_client, k8s)
        _check(prometheus, hooked_client, hooked_container, k8s, dashboard_probed, cri_proxy)
    finally:
        box.delete(k8s)
        wait_for(lambda: all(r["id"] != k8s for r in hooked_client.list()), 10, "the probe container to go")
    assert time.monotonic() - prometheus.started < 60, "keep this test under a minute"


def _check(prom: Prometheus, client, container: str, k8s: str, probed: str, cri) -> None:
    # ---- scrapes: two rounds of execs, each seen by Prometheus, so rate() has an increase
    wait_for(lambda: values(prom.query('up{job="warmexec"}')["result"]) == [1.0], 15,
             "Prometheus to scrape the supervisor")
    probe_failures = f'warmexec_exec_exits_total{{container="{k8s}",code="1"}}'
    wait_for(lambda: values(prom.query('up{job="warmexec-cri"}')["result"]) == [1.0], 15,
             "Prometheus to scrape warmexec cri")
    warm = 'warmexec_cri_execsync_total{path="warm",reason="served"}'
    for total in (3.0, 6.0):
        exercise(client, container, k8s, cri)
        wait_for(lambda total=total: values(prom.query(probe_failures)["result"]) == [total], 15,
                 f"Prometheus to scrape {total:.0f} failed probes")
        # 1 more: the fixture's first ExecSync, which waited for the proxy to serve the container
        wait_for(lambda total=total: values(prom.query(warm)["result"]) == [1 + total], 15,
                 f"Prometheus to scrape {total:.0f} warm ExecSyncs")
    # the supervisor's scrape and the rules are healthy
    targets = {t["labels"]["job"]: t for t in prom.api("targets", state="active")["activeTargets"]}
    assert set(targets) == {"warmexec", "warmexec-cri"}, targets
    assert all(t["health"] == "up" for t in targets.values()), targets

    def evaluated() -> list[dict] | None:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None
    rules = wait_for(evaluated, 10, "every rule to be evaluated without error")
    with open(RULES) as f:
        text = f.read()
    assert sorted(r["name"] for r in rules) == sorted(ALERT.findall(text) + RECORD.findall(text))

    # ---- every query of every panel, instant and over a range
    results: dict[str, list[dict]] = {}
    for panel in data_panels(load()):
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            data = prom.query(expr)
            assert data["resultType"] == "vector", f"{panel['title']}: {expr}"
            where = f"{panel['title']} [{target.get('legendFormat')}]: {expr}"
            if panel["title"] not in MAY_BE_EMPTY:
                assert data["result"], f"no data for {where}"
            if target.get("range", True):
                matrix = prom.query_range(expr, 20)
                assert matrix["resultType"] == "matrix", where
                if panel["title"] not in MAY_BE_EMPTY:
                    assert matrix["result"] and all(s["values"] for s in matrix["result"]), where
            results[f"{panel['title']}/{target['refId']}"] = data["result"]

    def panel(title: str, ref: str = "A") -> list[dict]:
        return results[f"{title}/{ref}"]

    assert values(panel("Exec rate"))[0] > 0
    assert 0 < values(panel("Failure ratio"))[0] < 1
    for title in ("Latency p50", "Latency p99"):
        (p,) = values(panel(title))
        assert math.isfinite(p) and 0 < p <= 60, (title, p)
    for ref in "ABC":
        for title in ("Exec duration p50 / p90 / p99", "Spawn latency p50 / p90 / p99"):
            (p,) = values(panel(title, ref))
            assert math.isfinite(p) and p > 0, (title, ref, p)
    codes = {s["metric"]["code"] for s in panel("Exits by code")}
    assert {"0", "1", "3", "137"} <= codes, codes
    assert {s["metric"]["code"] for s in panel("Errors by code")} >= {"NO_SUCH_CONTAINER", "BAD_CWD"}
    nonzero = {s["metric"]["container"]: s["metric"] for s in panel("Non-zero exits by container")}
    assert nonzero[k8s].get("pod") == K8S["pod"] and nonzero[k8s].get("namespace") == K8S["namespace"]
    assert container in nonzero and "pod" not in nonzero[container]  # Prometheus drops empty labels
    assert container in {s["metric"]["container"] for s in panel("Timeouts")}
    states = {s["metric"]["state"]: float(s["value"][1]) for s in panel("Workers by state")}
    assert set(states) == {"STARTING", "JOINING", "READY", "BACKOFF", "FATAL"} and states["READY"] >= 2
    assert values(panel("Workers READY", "B"))[0] >= 2  # active containers
    assert values(panel("Events dropped")) == [0.0]
    # probe: the hooks of scheduled probes' changes (the hooked supervisor's probe has none)
    assert {s["metric"]["kind"] for s in panel("Hook runs by kind")} == {"start", "exit", "probe"}
    # the hooked supervisor's DASHBOARD_PROBE fails in `probed`, and outlasts its period
    assert values(panel("Probes unhealthy / last run failed", "A")) == [1.0]
    assert [s["metric"]["container"] for s in panel("Unhealthy probes")] == [probed]
    ratios = {s["metric"]["container"]: float(s["value"][1])
              for s in panel("Probe success ratio by container")}
    assert ratios == {probed: 0.0}
    assert ("dashboard", "running") in {(s["metric"]["probe"], s["metric"]["reason"])
                                        for s in panel("Probe ticks skipped")}
    by_path = {(s["metric"]["path"], s["metric"]["reason"]): float(s["value"][1])
               for s in panel("CRI ExecSync by path / reason")}
    assert by_path[("warm", "served")] > 0 and by_path[("upstream", "unknown_container")] > 0, by_path
    for ref in "AB":
        paths = {s["metric"]["path"]: float(s["value"][1])
                 for s in panel("CRI ExecSync p50 / p99 by path", ref)}
        assert 0 < paths["warm"] <= 60 and 0 < paths["upstream"] <= 60, (ref, paths)
    assert [s["metric"]["kind"] for s in panel("CRI upstream")] == ["containerd"]

    # ---- the variables: label_values() is Grafana's call of the label values API
    for name, query in (("namespace", "label_values(warmexec_exec_exits_total, namespace)"),
                        ("pod", 'label_values(warmexec_exec_exits_total{namespace=~"$namespace"}, pod)'),
                        ("container", 'label_values(warmexec_exec_exits_total{namespace=~"$namespace",'
                                      'pod=~"$pod"}, container)')):
        var = next(v for v in load()["templating"]["list"] if v["name"] == name)
        assert var["query"]["query"] == query
        got = label_values(prom, substitute(query))
        want = {"namespace": K8S["namespace"], "pod": K8S["pod"], "container": container}[name]
        assert want in got, (name, got)
    # one namespace and pod selected: only the probe container
    only = 'label_values(warmexec_exec_exits_total{namespace=~"$namespace",pod=~"$pod"}, container)'
    assert label_values(prom, substitute(only, **K8S)) == [k8s]
    expr = next(t["expr"] for p in data_panels(load()) if p["title"] == "Non-zero exits by container"
                for t in p["targets"])
    selected = prom.query(substitute(expr, **K8S))["result"]
    assert [s["metric"]["container"] for s in selected] == [k8s]

    # ---- every rule's expression, and what Prometheus recorded and alerted
    for rule in rules:
        data = prom.query(rule["query"])
        assert data["resultType"] == "vector", rule["name"]
        if rule["type"] == "recording":
            assert data["result"], f"no data for recording rule {rule['name']}: {rule['query']}"
            name = rule["name"]
            wait_for(lambda name=name: prom.query(name)["result"], 10, f"{name} to be recorded")
        else:
            assert rule["labels"].get("severity") in SEVERITIES, rule["name"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["name"]
    p99 = values(prom.query("instance:warmexec_exec_duration_seconds:p99_5m")["result"])
    assert len(p99) == 1 and math.isfinite(p99[0])

    def probe_alert() -> dict | None:
        return next((a for a in prom.api("alerts")["alerts"]
                     if a["labels"]["alertname"] == "WarmexecContainerExecsFailing"
                     and a["labels"].get("container") == k8s), None)
    alert = wait_for(probe_alert, 10, "WarmexecContainerExecsFailing to be pending for the probe container")
    assert alert["state"] == "pending"  # for: 5m
    assert alert["labels"]["pod"] == K8S["pod"] and alert["labels"]["namespace"] == K8S["namespace"]
    assert alert["annotations"]["summary"] == (
        f"Most execs in container {k8s} (pod {K8S['namespace']}/{K8S['pod']}) on "
        f"{alert['labels']['instance']} exit non-zero")
    assert alert["annotations"]["description"].startswith("75% of the execs"), alert["annotations"]
    firing = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}
    assert "WarmexecSupervisorDown" not in firing, firing
