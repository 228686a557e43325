"""/probe and /sd on a real supervisor, probing real runc containers (issue 14).

The probe goes from the metrics thread to the loop over the loopback socket and runs in
the container's warm worker: these tests see its outcome over HTTP, its exec in the
supervisor's own metrics, its limits (BUSY) and its deadline, and that a supervisor that
served probes still stops cleanly (its loopback socket closed before its context).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from warmexec.protocol import Client

from .conftest import Supervisor, stop_cleanly, wait_for, wait_ready

MODULES = """
[probe_modules.ok]
argv = ["true"]
timeout = 2
[probe_modules.fail]
argv = ["sh", "-c", "echo not yet; exit 1"]
[probe_modules.hang]
argv = ["sleep", "30"]
timeout = 0.5
[probe_modules.long]
argv = ["sleep", "30"]
timeout = 30
[probe_modules.nobody]
argv = ["id", "-u"]
user = "nobody"
regex = "^65534$"
[probe_modules.mismatch]
argv = ["echo", "starting"]
regex = "ready"
[probe_modules.three]
argv = ["sh", "-c", "exit 3"]
exit_codes = [0, 3]
[probe_modules.chatty]
argv = ["sh", "-c", "yes | head -c 100000"]
capture = 1000
"""


def get(port: int, path: str, **params: str) -> tuple[int, str, float]:
    """(status, body, seconds) of GET path?params; a scrape timeout header if given."""
    headers = {}
    if "scrape_timeout" in params:
        headers["X-Prometheus-Scrape-Timeout-Seconds"] = params.pop("scrape_timeout")
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=40) as r:
            return r.status, r.read().decode(), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), time.monotonic() - t0


def samples(body: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def prober(box, tmp_path_factory):
    sup = Supervisor(box, str(tmp_path_factory.mktemp("probes")), MODULES)
    yield sup
    stop_cleanly(sup)  # a loopback socket left open would hang the context's end: exit != 0


@pytest.fixture(scope="module")
def target(box, prober):
    cid = box.run("probed")
    with Client(prober.endpoint) as c:
        wait_ready(c, cid)
    yield cid
    box.delete(cid)


def probe(sup: Supervisor, cid: str, module: str, **params: str) -> tuple[dict[str, float], float]:
    status, body, took = get(sup.metrics_port, "/probe", container=cid, module=module, **params)
    assert status == 200, body
    return samples(body), took


@pytest.mark.root
def test_a_passing_module_succeeds_and_a_failing_or_hanging_one_does_not(prober, target):
    ok, _ = probe(prober, target, "ok")
    assert (ok["probe_success"], ok["probe_exit_code"], ok["probe_timed_out"]) == (1, 0, 0)
    assert 0 < ok["probe_duration_seconds"] < 1
    fail, _ = probe(prober, target, "fail")
    assert (fail["probe_success"], fail["probe_exit_code"], fail["probe_timed_out"]) == (0, 1, 0)
    assert fail["probe_output_bytes{stream=stdout}"] == len("not yet\n")
    hang, took = probe(prober, target, "hang")
    assert (hang["probe_success"], hang["probe_exit_code"], hang["probe_timed_out"]) == (0, 137, 1)
    assert 0.5 <= hang["probe_duration_seconds"] and took < 2


@pytest.mark.root
def test_the_scrape_timeout_cuts_a_longer_module_short(prober, target):
    long, took = probe(prober, target, "long", scrape_timeout="1.5")
    assert long["probe_timed_out"] == 1 and long["probe_success"] == 0
    assert took < 1.5, f"answered after {took:.2f}s, past the scrape's own timeout"


@pytest.mark.root
def test_user_regex_exit_codes_and_capture_are_the_modules(prober, target):
    nobody, _ = probe(prober, target, "nobody")
    assert nobody["probe_success"] == 1 and nobody["probe_output_matched"] == 1
    miss, _ = probe(prober, target, "mismatch")
    assert (miss["probe_success"], miss["probe_exit_code"], miss["probe_output_matched"]) == (0, 0, 0)
    three, _ = probe(prober, target, "three")
    assert (three["probe_success"], three["probe_exit_code"]) == (1, 3)
    chatty, _ = probe(prober, target, "chatty")
    assert chatty["probe_output_bytes{stream=stdout}"] == 1000 and chatty["probe_output_truncated"] == 1


@pytest.mark.root
def test_an_unknown_container_module_or_query_is_a_4xx_at_once(prober, target):
    port = prober.metrics_port
    for params, code, words in [
        ({"container": "no-such-container", "module": "ok"}, 404, "NO_SUCH_CONTAINER"),
        ({"container": target, "module": "nope"}, 400, "unknown module 'nope'; known: chatty, fail"),
        ({"container": target}, 400, "unknown module"),
        ({"module": "ok"}, 400, "container="),
        ({"container": "x" * 2000, "module": "ok"}, 400, "container="),
        ({"container": target, "module": "ok", "scrape_timeout": "soon"}, 400, "Scrape-Timeout"),
    ]:
        status, body, took = get(port, "/probe", **params)
        assert (status, took < 1) == (code, True) and words in body, (params, status, body)
    # a unique prefix of the id names the container, as for any exec
    assert probe(prober, target[:-1], "ok")[0]["probe_success"] == 1


@pytest.mark.root
def test_a_probe_is_an_exec_like_any_other_counted_in_the_supervisors_metrics(prober, target):
    def failed_execs() -> float:
        status, body, _ = get(prober.metrics_port, "/metrics")
        return samples(body).get(f"warmexec_exec_exits_total{{code=1}}{{container={target}}}"
                                 "{namespace=}{pod=}", 0)
    before = failed_execs()
    probe(prober, target, "fail")
    assert failed_execs() == before + 1


@pytest.mark.root
def test_a_probe_past_the_in_flight_limit_is_busy_not_queued(box, tmp_path):
    sup = Supervisor(box, str(tmp_path), MODULES + "[limits]\nmax_inflight_per_container = 1\n")
    cid = box.run("probe-busy")
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, cid)
            rid = c.submit("exec", container=cid, argv=["sleep", "3"])  # the container's one slot
            wait_for(lambda: "warmexec_exec_inflight 1.0" in get(sup.metrics_port, "/metrics")[1], 5,
                     "the client's exec to be in flight")
            busy, took = probe(sup, cid, "ok")
            assert busy["probe_success"] == 0 and busy["probe_error_info{code=BUSY}"] == 1 and took < 1
            assert c.result(rid, 10)["exit_code"] == 0
        assert probe(sup, cid, "ok")[0]["probe_success"] == 1
    finally:
        box.delete(cid)
        stop_cleanly(sup)


@pytest.mark.root
def test_sd_lists_every_served_container_and_follows_them(box, prober, target):
    other = box.run("probe-sd")
    with Client(prober.endpoint) as c:
        wait_ready(c, other)

    def listed() -> dict[str, dict]:
        status, body, _ = get(prober.metrics_port, "/sd")
        assert status == 200
        return {g["targets"][0]: g["labels"] for g in json.loads(body)}
    groups = listed()
    assert {target, other} <= set(groups)
    assert groups[other]["__meta_warmexec_container_id"] == other
    assert groups[other]["__meta_warmexec_engine"] == "runc"
    assert groups[other]["__meta_warmexec_state"] == "READY"
    box.delete(other)
    wait_for(lambda: other not in listed(), 10, "the deleted container to leave /sd")
