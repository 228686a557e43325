"""The Prometheus rules through promtool, and the cases their unit tests need (no root).

promtool checks the rules and runs their unit tests (prometheus/warmexec.rules.test.yml), and
every alert and recording rule there has the cases it needs. The scrape of a real supervisor
and a real Prometheus evaluating the rules are in tests/system/test_prometheus.py.

Debian's package `prometheus` provides promtool. Outside CI a missing binary skips these
tests; in CI (CI set in the environment) it fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from ..conftest import REPO

RULES = os.path.join(REPO, "prometheus", "warmexec.rules.yml")
RULES_TEST = os.path.join(REPO, "prometheus", "warmexec.rules.test.yml")
ALERT = re.compile(r"^\s*- alert:\s*(\S+)\s*$", re.M)
RECORD = re.compile(r"^\s*- record:\s*(\S+)\s*$", re.M)
SEVERITIES = {"critical", "warning", "info"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian: apt-get install prometheus)"
    if os.environ.get("CI"):
        pytest.fail(message + ": CI must install it")
    pytest.skip(message)


# ---- the rules (no root) -----------------------------------------------------------
def test_rules_pass_promtool_check_and_their_unit_tests():
    promtool = binary("promtool")
    with open(RULES) as f:
        rules = f.read()
    alerts, records = ALERT.findall(rules), RECORD.findall(rules)
    check = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alerts) + len(records)} rules found" in check.stdout, check.stdout
    unit = subprocess.run([promtool, "test", "rules", RULES_TEST], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(RULES_TEST))
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout, unit.stdout


def test_every_rule_has_unit_tests_that_fire_and_do_not_fire():
    """promtool passes a test file that forgets an alert: make sure none is forgotten.

    Each alert needs a case where it fires, with its severity and summary/description
    annotations spelled out (promtool compares them whole), and a case where it does not;
    each recording rule needs an expression test. Read as text: YAML is not a test dependency.
    """
    with open(RULES) as f:
        rules = f.read()
    with open(RULES_TEST) as f:
        tests = f.read()
    alerts, records = ALERT.findall(rules), RECORD.findall(rules)
    assert len(alerts) >= 7 and len(set(alerts)) == len(alerts), alerts
    for name in ("WarmexecSupervisorDown", "WarmexecContainerExecsFailing", "WarmexecExecFailureRatioHigh",
                 "WarmexecExecLatencyHigh", "WarmexecWorkerCrashLooping", "WarmexecWorkersFatal",
                 "WarmexecHookFailures", "WarmexecEventsDropped"):
        assert name in alerts, f"{name} is missing from the rules"
    for rule in re.split(r"^\s*- alert:", rules, flags=re.M)[1:]:
        name = rule.split()[0]
        severity = re.search(r"^\s*severity:\s*(\S+)", rule, re.M)
        assert severity and severity.group(1) in SEVERITIES, f"{name}: severity label"
        for annotation in ("summary", "description"):
            assert re.search(rf"^\s*{annotation}:", rule, re.M), f"{name}: no {annotation}"
    cases = re.split(r"^\s*- eval_time:", tests, flags=re.M)[1:]
    for name in alerts:
        mine = [c for c in cases if re.search(rf"^\s*alertname:\s*{name}\s*$", c, re.M)]
        assert any(re.search(r"exp_alerts:\s*\[\]", c) for c in mine), f"{name}: no not-firing case"
        firing = [c for c in mine if re.search(r"exp_alerts:\s*\n\s*- exp_labels:", c)]
        assert firing, f"{name}: no firing case"
        assert all("severity:" in c and "summary:" in c and "description:" in c for c in firing), \
            f"{name}: a firing case without its severity and annotations"
    for name in records:
        assert re.search(rf"^\s*- expr:.*\b{re.escape(name)}\b", tests, re.M), f"{name}: no expression test"
