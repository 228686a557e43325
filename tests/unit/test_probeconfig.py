"""Probe modules from the config, how a module judges an exec's reply, /probe's text and
/sd's groups: pure logic, no container (tests/system/test_probe.py runs them for real)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from warmexec.supervisor import exporter
from warmexec.supervisor.config import ConfigError, load_config
from warmexec.supervisor.probeconfig import ProbeModule, parse_modules, succeeded


def _modules(toml: str, tmp_path) -> dict[str, ProbeModule]:
    path = tmp_path / "warmexec.toml"
    path.write_text(toml)
    return load_config(str(path)).probe_modules


def test_a_module_from_the_config_file(tmp_path):
    mods = _modules('[probe_modules.alive]\nargv = ["cat", "/tmp/ok"]\ntimeout = 2\nuser = "nobody"\n'
                    'exit_codes = [0, 3]\nregex = "^ok"\ncapture = 100\n'
                    '[probe_modules.bare]\nargv = ["true"]\n', tmp_path)
    alive = mods["alive"]
    assert (alive.argv, alive.timeout, alive.user, alive.exit_codes, alive.capture) == (
        ("cat", "/tmp/ok"), 2.0, "nobody", frozenset((0, 3)), 100)
    assert alive.regex.search(b"x\nok\n")  # multiline: any line may start with it
    bare = mods["bare"]
    assert (bare.timeout, bare.user, bare.exit_codes, bare.regex, bare.capture) == (
        5.0, None, frozenset((0,)), None, 4096)


@pytest.mark.parametrize("body, words", [
    ("", "argv must be a non-empty list"),
    ('argv = []', "argv must be a non-empty list"),
    ('argv = ["true", 3]', "argv must be a non-empty list"),
    ('argv = [""]', "argv must be a non-empty list"),
    ('argv = ["true"]\ntimeout = 0', "timeout must be in (0,"),
    ('argv = ["true"]\ntimeout = "5s"', "timeout must be a number"),
    ('argv = ["true"]\ntimeout = true', "timeout must be a number"),
    ('argv = ["true"]\ntimeout = inf', "timeout must be a number"),
    ('argv = ["true"]\nexit_codes = [256]', "exit_codes must be"),
    ('argv = ["true"]\nexit_codes = []', "exit_codes must be"),
    ('argv = ["true"]\nregex = "("', "regex:"),
    ('argv = ["true"]\ncapture = -1', "capture must be"),
    ('argv = ["true"]\nuser = ""', "user must be"),
    ('argv = ["true"]\ntimout = 3', "unknown key 'timout'"),
])
def test_a_bad_module_is_refused_with_its_name_and_the_file(tmp_path, body, words):
    path = tmp_path / "warmexec.toml"
    path.write_text(f"[probe_modules.m1]\n{body}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(path) in str(e.value) and "probe_modules.m1" in str(e.value) and words in str(e.value)


def test_a_module_name_must_fit_in_a_url():
    with pytest.raises(ValueError, match="module name"):
        parse_modules({"a b": {"argv": ["true"]}})
    with pytest.raises(ValueError, match="table"):
        parse_modules(["x"])


def test_success_is_an_accepted_exit_code_in_time_with_the_regex_found():
    m = parse_modules({"m": {"argv": ["x"], "exit_codes": [0, 2], "regex": "ready"}})["m"]
    ok = {"ok": True, "exit_code": 0, "timed_out": False, "stdout": b"all ready\n"}
    assert succeeded(m, ok)
    assert succeeded(m, {**ok, "exit_code": 2})
    assert not succeeded(m, {**ok, "exit_code": 1})
    assert not succeeded(m, {**ok, "timed_out": True})
    assert not succeeded(m, {**ok, "stdout": b"starting\n"})


@pytest.mark.parametrize("module_timeout, header, expected", [
    (5.0, None, 5.0),  # no scrape timeout given: the module's
    (5.0, "10", 5.0),  # the module's is shorter
    (5.0, "2", 2 - exporter.SCRAPE_MARGIN),  # the scrape's, less the answer's margin
    (5.0, "0.4", 0.2),  # too short for the margin: half of it
])
def test_the_deadline_is_the_shorter_of_the_modules_and_the_scrapes(module_timeout, header, expected):
    assert exporter.deadline(module_timeout, header) == pytest.approx(expected)


@pytest.mark.parametrize("header", ["", "abc", "0", "-1", "nan", "inf"])
def test_a_bad_scrape_timeout_header_is_refused(header):
    with pytest.raises(ValueError, match="X-Prometheus-Scrape-Timeout-Seconds"):
        exporter.deadline(5.0, header)


def _samples(body: bytes) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_probe_text_of_a_command_that_ran():
    m = parse_modules({"m": {"argv": ["x"], "regex": "^up$"}})["m"]
    reply = {"ok": True, "exit_code": 0, "timed_out": False, "stdout": b"up\n", "stderr": b"w",
             "truncated": True}
    assert _samples(exporter.probe_text(m, reply, 0.25)) == {
        "probe_success": 1, "probe_duration_seconds": 0.25, "probe_exit_code": 0, "probe_timed_out": 0,
        "probe_output_bytes{stream=stdout}": 3, "probe_output_bytes{stream=stderr}": 1,
        "probe_output_truncated": 1, "probe_output_matched": 1}


def test_probe_text_of_a_command_that_could_not_run():
    m = parse_modules({"m": {"argv": ["x"]}})["m"]
    reply = {"ok": False, "error": {"code": "BUSY", "message": "in-flight limit"}}
    samples = _samples(exporter.probe_text(m, reply, 0.001))
    assert samples["probe_success"] == 0 and samples["probe_exit_code"] == -1
    assert samples["probe_error_info{code=BUSY}"] == 1


def test_sd_groups_are_one_per_container_with_string_labels():
    rows = [{"id": "abc", "name": "web", "engine": "docker", "pod": None, "namespace": None,
             "image": "nginx:1", "containerd_namespace": None, "state": "READY"},
            {"id": "def", "name": None, "engine": "cri", "pod": "p-0", "namespace": "ns",
             "image": None, "containerd_namespace": "k8s.io", "state": "BACKOFF"}]
    groups = exporter.sd_groups(rows)
    assert [g["targets"] for g in groups] == [["abc"], ["def"]]
    assert groups[0]["labels"]["__meta_warmexec_container_name"] == "web"
    assert groups[1]["labels"]["__meta_warmexec_container_name"] == "def"  # no name: its id
    assert groups[1]["labels"]["__meta_warmexec_pod"] == "p-0"
    assert groups[1]["labels"]["__meta_warmexec_containerd_namespace"] == "k8s.io"
    assert all(isinstance(v, str) for g in groups for v in g["labels"].values())
    assert groups[0]["labels"]["__meta_warmexec_pod"] == ""
