"""docs/PROBES.md's config and scrape job, as they are, with Debian's real Prometheus.

The supervisor runs the documented TOML (its metrics address given by the test's flag,
which wins over the file's); Prometheus runs the documented scrape job with only the
address replaced. It must discover the containers through /sd and probe each through
/probe: probe_success 1 for a healthy container, 0 for a failing one and 0 (timed out)
for one whose probe hangs, read back from Prometheus's own API.
"""

from __future__ import annotations

import os
import re

import pytest

from warmexec.protocol import Client

from .conftest import REPO, Supervisor, stop_cleanly, wait_for, wait_ready
from .test_prometheus import Prometheus

DOC = os.path.join(REPO, "docs", "PROBES.md")
DOC_ADDRESS = "127.0.0.1:9750"


def documented(lang: str) -> str:
    """The fenced block of lang that follows a "test_probe_prometheus.py runs" marker."""
    with open(DOC) as f:
        text = f.read()
    m = re.search(r"<!-- the (?:scrape )?config test_probe_prometheus\.py runs[^>]*-->\n```" + lang
                  + r"\n(.*?)```", text, re.S)
    assert m, f"no marked {lang} block in {DOC}"
    return m.group(1)


@pytest.mark.root
def test_prometheus_discovers_and_probes_every_container_with_the_documented_job(box, tmp_path):
    sup = Supervisor(box, str(tmp_path / "sup"), documented("toml"))
    healthy, failing, hanging = (box.run(n) for n in ("probe-healthy", "probe-failing", "probe-hanging"))
    prom = None
    try:
        with Client(sup.endpoint) as c:
            for cid in (healthy, failing, hanging):
                wait_ready(c, cid)
        assert box.exec(healthy, ["sh", "-c", "echo ok > /tmp/healthy"]).returncode == 0
        assert box.exec(hanging, ["mkfifo", "/tmp/healthy"]).returncode == 0  # cat waits on it
        job = documented("yaml")
        assert job.count(DOC_ADDRESS) == 2  # the /sd URL and the probes' __address__
        job = job.replace(DOC_ADDRESS, f"127.0.0.1:{sup.metrics_port}")
        scrape_configs = job.split("scrape_configs:\n", 1)[1]
        os.makedirs(tmp_path / "prom")
        prom = Prometheus(str(tmp_path / "prom"), sup.metrics_port, scrape_configs)

        def outcomes() -> dict[str, dict] | None:
            got: dict[str, dict] = {}
            for metric in ("probe_success", "probe_timed_out", "up"):
                for sample in prom.query(f'{metric}{{job="warmexec-probe"}}')["result"]:
                    labels = sample["metric"]
                    got.setdefault(labels.get("container", ""), {"labels": labels})[metric] = \
                        float(sample["value"][1])
            mine = {cid: got.get(cid, {}) for cid in (healthy, failing, hanging)}
            done = all("probe_success" in o and "probe_timed_out" in o for o in mine.values())
            return mine if done else None
        seen = wait_for(outcomes, 30, "Prometheus to probe the three containers")
        assert (seen[healthy]["probe_success"], seen[healthy]["probe_timed_out"]) == (1, 0)
        assert (seen[failing]["probe_success"], seen[failing]["probe_timed_out"]) == (0, 0)
        assert (seen[hanging]["probe_success"], seen[hanging]["probe_timed_out"]) == (0, 1)
        for cid, o in seen.items():
            assert o["up"] == 1  # each probe answered in time, within the scrape's 1 s
            assert o["labels"]["instance"] == cid  # runc containers have no other name
            assert o["labels"]["engine"] == "runc"
    finally:
        if prom is not None:
            prom.stop()
        for cid in (healthy, failing, hanging):
            box.delete(cid)
        stop_cleanly(sup)
