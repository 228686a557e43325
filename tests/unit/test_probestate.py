"""Scheduled probes as pure logic: [[probes]] parsing, Kubernetes' thresholds, spreading,
the grid of runs, selectors and the `warmexec probes` table (tests/system/test_scheduler.py
runs them against real containers)."""

from __future__ import annotations

import pytest

from warmexec.supervisor.cli import probe_table
from warmexec.supervisor.names import docker_health
from warmexec.supervisor.probeconfig import docker_spec, parse_modules, parse_probes
from warmexec.supervisor.probestate import HEALTHY, UNHEALTHY, UNKNOWN, Health, next_run, offset, selects

MODULES = parse_modules({"alive": {"argv": ["cat", "/tmp/ok"], "timeout": 9, "regex": "ok"}})


def test_a_probe_takes_its_modules_command_and_kubernetes_defaults():
    (p,) = parse_probes([{"name": "web", "module": "alive"}], MODULES)
    assert p.module.argv == ("cat", "/tmp/ok") and p.module.regex is not None
    defaults = (p.timeout, p.period, p.initial_delay, p.success_threshold, p.failure_threshold)
    assert defaults == (1, 10, 0, 1, 3)
    assert p.containers == ("*",) and p.annotations == () and p.hook == ()
    (q,) = parse_probes([{"name": "own", "argv": ["true"], "exit_codes": [0, 1], "timeout": 2, "period": 0.5,
                          "containers": ["web-*"], "annotations": {"io.kubernetes.container.name": "nginx"},
                          "hook": ["/bin/hook"]}], MODULES)
    assert (q.module.argv, q.module.exit_codes, q.timeout, q.period) == (("true",), {0, 1}, 2, 0.5)
    assert q.annotations == (("io.kubernetes.container.name", "nginx"),) and q.hook == ("/bin/hook",)


@pytest.mark.parametrize("body, words", [
    ({"module": "alive"}, "name must be"),
    ({"name": "a", "module": "alive", "argv": ["x"]}, "either module"),
    ({"name": "a"}, "either module"),
    ({"name": "a", "module": "nope"}, "no [probe_modules.nope]"),
    ({"name": "a", "module": "alive", "regex": "x"}, "regex belongs to the module"),
    ({"name": "a", "argv": ["x"], "period": 0}, "period must be in"),
    ({"name": "a", "argv": ["x"], "initial_delay": -1}, "initial_delay must be in [0"),
    ({"name": "a", "argv": ["x"], "failure_threshold": 0}, "failure_threshold must be"),
    ({"name": "a", "argv": ["x"], "containers": []}, "containers must be"),
    ({"name": "a", "argv": ["x"], "annotations": {"k": 1}}, "annotations must be"),
    ({"name": "a", "argv": ["x"], "hook": "restart"}, "hook must be"),
    ({"name": "a", "argv": ["x"], "perod": 3}, "unknown key 'perod'"),
])
def test_a_bad_probe_is_refused_saying_what_is_wrong(body, words):
    with pytest.raises(ValueError) as e:
        parse_probes([body], MODULES)
    assert words in str(e.value)


def test_two_probes_of_one_name_are_refused():
    with pytest.raises(ValueError, match="two probes are named 'a'"):
        parse_probes([{"name": "a", "argv": ["x"]}, {"name": "a", "argv": ["y"]}], MODULES)


def test_health_changes_only_after_threshold_results_in_a_row():
    h = Health(success_threshold=2, failure_threshold=3)
    assert [h.record(ok) for ok in (False, False)] == [None, None] and h.status == UNKNOWN
    assert h.record(False) == UNHEALTHY
    assert h.record(False) is None  # already unhealthy: no change, no transition
    assert [h.record(ok) for ok in (True, False, True)] == [None, None, None]  # broken streaks
    assert h.record(True) == HEALTHY and h.streak == 2
    assert [h.record(ok) for ok in (False, False, True, False, False)] == [None] * 5
    assert h.record(False) == UNHEALTHY


def test_the_first_success_makes_a_default_probe_healthy():
    h = Health(success_threshold=1, failure_threshold=3)
    assert h.record(True) == HEALTHY


def test_offsets_are_fixed_within_the_period_and_spread():
    period = 1.0
    offsets = [offset("alive", f"c{i}", period) for i in range(500)]
    assert offsets == [offset("alive", f"c{i}", period) for i in range(500)]
    assert all(0 <= o < period for o in offsets)
    # 500 pairs in ten slices of the period: none holds more than twice its share
    counts = [sum(1 for o in offsets if i / 10 <= o < (i + 1) / 10) for i in range(10)]
    assert max(counts) < 100, counts
    assert offset("alive", "c1", period) != offset("other", "c1", period)


def test_runs_stay_on_their_grid_and_skip_missed_ticks():
    assert next_run(10.0, 2.0, 10.001) == 12.0
    assert next_run(10.0, 2.0, 12.5) == 14.0  # the loop was late past one tick: skip it
    assert next_run(10.0, 2.0, 17.9) == 18.0
    assert next_run(10.0, 2.0, 18.0) == 20.0


def test_selectors_match_any_name_and_every_annotation():
    names = ["3f2a", "web-1", "default/web-1"]
    assert selects(("web-*",), (), names, {})
    assert selects(("3f*",), (), names, {})
    assert not selects(("db-*",), (), names, {})
    labels = {"io.kubernetes.container.name": "nginx", "io.kubernetes.pod.name": "web-0"}
    assert selects(("*",), (("io.kubernetes.container.name", "ngi*"),), names, labels)
    assert not selects(("*",), (("io.kubernetes.container.name", "redis"),), names, labels)
    assert not selects(("*",), (("missing", "*"),), names, labels)  # absent never matches


def test_the_probes_table_lists_unhealthy_first():
    rows = [{"probe": "alive", "container": "c1", "name": "web", "status": "healthy", "streak": 4, "runs": 9,
             "running": False, "next_in": 3.2, "changed_at": 1000.0,
             "last": {"result": "success", "exit_code": 0, "duration": 0.0012, "error": None}},
            {"probe": "alive", "container": "c2", "name": None, "status": "unhealthy", "streak": 3, "runs": 3,
             "running": True, "next_in": 0.5, "changed_at": 1030.0,
             "last": {"result": "error", "exit_code": None, "duration": 0.0001,
                      "error": {"code": "WORKER_UNAVAILABLE", "message": "x"}}},
            {"probe": "alive", "container": "c3", "name": None, "status": "unknown", "streak": 0, "runs": 0,
             "running": False, "next_in": 7.0, "changed_at": None, "last": None}]
    lines = probe_table(rows, now=1100.0).splitlines()
    assert lines[0].split() == ["PROBE", "CONTAINER", "STATUS", "LAST", "RESULT", "EXIT", "DURATION",
                                "STREAK", "RUNS", "SINCE", "NEXT"]
    assert lines[1].split() == ["alive", "c2", "unhealthy", "error", "WORKER_UNAVAILABLE*", "-", "0.1ms",
                                "3", "3", "1m10s", "0s"]
    assert lines[2].split()[:4] == ["alive", "c3", "unknown", "-"]
    assert lines[3].split() == ["alive", "web", "healthy", "success", "0", "1.2ms", "4", "9", "1m40s", "3s"]


# ---- Docker's HEALTHCHECK (the shape of `docker inspect`'s Config) ----------------------
def test_a_docker_cmd_shell_healthcheck_becomes_a_probe_with_dockers_semantics():
    config = {"Healthcheck": {"Test": ["CMD-SHELL", "cat /tmp/healthy"], "Interval": 1_000_000_000,
                              "Timeout": 2_500_000_000, "Retries": 2, "StartPeriod": 5_000_000_000},
              "Shell": None, "Image": "busybox"}
    spec = docker_spec(docker_health(config))
    assert spec.name == "docker" and spec.module.argv == ("/bin/sh", "-c", "cat /tmp/healthy")
    assert (spec.period, spec.timeout, spec.failure_threshold, spec.success_threshold, spec.start_period) == (
        1.0, 2.5, 2, 1, 5.0)
    assert spec.module.exit_codes == {0} and spec.module.capture == 4096


def test_a_docker_cmd_healthcheck_runs_its_arguments_and_shell_and_defaults_apply():
    spec = docker_spec(docker_health({"Healthcheck": {"Test": ["CMD", "/bin/check", "--quick"]}}))
    assert spec.module.argv == ("/bin/check", "--quick")
    assert (spec.period, spec.timeout, spec.failure_threshold, spec.start_period) == (30.0, 30.0, 3, 0.0)
    shell = docker_spec(docker_health({"Healthcheck": {"Test": ["CMD-SHELL", "exit 0"]},
                                       "Shell": ["/bin/bash", "-o", "pipefail", "-c"]}))
    assert shell.module.argv == ("/bin/bash", "-o", "pipefail", "-c", "exit 0")


@pytest.mark.parametrize("config", [
    {}, {"Healthcheck": None}, {"Healthcheck": {"Test": ["NONE"]}}, {"Healthcheck": {"Test": []}},
    {"Healthcheck": {"Test": ["CMD"]}}, {"Healthcheck": {"Test": "CMD-SHELL true"}},
    {"Healthcheck": {"Test": ["CMD-SHELL", 3]}},
])
def test_no_healthcheck_a_disabled_or_a_malformed_one_is_no_probe(config):
    assert docker_health(config) is None


def test_bad_durations_from_the_engine_fall_back_to_dockers_defaults():
    h = docker_health({"Healthcheck": {"Test": ["CMD", "true"], "Interval": -5, "Timeout": "1s",
                                       "Retries": True}})
    spec = docker_spec(h)
    assert (spec.period, spec.timeout, spec.failure_threshold) == (30.0, 30.0, 3)
