"""Scheduled probes ([[probes]]) against real runc containers (issue 14).

Thresholds, transitions, events and hooks; the initial delay; no two runs of a probe at
once and timeouts; spreading over the period; selectors; the budget that keeps client
execs their room; `warmexec probes`. Each test runs a supervisor of its own with its own
probes, selecting only its own containers (the session's box holds others).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from warmexec.protocol import Client
from warmexec.supervisor.probestate import offset

from .conftest import Supervisor, stop_cleanly, wait_for, wait_ready, warmexec_cli
from .test_events import Subscriber

pytestmark = pytest.mark.root

HOOK = """import json, os, sys
doc = json.load(sys.stdin)
with open(os.path.join(sys.argv[1], "%s-%s.json" % (doc["container"], doc["last"]["time"])), "w") as f:
    json.dump(doc, f)
"""


@contextmanager
def probing(box, tmp_path, config: str, *names: str, events: bool = False,
            before: bool = False) -> Iterator[tuple[Supervisor, list[str]]]:
    """A supervisor with config and containers named names (started before the
    supervisor if before), all warm; everything cleaned up after."""
    cids: list[str] = []
    sup = None
    try:
        if before:
            cids = [box.run(n) for n in names]
        if events:
            config = f'events = "ipc://{tmp_path}/events.sock"\n' + config
        sup = Supervisor(box, str(tmp_path), config)
        if not before:
            cids = [box.run(n) for n in names]
        with Client(sup.endpoint) as c:
            for cid in cids:
                wait_ready(c, cid)
        yield sup, cids
    finally:
        for cid in cids:
            box.delete(cid)
        if sup is not None:
            stop_cleanly(sup)


def rows(sup: Supervisor) -> list[dict]:
    with Client(sup.endpoint) as c:
        return c.call("probes")["probes"]


def row(sup: Supervisor, cid: str, probe: str | None = None) -> dict | None:
    return next((r for r in rows(sup) if r["container"] == cid and probe in (None, r["probe"])), None)


def until(sup: Supervisor, cid: str, test, what: str, probe: str | None = None, timeout: float = 15) -> dict:
    """Wait until the probe's row in cid exists and passes test; return it."""
    return wait_for(lambda: (r := row(sup, cid, probe)) is not None and test(r) and r, timeout, what)


def metric(sup: Supervisor, name: str, default: float | None = 0.0, **labels: str) -> float | None:
    """The first sample of name with labels; default if there is none."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{sup.metrics_port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return default


def test_thresholds_transitions_events_and_hooks(box, tmp_path):
    hook_dir = tmp_path / "hooked"
    hook_dir.mkdir()
    (tmp_path / "hook.py").write_text(HOOK)
    config = f"""
[[probes]]
name = "file"
argv = ["cat", "/tmp/healthy"]
containers = ["*-sched-thr"]
period = 0.2
timeout = 1
failure_threshold = 3
success_threshold = 2
hook = ["{sys.executable}", "{tmp_path / 'hook.py'}", "{hook_dir}"]
"""
    with probing(box, tmp_path, config, "sched-thr", events=True) as (sup, (cid,)):
        sub = Subscriber(f"ipc://{tmp_path}/events.sock")
        try:
            first = until(sup, cid, lambda r: r["status"] == "unhealthy", "unhealthy")
            assert first["last"]["result"] == "failure" and first["last"]["exit_code"] == 1
            assert "No such file" in first["last"]["output"]
            assert metric(sup, "warmexec_probe_healthy", container=cid) == 0
            assert metric(sup, "warmexec_probe_success", container=cid) == 0
            box.exec(cid, ["sh", "-c", "echo ok > /tmp/healthy"])
            until(sup, cid, lambda r: r["status"] == "healthy", "healthy")
            assert metric(sup, "warmexec_probe_healthy", container=cid) == 1
            assert metric(sup, "warmexec_probe_transitions_total", container=cid, to="unhealthy") == 1
            assert metric(sup, "warmexec_probe_transitions_total", container=cid, to="healthy") == 1
            assert metric(sup, "warmexec_probe_results_total", container=cid, result="failure") >= 3
            assert metric(sup, "warmexec_probe_duration_seconds_count", probe="file") >= 5
            wait_for(lambda: len(list(hook_dir.iterdir())) >= 2, 10, "both hooks to run")
            docs = sorted((json.loads(p.read_text()) for p in hook_dir.iterdir()),
                          key=lambda d: d["last"]["time"])
            # each change came with the threshold's result, not one before or after
            assert [(d["previous"], d["status"], d["streak"]) for d in docs] == [
                ("unknown", "unhealthy", 3), ("unhealthy", "healthy", 2)]
            assert docs[0]["argv"] == ["cat", "/tmp/healthy"] and docs[0]["event"] == "probe.changed"
            # the subscriber may have joined after the first changes: a third must reach it
            box.exec(cid, ["rm", "/tmp/healthy"])
            changed = wait_for(lambda: [e for e in sub.topic("probe.changed")
                                        if e["container"] == cid and e["previous"] == "healthy"], 10,
                               "a probe.changed event")
            event = changed[0]
            assert (event["status"], event["probe"], event["streak"]) == ("unhealthy", "file", 3)
        finally:
            sub.sock.close()


def test_no_run_before_the_initial_delay(box, tmp_path):
    config = """
[[probes]]
name = "late"
argv = ["true"]
containers = ["*-sched-delay"]
initial_delay = 2
period = 0.2
"""
    with probing(box, tmp_path, config) as (sup, _):
        t0 = time.monotonic()
        cid = box.run("sched-delay")
        try:
            seen = wait_for(lambda: row(sup, cid), 5, "the probe to be scheduled")
            assert seen["runs"] == 0 and seen["status"] == "unknown"
            assert metric(sup, "warmexec_probe_success", None, container=cid) is None  # before a run
            until(sup, cid, lambda r: r["runs"] >= 1, "the first run")
            assert time.monotonic() - t0 >= 2, "ran before its initial delay"
        finally:
            box.delete(cid)


def test_a_probe_outlasting_its_period_never_overlaps_and_a_hang_times_out(box, tmp_path):
    # mkdir fails if another run holds the lock: an overlap would be a failure
    config = """
[[probes]]
name = "slow"
argv = ["sh", "-c", "mkdir /tmp/lock || exit 9; sleep 0.6; rmdir /tmp/lock"]
containers = ["*-sched-slow"]
period = 0.2
timeout = 5
[[probes]]
name = "hang"
argv = ["sleep", "60"]
containers = ["*-sched-slow"]
period = 0.5
timeout = 0.3
"""
    with probing(box, tmp_path, config, "sched-slow") as (sup, (cid,)):
        until(sup, cid, lambda r: r["runs"] >= 3, "three runs of the slow probe", "slow")
        assert metric(sup, "warmexec_probe_results_total", probe="slow", result="failure") == 0
        assert metric(sup, "warmexec_probe_results_total", probe="slow", result="success") >= 3
        assert metric(sup, "warmexec_probe_skipped_total", probe="slow", reason="running") >= 3
        until(sup, cid, lambda r: r["runs"] >= 2, "two runs of the hanging probe", "hang")
        hang = row(sup, cid, "hang")
        assert hang["last"]["result"] == "timeout" and hang["last"]["exit_code"] == 137
        assert hang["last"]["duration"] < 1.5
        assert metric(sup, "warmexec_probe_results_total", probe="hang", result="timeout") >= 2


def test_runs_are_spread_over_the_period_by_their_offsets(box, tmp_path):
    names = [f"sched-spread-{i}" for i in range(5)]
    config = """
[[probes]]
name = "spread"
argv = ["true"]
containers = ["*-sched-spread-*"]
period = 2
"""
    # Started before the supervisor: its first match sees all five at once, so each first
    # run comes its own offset after that moment.
    with probing(box, tmp_path, config, *names, before=True) as (sup, cids):
        def all_ran() -> list[dict] | None:
            rs = [row(sup, c) for c in cids]
            return rs if all(r and r["runs"] for r in rs) else None
        firsts = wait_for(all_ran, 10, "a run in every container")
        times = [r["last"]["time"] - r["last"]["duration"] for r in firsts]
        offsets = [offset("spread", c, 2.0) for c in cids]
        base = min(t - o for t, o in zip(times, offsets))
        for t, o, c in zip(times, offsets, cids):
            assert abs((t - base) - o) < 0.15, f"{c} ran at +{t - base:.3f}s, its offset is {o:.3f}s"


def test_selectors_pick_containers_by_name_glob_and_annotation(box, tmp_path):
    cfg = box.config()
    cfg["annotations"] = {"io.kubernetes.container.name": "nginx"}
    config = """
[[probes]]
name = "by-annotation"
argv = ["true"]
containers = ["*-sched-sel-*"]
annotations = { "io.kubernetes.container.name" = "ngin*" }
period = 0.3
"""
    with probing(box, tmp_path, config, "sched-sel-plain") as (sup, (plain,)):
        tagged = box.run("sched-sel-nginx", cfg)
        outside = box.run("sched-other-nginx", cfg)
        try:
            wait_for(lambda: row(sup, tagged), 10, "the annotated container to be probed")
            assert row(sup, plain) is None and row(sup, outside) is None
        finally:
            box.delete(tagged)
            box.delete(outside)
        wait_for(lambda: row(sup, tagged) is None, 10, "the probe to go with its container")
        assert metric(sup, "warmexec_probe_results_total", container=tagged) == 0  # series removed


def test_the_budget_keeps_room_for_client_execs(box, tmp_path):
    # Four containers' probes each hold an exec for 2 s; the supervisor takes 3 execs in
    # all. Without the budget of 2 the probes would fill all 3 and the client get BUSY.
    config = """
[limits]
max_inflight = 3
max_probes_inflight = 2
[[probes]]
name = "hog"
argv = ["sleep", "2"]
containers = ["*-sched-hog-*"]
period = 0.2
timeout = 5
"""
    with probing(box, tmp_path, config, *[f"sched-hog-{i}" for i in range(4)]) as (sup, cids):
        wait_for(lambda: metric(sup, "warmexec_probe_skipped_total", probe="hog", reason="budget") >= 5, 10,
                 "probes to be held back by the budget")
        with Client(sup.endpoint) as c:
            for _ in range(5):
                assert c.exec(cids[0], ["true"])["exit_code"] == 0  # never BUSY
        assert sum(1 for r in rows(sup) if r["running"]) <= 2


def test_warmexec_probes_prints_a_table(box, tmp_path):
    config = """
[[probes]]
name = "table"
argv = ["sh", "-c", "exit 4"]
containers = ["*-sched-cli"]
period = 0.2
failure_threshold = 1
"""
    with probing(box, tmp_path, config, "sched-cli") as (sup, (cid,)):
        until(sup, cid, lambda r: r["status"] == "unhealthy", "unhealthy")
        r = warmexec_cli(sup, command="probes")
        assert r.code == 0, r.stderr
        header, line = r.stdout.splitlines()[:2]
        assert header.split()[:3] == ["PROBE", "CONTAINER", "STATUS"]
        assert line.split()[:5] == ["table", cid, "unhealthy", "failure", "4"]
        js = warmexec_cli(sup, "--json", command="probes")
        assert json.loads(js.stdout)[0]["container"] == cid
